"""The PyTorch peers (imported only inside the worker process; never imports JAX).

- ``torch``: ``F.linear`` forward, the same loss ``sum(Y ⊙ C)``, and
  ``torch.autograd.grad`` w.r.t. ``(weight, bias, x)`` (the analogue of
  ``value_and_grad`` w.r.t. ``(params, x)``); for an MLP, ``nn.Sequential`` of
  ``nn.Linear``/``nn.ReLU`` with an SGD step.
- ``torch_gemm``: one ``(n, d_in) @ (d_in, d_out)`` GEMM, for the per-GEMM comparison.

bfloat16 cases run under ``torch.autocast`` (bfloat16 matmuls, float32 params and
gradients), which is jaxlinear's ``compute_dtype`` policy. On CUDA every call ends with
``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from benchmarks.cases import LEARNING_RATE, Case, make_data

LAYER_IMPLS = ("torch", "torch_gemm")
MLP_IMPLS = ("torch",)


def available() -> str | None:
    """``None`` if PyTorch can run here, else why it is skipped."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (CPU build: pip install torch==2.13.0)"
    return None


def setup(device: str, precision: str | None) -> dict:
    """Configure PyTorch for ``device`` ("cpu" or "gpu"); return its description.

    ``precision`` follows JAX's matmul precision for float32: ``None`` (JAX's default,
    which is TF32 on recent NVIDIA GPUs) maps to ``set_float32_matmul_precision("high")``
    and ``"highest"`` to ``"highest"``; on CPU it changes nothing.
    """
    import torch

    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device here")
    torch.set_float32_matmul_precision("highest" if precision == "highest" else "high")
    desc = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device == "gpu":
        desc["torch_device"] = torch.cuda.get_device_name(0)
    return desc


def _saved_bytes(fn) -> tuple[int, list[str]]:
    """Bytes of the distinct tensors autograd saves for the backward pass while ``fn()`` runs."""
    import torch

    seen: dict[tuple, tuple[int, str]] = {}

    def pack(t):
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        desc = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
        seen[key] = (t.numel() * t.element_size(), desc)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for n, _ in seen.values()), [d for _, d in seen.values()]


def prepare(impl: str, case: Case, device: str, seed: int = 0) -> tuple[Callable[[], None], dict]:
    """Build ``impl`` on ``case``; return ``(call, info)`` as ``jax_impls.prepare`` does."""
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    bf16 = case.dtype == "bfloat16"
    data = make_data(case, seed)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def tensor(a, grad=False):
        return torch.tensor(a, device=dev).requires_grad_(grad)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    info: dict = {"compile_s": None}
    if impl == "torch_gemm":
        dt = torch.bfloat16 if bf16 else torch.float32
        a = tensor(data["x"].reshape(case.rows, case.d_in)).to(dt)  # (n, d_in)
        w = tensor(data["layers"][0][0]).to(dt)  # (d_in, d_out)

        def run():
            a @ w

    elif case.kind == "layer":
        W, b = data["layers"][0]
        w, bias = tensor(W.T.copy(), True), tensor(b, True)  # w: (d_out, d_in)
        x, c = tensor(data["x"], True), tensor(data["cotangent"])

        def forward():
            with autocast():
                return F.linear(x, w, bias)

        def run():
            loss = (forward().float() * c).sum()
            torch.autograd.grad(loss, (w, bias, x))

        info["residual_bytes"], info["residuals"] = _saved_bytes(forward)
    else:
        mods = []
        for i, (W, b) in enumerate(data["layers"]):
            lin = torch.nn.Linear(*W.shape, device=dev)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W.T.copy()))
                lin.bias.copy_(torch.from_numpy(b))
            mods.append(lin)
            if i < len(data["layers"]) - 1:
                mods.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*mods)
        opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, foreach=True)
        x, target = tensor(data["x"]), tensor(data["target"])

        def forward():
            with autocast():
                return model(x)

        def run():
            opt.zero_grad(set_to_none=True)
            loss = (forward().float() - target).square().mean()
            loss.backward()
            opt.step()

        info["residual_bytes"], info["residuals"] = _saved_bytes(forward)

    def call():
        run()
        sync()

    call()
    return call, info
