"""Trace-time checks shared by the family's ops (shapes and dtypes only; free under ``jit``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def operand(fn: str, name: str, a):
    """``a`` as a JAX array of a floating (or complex) dtype; NumPy arrays are converted."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"{fn}: `{name}` must be an array, got {type(a).__name__}")
    dtype = jnp.dtype(a.dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{fn}: `{name}` has dtype {dtype}; expected a floating (or complex) dtype"
            f" (shape {tuple(a.shape)})"
        )
    return jnp.asarray(a) if isinstance(a, np.ndarray) else a


def promoted(fn: str, operands: dict, *, weak: bool = True) -> tuple:
    """The operands as JAX computes them together (``jnp.result_type`` promotion).

    With ``weak`` (``jnp`` semantics: ``einsum``), a weakly typed operand (made from a
    Python scalar) takes the dtype of the strongly typed ones; without it (``lax``
    semantics: ``dot_general``) it keeps its own. Different dtypes are then left to the
    rule builder, which computes in their promoted dtype (``jnp.result_type``) and returns
    each cotangent in its operand's dtype. Complex and real operands do not mix: the real
    one's cotangent would be the real part of a complex product (cast it to complex).
    """
    strong = [a.dtype for a in operands.values() if not getattr(a, "weak_type", False)]
    out = []
    for a in operands.values():
        if weak and getattr(a, "weak_type", False) and strong:
            a = a.astype(jnp.result_type(a, *strong))
        out.append(a)
    kinds = {jnp.issubdtype(a.dtype, jnp.complexfloating) for a in out}
    if len(kinds) > 1:
        got = ", ".join(f"`{n}` {a.dtype}" for n, a in zip(operands, out, strict=True))
        raise TypeError(
            f"{fn}: complex and real operands do not mix ({got}): the gradient of the real one"
            " would be the real part of a complex product; cast it, e.g. .astype(jnp.complex64)"
        )
    return tuple(out)


def out_dtype(fn: str, preferred_element_type) -> np.dtype | None:
    """``preferred_element_type`` as ``None`` or a floating ``np.dtype``."""
    if preferred_element_type is None:
        return None
    try:
        dtype = jnp.dtype(preferred_element_type)
    except TypeError:
        raise TypeError(
            f"{fn}: `preferred_element_type` must be a dtype, got {preferred_element_type!r}"
        ) from None
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{fn}: `preferred_element_type` must be a floating (or complex) dtype, got {dtype}"
        )
    return dtype


def no_out_sharding(fn: str, out_sharding) -> None:
    """Only ``out_sharding=None`` (what Flax passes by default) is accepted."""
    if out_sharding is not None:
        raise NotImplementedError(
            f"{fn}: `out_sharding` must be None, got {out_sharding!r}; jaxlinear places the"
            " result where its operands' shardings put it (shard the operands instead)"
        )
