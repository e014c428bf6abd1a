"""What is measured: the shapes, dtypes and round counts of each suite, and the data.

A ``Case`` is plain data (it crosses the pipe to the worker processes as JSON). Every
implementation of a case gets the same float32 arrays, made from the same seed by
``make_data``; peers that store the weight as ``(d_out, d_in)`` get its transpose.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Which targets a case counts towards (see report.targets).
TINY, TWO_D, ND, MLP, LARGE = "tiny", "2d", "nd", "mlp", "large"


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape to measure.

    Attributes:
      name: short unique id, e.g. ``"2d-1024"``.
      kind: ``"layer"`` (one ``Y = X W + b``, ``value_and_grad`` w.r.t. ``(params, x)``)
        or ``"mlp"`` (a training step: forward, backward, SGD update).
      batch: the leading axes of ``x``, e.g. ``(8, 512)``.
      sizes: ``(d_in, d_out)`` for a layer; ``(d_0, d_1, ..., d_L)`` for an MLP.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (params and data stay float32;
        bfloat16 means bfloat16 matmul operands with float32 accumulation).
      rounds: interleaved rounds to time.
      tag: which targets apply (``TINY``, ``TWO_D``, ``ND``, ``MLP``, ``LARGE``).
    """

    name: str
    kind: str
    batch: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: str = "float32"
    rounds: int = 20
    tag: str = TWO_D

    @property
    def d_in(self) -> int:
        return self.sizes[0]

    @property
    def d_out(self) -> int:
        return self.sizes[-1]

    @property
    def rows(self) -> int:
        """``n``: the leading axes of ``x`` collapsed into one."""
        return math.prod(self.batch)

    @property
    def gemm_flops(self) -> int:
        """FLOPs of the dominant GEMM ``(n, d_in) @ (d_in, d_out)`` (layers only)."""
        return 2 * self.rows * self.d_in * self.d_out

    @property
    def flops(self) -> int:
        """Forward + backward matmul FLOPs: three GEMMs per layer (``XW``, ``GWᵀ``, ``XᵀG``)."""
        return sum(
            6 * self.rows * a * b for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=True)
        )

    @property
    def label(self) -> str:
        dims = ", ".join(map(str, self.batch))
        if self.kind == "mlp":
            return f"MLP ({dims}, {'→'.join(map(str, self.sizes))})"
        return f"({dims}, {self.d_in}→{self.d_out})"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Case:
        return cls(**{**d, "batch": tuple(d["batch"]), "sizes": tuple(d["sizes"])})


def _layer(name, batch, d_in, d_out, rounds, tag, dtype="float32"):
    return Case(name, "layer", tuple(batch), (d_in, d_out), dtype, rounds, tag)


def _mlp(name, batch, sizes, rounds, dtype="float32"):
    return Case(name, "mlp", tuple(batch), tuple(sizes), dtype, rounds, MLP)


def cpu_suite() -> list[Case]:
    """The full CPU run (5-9 minutes on 2 cores; fewer rounds for the big shapes)."""
    return [
        _layer("tiny", (32,), 64, 64, 100, TINY),
        _layer("2d-256", (256,), 512, 512, 80, TWO_D),
        _layer("2d-1024", (1024,), 1024, 1024, 60, TWO_D),
        _layer("2d-4096", (4096,), 2048, 2048, 20, TWO_D),
        _layer("3d", (8, 512), 1024, 1024, 40, ND),
        _layer("4d", (4, 8, 128), 1024, 1024, 40, ND),
        _mlp("mlp", (256,), (784, 1024, 1024, 10), 60),
    ]


def smoke_suite() -> list[Case]:
    """Tiny shapes, one round: checks that every implementation runs (CI)."""
    return [
        _layer("smoke-2d", (8,), 16, 8, 1, TINY),
        _layer("smoke-3d", (2, 3), 16, 8, 1, ND),
        _layer("smoke-4d", (2, 2, 3), 16, 8, 1, ND),
        _mlp("smoke-mlp", (8,), (16, 32, 4), 1),
    ]


def gpu_suite(dtypes=("float32", "bfloat16")) -> list[Case]:
    """The accelerator run: the CPU shapes plus large ones, in each dtype.

    Ordered by importance (large shapes first, the dtypes side by side), so that a run
    cut short by ``--budget-s`` still has the headline numbers.
    """
    shapes = [
        ("2d-8192", "layer", (8192,), (8192, 8192), 15, LARGE),
        ("3d-large", "layer", (16, 1024), (4096, 4096), 15, ND),
        ("mlp", "mlp", (1024,), (1024, 4096, 4096, 1024), 20, MLP),
        ("3d", "layer", (8, 512), (1024, 1024), 20, ND),
        ("4d", "layer", (4, 8, 128), (1024, 1024), 20, ND),
        ("2d-4096", "layer", (4096,), (2048, 2048), 20, TWO_D),
        ("2d-1024", "layer", (1024,), (1024, 1024), 20, TWO_D),
        ("tiny", "layer", (32,), (64, 64), 20, TINY),
    ]
    cases = []
    for name, kind, batch, sizes, rounds, tag in shapes:
        for dt in dtypes:
            suffix = "" if dt == "float32" else "-" + {"bfloat16": "bf16"}.get(dt, dt)
            cases.append(Case(name + suffix, kind, batch, sizes, dt, rounds, tag))
    return cases


def make_data(case: Case, seed: int = 0) -> dict[str, object]:
    """The float32 arrays for ``case``, identical in every process for the same seed.

    Returns:
      ``{"x": (*batch, d_in), "layers": [(W: (d_i, d_{i+1}), b: (d_{i+1},)), ...],
      "target" (MLP) or "cotangent" (layer): (*batch, d_L)}`` as NumPy float32 arrays.
    """
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((*case.batch, case.d_in), dtype=f32)
    layers = []
    for a, b in zip(case.sizes[:-1], case.sizes[1:], strict=True):
        W = rng.standard_normal((a, b), dtype=f32) / f32(math.sqrt(a))  # (d_in, d_out)
        bias = f32(0.1) * rng.standard_normal((b,), dtype=f32)  # (d_out,)
        layers.append((W, bias))
    data = {"x": x, "layers": layers}
    # MLP: regression target; layer: the fixed weights C of the loss sum(Y * C), i.e. the
    # cotangent G = C reaches the pullback as is (no elementwise work of its own).
    key = "target" if case.kind == "mlp" else "cotangent"
    data[key] = rng.standard_normal((*case.batch, case.d_out), dtype=f32)
    return data


LEARNING_RATE = 1e-3  # SGD step size of the MLP training step
