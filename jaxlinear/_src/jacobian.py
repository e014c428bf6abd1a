r"""Jacobians of ``Y = X W + b``: dense (behind a size guard) and as diagonal blocks.

For ``X: (n, d_in)`` the Jacobian ``∂Y/∂X`` has shape ``(n, d_out, n, d_in)``, but it is
block diagonal: row ``i`` of ``Y`` depends only on row ``i`` of ``X``, and

    ∂Y_i/∂X_j = δ_ij Wᵀ,   ∂Y_ik/∂W_jl = X_ij δ_kl,   ∂Y_ik/∂b_l = δ_kl.

So the dense ``∂Y/∂X`` holds ``n²·d_out·d_in`` numbers of which only ``n·d_out·d_in`` can
be non-zero (``jacobian_blocks``). For a layer of a realistic size the dense Jacobian does
not fit in memory (``n = 64``, ``d_in = d_out = 4096``: 68.7 billion entries, 256 GiB in
float32); ``dense_jacobian`` refuses such sizes before allocating anything.

Both functions build the Jacobian from the rules in ``formulas`` (the pushforward applied
to every basis tangent, or the pullback applied to every basis cotangent, whichever
needs the smaller identity matrix); the math is not written here a second time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxlinear._src import formulas
from jaxlinear._src.validation import canonical_precision, check_layer, layer_inputs, one_dtype

DEFAULT_MAX_ENTRIES = 2**26  # 67,108,864 entries: 256 MiB in float32
_WRT = ("x", "W", "b")


def _count_words(count: int) -> str:
    """``68719476736 -> "68,719,476,736 (68.7 billion)"``."""
    for scale, word in ((1e12, "trillion"), (1e9, "billion"), (1e6, "million")):
        if count >= scale:
            return f"{count:,} ({count / scale:.1f} {word})"
    return f"{count:,}"


def _bytes_words(nbytes: int) -> str:
    """``274877906944 -> "256 GiB"``, ``1536 -> "1.5 KiB"``."""
    value, unit = float(nbytes), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:.3g} {unit}"


def _check_options(fn: str, wrt, max_entries) -> None:
    if wrt not in _WRT:
        raise ValueError(f"{fn}: `wrt` must be one of {_WRT}, got {wrt!r}")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValueError(f"{fn}: `max_entries` must be a positive int, got {max_entries!r}")


def _guard(fn: str, what: str, shape: tuple, dtype, max_entries: int, hint: str = "") -> None:
    """Raise ``ValueError`` if an array of ``shape`` would exceed ``max_entries`` entries."""
    entries = math.prod(shape)
    if entries > max_entries:
        nbytes = entries * jnp.dtype(dtype).itemsize
        raise ValueError(
            f"{fn}: {what} would have shape {shape}: {_count_words(entries)} entries,"
            f" {_bytes_words(nbytes)} in {jnp.dtype(dtype)}; the limit is"
            f" max_entries={max_entries:,}.{hint} Pass a larger `max_entries` to compute it anyway."
        )


def _jacobian(push, pull, in_shape: tuple, out_shape: tuple, dtype):
    """The dense Jacobian ``out_shape + in_shape`` of a linear map given both its rules.

    ``push: (in_shape) -> (out_shape)`` gives the columns (one per basis tangent),
    ``pull: (out_shape) -> (in_shape)`` the rows (one per basis cotangent). The smaller
    identity of the two is used, so no intermediate is larger than the Jacobian itself.
    """
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in <= n_out:
        basis = jnp.eye(n_in, dtype=dtype).reshape(n_in, *in_shape)  # e_j, one per input entry
        columns = jax.vmap(push)(basis)  # (n_in, *out_shape): column j is J e_j
        return jnp.moveaxis(columns.reshape(n_in, n_out), 0, 1).reshape(*out_shape, *in_shape)
    basis = jnp.eye(n_out, dtype=dtype).reshape(n_out, *out_shape)  # e_k, one per output entry
    rows = jax.vmap(pull)(basis)  # (n_out, *in_shape): row k is Jᵀ e_k
    return rows.reshape(*out_shape, *in_shape)


def dense_jacobian(params, x, *, wrt="x", max_entries=DEFAULT_MAX_ENTRIES, precision=None):
    r"""The dense Jacobian of ``Y = X W + b`` with respect to ``x``, ``W`` or ``b``.

    The result has shape ``Y.shape + arg.shape`` (as ``jax.jacrev`` would return it):

    | ``wrt`` | shape (``x: (n, d_in)``) | entries |
    |---|---|---|
    | ``"x"`` | ``(n, d_out, n, d_in)`` | ``δ_ij Wᵀ``: block diagonal |
    | ``"W"`` | ``(n, d_out, d_in, d_out)`` | ``X_ij δ_kl`` |
    | ``"b"`` | ``(n, d_out, d_out)`` | ``δ_kl``, every example |

    The size check runs on shapes only, before anything is allocated.

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``; ``W: (d_in, d_out)``, ``b: (d_out,)``,
        ``(1, d_out)`` or ``None``.
      x: ``(..., d_in)``, the point at which the Jacobian is taken.
      wrt: ``"x"``, ``"W"`` or ``"b"``.
      max_entries: refuse to build a Jacobian with more entries than this.
      precision: passed to every matmul.

    Returns:
      ``(..., d_out) + shape of the wrt argument``, in the dtype of ``Y``.

    Raises:
      ValueError: the Jacobian would have more than ``max_entries`` entries (the message
        gives the count and the bytes); ``wrt`` not one of the three; ``wrt="b"`` without
        a bias; and the shape errors of ``linear``.
      TypeError: the dtype and structure errors of ``linear``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> J = jaxlinear.dense_jacobian(p, jnp.ones((3, 2)))
      >>> J.shape
      (3, 2, 3, 2)
      >>> J[0, :, 0].tolist(), J[0, :, 1].tolist()  # the block Wᵀ, then a zero block
      ([[2.0, -1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]])
    """
    fn = "dense_jacobian"
    _check_options(fn, wrt, max_entries)
    params, x = layer_inputs(params, x)  # NumPy/weakly typed -> the arrays JAX computes on
    layout = check_layer(fn, params, x, None)
    one_dtype(fn, layout, params, x)
    precision = canonical_precision(precision)
    W, b = layout.unpack(params)
    if wrt == "b" and b is None:
        raise ValueError(f"{fn}: `wrt` is 'b' but `params` has no bias (`b` is None)")
    given = {"x": x, "W": W, "b": layout.raw(params)[1]}[wrt]
    in_shape, flat_shape = tuple(given.shape), {"x": x, "W": W, "b": b}[wrt].shape
    out_shape = (*x.shape[:-1], W.shape[1])
    dtype = formulas.output_dtype(x.dtype, None)
    hint = ""
    if wrt == "x" and len(out_shape) > 1:
        n, (d_in, d_out) = math.prod(out_shape[:-1]), W.shape
        blocks = n * d_out * d_in
        hint = (
            f" jacobian_blocks gives the n={n:,} diagonal blocks instead:"
            f" {_count_words(blocks)} entries, {_bytes_words(blocks * dtype.itemsize)}."
        )
    _guard(fn, f"the Jacobian ∂Y/∂{wrt}", (*out_shape, *in_shape), dtype, max_entries, hint)

    def push(t):  # (in_shape) -> (out_shape)
        tangents = {"x": None, "W": None, "b": None}
        tangents[wrt] = t.reshape(flat_shape)
        return formulas.pushforward(
            x, W, tangents["x"], tangents["W"], tangents["b"], precision=precision
        )

    def pull(g):  # (out_shape) -> (in_shape)
        dx, dW, db = formulas.pullback(x, W, g, precision=precision, wrt=(wrt,))
        return {"x": dx, "W": dW, "b": db}[wrt].reshape(in_shape)

    return _jacobian(push, pull, in_shape, out_shape, dtype)


def jacobian_blocks(params, x, *, max_entries=DEFAULT_MAX_ENTRIES, precision=None):
    r"""The diagonal blocks ``∂Y_i/∂X_i`` of the block-diagonal Jacobian ``∂Y/∂X``.

    Row ``i`` of ``Y`` depends on row ``i`` of ``X`` only, so every other block of
    ``∂Y/∂X`` is exactly zero and these blocks are all there is: ``n·d_out·d_in`` numbers
    instead of the dense ``n²·d_out·d_in``. (For this layer every block is ``Wᵀ``.)

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``.
      x: ``(..., d_in)``; every leading position ``i`` is one example.
      max_entries: refuse to build more entries than this.
      precision: passed to every matmul.

    Returns:
      ``(..., d_out, d_in)``: ``blocks[i] = ∂Y_i/∂X_i``, in the dtype of ``Y``.

    Raises:
      ValueError: more than ``max_entries`` entries; the shape errors of ``linear``.
      TypeError: the dtype and structure errors of ``linear``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> B = jaxlinear.jacobian_blocks(p, jnp.ones((3, 2)))
      >>> B.shape, B[2].tolist()
      ((3, 2, 2), [[2.0, -1.0], [1.0, 3.0]])
    """
    fn = "jacobian_blocks"
    _check_options(fn, "x", max_entries)
    params, x = layer_inputs(params, x)  # NumPy/weakly typed -> the arrays JAX computes on
    layout = check_layer(fn, params, x, None)
    one_dtype(fn, layout, params, x)
    precision = canonical_precision(precision)
    W, _ = layout.unpack(params)
    d_in, d_out = W.shape
    lead = tuple(x.shape[:-1])
    dtype = formulas.output_dtype(x.dtype, None)
    _guard(fn, "the diagonal blocks of ∂Y/∂x", (*lead, d_out, d_in), dtype, max_entries)

    def block(x_i):  # (d_in,) -> (d_out, d_in): the Jacobian of one example's row
        def push(t):
            return formulas.pushforward(x_i, W, t, None, None, precision=precision)

        def pull(g):
            return formulas.pullback(x_i, W, g, precision=precision, wrt=("x",))[0]

        return _jacobian(push, pull, (d_in,), (d_out,), dtype)

    rows = jnp.reshape(x, (math.prod(lead), d_in))  # (n, d_in)
    return jax.vmap(block)(rows).reshape(*lead, d_out, d_in)
