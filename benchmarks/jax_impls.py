"""The JAX implementations: jaxlinear's two bindings, plain JAX AD, Flax, Equinox, one GEMM.

Each is built the way its users write it, then wrapped identically: a fixed scalar
loss ``sum(Y ⊙ C)`` (in float32, ``C`` a fixed array, so the cotangent is ``G = C`` and
the loss adds one fused multiply-reduce, not a pass of its own over ``G``),
``jax.value_and_grad`` w.r.t. ``(params, x)``, ``jax.jit``. An MLP case is a whole
training step instead: forward, mean-squared-error loss, backward, SGD update.

``prepare(impl, case)`` returns ``(call, info)``: ``call()`` runs one step and blocks
until every output is ready; ``info`` holds the compile time, the residuals saved for
the backward pass (``saved_residuals`` of the forward function) and the library calls
XLA chose (from the optimized HLO).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

import jaxlinear
from benchmarks.cases import LEARNING_RATE, Case, make_data

LAYER_IMPLS = ("linear", "dual_linear", "plain", "flax", "equinox", "gemm")
MLP_IMPLS = ("linear", "dual_linear", "plain", "flax", "equinox")
_NEEDS = {"flax": "flax", "equinox": "equinox"}


def available() -> dict[str, str | None]:
    """``impl -> None`` if it can run here, else the reason it is skipped."""
    out: dict[str, str | None] = {}
    for impl in LAYER_IMPLS:
        module = _NEEDS.get(impl)
        if impl == "dual_linear" and getattr(jaxlinear, "dual_linear", None) is None:
            out[impl] = "this jaxlinear has no dual_linear"
        elif module and importlib.util.find_spec(module) is None:
            out[impl] = f"{module} is not installed (pip install 'jaxlinear[bench]')"
        else:
            out[impl] = None
    return out


def versions() -> dict[str, str]:
    """Versions of the JAX-side peers that are importable."""
    v = {"jax": jax.__version__, "jaxlinear": jaxlinear.__version__}
    for name in ("jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "equinox"):
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return v


def _compute_dtype(case: Case):
    return None if case.dtype == "float32" else jnp.dtype(case.dtype)


# ----------------------------------------------------------------------------------------
# One layer: apply(params, x) -> Y for each implementation, with its params pytree.


def _layer_jaxlinear(fn_name: str, case: Case, W, b):
    fn = getattr(jaxlinear, fn_name)
    cd = _compute_dtype(case)
    return (lambda p, x: fn(p, x, compute_dtype=cd)), jaxlinear.Params(W, b)


def _plain_affine(x, W, b, cd):
    """``x @ W + b`` as a user writes it; in bfloat16 with float32 accumulation if ``cd``."""
    if cd is None:
        return x @ W + b  # (..., d_in) @ (d_in, d_out) + (d_out,)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    y = lax.dot_general(x.astype(cd), W.astype(cd), dims, preferred_element_type=jnp.float32)
    return (y + b).astype(cd)


def _layer_plain(case: Case, W, b):
    cd = _compute_dtype(case)
    return (lambda p, x: _plain_affine(x, p[0], p[1], cd)), (W, b)


def _flax_dense(case: Case, d_out: int):
    import flax.linen as nn

    cd = _compute_dtype(case)
    return nn.Dense(d_out, dtype=cd or jnp.float32, param_dtype=jnp.float32)


def _layer_flax(case: Case, W, b):
    model = _flax_dense(case, case.d_out)
    return model.apply, {"params": {"kernel": W, "bias": b}}


def _eqx_linear(W, b):
    """An ``equinox.nn.Linear`` holding ``W.T: (d_out, d_in)`` and ``b``."""
    import equinox as eqx

    d_in, d_out = W.shape
    lin = eqx.nn.Linear(d_in, d_out, key=jax.random.key(0))
    return eqx.tree_at(lambda m: (m.weight, m.bias), lin, (W.T, b))


def _eqx_call(model, x, cd):
    """Apply a per-example Equinox model to ``x: (..., d_in)``, one ``vmap`` per leading axis."""
    if cd is not None:
        model = jax.tree.map(lambda a: a.astype(cd), model)
        x = x.astype(cd)
    f = model
    for _ in range(x.ndim - 1):
        f = jax.vmap(f)
    return f(x)


def _layer_equinox(case: Case, W, b):
    cd = _compute_dtype(case)
    return (lambda m, x: _eqx_call(m, x, cd)), _eqx_linear(W, b)


# ----------------------------------------------------------------------------------------
# An MLP: apply(params, x) -> Y for each implementation.


def _relu_chain(layer_fns, x):
    for i, f in enumerate(layer_fns):
        x = f(x)
        if i < len(layer_fns) - 1:
            x = jax.nn.relu(x)
    return x


def _mlp_jaxlinear(fn_name: str, case: Case, layers):
    fn = getattr(jaxlinear, fn_name)
    cd = _compute_dtype(case)
    params = [jaxlinear.Params(W, b) for W, b in layers]
    return (lambda ps, x: jaxlinear.mlp(ps, x, layer=fn, compute_dtype=cd)), params


def _mlp_plain(case: Case, layers):
    cd = _compute_dtype(case)

    def apply(ps, x):
        return _relu_chain([lambda h, W=W, b=b: _plain_affine(h, W, b, cd) for W, b in ps], x)

    return apply, list(layers)


def _mlp_flax(case: Case, layers):
    import flax.linen as nn

    sizes = case.sizes

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _relu_chain([_flax_dense(case, d) for d in sizes[1:]], x)

    params = {f"Dense_{i}": {"kernel": W, "bias": b} for i, (W, b) in enumerate(layers)}
    return MLP().apply, {"params": params}


def _mlp_equinox(case: Case, layers):
    cd = _compute_dtype(case)
    model = tuple(_eqx_linear(W, b) for W, b in layers)  # a tuple of eqx.nn.Linear

    def apply(m, x):
        return _relu_chain([lambda h, lin=lin: _eqx_call(lin, h, cd) for lin in m], x)

    return apply, model


_LAYER_BUILDERS: dict[str, Callable] = {
    "linear": lambda case, W, b: _layer_jaxlinear("linear", case, W, b),
    "dual_linear": lambda case, W, b: _layer_jaxlinear("dual_linear", case, W, b),
    "plain": _layer_plain,
    "flax": _layer_flax,
    "equinox": _layer_equinox,
}
_MLP_BUILDERS: dict[str, Callable] = {
    "linear": lambda case, layers: _mlp_jaxlinear("linear", case, layers),
    "dual_linear": lambda case, layers: _mlp_jaxlinear("dual_linear", case, layers),
    "plain": _mlp_plain,
    "flax": _mlp_flax,
    "equinox": _mlp_equinox,
}


# ----------------------------------------------------------------------------------------
# Residuals, compile time, library calls.


def _saved_residuals(f, *args):
    """``jax.ad_checkpoint.saved_residuals`` (public in some JAX versions, private in others)."""
    import jax.ad_checkpoint

    fn = getattr(jax.ad_checkpoint, "saved_residuals", None)
    if fn is None:
        from jax._src import ad_checkpoint

        fn = ad_checkpoint.saved_residuals
    return fn(f, *args)


def residuals(apply, params, x) -> dict:
    """The arrays JAX keeps from the forward pass of ``apply(params, x)`` for its backward pass."""
    try:
        saved = _saved_residuals(apply, params, x)
    except Exception as e:  # a private API: report, never fail the run
        why = f"unavailable: {type(e).__name__}: {e}"
        return {"residual_bytes": None, "residual_bytes_new": None, "residuals": [why]}
    items = []
    for aval, src in saved:
        nbytes = math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
        where = src.split(" from /")[0].split(" from <")[0]  # drop file paths
        items.append((nbytes, where.startswith("from the argument"), f"{aval.str_short()} {where}"))
    return {
        "residual_bytes": sum(n for n, _, _ in items),
        # arrays made by the forward pass (arguments such as W are alive anyway)
        "residual_bytes_new": sum(n for n, arg, _ in items if not arg),
        "residuals": [d for _, _, d in items],
    }


_LIBRARY_CALL = re.compile(r'"kind":"(__\w+)"|custom_call_target="([^"]+)"')


def _library_calls(hlo_text: str) -> list[str]:
    """Library fusions/custom calls in optimized HLO (e.g. ``__ynn_fusion``), with counts."""
    counts: dict[str, int] = {}
    for m in _LIBRARY_CALL.finditer(hlo_text):
        name = m.group(1) or m.group(2)
        counts[name] = counts.get(name, 0) + 1
    entry = hlo_text[hlo_text.find("\nENTRY") :]
    dots = len(re.findall(r"= \S+ dot\(", entry[: entry.find("\n}")]))
    if dots:
        counts["dot (Eigen)"] = dots  # dots left to XLA's own runtime, not fused into a library
    return [f"{k}×{v}" for k, v in sorted(counts.items())]


def program_fingerprint(hlo_text: str) -> str:
    """A hash of optimized HLO with metadata dropped and every name canonicalized.

    Two implementations with equal fingerprints run the same program (same instructions,
    operands and layouts), whatever their parameters and instructions are called.
    """
    body = hlo_text[hlo_text.find("\n%") :]
    body = re.sub(r"(, metadata=\{[^}]*\}|stack_frame_id=\d+)", "", body)
    names: dict[str, str] = {}
    body = re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), body)
    body = re.sub(r"([(,] ?)[\w.]+: ", r"\1p: ", body)  # parameter names in signatures
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def _compile(step, args) -> dict:
    """Trace + lower + compile ``step`` once (JAX caches it for the timed calls).

    Returns the seconds it took, the library calls in the optimized HLO, and the
    program's fingerprint (``program_fingerprint``).
    """
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    info = {"compile_s": time.perf_counter() - t0, "library_calls": [], "hlo_hash": None}
    try:
        text = compiled.as_text()
    except Exception:  # as_text is best effort on some backends
        return info
    info["library_calls"] = _library_calls(text)
    info["hlo_hash"] = program_fingerprint(text)
    return info


# ----------------------------------------------------------------------------------------


def _loss_step(apply):
    def loss(params, x, c):
        return jnp.sum(apply(params, x).astype(jnp.float32) * c)  # sum(Y ⊙ C): G = C

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _train_step(apply):
    def step(params, x, target):
        def loss(params):
            y = apply(params, x).astype(jnp.float32)
            return jnp.mean(jnp.square(y - target))

        value, grads = jax.value_and_grad(loss)(params)
        new = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        return new, value

    return jax.jit(step)


_DEVICE_DATA: dict = {}


def _device_data(case: Case, seed: int) -> dict:
    """``make_data`` on the device, shared by every implementation of the current case.

    Sharing the input buffers keeps the comparison about the computation: two processes
    or two copies of the same arrays can differ by 10% in speed through where the
    buffers happen to lie (cache-set aliasing), even for identical compiled programs.
    """
    key = (case, seed)
    if key not in _DEVICE_DATA:
        _DEVICE_DATA.clear()  # one case at a time
        data = make_data(case, seed)
        _DEVICE_DATA[key] = {
            "x": jnp.asarray(data["x"]),
            "layers": [(jnp.asarray(W), jnp.asarray(b)) for W, b in data["layers"]],
            **{k: jnp.asarray(data[k]) for k in ("cotangent", "target") if k in data},
        }
    return _DEVICE_DATA[key]


def prepare(impl: str, case: Case, seed: int = 0) -> tuple[Callable[[], None], dict]:
    """Build, compile and warm up ``impl`` on ``case``; return ``(call, info)``."""
    data = _device_data(case, seed)
    x, layers = data["x"], data["layers"]
    info: dict = {}
    if impl == "gemm":
        cd = _compute_dtype(case) or jnp.float32
        a = x.reshape(case.rows, case.d_in).astype(cd)  # (n, d_in)
        w = layers[0][0].astype(cd)  # (d_in, d_out)
        step, args = jax.jit(lambda a, w: a @ w), (a, w)
    elif case.kind == "layer":
        apply, params = _LAYER_BUILDERS[impl](case, *layers[0])
        step, args = _loss_step(apply), (params, x, data["cotangent"])
        info.update(residuals(apply, params, x))
    else:
        apply, params = _MLP_BUILDERS[impl](case, layers)
        step, args = _train_step(apply), (params, x, data["target"])
        info.update(residuals(apply, params, x))
    info.update(_compile(step, args))

    def call():
        jax.block_until_ready(step(*args))

    call()  # first call: JAX's caches, allocations
    return call, info
