r"""What the three model adapters (Flax NNX, Flax linen, Equinox) share.

- ``BINDINGS`` and ``op(family, binding)``: jaxlinear's function for each op family.
- The subclass rule, ``replaced_by(cls, base, methods)``: a subclass of a layer jaxlinear
  knows is converted when each of ``methods`` it overrides reaches the parent's
  computation (calls ``super().method`` or names the parent class), and left untouched
  (with the reason) when one of them replaces it.
- ``converted_subclass(cls, ours)``: the class a converted subclass instance gets, so
  ``super()`` inside the user's override lands on jaxlinear's version of the method.
- ``Row``, ``Report``, ``STATUSES``: the report every adapter returns (Equinox keeps its
  own three-column report for now).

This module imports no model library.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing as tp

from jaxlinear._src.ops import conv as _conv
from jaxlinear._src.ops import conv_transpose as _conv_transpose
from jaxlinear._src.ops import dot_general as _dot_general
from jaxlinear._src.ops import einsum as _einsum
from jaxlinear._src.ops import embed as _embed

BINDINGS = ("custom_vjp", "dual")

# jaxlinear's op for each op family, per binding (BINDINGS order).
OPS = {
    "dot_general": (_dot_general.dot_general, _dot_general.dual_dot_general),
    "einsum": (_einsum.einsum, _einsum.dual_einsum),
    "conv_general_dilated": (_conv.conv_general_dilated, _conv.dual_conv_general_dilated),
    "embed": (_embed.embed, _embed.dual_embed),
    "conv_transpose": (_conv_transpose.conv_transpose, _conv_transpose.dual_conv_transpose),
}


@functools.cache
def op(family: str, binding: str, quant=None):
    """jaxlinear's function for ``family`` (``"dot_general"``, ...) in ``binding``; with a
    ``quant`` recipe, that function with ``quant`` bound (one object per recipe, so equal
    graphdefs stay equal; an embedding lookup is a gather, never quantized)."""
    fn = OPS[family][BINDINGS.index(binding)]
    return fn if quant is None or family == "embed" else functools.partial(fn, quant=quant)


def check_binding(fn: str, binding) -> str:
    if binding not in BINDINGS:
        raise ValueError(f"{fn}: `binding` must be 'custom_vjp' or 'dual', got {binding!r}")
    return binding


def matmul(binding: str):
    """``a @ b`` (contract ``a``'s last axis with ``b``'s first) on jaxlinear's ``dot_general``.

    ``(..., k) @ (k, n) -> (..., n)``; the right operand is the weight.
    """
    dot_general = op("dot_general", binding)

    def matmul(a, b):
        return dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))

    return matmul


# --------------------------------------------------------------------------------------
# The subclass rule.


def _reaches_parent(function, method: str, base: type) -> bool:
    """Whether ``function`` (an override of ``method``) calls the parent's ``method``.

    Read off the bytecode's names: ``super().method(...)`` names ``super`` and
    ``method``; ``Base.method(self, ...)`` names ``Base`` and ``method``.
    """
    code = getattr(inspect.unwrap(function), "__code__", None)
    if code is None:
        return False
    names = {*code.co_names, *code.co_freevars}  # globals and attributes; closed-over names
    return method in names and ("super" in names or base.__name__ in names)


def replaced_by(cls: type, base: type, methods: tp.Iterable[str]) -> str | None:
    """``None`` if ``cls`` (a subclass of ``base``) computes what ``base`` does; else why not.

    Every override of one of ``methods`` between ``cls`` and ``base`` in the MRO must
    reach the parent's method (``super().__call__(x) * scale`` does; a new body that
    never calls the parent does not).

    Returns:
      ``None``, or the reason in words: ``"ScaledEmbed.__call__ replaces nn.Embed's"``.
    """
    for method in methods:
        for klass in cls.__mro__:
            if klass is base or not issubclass(klass, base):
                break
            function = klass.__dict__.get(method)
            if function is not None and not _reaches_parent(function, method, base):
                return (
                    f"{klass.__name__}.{method} replaces {base.__name__}.{method} (never calls it)"
                )
    return None


def known_base(cls: type, known: tp.Iterable[type]) -> type | None:
    """The first class of ``known`` in ``cls``'s MRO (``cls`` itself first), else ``None``."""
    known = tuple(known)
    return next((k for k in cls.__mro__ if k in known), None)


@functools.cache
def converted_subclass(cls: type, ours: type) -> type:
    """``cls`` (a user's subclass of a known layer) with jaxlinear's layer ``ours`` under it.

    The MRO is ``[new, cls, ..., ours, base, ...]``, so the user's overrides run first and
    their ``super()`` calls land on ``ours``. ``isinstance(new, cls)`` holds.
    """
    if issubclass(cls, ours):
        return cls
    return types.new_class(
        cls.__name__,
        (cls, ours),
        exec_body=lambda ns: ns.update(
            __module__=cls.__module__,
            __qualname__=cls.__qualname__,
            __doc__=cls.__doc__,
            jaxlinear_converted_from=cls,
        ),
    )


def original_class(cls: type) -> type:
    """The user's class a ``converted_subclass`` was made from (itself otherwise)."""
    return cls.__dict__.get("jaxlinear_converted_from", cls)


# --------------------------------------------------------------------------------------
# The report.


class Row(tp.NamedTuple):
    """One module of the model: where it is, what it is, what it runs."""

    path: str  # "blocks.0.attn.query"; "" for the model itself
    module: str  # its class name
    status: str  # "explicit" | "jax-ad" | "untouched" | "note"
    runs: str  # what its call runs, in words


STATUSES = {
    "explicit": "runs jaxlinear's op(s): the explicit rules",
    "jax-ad": "a layer `explicit` converts, still on Flax's op and JAX's AD",
    "untouched": "owns parameters used in a way `explicit` does not convert",
    "note": "no parameters of its own; information",
}


class Report:
    """What every module of a model runs; ``str(report)`` is a table.

    ``report[path]`` is the ``Row`` of one module (path ``"a.b.0"``, ``""`` for the
    model itself); ``report.explicit`` / ``report.untouched`` are the paths with that
    status; iterating gives the rows in path order.
    """

    def __init__(self, rows: tp.Iterable[Row]):
        self.rows = tuple(rows)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, path: str) -> Row:
        for row in self.rows:
            if row.path == path:
                return row
        raise KeyError(f"Report: no module at path {path!r}")

    def paths(self, status: str) -> tuple[str, ...]:
        """The paths of the modules with ``status``.

        Args:
          status: one of ``STATUSES``.
        """
        if status not in STATUSES:
            raise ValueError(
                f"Report.paths: `status` must be one of {list(STATUSES)}, got {status!r}"
            )
        return tuple(r.path for r in self.rows if r.status == status)

    @property
    def explicit(self) -> tuple[str, ...]:
        return self.paths("explicit")

    @property
    def untouched(self) -> tuple[str, ...]:
        return self.paths("untouched")

    def __str__(self):
        head = Row("path", "module", "status", "runs")
        cells = [head, *((r.path or "(model)", *r[1:]) for r in self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
        lines.insert(1, "  ".join("-" * w for w in [*widths, len(head.runs)]))
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self):
        return f"Report(\n{self}\n)"


def path_order(path: tuple) -> tuple:
    """Sort key: numeric path parts numerically, before names."""
    return tuple((1, 0, k) if isinstance(k, str) else (0, k, "") for k in path)
