r"""The affine map ``Y = X W + b``, its pushforward and its pullback.

This module is the only place where the math is written: ``matmul`` and its two
transposes (``matmul_transpose_x``, ``matmul_transpose_W``) are the dense layer's three
functions for the rule builder (``jaxlinear._src.bilinear``), and ``forward``,
``pushforward``, ``pullback`` are those functions under the builder's mixed-precision
policy. Every binding (``linear``'s ``custom_vjp``, ``dual_linear``'s primitives, the
public ``pushforward``/``pullback``, the demos) calls these.

Shapes: ``x: (..., d_in)``, ``W: (d_in, d_out)``, ``b: (d_out,)``, ``g: (..., d_out)``.

    Y = X W + b,   Ẏ = Ẋ W + X Ẇ + ḃ,   X̄ = G Wᵀ,  W̄ = Xᵀ G,  b̄ = Σ_batch G.

These functions do no validation: callers check shapes and dtypes first
(``jaxlinear._src.validation``). Zero tangents may be passed as ``None``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlinear._src import bilinear
from jaxlinear._src.bilinear import accumulation_dtype as accumulation_dtype
from jaxlinear._src.vma import typed_2d

# Contraction patterns for lax.dot_general, as ((lhs_contract, rhs_contract), (batch, batch)).
_LAST_FIRST = (((1,), (0,)), ((), ()))  # (n, d_in) @ (d_in, d_out)
_LAST_LAST = (((1,), (1,)), ((), ()))  # (n, d_out) @ (d_in, d_out)ᵀ
_FIRST_FIRST = (((0,), (0,)), ((), ()))  # (n, d_in)ᵀ @ (n, d_out)


def _dot(a, b, dims, precision, preferred_element_type, sharding=None):
    """``lax.dot_general`` accumulating in ``preferred_element_type``.

    ``sharding``: where the result lives, on meshes whose shardings are types (else None).
    """
    if sharding is None:  # keep the call plain where sharding is not part of the types
        return lax.dot_general(
            a, b, dims, precision=precision, preferred_element_type=preferred_element_type
        )
    return lax.dot_general(
        a,
        b,
        dims,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=sharding,
    )


def _rows(a):
    """Collapse every leading axis into one: ``(..., d) -> (n, d)`` with ``n = prod(...)``."""
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def output_dtype(x_dtype, compute_dtype) -> np.dtype:
    """dtype of ``Y``: ``compute_dtype`` when given, else the dtype of ``x``."""
    return jnp.dtype(x_dtype if compute_dtype is None else compute_dtype)


# --------------------------------------------------------------------------------------
# The three functions of the builder (jaxlinear._src.bilinear): B(x, W) = X W and its two
# transposes. Operands arrive in the compute dtype; products accumulate in
# ``preferred_element_type``. Every leading axis of x is collapsed into one, so each is a
# single 2-D contraction (dW = Xᵀ G writes no transposed copy of G).


def matmul(x, W, *, precision=None, preferred_element_type=None):
    """``B(x, W) = X W``: ``(..., d_in) @ (d_in, d_out) -> (..., d_out)``."""
    y_sharding = typed_2d(x, "rows", W, 1)
    y = _dot(_rows(x), W, _LAST_FIRST, precision, preferred_element_type, y_sharding)
    return y.reshape(*x.shape[:-1], W.shape[1])  # (n, d_out) -> (..., d_out)


def matmul_transpose_x(g, W, x_aval, *, precision=None, preferred_element_type=None):
    """``dX = G Wᵀ``: ``(..., d_out) @ (d_in, d_out)ᵀ -> (..., d_in)``, laid out like ``x``."""
    x_sharding = typed_2d(x_aval, "rows", x_aval, -1)
    dx = _dot(_rows(g), W, _LAST_LAST, precision, preferred_element_type, x_sharding)
    return dx.reshape(x_aval.shape)


def matmul_transpose_W(g, x, W_aval, *, precision=None, preferred_element_type=None):
    """``dW = Xᵀ G``: ``(n, d_in)ᵀ @ (n, d_out) -> (d_in, d_out)``, laid out like ``W``."""
    W_sharding = typed_2d(W_aval, 0, W_aval, 1)
    return _dot(_rows(x), _rows(g), _FIRST_FIRST, precision, preferred_element_type, W_sharding)


# --------------------------------------------------------------------------------------
# The layer's formulas: the three functions under the builder's mixed-precision policy.


def forward(x, W, b, *, precision=None, compute_dtype=None):
    """``Y = X W + b``: ``(..., d_in) @ (d_in, d_out) + (d_out,) -> (..., d_out)``.

    ``b`` may be ``None`` (no bias). The bias is added in the accumulation dtype,
    then the result is rounded once to ``output_dtype``.
    """
    return bilinear.apply_forward(matmul, x, W, b, compute_dtype=compute_dtype, precision=precision)


def pushforward(x, W, dx, dW, db, *, precision=None, compute_dtype=None):
    """JVP: ``dY = dX W + X dW + db``, shape ``(..., d_out)``.

    Any of ``dx: (..., d_in)``, ``dW: (d_in, d_out)``, ``db: (d_out,)`` may be
    ``None`` (a zero tangent); its term is then skipped, not computed with zeros.
    """
    return bilinear.apply_pushforward(
        matmul, x, W, dx, dW, db, compute_dtype=compute_dtype, precision=precision
    )


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
    return bilinear.apply_pullback(
        matmul_transpose_x,
        matmul_transpose_W,
        x,
        W,
        g,
        wrt=tuple("w" if n == "W" else n for n in wrt),  # the builder calls W `w`
        compute_dtype=compute_dtype,
        precision=precision,
    )
