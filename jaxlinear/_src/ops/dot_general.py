r"""``dot_general``: ``lax.dot_general`` with its two transposes written out.

``lax.dot_general(x, w, ((xc, wc), (xb, wb)))`` contracts the axes ``xc`` of ``x`` with
``wc`` of ``w`` and pairs the batch axes ``xb`` with ``wb``; the result's axes are
(batch, ``x``'s kept axes, ``w``'s kept axes). It is bilinear, and each transpose is a
``dot_general`` of ``G`` with the other operand followed by a transpose of the axes:

* ``x̄ = dot_general(G, w)`` contracting ``G``'s ``w``-kept axes with ``w``'s kept axes,
  batch with batch, then axes put back in ``x``'s order (``transpose_x``);
* ``w̄``: the same with the operands' roles swapped (``transpose_w`` calls
  ``transpose_x`` on swapped dimension numbers), as JAX's
  ``_dot_general_transpose_lhs`` / ``_rhs`` (``jax/_src/lax/lax.py``) state it.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from jaxlinear._src import ghost
from jaxlinear._src.bilinear import bilinear_op
from jaxlinear._src.ops import _checks
from jaxlinear._src.quant import resolve
from jaxlinear._src.validation import canonical_precision


def _remaining(n, *removed):
    """``range(n)`` without the axes in ``removed``, in order."""
    gone = {int(i) for r in removed for i in r}
    return [i for i in range(n) if i not in gone]


def _ranges_like(*xs):
    """Consecutive ranges as long as each of ``xs``: ``([0..len0), [len0..len0+len1), ...)``."""
    start = 0
    for x in xs:
        yield tuple(range(start, start + len(x)))
        start += len(x)


def forward(x, w, *, dimension_numbers, precision, preferred_element_type):
    """``y = dot_general(x, w)``: axes (batch, ``x`` kept, ``w`` kept)."""
    return lax.dot_general(
        x, w, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
    )


def transpose_x(
    g, w, x_aval, *, dimension_numbers, precision, preferred_element_type, swap_ans=False
):
    """``x̄``: ``G`` contracted with ``w`` over ``w``'s kept axes, axes put back in ``x``'s order.

    ``swap_ans``: ``G``'s axes are (batch, ``w`` kept, ``x`` kept), i.e. ``x`` is the
    *right* operand of the forward map (how ``transpose_w`` uses this function).
    """
    (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
    x_kept = _remaining(len(x_aval.shape), x_contract, x_batch)
    w_kept = _remaining(w.ndim, w_contract, w_batch)
    if swap_ans:
        g_batch, g_w, _ = _ranges_like(x_batch, w_kept, x_kept)
    else:
        g_batch, _, g_w = _ranges_like(x_batch, x_kept, w_kept)
    # dot_general(g, w) gives x's axes as (batch, x kept, x contracted in the order w's
    # contracted axes sort to); dot_general(w, g) as (batch, x contracted, x kept). Take the
    # order that keeps x's non-batch axes in x's order where one does, as jnp.einsum picks
    # its operand order: then the result needs no transpose (no transposed copy), or one
    # that only moves batch axes. E.g. a dense layer's w̄ is dot_general(x, g) directly.
    # (The 16-bit forms XLA:CPU lacks, issue #29, are the builder's concern: contract().)
    x_contract_sorted_by_w = [int(x_contract[i]) for i in np.argsort(w_contract)]
    in_order = lambda axes: axes == sorted(axes)  # noqa: E731
    if in_order([*x_contract_sorted_by_w, *x_kept]) and not in_order(
        [*x_kept, *x_contract_sorted_by_w]
    ):
        order = [*x_batch, *x_contract_sorted_by_w, *x_kept]
        pair = precision[::-1] if isinstance(precision, tuple) else precision  # (lhs, rhs)
        dims = ((tuple(w_kept), g_w), (tuple(w_batch), g_batch))
        dx = lax.dot_general(
            w, g, dims, precision=pair, preferred_element_type=preferred_element_type
        )
    else:
        order = [*x_batch, *x_kept, *x_contract_sorted_by_w]
        dims = ((g_w, tuple(w_kept)), (g_batch, tuple(w_batch)))
        dx = lax.dot_general(
            g, w, dims, precision=precision, preferred_element_type=preferred_element_type
        )
    if order == sorted(order):
        return dx
    return lax.transpose(dx, tuple(int(a) for a in np.argsort(order)))


def transpose_w(g, x, w_aval, *, dimension_numbers, precision, preferred_element_type):
    """``w̄``: ``transpose_x`` with the operands' roles swapped."""
    (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
    swapped = ((w_contract, x_contract), (w_batch, x_batch))
    return transpose_x(
        g,
        x,
        w_aval,
        dimension_numbers=swapped,
        precision=precision,
        preferred_element_type=preferred_element_type,
        swap_ans=True,
    )


def _batch(x_ndim, w_ndim, x_batched, w_batched, *, axis_size, dimension_numbers, precision):
    """vmap: the new axis 0 becomes a batch axis (both batched) or a kept axis (one batched)."""
    del w_ndim, axis_size, precision
    (xc, wc), (xb, wb) = dimension_numbers

    def shift(dims, on):
        return tuple(d + 1 for d in dims) if on else tuple(dims)

    xc, xb, wc, wb = (
        shift(xc, x_batched),
        shift(xb, x_batched),
        shift(wc, w_batched),
        shift(wb, w_batched),
    )
    if x_batched and w_batched:
        return {"dimension_numbers": ((xc, wc), ((0, *xb), (0, *wb)))}, 0
    dims = {"dimension_numbers": ((xc, wc), (xb, wb))}
    if x_batched:  # x's first kept axis: right after the batch axes
        return dims, len(xb)
    return dims, len(xb) + x_ndim - len(xc) - len(xb)  # w's first kept axis


def _factors(x, g, w_aval, *, y_axis, preferred_element_type, dimension_numbers, precision):
    """``w̄_i = X_iᵀ G_i``: ``x_i`` read as ``X_i: (T, d)`` (kept axes, then contracted
    ones, ``w``'s axes ``wc``) and ``g_i`` as ``G_i: (T, p)`` (``w``'s kept axes, in order);
    ``(X, G, wc, w kept)``, or ``None`` with batch axes."""
    del y_axis, preferred_element_type, precision  # y_axis: 0, x's first kept axis
    (xc, wc), (xb, wb) = dimension_numbers
    if xb:  # batch axes pair x with w: w̄_i is not one matrix product
        return None
    n, kept = x.shape[0], _remaining(x.ndim, xc)  # kept: axis 0 (the examples) first
    X = x.transpose(*kept, *xc).reshape(n, int(np.prod(x.shape[1:])) // _size(x, xc), -1)
    G = g.reshape(n, X.shape[1], -1)  # y: (x kept, w kept)
    return X, G, tuple(int(a) for a in wc), tuple(_remaining(len(w_aval.shape), wc, wb))


def _per_example(x, g, w_aval, **kw):
    """Ghost norms of ``w̄_i = X_iᵀ G_i`` (``_factors``); declined with batch axes."""
    got = _factors(x, g, w_aval, **kw)
    return None if got is None else ghost.matmul_route(*got[:2])


def _size(a, axes):
    return int(np.prod([a.shape[i] for i in axes], dtype=int))


def _scale_axes(product, a_ndim, b_ndim, *, dimension_numbers, precision):
    """Quantization: the axes each product keeps, as ``(operand axis, result axis)`` pairs.

    ``y``'s axes are (batch, ``x`` kept, ``w`` kept); ``x̄`` and ``w̄`` receive the batch
    axes and the other operand's contracted axes in their own places.
    """
    del precision
    (xc, wc), (xb, wb) = dimension_numbers
    nb = len(xb)

    def pairs(*seqs):  # (from, to) pairs of consecutive (from_seq, to_seq) arguments
        it = iter(seqs)
        return tuple(p for f in it for p in zip(f, next(it), strict=True))

    if product == "forward":  # a = x, b = w
        x_kept, w_kept = _remaining(a_ndim, xc, xb), _remaining(b_ndim, wc, wb)
        n_x = nb + len(x_kept)
        return (
            pairs(xb, range(nb), x_kept, range(nb, n_x)),
            pairs(wb, range(nb), w_kept, range(n_x, n_x + len(w_kept))),
        )
    # grad_x: (g, w) -> x̄; grad_w: (g, x) -> w̄: the same with the roles of x and w swapped
    if product == "grad_w":
        xc, wc, xb, wb = wc, xc, wb, xb
    o_kept = b_ndim - len(wc) - nb  # the other operand's kept axes, contracted with g's
    n_kept = a_ndim - nb - o_kept  # the result's own kept axes
    r_kept = _remaining(nb + n_kept + len(xc), xc, xb)
    first = nb if product == "grad_x" else nb + o_kept  # g: (batch, x kept, w kept)
    return (
        pairs(range(nb), xb, range(first, first + n_kept), r_kept),
        pairs(wb, xb, wc, xc),
    )


DOT_GENERAL = bilinear_op(
    "dot_general",
    forward,
    transpose_x,
    transpose_w,
    batch=_batch,
    per_example=_per_example,
    factors=_factors,
    scale_axes=_scale_axes,
)


# --------------------------------------------------------------------------------------
# Validation.


def _canonical_dims(fn, lhs, rhs, dimension_numbers):
    """``((lc, rc), (lb, rb))`` as tuples of Python ints, checked against the operands."""
    form = "((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))"
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (tuple(int(d) for d in dims) for dims in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: `dimension_numbers` must be {form} with sequences of ints,"
            f" got {dimension_numbers!r}"
        ) from None
    for side, contract, batch, a in (("lhs", lc, lb, lhs), ("rhs", rc, rb, rhs)):
        for kind, dims in (("contracting", contract), ("batch", batch)):
            bad = [d for d in dims if not 0 <= d < a.ndim]
            if bad:
                raise ValueError(
                    f"{fn}: `dimension_numbers` names {side} {kind} dimension(s) {bad}, out of"
                    f" range for `{side}` of rank {a.ndim} (shape {tuple(a.shape)})"
                )
        if len(set(contract + batch)) != len(contract + batch):
            raise ValueError(
                f"{fn}: `dimension_numbers` repeats a {side} dimension: contracting {contract},"
                f" batch {batch}; each axis may appear once"
            )
    for kind, ldims, rdims in (("contracting", lc, rc), ("batch", lb, rb)):
        if len(ldims) != len(rdims):
            raise ValueError(
                f"{fn}: `dimension_numbers` has {len(ldims)} lhs but {len(rdims)} rhs {kind}"
                f" dimensions ({ldims} vs {rdims}); they must pair up"
            )
        for ld, rd in zip(ldims, rdims, strict=True):
            if lhs.shape[ld] != rhs.shape[rd]:
                raise ValueError(
                    f"{fn}: {kind} dimension sizes differ: `lhs` axis {ld} has size"
                    f" {lhs.shape[ld]} (shape {tuple(lhs.shape)}) but `rhs` axis {rd} has size"
                    f" {rhs.shape[rd]} (shape {tuple(rhs.shape)})"
                )
    return (lc, rc), (lb, rb)


def _prepare(fn, lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding):
    _checks.no_out_sharding(fn, out_sharding)
    lhs, rhs = _checks.operand(fn, "lhs", lhs), _checks.operand(fn, "rhs", rhs)
    lhs, rhs = _checks.promoted(fn, {"lhs": lhs, "rhs": rhs}, weak=False)  # as lax promotes
    params = dict(
        dimension_numbers=_canonical_dims(fn, lhs, rhs, dimension_numbers),
        precision=canonical_precision(precision),
    )
    return lhs, rhs, _checks.out_dtype(fn, preferred_element_type), params


def dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    quant=None,
):
    r"""``lax.dot_general`` whose backward pass is its two transposes, written out.

    A ``jax.custom_vjp`` (reverse mode: ``grad``, ``vjp``, ``jacrev``; plus ``vmap``,
    ``jit``); the forward pass saves only ``lhs`` and ``rhs``. For forward mode use
    ``dual_dot_general``. A drop-in for ``nnx.Linear(..., dot_general=...)`` and
    ``nnx.LinearGeneral(..., dot_general=...)``.

    Args:
      lhs: array with any floating dtype.
      rhs: array; contracting and batch sizes must match ``lhs``'s.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: as for ``lax.dot_general``, used in the forward and both transposes.
      preferred_element_type: dtype of the result (accumulation is at least float32).
      out_sharding: must be ``None`` (accepted because Flax passes it).
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see ``docs/guides/quantization.md``).

    Returns:
      ``(*batch, *lhs_kept, *rhs_kept)``, in ``preferred_element_type`` if given, else in
      the promoted dtype of ``lhs`` and ``rhs``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.array([[1., 2.]]), jnp.array([[1., 0.], [0., 3.]])
      >>> dn = (((1,), (0,)), ((), ()))  # x's axis 1 with w's axis 0: x @ w
      >>> jaxlinear.dot_general(x, w, dn).tolist()
      [[1.0, 6.0]]
      >>> jax.grad(lambda w: jaxlinear.dot_general(x, w, dn).sum())(w).tolist()
      [[1.0, 1.0], [2.0, 2.0]]
    """
    lhs, rhs, out_dtype, params = _prepare(
        "dot_general", lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding
    )
    quant = resolve("dot_general", quant)
    return DOT_GENERAL.custom_vjp(lhs, rhs, out_dtype=out_dtype, quant=quant, **params)


def dual_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    quant=None,
):
    r"""``lax.dot_general`` with an explicit JVP *and* explicit transposes (every transform).

    Same arguments as ``dot_general``; supports ``jvp``, ``jacfwd``, ``hessian``,
    ``linear_transpose`` in either operand, ``grad``, ``vmap``, ``jit``.

    Args:
      lhs: as in ``dot_general``.
      rhs: as in ``dot_general``.
      dimension_numbers: as in ``dot_general``.
      precision: as in ``dot_general``.
      preferred_element_type: as in ``dot_general``.
      out_sharding: as in ``dot_general``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.array([[1., 2.]]), jnp.array([[1., 0.], [0., 3.]])
      >>> dn = (((1,), (0,)), ((), ()))
      >>> jax.jvp(lambda x: jaxlinear.dual_dot_general(x, w, dn), (x,), (x,))[1].tolist()
      [[1.0, 6.0]]
    """
    lhs, rhs, out_dtype, params = _prepare(
        "dual_dot_general",
        lhs,
        rhs,
        dimension_numbers,
        precision,
        preferred_element_type,
        out_sharding,
    )
    quant = resolve("dual_dot_general", quant)
    return DOT_GENERAL.dual(lhs, rhs, out_dtype=out_dtype, quant=quant, **params)
