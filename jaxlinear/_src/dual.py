r"""``dual_linear``: ``Y = X W + b`` with an explicit JVP *and* an explicit transpose.

Mechanism: two ``jax.extend.core.Primitive``\ s, each with its rules registered
right below it (public JAX extension points only: ``jax.extend.core.Primitive``,
``jax.interpreters.ad.primitive_jvps`` / ``primitive_transposes``,
``jax.interpreters.batching.primitive_batchers``, ``jax.interpreters.mlir.lower_fun``):

``affine_p(x, W[, b])``
    the forward map ``formulas.forward``. JVP rule: bind ``pushforward_p`` on the
    tangents. Transpose rule (for ``jax.linear_transpose`` of ``x -> dual_linear(p, x)``
    or of ``p -> dual_linear(p, x)``): ``formulas.pullback``.
``pushforward_p(x, W, dx?, dW?, db?)``
    the tangent map ``formulas.pushforward``, linear in ``(dx, dW, db)``. Transpose
    rule: ``formulas.pullback``; this is what ``grad``/``vjp`` run, since JAX's
    reverse mode is linearize-then-transpose. Its own JVP rule (for Hessians and
    forward-over-reverse) binds ``pushforward_p`` twice, using the identity
    ``dX Ẇ + Ẋ dW = pushforward(x=dX, W=dW; dx=Ẋ, dW=Ẇ)``.

So the forward-mode rule is ``pushforward`` and the reverse-mode rule is
``pullback``, the same functions ``linear`` uses, and every transform composes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jaxlinear._src import formulas, vma
from jaxlinear._src.linear import _prepare

_TANGENTS = ("x", "W", "b")  # the names of pushforward_p's optional linear operands


def _out_aval(x_aval, d_out, compute_dtype, *operand_avals):
    """``Y``'s abstract value: ``x``'s with the last axis ``d_out``; ``operand_avals[0]`` is W's.

    Inside ``shard_map``, ``Y`` varies along every manual axis along which any operand does;
    on a mesh with Explicit axes, its sharding is the one ``formulas.forward`` gives it.
    """
    aval = x_aval.update(
        shape=(*x_aval.shape[:-1], d_out),
        dtype=formulas.output_dtype(x_aval.dtype, compute_dtype),
        weak_type=False,
    )
    sharding = vma.typed_output(x_aval, operand_avals[0])  # only where shardings are types
    if sharding is not None:
        aval = aval.update(sharding=sharding)
    axes = frozenset().union(*(vma.varying_axes(a) for a in (x_aval, *operand_avals)))
    return vma.with_varying(aval, axes)


def _moved(a, axis, size):
    """``a`` with its batch axis at 0: moved there, or broadcast if it has none."""
    if axis is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, axis, 0)


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)


def _register(prim, impl, abstract_eval, jvp, transpose, batch):
    """Register a primitive's rules: evaluation and lowering are the formula itself."""
    prim.def_impl(impl)
    prim.def_abstract_eval(abstract_eval)
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = batch
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))


# --------------------------------------------------------------------------------------
# affine_p: the forward map.

affine_p = Primitive("jaxlinear_affine")


def _affine_impl(x, W, *b, precision, compute_dtype):
    return formulas.forward(x, W, *b or [None], precision=precision, compute_dtype=compute_dtype)


def _affine_abstract_eval(x, W, *b, precision, compute_dtype):
    del precision
    return _out_aval(x, W.shape[1], compute_dtype, W, *b)


def _affine_jvp(primals, tangents, *, precision, compute_dtype):
    x, W, *_ = primals
    y = affine_p.bind(*primals, precision=precision, compute_dtype=compute_dtype)
    present = tuple(type(t) is not ad.Zero for t in tangents)
    if not any(present):  # JAX does not call a JVP rule with all-zero tangents; be safe anyway
        return y, jnp.zeros_like(y)
    mask = present + (False,) * (3 - len(present))  # no b operand: no b tangent
    dy = pushforward_p.bind(
        x,
        W,
        *(t for t, p in zip(tangents, present, strict=True) if p),
        mask=mask,
        precision=precision,
        compute_dtype=compute_dtype,
    )
    return y, dy


def _affine_transpose(ct, x, W, *b, precision, compute_dtype):
    """Transpose w.r.t. ``x`` (``W``, ``b`` fixed) or w.r.t. ``(W, b)`` (``x`` fixed)."""
    undefined = [ad.is_undefined_primal(a) for a in (x, W, *b)]
    if undefined[0] and undefined[1]:
        raise ValueError(
            "dual_linear: cannot transpose with respect to both `x` and `W`: X W is bilinear,"
            " not linear, in (x, W)"
        )
    wrt = tuple(name for name, u in zip(_TANGENTS, undefined, strict=False) if u)
    if type(ct) is ad.Zero:
        return [None] * len(undefined)
    # An operand being solved for is an UndefinedPrimal: pass its aval (shape, dtype).
    x_, W_ = (a.aval if ad.is_undefined_primal(a) else a for a in (x, W))
    dx, dW, db = formulas.pullback(
        x_, W_, ct, precision=precision, compute_dtype=compute_dtype, wrt=wrt
    )
    # Inside shard_map: sum over the manual axes along which the operand solved for is replicated.
    cts = zip((dx, dW, db), (x, W, *b), undefined, strict=False)
    return [vma.psum_to(d, a.aval) if u else d for d, a, u in cts]


def _affine_batch(args, dims, *, precision, compute_dtype):
    x, W, *b = args
    x_dim, W_dim, *b_dim = dims
    if W_dim is None and all(d is None for d in b_dim):
        # Only x is batched: its batch axis becomes one more leading axis of x.
        x = jnp.moveaxis(x, x_dim, 0)
        return affine_p.bind(x, W, *b, precision=precision, compute_dtype=compute_dtype), 0
    # Batched weights: one GEMM per batch entry; fall back to the formula under vmap.
    fn = jax.vmap(
        lambda x, W, *b: _affine_impl(x, W, *b, precision=precision, compute_dtype=compute_dtype),
        in_axes=tuple(dims),
    )
    return fn(*args), 0


_register(
    affine_p, _affine_impl, _affine_abstract_eval, _affine_jvp, _affine_transpose, _affine_batch
)


# --------------------------------------------------------------------------------------
# pushforward_p: the tangent map, linear in its tangent operands.


def _split(args, mask):
    """``(x, W, dx|None, dW|None, db|None)`` from the operands and the static mask."""
    x, W, *tangents = args
    it = iter(tangents)
    return (x, W, *(next(it) if m else None for m in mask))


pushforward_p = Primitive("jaxlinear_pushforward")


def _pushforward_impl(*args, mask, precision, compute_dtype):
    x, W, dx, dW, db = _split(args, mask)
    return formulas.pushforward(x, W, dx, dW, db, precision=precision, compute_dtype=compute_dtype)


def _pushforward_abstract_eval(*args, mask, precision, compute_dtype):
    del mask, precision
    return _out_aval(args[0], args[1].shape[1], compute_dtype, *args[1:])


def _bind_pushforward(x, W, dx, dW, db, *, precision, compute_dtype):
    """Bind ``pushforward_p``, passing ``None``/symbolic-zero tangents as absent."""
    tangents = [None if type(t) is ad.Zero else t for t in (dx, dW, db)]
    mask = tuple(t is not None for t in tangents)
    if not any(mask):
        return None
    return pushforward_p.bind(
        x,
        W,
        *(t for t in tangents if t is not None),
        mask=mask,
        precision=precision,
        compute_dtype=compute_dtype,
    )


def _pushforward_jvp(primals, tangents, *, mask, precision, compute_dtype):
    # pushforward(x, W; dx, dW, db) = dx W + x dW + db. Differentiating every operand
    # (dots for the new tangents):  [ḋx W + x ḋW + ḋb] + [dx Ẇ + ẋ dW], and the bracket on
    # the right is pushforward(x=dx, W=dW; dx=ẋ, dW=Ẇ): the same map with roles swapped.
    kw = dict(precision=precision, compute_dtype=compute_dtype)
    x, W, dx, dW, _ = _split(primals, mask)
    x_dot, W_dot, *dots = tangents
    _, _, dx_dot, dW_dot, db_dot = _split((None, None, *dots), mask)
    out = pushforward_p.bind(*primals, mask=mask, **kw)
    terms = [
        _bind_pushforward(x, W, dx_dot, dW_dot, db_dot, **kw),
        _bind_pushforward(
            x if dx is None else dx,  # dx is None: its term (dx Ẇ) is dropped below
            W if dW is None else dW,  # dW is None: its term (ẋ dW) is dropped below
            None if dW is None else x_dot,
            None if dx is None else W_dot,
            None,
            **kw,
        ),
    ]
    terms = [t for t in terms if t is not None]
    if not terms:
        return out, jnp.zeros_like(out)
    return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _pushforward_transpose(ct, *args, mask, precision, compute_dtype):
    x, W, *tangents = args
    if ad.is_undefined_primal(x) or ad.is_undefined_primal(W):
        raise ValueError(
            "dual_linear: the pushforward is linear in the tangents (dx, dW, db) only; it"
            " cannot be transposed with respect to the primal `x` or `W`"
        )
    names = [name for name, m in zip(_TANGENTS, mask, strict=True) if m]
    wrt = tuple(n for n, t in zip(names, tangents, strict=True) if ad.is_undefined_primal(t))
    if type(ct) is ad.Zero:
        return [None] * len(args)
    dx, dW, db = formulas.pullback(
        x, W, ct, precision=precision, compute_dtype=compute_dtype, wrt=wrt
    )
    by_name = {"x": dx, "W": dW, "b": db}
    for n, t in zip(names, tangents, strict=True):
        if ad.is_undefined_primal(t):
            # Inside shard_map: sum over the manual axes along which this tangent is replicated.
            by_name[n] = vma.psum_to(by_name[n], t.aval)
    return [None, None, *(by_name[n] for n in names)]


def _pushforward_batch(args, dims, *, mask, precision, compute_dtype):
    kw = dict(mask=mask, precision=precision, compute_dtype=compute_dtype)
    x, W, dx, dW, db = _split(args, mask)
    x_dim, W_dim, dx_dim, dW_dim, db_dim = _split(dims, mask)
    if W_dim is None and dW_dim is None and db_dim is None:
        # Only x-like operands are batched: the batch axis becomes a leading axis of both.
        size = _batch_size(args, dims)
        x = _moved(x, x_dim, size)
        dx = None if dx is None else _moved(dx, dx_dim, size)
        rest = [t for t in (dx, dW, db) if t is not None]
        return pushforward_p.bind(x, W, *rest, **kw), 0
    fn = jax.vmap(lambda *a: _pushforward_impl(*a, **kw), in_axes=tuple(dims))
    return fn(*args), 0


_register(
    pushforward_p,
    _pushforward_impl,
    _pushforward_abstract_eval,
    _pushforward_jvp,
    _pushforward_transpose,
    _pushforward_batch,
)


# --------------------------------------------------------------------------------------


def dual_linear(params, x, *, precision=None, compute_dtype=None):
    r"""The affine layer ``Y = X W + b`` with explicit forward- *and* reverse-mode rules.

    Same contract, validation and dtype policy as ``linear``; the JVP rule is
    ``pushforward`` and the transpose rule is ``pullback``. Unlike ``linear`` (a
    ``custom_vjp``), it supports every JAX transform: ``jvp``, ``linearize``,
    ``jacfwd``, ``hessian``, forward-over-reverse and reverse-over-forward,
    ``linear_transpose``, as well as ``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jit``,
    ``checkpoint`` and ``lax.scan``.

    Args:
      params: ``Params(W, b)`` or ``{"W": W, "b": b}``; ``W: (d_in, d_out)``,
        ``b: (d_out,)``, ``(1, d_out)`` or ``None``.
      x: ``(..., d_in)``.
      precision: passed to every matmul (forward, JVP and transpose).
      compute_dtype: e.g. ``jnp.bfloat16``: matmuls in this dtype, float32 accumulation.

    Returns:
      ``Y: (..., d_out)``, in ``compute_dtype`` if given, else in ``x.dtype``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> x = jnp.array([1., 1.])
      >>> jax.jvp(lambda x: jaxlinear.dual_linear(p, x), (x,), (jnp.array([1., 0.]),))[1].tolist()
      [2.0, 1.0]
    """
    layout, precision, compute_dtype = _prepare("dual_linear", params, x, precision, compute_dtype)
    W, b = layout.unpack(params)
    operands = (x, W) if b is None else (x, W, b)
    return affine_p.bind(*operands, precision=precision, compute_dtype=compute_dtype)
