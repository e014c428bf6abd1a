r"""The affine map ``Y = X W + b``, its pushforward and its pullback.

This module is the only place where the math is written. Every binding
(``linear``'s ``custom_vjp``, ``dual_linear``'s primitives, the public
``pushforward``/``pullback``, the demos) calls these three functions.

Shapes: ``x: (..., d_in)``, ``W: (d_in, d_out)``, ``b: (d_out,)``, ``g: (..., d_out)``.

.. math::

     Y = X W + b, \qquad
     \dot Y = \dot X W + X \dot W + \dot b, \qquad
     \bar X = G W^\top,\; \bar W = X^\top G,\; \bar b = \textstyle\sum_{\text{batch}} G.

These functions do no validation: callers check shapes and dtypes first
(``jaxlinear._src.validation``). Zero tangents may be passed as ``None``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlinear._src.vma import typed_2d

# Contraction patterns for lax.dot_general, as ((lhs_contract, rhs_contract), (batch, batch)).
_LAST_FIRST = (((1,), (0,)), ((), ()))  # (n, d_in) @ (d_in, d_out)
_LAST_LAST = (((1,), (1,)), ((), ()))  # (n, d_out) @ (d_in, d_out)ᵀ
_FIRST_FIRST = (((0,), (0,)), ((), ()))  # (n, d_in)ᵀ @ (n, d_out)


def accumulation_dtype(dtype) -> np.dtype:
    """float32 for 16-bit floats (bfloat16, float16); the dtype itself otherwise."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def _dot(a, b, dims, precision, compute_dtype, sharding=None):
    """``dot_general`` in ``compute_dtype`` (if given) with wide accumulation.

    ``sharding``: where the result lives, on meshes whose shardings are types (else None).
    """
    if compute_dtype is not None:
        a, b = a.astype(compute_dtype), b.astype(compute_dtype)
    acc = accumulation_dtype(a.dtype)
    if sharding is None:  # keep the call plain where sharding is not part of the types
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc)
    return lax.dot_general(
        a, b, dims, precision=precision, preferred_element_type=acc, out_sharding=sharding
    )


def _rows(a):
    """Collapse every leading axis into one: ``(..., d) -> (n, d)`` with ``n = prod(...)``."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def output_dtype(x_dtype, compute_dtype) -> np.dtype:
    """dtype of ``Y``: ``compute_dtype`` when given, else the dtype of ``x``."""
    return jnp.dtype(x_dtype if compute_dtype is None else compute_dtype)


def forward(x, W, b, *, precision=None, compute_dtype=None):
    """``Y = X W + b``: ``(..., d_in) @ (d_in, d_out) + (d_out,) -> (..., d_out)``.

    ``b`` may be ``None`` (no bias). The bias is added in the accumulation dtype,
    then the result is rounded once to ``output_dtype``.
    """
    y_sharding = typed_2d(x, "rows", W, 1)
    y = _dot(_rows(x), W, _LAST_FIRST, precision, compute_dtype, y_sharding)  # (n, d_out)
    if b is not None:
        y = y + b.astype(y.dtype)[None, :]  # (n, d_out) + (1, d_out)
    out = y.astype(output_dtype(x.dtype, compute_dtype))
    return out.reshape(*x.shape[:-1], W.shape[1])


def pushforward(x, W, dx, dW, db, *, precision=None, compute_dtype=None):
    """JVP: ``dY = dX W + X dW + db``, shape ``(..., d_out)``.

    Any of ``dx: (..., d_in)``, ``dW: (d_in, d_out)``, ``db: (d_out,)`` may be
    ``None`` (a zero tangent); its term is then skipped, not computed with zeros.
    """
    dy = None
    sharding = typed_2d(x, "rows", W, 1)  # dY lives where Y does
    if dx is not None:  # (n, d_in) @ (d_in, d_out)
        dy = _dot(_rows(dx), W, _LAST_FIRST, precision, compute_dtype, sharding)
    if dW is not None:  # (n, d_in) @ (d_in, d_out)
        term = _dot(_rows(x), dW, _LAST_FIRST, precision, compute_dtype, sharding)
        dy = term if dy is None else dy + term
    n = math.prod(x.shape[:-1])
    acc = accumulation_dtype(output_dtype(x.dtype, compute_dtype))
    if dy is None:
        dy = jnp.zeros((n, W.shape[1]), acc)
    if db is not None:
        dy = dy + db.astype(dy.dtype)[None, :]  # (n, d_out) + (1, d_out)
    out = dy.astype(output_dtype(x.dtype, compute_dtype))
    return out.reshape(*x.shape[:-1], W.shape[1])


def pullback(x, W, g, *, precision=None, compute_dtype=None, wrt=("x", "W", "b")):
    """VJP: ``dX = G Wᵀ``, ``dW = Xᵀ G``, ``db = Σ G`` over every leading axis.

    Returns ``(dx, dW, db)``: ``dx: (..., d_in)`` in ``x.dtype``, ``dW: (d_in, d_out)``
    and ``db: (d_out,)`` in ``W.dtype``; an entry not named in ``wrt`` is ``None``
    and is not computed. The leading axes of ``x`` and ``g`` are collapsed to one
    axis first, so ``Xᵀ G`` is a single 2-D contraction (no transposed copy of ``G``).

    Values are read only where a formula needs them (``W`` for ``dx``, ``x`` for
    ``dW``); otherwise anything with ``.shape`` and ``.dtype`` will do, e.g. the
    abstract value of an operand that a transpose rule is solving for.
    """
    g2 = _rows(g)  # (n, d_out)
    dx = dW = db = None
    if "x" in wrt:  # (n, d_out) @ (d_out, d_in), laid out like x
        dx = _dot(g2, W, _LAST_LAST, precision, compute_dtype, typed_2d(x, "rows", x, -1))
        dx = dx.astype(x.dtype).reshape(x.shape)
    if "W" in wrt:  # (d_in, n) @ (n, d_out), laid out like W
        dW = _dot(_rows(x), g2, _FIRST_FIRST, precision, compute_dtype, typed_2d(W, 0, W, 1))
        dW = dW.astype(W.dtype)
    if "b" in wrt:
        db = jnp.sum(g2.astype(accumulation_dtype(g2.dtype)), axis=0).astype(W.dtype)  # (d_out,)
    return dx, dW, db
