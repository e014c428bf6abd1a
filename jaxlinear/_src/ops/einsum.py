r"""``einsum``: two-operand ``jnp.einsum`` with its two transposes written as einsums.

For ``y = einsum("X,W->Y", x, w)`` (``X``, ``W``, ``Y`` strings of letters) the
transposes are the same contraction with the subscripts permuted:

.. math::

     \bar x = \mathrm{einsum}(\texttt{"Y,W->X"}, g, w), \qquad
     \bar w = \mathrm{einsum}(\texttt{"Y,X->W"}, g, x).

E.g. ``"btd,dhk->bthk"``: ``x̄ = einsum("bthk,dhk->btd", g, w)`` and
``w̄ = einsum("bthk,btd->dhk", g, x)``. A letter of ``X`` found in neither ``W`` nor
``Y`` is summed out of ``x`` alone; its transpose is a broadcast (the adjoint of a sum),
so it is dropped from the einsum and broadcast back afterwards.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
from jax import lax

from jaxlinear._src.bilinear import bilinear_op
from jaxlinear._src.ops import _checks
from jaxlinear._src.validation import canonical_precision


def _contract(out, a, b, subscripts_a, subscripts_b, out_aval, precision, preferred_element_type):
    """``einsum("A,B->out", a, b)``, broadcast over the letters of ``out`` in neither input."""
    have = set(subscripts_a) | set(subscripts_b)
    kept = "".join(c for c in out if c in have)
    y = jnp.einsum(
        f"{subscripts_a},{subscripts_b}->{kept}",
        a,
        b,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if kept == out:
        return y
    # Letters summed out of one operand alone: the transpose of that sum is a broadcast.
    missing = tuple(i for i, c in enumerate(out) if c not in have)
    return jnp.broadcast_to(lax.expand_dims(y, missing), tuple(out_aval.shape))


def forward(x, w, *, subscripts, precision, preferred_element_type):
    """``y = einsum("X,W->Y", x, w)``; ``subscripts = (X, W, Y)``."""
    xs, ws, ys = subscripts
    return jnp.einsum(
        f"{xs},{ws}->{ys}", x, w, precision=precision, preferred_element_type=preferred_element_type
    )


def transpose_x(g, w, x_aval, *, subscripts, precision, preferred_element_type):
    """``x̄ = einsum("Y,W->X", g, w)``."""
    xs, ws, ys = subscripts
    return _contract(xs, g, w, ys, ws, x_aval, precision, preferred_element_type)


def transpose_w(g, x, w_aval, *, subscripts, precision, preferred_element_type):
    """``w̄ = einsum("Y,X->W", g, x)``."""
    xs, ws, ys = subscripts
    return _contract(ws, g, x, ys, xs, w_aval, precision, preferred_element_type)


def _batch(x_ndim, w_ndim, x_batched, w_batched, *, axis_size, subscripts, precision):
    """vmap: a fresh letter in front of each batched operand's subscripts and of ``y``'s."""
    del x_ndim, w_ndim, axis_size, precision
    xs, ws, ys = subscripts
    new = next(c for c in string.ascii_letters if c not in xs + ws + ys)
    xs, ws = (new + xs if x_batched else xs), (new + ws if w_batched else ws)
    return {"subscripts": (xs, ws, new + ys)}, 0


EINSUM = bilinear_op("einsum", forward, transpose_x, transpose_w, batch=_batch)


# --------------------------------------------------------------------------------------
# Validation.


def _parse(fn, subscripts, x, w):
    """``(X, W, Y)`` from ``"X,W->Y"`` (or implicit ``"X,W"``), checked against the operands."""
    if not isinstance(subscripts, str):
        raise TypeError(
            f"{fn}: `subscripts` must be a string such as 'btd,dhk->bthk',"
            f" got {type(subscripts).__name__}"
        )
    spec = subscripts.replace(" ", "")
    if "." in spec:
        raise ValueError(
            f"{fn}: `subscripts` {subscripts!r} uses an ellipsis ('...'), which jaxlinear's"
            " einsum does not support; name every axis with a letter"
        )
    inputs, arrow, out = spec.partition("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        raise ValueError(
            f"{fn}: `subscripts` {subscripts!r} names {len(operands)} operand(s); exactly two"
            " (input, kernel) are supported"
        )
    xs, ws = operands
    if not arrow:  # implicit output: the letters appearing once, in alphabetical order
        out = "".join(sorted(c for c in set(xs + ws) if (xs + ws).count(c) == 1))
    for name, subs in (("x", xs), ("w", ws), ("output", out)):
        bad = sorted({c for c in subs if c not in string.ascii_letters})
        if bad:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} has non-letter(s) {bad} in the {name} term"
            )
        repeated = sorted({c for c in subs if subs.count(c) > 1})
        if repeated:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} repeats {repeated} in the {name} term"
                f" {subs!r}; traces and diagonals are not supported"
            )
    stray = sorted(set(out) - set(xs) - set(ws))
    if stray:
        raise ValueError(
            f"{fn}: `subscripts` {subscripts!r}: output letter(s) {stray} appear in no operand"
        )
    for name, subs, a in (("x", xs, x), ("w", ws, w)):
        if len(subs) != a.ndim:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} gives `{name}` {len(subs)} axes ({subs!r})"
                f" but `{name}` has rank {a.ndim} (shape {tuple(a.shape)})"
            )
    for c in sorted(set(xs) & set(ws)):
        nx, nw = x.shape[xs.index(c)], w.shape[ws.index(c)]
        if nx != nw:
            raise ValueError(
                f"{fn}: letter {c!r} has size {nx} in `x` (shape {tuple(x.shape)}) but {nw}"
                f" in `w` (shape {tuple(w.shape)}); sizes of a shared letter must match"
            )
    return xs, ws, out


def _prepare(fn, subscripts, operands, precision, preferred_element_type, out_sharding):
    _checks.no_out_sharding(fn, out_sharding)
    if len(operands) != 2:
        raise ValueError(
            f"{fn}: expected exactly two operands (input, kernel), got {len(operands)}"
        )
    x, w = _checks.operand(fn, "x", operands[0]), _checks.operand(fn, "w", operands[1])
    x, w = _checks.promoted(fn, {"x": x, "w": w})  # as jnp.result_type promotes
    params = dict(subscripts=_parse(fn, subscripts, x, w), precision=canonical_precision(precision))
    return x, w, _checks.out_dtype(fn, preferred_element_type), params


def einsum(subscripts, *operands, precision=None, preferred_element_type=None, out_sharding=None):
    r"""Two-operand ``jnp.einsum`` whose backward pass is two einsums, written out.

    A ``jax.custom_vjp`` (``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jit``); the forward
    pass saves only the two operands. For forward mode use ``dual_einsum``. A drop-in
    for ``nnx.Einsum(..., einsum_op=jaxlinear.einsum)``.

    .. math:: \bar x = \mathrm{einsum}(\texttt{"Y,W->X"}, g, w), \quad
              \bar w = \mathrm{einsum}(\texttt{"Y,X->W"}, g, x)

    Args:
      subscripts: ``"X,W->Y"`` with letters only (batch letters allowed, e.g.
        ``"btd,dhk->bthk"``, ``"bqhd,bkhd->bhqk"``), or implicit ``"X,W"``. No
        ellipsis, no letter repeated within one term.
      *operands: exactly two arrays ``x`` and ``w`` of floating dtype.
      precision: as for ``jnp.einsum``, used in the forward and both transposes.
      preferred_element_type: dtype of the result (accumulation is at least float32).
      out_sharding: must be ``None`` (accepted because Flax passes it).

    Returns:
      ``y`` with axes ``Y``, in ``preferred_element_type`` if given, else in the
      promoted dtype of the operands.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.ones((2, 3)), jnp.arange(6.).reshape(3, 2)
      >>> jaxlinear.einsum("td,dk->tk", x, w).tolist()
      [[6.0, 9.0], [6.0, 9.0]]
      >>> jax.grad(lambda x: jaxlinear.einsum("td,dk->tk", x, w).sum())(x).tolist()
      [[1.0, 5.0, 9.0], [1.0, 5.0, 9.0]]
    """
    x, w, out_dtype, params = _prepare(
        "einsum", subscripts, operands, precision, preferred_element_type, out_sharding
    )
    return EINSUM.custom_vjp(x, w, out_dtype=out_dtype, **params)


def dual_einsum(
    subscripts, *operands, precision=None, preferred_element_type=None, out_sharding=None
):
    r"""Two-operand ``jnp.einsum`` with an explicit JVP *and* explicit transposes.

    Same arguments as ``einsum``; supports ``jvp``, ``jacfwd``, ``hessian``,
    ``linear_transpose`` in either operand, ``grad``, ``vmap``, ``jit``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.ones((2, 3)), jnp.arange(6.).reshape(3, 2)
      >>> jax.jvp(lambda w: jaxlinear.dual_einsum("td,dk->tk", x, w), (w,), (w,))[1].tolist()
      [[6.0, 9.0], [6.0, 9.0]]
    """
    x, w, out_dtype, params = _prepare(
        "dual_einsum", subscripts, operands, precision, preferred_element_type, out_sharding
    )
    return EINSUM.dual(x, w, out_dtype=out_dtype, **params)
