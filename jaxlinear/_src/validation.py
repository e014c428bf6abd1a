"""Trace-time checks, one per kind of mistake, with messages naming the function and argument.

Everything here runs on shapes and dtypes only, so it costs nothing inside ``jit``.

Dtypes are compared as JAX computes in them, not as NumPy stores them: canonicalized
under the current ``jax_enable_x64`` setting (with it off, a NumPy float64 array computes
in float32, as in ``x @ W + b``), and a weakly typed value (a Python scalar, or an array
made from one) takes the dtype of the strongly typed operands it meets.
``layer_inputs`` / ``like_inputs`` make the inputs such arrays at the public boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlinear._src.params import _KEYS, Layout, Params, _read, layout_of


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


_PY_SCALARS = (bool, int, float, complex)  # what jnp takes besides arrays (weakly typed)


def _as_array(a):
    """A NumPy floating array or scalar (or a Python one) as a ``jax.Array``, canonicalized
    as ``jnp.asarray`` does; anything else unchanged, for the checks to accept or refuse."""
    if isinstance(a, (np.ndarray, np.generic, *_PY_SCALARS)) and jnp.issubdtype(
        np.result_type(a), jnp.inexact
    ):
        return jnp.asarray(a)
    return a


def _meet(a, other):
    """A weakly typed ``a`` in the dtype it computes in next to a strongly typed ``other``
    (a Python float times a float32 array is float32); anything else unchanged."""
    if (
        isinstance(a, jax.Array)
        and a.weak_type
        and hasattr(other, "dtype")
        and not getattr(other, "weak_type", False)
    ):
        return a.astype(jnp.result_type(a, other.dtype))
    return a


def _kind(params) -> str | None:
    """The kind of a params pytree ``layout_of`` accepts, or ``None`` (refused there)."""
    if isinstance(params, Params):
        return "params"
    if isinstance(params, tuple) and len(params) in (1, 2):
        return "tuple"
    if isinstance(params, dict):
        return "dict" if "W" in params else "flax" if "kernel" in params else None
    return None


def _pack_like(params, W, b):
    """``params`` with ``W`` and ``b`` replaced, in its own structure; ``b`` only if present."""
    kind = _kind(params)
    if kind == "params":
        return params._replace(W=W, b=b)
    if kind == "tuple":
        return (W, b) if len(params) == 2 else (W,)
    w_key, b_key = _KEYS[kind]
    return {**params, w_key: W, **({b_key: b} if b_key in params else {})}


def _unpack(params):
    """``(W, b)`` of a params pytree of any accepted kind; ``None`` for anything else."""
    kind = _kind(params)
    return None if kind is None else _read(kind, params)


def plain_params_only(fn: str, layout: Layout) -> None:
    """The sharded layers build ``shard_map`` specs for ``Params`` and ``{"W", "b"}`` only."""
    if layout.kind not in ("params", "dict"):
        raise TypeError(
            f"{fn}: `params` must be Params(W, b) or {{'W': W, 'b': b}} here; got a"
            f" {layout.kind} ({'Flax kernel/bias dict' if layout.kind == 'flax' else '(W, b)'})."
            " Convert with jaxlinear.from_flax(params) or jaxlinear.Params(*params)"
        )


def layer_inputs(params, x):
    """``(params, x)`` with ``W``, ``b`` and ``x`` as the arrays JAX computes ``x @ W + b`` on.

    NumPy arrays become ``jax.Array`` values canonicalized under the x64 setting (float64 ->
    float32 with x64 off), and a weakly typed ``x`` or ``b`` takes ``W``'s dtype (a weak
    ``W`` takes ``x``'s); the structure of ``params`` is kept. Non-arrays are left as they
    are, for ``check_layer`` to refuse with its message. Call it first in a public function.
    """
    x = _as_array(x)
    Wb = _unpack(params)
    if Wb is None:
        return params, x
    W, b = (_as_array(a) for a in Wb)
    W = _meet(W, x)
    x, b = _meet(x, W), _meet(b, W)
    return _pack_like(params, W, b), x


def like_inputs(value, like):
    """``value`` (an array, a params pytree like ``like``, or ``None``) as JAX arrays; a
    weakly typed leaf takes the dtype of its counterpart in ``like``. For tangents and
    cotangents, before ``check_same``."""
    if value is None:
        return None
    pair = _unpack(value)
    if pair is None:
        return _meet(_as_array(value), like)
    likes = _unpack(like) or (None, None)
    W, b = (None if a is None else _meet(_as_array(a), l) for a, l in zip(pair, likes, strict=True))
    return _pack_like(value, W, b)


def _shape(a):
    return tuple(getattr(a, "shape", np.shape(a)))


def _dtype_and_weak(fn: str, name: str, a) -> tuple[np.dtype, bool]:
    """The dtype JAX computes ``a`` in, and whether ``a`` is weakly typed.

    Raises ``TypeError`` for a non-array (a list, a string, ``None``: ``jnp`` refuses them
    too) and for a dtype that is not floating or complex.
    """
    if isinstance(a, _PY_SCALARS):
        dtype, weak = jnp.dtype(jnp.result_type(a)), True
    elif hasattr(a, "dtype") and hasattr(a, "shape"):
        dtype = jax.dtypes.canonicalize_dtype(jnp.dtype(a.dtype))
        weak = bool(getattr(a, "weak_type", False))
    else:
        raise TypeError(
            f"{fn}: `{name}` must be an array (a jax.Array or numpy.ndarray),"
            f" got {type(a).__name__}"
        )
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{fn}: `{name}` has dtype {dtype}; expected a floating (or complex) dtype"
            f" (shape {_shape(a)})"
        )
    return dtype, weak


def _dtype(fn: str, name: str, a) -> np.dtype:
    return _dtype_and_weak(fn, name, a)[0]


def _computed_dtypes(operands: dict) -> dict:
    """``{name: (dtype, weak)}`` -> ``{name: dtype}``: what each operand computes in once
    they meet, as in ``x @ W + b``: a weakly typed one takes the dtype of the strongly
    typed ones (a Python float next to bfloat16 is bfloat16); the others keep theirs."""
    strong = [dtype for dtype, weak in operands.values() if not weak]
    return {
        name: jnp.dtype(jnp.result_type(dtype.type(0).item(), *strong))
        if weak and strong
        else dtype
        for name, (dtype, weak) in operands.items()
    }


def check_layer(fn: str, params, x, compute_dtype: np.dtype | None) -> Layout:
    """Check ``params`` and ``x`` for ``Y = X W + b``; return the params' layout.

    Raises:
      TypeError: bad params structure, non-float dtypes, complex and real operands mixed,
        or a real ``compute_dtype`` for complex operands. Different real dtypes are fine:
        they promote (``promoted_compute_dtype``).
      ValueError: bad shapes (``W`` not 2-D, ``x`` 0-d or of the wrong width,
        ``b`` of a shape other than ``(d_out,)`` or ``(1, d_out)``).
    """
    layout = layout_of(fn, params)
    W, b = layout.raw(params)
    w_shape, x_shape = _shape(W), _shape(x)

    operands = {"W": _dtype_and_weak(fn, "W", W), "x": _dtype_and_weak(fn, "x", x)}
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
        operands["b"] = _dtype_and_weak(fn, "b", b)
    dtypes = _computed_dtypes(operands)  # as JAX computes x @ W + b
    is_complex = any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes.values())
    if is_complex and not all(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes.values()):
        got = ", ".join(f"`{k}` {dtypes[k]}" for k in ("x", "W", "b") if k in dtypes)
        raise TypeError(
            f"{fn}: complex and real operands do not mix ({got}): the gradient of a real one"
            " would be the real part of a complex product; cast it, e.g. .astype(jnp.complex64)"
        )
    if (
        compute_dtype is not None
        and is_complex
        and not jnp.issubdtype(compute_dtype, jnp.complexfloating)
    ):
        raise TypeError(
            f"{fn}: `compute_dtype` is for real mixed precision; got complex inputs"
            f" (`x` {dtypes['x']}, `W` {dtypes['W']})"
        )
    return layout


def one_dtype(fn: str, layout: Layout, params, x) -> None:
    """For the tools that build a dense result in one dtype (the Jacobian helpers):
    ``x``, ``W`` and ``b`` must share one dtype (no promotion there)."""
    W, b = layout.raw(params)
    for name, a in (("x", x), ("b", b)):
        if a is not None and jnp.dtype(a.dtype) != jnp.dtype(W.dtype):
            raise TypeError(
                f"{fn}: `{name}` has dtype {a.dtype} but `W` has dtype {W.dtype}; the"
                " Jacobian is built in one dtype: cast them to one"
            )


def promoted_compute_dtype(layout: Layout, params, x, compute_dtype) -> np.dtype | None:
    """The dtype ``x @ W + b`` computes in, as JAX promotes it, when the operands differ.

    ``compute_dtype`` if given; else ``None`` when ``x``, ``W`` and ``b`` share one dtype
    (the common case, nothing to decide); else ``jnp.result_type(x, W, b)``: bfloat16
    params with a float32 ``x`` give float32, as ``x @ W + b`` does (the matmul then runs
    in float32 too, as in Flax's ``promote_dtype``). Call after ``check_layer`` on inputs
    from ``layer_inputs`` (weakly typed values already took the strong dtype).
    """
    if compute_dtype is not None:
        return compute_dtype
    dtypes = {jnp.dtype(a.dtype) for a in (x, *layout.raw(params)) if a is not None}
    if len(dtypes) == 1:
        return None
    return jnp.dtype(jnp.result_type(*dtypes))


def check_same(fn: str, name: str, value, like_name: str, like) -> None:
    """``value`` must have exactly the shape and dtype of ``like`` (tangents, cotangents)."""
    if _shape(value) != _shape(like):
        raise ValueError(
            f"{fn}: `{name}` has shape {_shape(value)} but `{like_name}` has shape {_shape(like)};"
            " they must match"
        )
    dtypes = _computed_dtypes(
        {"value": _dtype_and_weak(fn, name, value), "like": _dtype_and_weak(fn, like_name, like)}
    )
    if dtypes["value"] != dtypes["like"]:
        raise TypeError(
            f"{fn}: `{name}` has dtype {dtypes['value']} but `{like_name}` has dtype"
            f" {dtypes['like']}; they must match"
        )
