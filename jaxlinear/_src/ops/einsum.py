r"""``einsum``: two-operand ``jnp.einsum`` with its two transposes written as einsums.

For ``y = einsum("X,W->Y", x, w)`` (``X``, ``W``, ``Y`` strings of letters) the
transposes are the same contraction with the subscripts permuted:

    x̄ = einsum("Y,W->X", g, w),   w̄ = einsum("Y,X->W", g, x).

E.g. ``"btd,dhk->bthk"``: ``x̄ = einsum("bthk,dhk->btd", g, w)`` and
``w̄ = einsum("bthk,btd->dhk", g, x)``. A letter of ``X`` found in neither ``W`` nor
``Y`` is summed out of ``x`` alone; its transpose is a broadcast (the adjoint of a sum),
so it is dropped from the einsum and broadcast back afterwards.

Every two-operand form ``jnp.einsum`` takes is rewritten first (``_parse``) into letters
only: ``...`` becomes fresh letters, an implicit output is spelled out, and a size-1 axis
broadcast against size ``n`` gets a letter of its own, summed out of its operand alone
(so its transpose is that broadcast back: the adjoint of a broadcast is a sum). The op
itself (forward, both transposes, ``vmap``) only ever sees ``"X,W->Y"`` in letters.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlinear._src import ghost
from jaxlinear._src.bilinear import bilinear_op
from jaxlinear._src.ops import _checks
from jaxlinear._src.quant import resolve
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


def _factors(x, g, w_aval, *, y_axis, preferred_element_type, subscripts, precision):
    """``w̄_i = X_iᵀ G_i`` for ``"X,W->Y"``: ``X_i: (T, d)`` over the letters of ``x`` and
    ``y`` alone (``T``) and the contracted ones (``d``), ``G_i: (T, p)`` with ``p`` the letters
    of ``w`` and ``y``; ``(X, G, w's axes of d, w's axes of p)`` (``w``'s letters in neither
    ``x`` nor ``y`` are in neither: ``w̄_i`` is constant along them). ``None`` when a letter
    is in all three (a batch letter: ``w̄_i`` is then not one matrix product) or repeated
    within a term."""
    del y_axis, preferred_element_type, precision
    xs, ws, ys = subscripts
    if any(len(set(s)) != len(s) for s in subscripts) or set(xs) & set(ws) & set(ys):
        return None
    e = xs[0]  # the examples' letter
    T = "".join(c for c in xs[1:] if c in ys)
    d = "".join(c for c in xs if c in ws)
    p = "".join(c for c in ws if c in ys)
    n = x.shape[0]
    X = jnp.einsum(f"{xs}->{e}{T}{d}", x).reshape(n, -1, _size(w_aval, ws, d))
    G = jnp.einsum(f"{ys}->{e}{T}{p}", g).reshape(n, X.shape[1], -1)
    return X, G, tuple(ws.index(c) for c in d), tuple(ws.index(c) for c in p)


def _per_example(x, g, w_aval, *, subscripts, **kw):
    """Ghost norms of ``w̄_i = X_iᵀ G_i`` (``_factors``), times the size of ``w``'s letters
    in neither ``x`` nor ``y``."""
    got = _factors(x, g, w_aval, subscripts=subscripts, **kw)
    got = None if got is None else ghost.matmul_route(*got[:2], int(np.prod(w_aval.shape)))
    if got is None:
        return None
    xs, ws, ys = subscripts
    # w̄ is constant along the letters of w alone (the adjoint of summing w over them).
    return got[0], got[1] * _size(w_aval, ws, "".join(c for c in ws if c not in xs + ys))


def _size(aval, letters, which):
    return int(np.prod([aval.shape[letters.index(c)] for c in which], dtype=int))


def _scale_axes(product, a_ndim, b_ndim, *, subscripts, precision):
    """Quantization: the letters each product keeps (an operand's letters in the result's)."""
    del a_ndim, b_ndim, precision
    xs, ws, ys = subscripts
    terms = {"forward": (xs, ws, ys), "grad_x": (ys, ws, xs), "grad_w": (ys, xs, ws)}
    a, b, out = terms[product]
    return tuple(tuple((i, out.index(c)) for i, c in enumerate(t) if c in out) for t in (a, b))


EINSUM = bilinear_op(
    "einsum",
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


def _parse(fn, subscripts, x, w):
    """``(X, W, Y)``, letters only, from any two-operand form ``jnp.einsum`` takes.

    ``"X,W->Y"`` or implicit ``"X,W"`` (output: the letters that appear once, sorted),
    each term with at most one ``...`` (the operands' remaining axes, broadcast against
    each other as in NumPy, right-aligned). Canonicalized, checked against the operands:

    * ``...`` becomes fresh letters, one per broadcast axis; an output without ``...``
      sums those axes (as ``jnp.einsum``); implicit output puts them first.
    * A shared letter of size 1 in one operand and ``n`` in the other (a broadcast)
      gets a fresh letter in the size-1 operand, summed out of it alone: so ``x`` (or
      ``w``) of size 1 there is broadcast, and its transpose sums that axis back.

    A letter repeated within one term (a diagonal or trace, ``"ii,ij->j"``) is refused.
    """
    if not isinstance(subscripts, str):
        raise TypeError(
            f"{fn}: `subscripts` must be a string such as 'btd,dhk->bthk',"
            f" got {type(subscripts).__name__}"
        )
    spec = subscripts.replace(" ", "")
    inputs, arrow, out = spec.partition("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        raise ValueError(
            f"{fn}: `subscripts` {subscripts!r} names {len(operands)} operand(s); exactly two"
            " (input, kernel) are supported"
        )
    xs, ws = operands
    terms = {"x": xs, "w": ws, "output": out if arrow else None}
    for name, term in terms.items():
        if term is None:
            continue
        body = term.replace("...", "", 1)
        if "..." in body:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} has more than one ellipsis ('...') in the"
                f" {name} term {term!r}"
            )
        bad = sorted({c for c in body if c not in string.ascii_letters})
        if bad:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} has non-letter(s) {bad} in the {name} term"
                " (letters a-z, A-Z and one '...' are accepted)"
            )
        repeated = sorted({c for c in body if body.count(c) > 1})
        if repeated and name == "output":
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} repeats {repeated} in the output term {term!r}"
            )
        if repeated:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} repeats {repeated} in the {name} term"
                f" {term!r}, a diagonal or trace, which jaxlinear's einsum does not take; take"
                f" it first (e.g. jnp.einsum('ii->i', a)) and pass the result"
            )
    # `...`: the operand's axes not named by a letter, right-aligned against the other's.
    n_ell = {}
    for name, term, a in (("x", xs, x), ("w", ws, w)):
        named = len(term.replace("...", ""))
        n_ell[name] = a.ndim - named if "..." in term else 0
        if n_ell[name] < 0 or ("..." not in term and named != a.ndim):
            least = "at least " if "..." in term else ""
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} gives `{name}` {least}{named} axes"
                f" ({term!r}) but `{name}` has rank {a.ndim} (shape {tuple(a.shape)})"
            )
    unused = iter(c for c in string.ascii_letters if c not in spec)

    def fresh():
        c = next(unused, None)
        if c is None:
            raise ValueError(
                f"{fn}: `subscripts` {subscripts!r} with operands of shapes {tuple(x.shape)} and"
                f" {tuple(w.shape)} needs more than {len(string.ascii_letters)} letters"
            )
        return c

    k = max(n_ell.values())
    ell = "".join(fresh() for _ in range(k))
    if arrow:
        out = out.replace("...", ell)  # an output without `...` sums those axes
    else:  # implicit: the broadcast axes, then the letters appearing once, sorted
        letters = xs.replace("...", "") + ws.replace("...", "")
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    xs = xs.replace("...", ell[k - n_ell["x"] :])
    ws = ws.replace("...", ell[k - n_ell["w"] :])
    stray = sorted(set(out) - set(xs) - set(ws))
    if stray:
        raise ValueError(
            f"{fn}: `subscripts` {subscripts!r}: output letter(s) {stray} appear in no operand"
        )
    # Shared letters: equal sizes, or size 1 in one operand (broadcast: a fresh letter there).
    for c in sorted(set(xs) & set(ws)):
        nx, nw = x.shape[xs.index(c)], w.shape[ws.index(c)]
        if nx == nw:
            continue
        if 1 not in (nx, nw):
            where = f"letter {c!r}" if c not in ell else "an axis of '...'"
            raise ValueError(
                f"{fn}: {where} has size {nx} in `x` (shape {tuple(x.shape)}) but {nw}"
                f" in `w` (shape {tuple(w.shape)}); sizes of a shared letter must match"
                " (or one be 1, broadcast)"
            )
        if nx == 1:
            xs = xs.replace(c, fresh())
        else:
            ws = ws.replace(c, fresh())
    return xs, ws, out


def _chain_hint(fn, subscripts, n):
    """What to write instead of an ``n``-operand einsum: two-operand calls, left to right
    (each keeps the letters a later term or the output still needs), or ``jnp.einsum``."""
    hint = (
        "Chain two-operand calls (each then runs its own explicit transposes), or use"
        " jnp.einsum for a product of activations only (no parameter to differentiate)"
    )
    if not isinstance(subscripts, str) or "->" not in subscripts or "." in subscripts:
        return hint + "."
    terms, out = subscripts.replace(" ", "").split("->")
    terms = terms.split(",")
    if len(terms) != n or n < 3:
        return hint + "."
    calls, acc, arg = [], terms[0], "operands[0]"
    for i, term in enumerate(terms[1:], 1):
        later = set("".join(terms[i + 1 :]) + out)
        kept = out if i == n - 1 else "".join(dict.fromkeys(c for c in acc + term if c in later))
        calls.append(f'y{i} = jaxlinear.{fn}("{acc},{term}->{kept}", {arg}, operands[{i}])')
        acc, arg = kept, f"y{i}"
    return f"{hint}: here {'; '.join(calls)}."


def _prepare(fn, subscripts, operands, precision, preferred_element_type, out_sharding):
    _checks.no_out_sharding(fn, out_sharding)
    if len(operands) != 2:
        raise ValueError(
            f"{fn}: expected exactly two operands (input, kernel), got {len(operands)}."
            f" {_chain_hint(fn, subscripts, len(operands))}"
        )
    x, w = _checks.operand(fn, "x", operands[0]), _checks.operand(fn, "w", operands[1])
    x, w = _checks.promoted(fn, {"x": x, "w": w})  # as jnp.result_type promotes
    params = dict(subscripts=_parse(fn, subscripts, x, w), precision=canonical_precision(precision))
    return x, w, _checks.out_dtype(fn, preferred_element_type), params


def einsum(
    subscripts,
    *operands,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    quant=None,
):
    r"""Two-operand ``jnp.einsum`` whose backward pass is two einsums, written out.

    A ``jax.custom_vjp`` (``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jit``); the forward
    pass saves only the two operands. For forward mode use ``dual_einsum``. A drop-in
    for ``nnx.Einsum(..., einsum_op=jaxlinear.einsum)``.

        x̄ = einsum("Y,W->X", g, w),   w̄ = einsum("Y,X->W", g, x)

    Args:
      subscripts: any two-operand form ``jnp.einsum`` takes: ``"X,W->Y"`` (batch
        letters allowed, e.g. ``"btd,dhk->bthk"``, ``"bqhd,bkhd->bhqk"``), implicit
        ``"X,W"`` (output: the letters that appear once, sorted), ``...`` in either or
        both operands and the output (e.g. Flax's ``"d...ab,bc...->ad...c"``; axes
        broadcast as in NumPy, size 1 against ``n``; an output without ``...`` sums
        them). A letter repeated within one term (a diagonal or trace, ``"ii,ij->j"``)
        is refused.
      *operands: exactly two arrays ``x`` and ``w`` of floating dtype.
      precision: as for ``jnp.einsum``, used in the forward and both transposes.
      preferred_element_type: dtype of the result (accumulation is at least float32).
      out_sharding: must be ``None`` (accepted because Flax passes it).
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see ``docs/guides/quantization.md``).

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
      >>> jaxlinear.einsum("...d,dk->...k", jnp.ones((4, 2, 3)), w).shape
      (4, 2, 2)
    """
    x, w, out_dtype, params = _prepare(
        "einsum", subscripts, operands, precision, preferred_element_type, out_sharding
    )
    quant = resolve("einsum", quant)
    return EINSUM.custom_vjp(x, w, out_dtype=out_dtype, quant=quant, **params)


def dual_einsum(
    subscripts,
    *operands,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    quant=None,
):
    r"""Two-operand ``jnp.einsum`` with an explicit JVP *and* explicit transposes.

    Same arguments as ``einsum``; supports ``jvp``, ``jacfwd``, ``hessian``,
    ``linear_transpose`` in either operand, ``grad``, ``vmap``, ``jit``.

    Args:
      subscripts: as in ``einsum``.
      *operands: as in ``einsum``.
      precision: as in ``einsum``.
      preferred_element_type: as in ``einsum``.
      out_sharding: as in ``einsum``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.ones((2, 3)), jnp.arange(6.).reshape(3, 2)
      >>> jax.jvp(lambda w: jaxlinear.dual_einsum("td,dk->tk", x, w), (w,), (w,))[1].tolist()
      [[6.0, 9.0], [6.0, 9.0]]
    """
    x, w, out_dtype, params = _prepare(
        "dual_einsum", subscripts, operands, precision, preferred_element_type, out_sharding
    )
    quant = resolve("dual_einsum", quant)
    return EINSUM.dual(x, w, out_dtype=out_dtype, quant=quant, **params)
