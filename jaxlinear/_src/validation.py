"""Trace-time checks, one per kind of mistake, with messages naming the function and argument.

Everything here runs on shapes and dtypes only, so it costs nothing inside ``jit``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlinear._src.params import Layout, layout_of


def canonical_compute_dtype(fn: str, compute_dtype) -> np.dtype | None:
    """``None`` or a real floating ``np.dtype`` (hashable, so it can be a static argument)."""
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(compute_dtype)
    except TypeError:
        raise TypeError(
            f"{fn}: `compute_dtype` must be a floating dtype such as jnp.bfloat16,"
            f" got {compute_dtype!r}"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn}: `compute_dtype` must be a real floating dtype such as jnp.bfloat16, got {dtype}"
        )
    return dtype


def canonical_precision(precision):
    """Make ``precision`` hashable (lists become tuples) so it can be a static argument."""
    if isinstance(precision, list):
        return tuple(precision)
    return precision


def _shape(a):
    return tuple(getattr(a, "shape", np.shape(a)))


def _dtype(fn: str, name: str, a) -> np.dtype:
    dtype = getattr(a, "dtype", None)
    if dtype is None:
        raise TypeError(f"{fn}: `{name}` must be an array, got {type(a).__name__}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{fn}: `{name}` has dtype {dtype}; expected a floating (or complex) dtype"
            f" (shape {_shape(a)})"
        )
    return dtype


def check_layer(fn: str, params, x, compute_dtype: np.dtype | None) -> Layout:
    """Check ``params`` and ``x`` for ``Y = X W + b``; return the params' layout.

    Raises:
      TypeError: bad params structure, non-float dtypes, or mismatched dtypes.
      ValueError: bad shapes (``W`` not 2-D, ``x`` 0-d or of the wrong width,
        ``b`` of a shape other than ``(d_out,)`` or ``(1, d_out)``).
    """
    layout = layout_of(fn, params)
    W = params.W if layout.kind == "params" else params["W"]
    b = params.b if layout.kind == "params" else params.get("b")
    w_shape, x_shape = _shape(W), _shape(x)

    w_dtype = _dtype(fn, "W", W)
    x_dtype = _dtype(fn, "x", x)
    if len(w_shape) != 2:
        raise ValueError(f"{fn}: `W` must be 2-D (d_in, d_out), got shape {w_shape}")
    d_in, d_out = w_shape
    if len(x_shape) == 0:
        raise ValueError(
            f"{fn}: `x` must have at least one axis (..., d_in) with d_in={d_in}, got a 0-d array"
        )
    if x_shape[-1] != d_in:
        raise ValueError(
            f"{fn}: `x` has last dim {x_shape[-1]} (shape {x_shape}) but `W` expects"
            f" d_in={d_in} (shape {w_shape})"
        )
    if b is not None:
        b_shape = _shape(b)
        if b_shape not in ((d_out,), (1, d_out)):
            raise ValueError(
                f"{fn}: `b` has shape {b_shape} but must be ({d_out},) or the row vector"
                f" (1, {d_out}) for W of shape {w_shape}; a per-example bias is not broadcast"
            )
        b_dtype = _dtype(fn, "b", b)
        if b_dtype != w_dtype:
            raise TypeError(
                f"{fn}: `b` has dtype {b_dtype} but `W` has dtype {w_dtype}; they must match"
            )

    is_complex = jnp.issubdtype(x_dtype, jnp.complexfloating) or jnp.issubdtype(
        w_dtype, jnp.complexfloating
    )
    if compute_dtype is None:
        if x_dtype != w_dtype:
            raise TypeError(
                f"{fn}: `x` has dtype {x_dtype} but `W` has dtype {w_dtype}; cast one, or pass"
                " compute_dtype= to run the matmuls in one dtype"
            )
    elif is_complex:
        raise TypeError(
            f"{fn}: `compute_dtype` is for real mixed precision; got complex inputs"
            f" (`x` {x_dtype}, `W` {w_dtype})"
        )
    return layout


def check_same(fn: str, name: str, value, like_name: str, like) -> None:
    """``value`` must have exactly the shape and dtype of ``like`` (tangents, cotangents)."""
    if _shape(value) != _shape(like):
        raise ValueError(
            f"{fn}: `{name}` has shape {_shape(value)} but `{like_name}` has shape {_shape(like)};"
            " they must match"
        )
    dtype = _dtype(fn, name, value)
    if dtype != jnp.dtype(like.dtype):
        raise TypeError(
            f"{fn}: `{name}` has dtype {dtype} but `{like_name}` has dtype {jnp.dtype(like.dtype)};"
            " they must match"
        )
