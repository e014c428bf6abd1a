r"""Per-example gradient norms and clipped gradients, without forming per-example gradients.

For the dense layer ``Y = X W + b``, example ``i``'s gradient is ``dW_i = X_iᵀ G_i`` and
``db_i = Σ_t G_i[t]``, where ``X_i: (T, d_in)`` and ``G_i: (T, d_out)`` are example ``i``'s
rows of the layer input and of the cotangent of ``Y`` (``T = 1`` for 2-D inputs; every axis
between the first and the last is flattened into ``T``). So its squared norm needs only
``X`` and ``G``, which the backward pass computes anyway:

- 2-D input ``(n, d_in)``: ``‖dW_i‖² = ‖x_i‖² ‖g_i‖²`` (``dW_i`` has rank one) and
  ``‖db_i‖² = ‖g_i‖²``: ``O(d_in + d_out)`` work per example.
- Input ``(n, T, d_in)``: ``‖X_iᵀ G_i‖_F² = ⟨X_i X_iᵀ, G_i G_iᵀ⟩`` (the "Gram" route,
  ``T² (d_in + d_out)`` multiply-adds per example) or the per-example ``dW_i = X_iᵀ G_i``
  squared and summed (``T d_in d_out``). ``sequence_route`` picks the one with fewer
  multiply-adds, statically per layer call: Gram when ``T (d_in + d_out) ≤ d_in d_out``.

The clipped gradient ``Σ_i c_i ∇ℓ_i`` of a dense layer is ``Xᵀ diag(c) G`` (and
``Σ_i c_i Σ_t G_i[t]`` for ``b``): the layer's own pullback applied to ``G`` with row ``i``
scaled by ``c_i``. So ``clipped_grad`` costs one forward pass, one backward pass that
stops at the ``G``\ s, the norms, and one more set of weight-gradient contractions; it never
runs a second backward pass through the network, and forms per-example gradients only where
the ``"per_example"`` route below already did (then the clipped sum is ``Σ_i c_i dW_i``).

How the layers hand ``X`` and ``G`` over (all at trace time):

1. *Discovery*: ``loss_fn`` is traced once with ``jax.make_jaxpr``. Every call of
   ``linear`` or ``dual_linear`` (so also ``mlp``; both are decorated with ``hooked``) goes
   through ``layer_call``, which records it. A call qualifies when each leaf of its
   ``params`` is a leaf of the ``params`` being differentiated (the same object: pass the
   leaves themselves, not arrays computed from them) and its input has the ``n`` examples
   on axis 0, outside any transformation.
   A qualifying layer computes with stand-ins for ``W`` and ``b`` broadcast from one scalar
   "probe" input per leaf, so the jaxpr shows every *other* use of a leaf. A leaf is handled
   structurally when its own input is used nowhere in the jaxpr and its probe exactly once
   at the top level: one qualifying layer call, not inside ``jax.jit``, ``lax.scan``,
   ``lax.cond``, ``jax.checkpoint`` or a custom rule within ``loss_fn``.
2. *Computation*: ``loss_fn`` runs again under ``jax.vjp``; each layer call that holds a
   structural leaf returns ``Y + Z_k`` with an input ``Z_k = 0`` of ``Y``'s shape and keeps
   its input ``X_k``. The cotangent of ``Z_k`` is ``G_k``.
3. *Fallback*: every other params leaf (used outside the layers, shared by two layer calls,
   reached through a layer inside another transformation, a layer whose input is not
   ``(n, ...)``, or an op without a structural norm yet: ``conv``, ``einsum``,
   ``dot_general``, ``embed``) gets its per-example gradients from
   ``jax.vmap`` of ``jax.grad`` of the single-example loss with respect to just those
   leaves (``fallback="vmap"``, the default: memory ``n`` times those leaves), or raises a
   ``ValueError`` naming the leaf and the reason (``fallback="raise"``).

Assumptions: the examples do not interact (loss ``i`` depends only on row ``i`` of every
array in ``args``: no batch norm or other statistics across the batch), and ``loss_fn`` is
deterministic in its Python control flow (it is traced twice; a different sequence of
layer calls on the second trace raises). A ``jax.jit``-wrapped ``loss_fn`` hides its layers
(its leaves go to the fallback): pass the plain function and jit the whole step instead.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_FALLBACKS = ("vmap", "raise")

# The active recorder (discovery or computation), or None: outside the two passes, and
# while a layer's own code runs, layer_call is a plain call.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxlinear_per_example", default=None)


def hooked(layer: Callable) -> Callable:
    """Decorate a dense layer ``layer(params, x, **options)`` so the recorders see its calls.

    For ``Y = X W + b`` layers only (``params`` leaves ``W: (d_in, d_out)``, optional
    ``b``): the norms use the dense formula. Other ops are not decorated, so their
    parameters get the fallback. Outside ``per_example_grad_norms`` and ``clipped_grad``
    the wrapper only calls ``layer``.
    """

    @functools.wraps(layer)
    def wrapper(params, x, *args, **kwargs):
        if _ACTIVE.get() is None:
            return layer(params, x, *args, **kwargs)
        return layer_call(lambda p, x: layer(p, x, *args, **kwargs), params, x)

    return wrapper


def layer_call(apply: Callable, params, x):
    """The hook of the dense layers: ``apply(params, x)``, seen by the active recorder.

    ``apply(params, x) -> Y: (..., d_out)`` is the layer itself; ``params`` holds the leaves
    ``W: (d_in, d_out)`` and optionally ``b``, in that order. ``apply`` runs unhooked.
    """
    recorder = _ACTIVE.get()
    token = _ACTIVE.set(None)
    try:
        return apply(params, x) if recorder is None else recorder.layer(apply, params, x)
    finally:
        _ACTIVE.reset(token)


def sequence_route(T: int, d_in: int, d_out: int) -> str:
    """Which formula gives ``‖X_iᵀ G_i‖_F²`` for ``X_i: (T, d_in)``, ``G_i: (T, d_out)``.

    ``"rank_one"`` for ``T == 1`` (``‖x_i‖² ‖g_i‖²``), ``"gram"`` when
    ``T (d_in + d_out) ≤ d_in d_out`` (``⟨X_i X_iᵀ, G_i G_iᵀ⟩``: ``T² (d_in + d_out)``
    multiply-adds and a ``(T, T)`` buffer per example), else ``"per_example"``
    (``dW_i = X_iᵀ G_i`` squared and summed: ``T d_in d_out`` multiply-adds and a
    ``(d_in, d_out)`` buffer per example).

    Examples:
      >>> sequence_route(1, 512, 512), sequence_route(64, 512, 512), sequence_route(1024, 64, 64)
      ('rank_one', 'gram', 'per_example')
    """
    if T == 1:
        return "rank_one"
    return "gram" if T * (d_in + d_out) <= d_in * d_out else "per_example"


def dense_sq_norms(x, g, dtype):
    r"""Per-example squared norms of the dense layer's ``dW`` and ``db``.

    .. math:: \|X_i^\top G_i\|_F^2 = \langle X_i X_i^\top, G_i G_i^\top \rangle, \qquad
              \|\textstyle\sum_t G_i[t]\|^2

    Args:
      x: ``(n, ..., d_in)`` layer input; example ``i`` is ``x[i]``.
      g: ``(n, ..., d_out)`` cotangent of the layer output.
      dtype: the dtype to compute in.

    Returns:
      ``(sq_W, sq_b, dW)``: ``sq_W``, ``sq_b`` of shape ``(n,)``; ``dW`` the per-example
      weight gradients ``(n, d_in, d_out)`` where the ``"per_example"`` route formed them
      (``clipped_grad`` then reuses them), else ``None``.
    """
    n, d_in, d_out = x.shape[0], x.shape[-1], g.shape[-1]
    dw = None
    X = x.reshape(n, -1, d_in).astype(dtype)  # (n, T, d_in)
    G = g.reshape(n, -1, d_out).astype(dtype)  # (n, T, d_out)
    route = sequence_route(X.shape[1], d_in, d_out)
    if route == "rank_one":
        sq_w = jnp.sum(X[:, 0] ** 2, axis=-1) * jnp.sum(G[:, 0] ** 2, axis=-1)
    elif route == "gram":
        xx = jnp.einsum("ntd,nsd->nts", X, X)  # (n, T, T)
        gg = jnp.einsum("ntk,nsk->nts", G, G)  # (n, T, T)
        sq_w = jnp.sum(xx * gg, axis=(1, 2))
    else:
        dw = jnp.einsum("ntd,ntk->ndk", X, G)  # (n, d_in, d_out): per-example dW_i
        sq_w = jnp.sum(dw**2, axis=(1, 2))
    sq_b = jnp.sum(jnp.sum(G, axis=1) ** 2, axis=-1)
    return sq_w, sq_b, dw


# --------------------------------------------------------------------------------------
# The two passes.


@dataclasses.dataclass
class _Call:
    """A qualifying layer call seen in the discovery pass."""

    apply: Callable
    treedef: object  # of the layer's params
    leaves: tuple[int, ...]  # index into the params leaves of each layer params leaf (W, b)
    x_shape: tuple[int, ...]
    y: jax.ShapeDtypeStruct


class _Discover:
    """Pass 1: record the layer calls; qualifying ones compute with probe stand-ins."""

    def __init__(self, n, leaf_tracers, probes):
        self.n = n
        self.index = {id(t): j for j, t in enumerate(leaf_tracers)}
        self.probes = probes
        self.tracer_type = type(probes[0]) if probes else None
        self.calls: list[_Call | None] = []
        self.reasons: dict[int, str] = {}  # leaf -> why it cannot be handled structurally

    def layer(self, apply, params, x):
        leaves, treedef = jax.tree.flatten(params)
        idx = [self.index.get(id(a)) for a in leaves]
        reason = self._disqualify(leaves, idx, x)
        if reason is not None:
            for j in idx:
                if j is not None:
                    self.reasons.setdefault(j, reason)
            self.calls.append(None)
            return apply(params, x)  # the leaves themselves: the jaxpr shows them used
        stand_ins = [
            jnp.broadcast_to(self.probes[j], a.shape) for j, a in zip(idx, leaves, strict=True)
        ]
        y = apply(treedef.unflatten(stand_ins), x)
        self.calls.append(
            _Call(
                apply, treedef, tuple(idx), tuple(x.shape), jax.ShapeDtypeStruct(y.shape, y.dtype)
            )
        )
        return y

    def _disqualify(self, leaves, idx, x):
        """``None`` if the call qualifies, else the reason (for its params leaves)."""
        if all(j is None for j in idx):
            return "not a params leaf"
        if len(leaves) not in (1, 2):
            return f"passed to a jaxlinear layer in params of {len(leaves)} leaves, not (W, b)"
        if any(j is None for j in idx):
            return "passed to a jaxlinear layer together with a W or b that is not a params leaf"
        if isinstance(x, jax.core.Tracer) and type(x) is not self.tracer_type:
            return (
                "passed to a jaxlinear layer inside a transformation (vmap, grad, ...) in loss_fn"
            )
        shape = np.shape(x)
        w_shape = np.shape(leaves[0])
        if len(w_shape) != 2 or not shape or shape[-1] != w_shape[0]:
            return f"passed as a W of shape {w_shape} for an input of shape {shape}"
        if len(shape) < 2 or shape[0] != self.n:
            return (
                f"passed to a jaxlinear layer whose input `x` has shape {shape}, not"
                f" ({self.n}, ..., d_in) with the examples on axis 0"
            )
        return None


class _Compute:
    """Pass 2: the layer calls holding structural leaves add ``Z_k`` and keep ``X_k``."""

    def __init__(self, fn, calls, slots, zs):
        self.fn, self.calls, self.slots, self.zs = fn, calls, slots, zs
        self.k = 0
        self.xs: list = [None] * len(zs)

    def layer(self, apply, params, x):
        k, self.k = self.k, self.k + 1
        y = apply(params, x)
        slot = self.slots.get(k)
        if slot is None:
            return y
        if np.shape(x) != self.calls[k].x_shape or np.shape(y) != self.calls[k].y.shape:
            raise RuntimeError(
                f"{self.fn}: `loss_fn` made different jaxlinear layer calls when traced again"
                f" (call {k}: x of shape {np.shape(x)}, expected {self.calls[k].x_shape});"
                " its Python control flow must not change between traces"
            )
        self.xs[slot] = x
        return y + self.zs[slot]


def _run(recorder, fn, *args, **kwargs):
    token = _ACTIVE.set(recorder)
    try:
        return fn(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------------------
# Validation.


def _check_args(fn: str, args) -> int:
    """The number of examples ``n``: the common leading size of every array in ``args``."""
    flat = jax.tree_util.tree_flatten_with_path(args)[0]
    if not flat:
        raise ValueError(
            f"{fn}: `args` holds no arrays; pass the batch (examples along axis 0) after `params`"
        )
    first_name = first_shape = None
    for path, a in flat:
        name = "args" + jax.tree_util.keystr(path)
        shape = getattr(a, "shape", None)
        if shape is None or not hasattr(a, "dtype"):
            raise TypeError(
                f"{fn}: `{name}` must be an array with the examples along axis 0,"
                f" got {type(a).__name__}"
            )
        if len(shape) == 0:
            raise ValueError(f"{fn}: `{name}` must have the examples along axis 0, got a 0-d array")
        if first_shape is None:
            first_name, first_shape = name, tuple(shape)
        elif shape[0] != first_shape[0]:
            raise ValueError(
                f"{fn}: `{name}` has leading size {shape[0]} (shape {tuple(shape)}) but"
                f" `{first_name}` has {first_shape[0]} (shape {first_shape}); every array in"
                " `args` must have the same number of examples along axis 0"
            )
    return int(first_shape[0])


def _check_params(fn: str, params):
    """Params leaves as jax arrays, their names, and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError(f"{fn}: `params` has no array leaves")
    names, leaves = [], []
    for path, a in flat:
        name = "params" + jax.tree_util.keystr(path)
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: `{name}` has dtype {a.dtype}; every params leaf must be real floating"
            )
        names.append(name)
        leaves.append(a)
    return leaves, names, treedef


def _check_losses(fn: str, out, n: int) -> None:
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"{fn}: `loss_fn` must return one array of per-example losses of shape ({n},),"
            f" got {jax.tree.structure(out)}"
        )
    if out.shape != (n,):
        hint = " (a scalar: return the per-example losses, not their sum or mean)"
        raise ValueError(
            f"{fn}: `loss_fn` must return per-example losses of shape ({n},) (one per example"
            f" along axis 0 of `args`), got shape {out.shape}{hint if out.shape == () else ''}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fn}: `loss_fn` must return real floating losses, got dtype {out.dtype}")


def _check_clip_norm(fn: str, clip_norm) -> None:
    if clip_norm is None:
        raise ValueError(f"{fn}: `clip_norm` must be a finite number > 0, got None")
    if np.ndim(clip_norm) != 0:
        raise ValueError(f"{fn}: `clip_norm` must be a scalar, got shape {np.shape(clip_norm)}")
    try:
        value = float(clip_norm)
    except jax.errors.ConcretizationTypeError:
        return  # a traced value: it cannot be checked at trace time
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: `clip_norm` must be a finite number > 0, got {value}")


# --------------------------------------------------------------------------------------
# The driver.


def _analyse(jaxpr, calls, reasons, num_leaves):
    """Which leaves are structural; reasons for the others; unused leaves.

    ``jaxpr.invars`` are the probes, then the leaves, then the args.
    """
    probe_vars = jaxpr.invars[:num_leaves]
    leaf_vars = jaxpr.invars[num_leaves : 2 * num_leaves]
    uses = collections.defaultdict(list)  # id(var) -> the top-level equations reading it
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            uses[id(v)].append(eqn)
    outs = {id(v) for v in jaxpr.outvars}
    in_calls = collections.Counter(j for c in calls if c is not None for j in c.leaves)
    status = {}  # leaf -> "layer" | "unused" | a reason
    for j in range(num_leaves):
        leaf_used = bool(uses[id(leaf_vars[j])]) or id(leaf_vars[j]) in outs
        probe_uses = uses[id(probe_vars[j])]
        if j in reasons:
            status[j] = reasons[j]
        elif in_calls[j] > 1:
            status[j] = f"used by {in_calls[j]} jaxlinear layer calls (shared weights)"
        elif leaf_used:
            status[j] = (
                "used outside jaxlinear's dense layers (linear, dual_linear, mlp; conv, einsum,"
                " dot_general and embed have no structural norm yet), or by a layer inside"
                " jax.jit, lax.scan, lax.cond, jax.checkpoint or a custom rule within loss_fn"
            )
        elif in_calls[j] == 0:
            status[j] = "unused"
        elif len(probe_uses) == 1 and probe_uses[0].primitive.name == "broadcast_in_dim":
            status[j] = "layer"
        else:
            status[j] = (
                "used by a jaxlinear layer inside jax.jit, lax.scan, lax.cond, jax.checkpoint"
                " or a custom rule within loss_fn"
            )
    return status


def _per_example(fn, loss_fn, params, args, fallback, clip, clip_norm=None):
    """Norms ``(n,)``; with ``clip``, ``(clipped gradient, norms)``."""
    if fallback not in _FALLBACKS:
        raise ValueError(f"{fn}: `fallback` must be one of {_FALLBACKS}, got {fallback!r}")
    if clip:
        _check_clip_norm(fn, clip_norm)
    n = _check_args(fn, args)
    leaves, names, treedef = _check_params(fn, params)
    L = len(leaves)
    dtype = jnp.result_type(*(a.dtype for a in leaves), jnp.float32)  # norms' dtype

    # Pass 1: discovery.
    recorders = []

    def discover(probes, leaf_tracers, args):
        recorders.append(_Discover(n, leaf_tracers, probes))
        return _run(recorders[-1], loss_fn, treedef.unflatten(leaf_tracers), *args)

    probes = [jnp.zeros((), a.dtype) for a in leaves]
    closed, out = jax.make_jaxpr(discover, return_shape=True)(probes, leaves, args)
    _check_losses(fn, out, n)
    (rec,) = recorders
    status = _analyse(closed.jaxpr, rec.calls, rec.reasons, L)
    other = [j for j in range(L) if status[j] not in ("layer", "unused")]
    if other and fallback == "raise":
        j = other[0]
        raise ValueError(
            f"{fn}: `{names[j]}` is {status[j]}, so its per-example gradient norm has no"
            " structural formula here; pass fallback='vmap' to compute it from per-example"
            " gradients of that leaf (jax.vmap of jax.grad), or use the leaf directly as the"
            " W or b of one top-level jaxlinear layer call"
        )

    # Pass 2: one forward and one backward pass that stops at the G's.
    slots, taps = {}, []  # call index -> slot; slot -> call index
    for k, call in enumerate(rec.calls):
        if call is not None and any(status[j] == "layer" for j in call.leaves):
            slots[k] = len(taps)
            taps.append(k)
    zs = [jnp.zeros(rec.calls[k].y.shape, rec.calls[k].y.dtype) for k in taps]

    def losses_of(zs, other_values):
        values = list(leaves)
        for j, v in zip(other, other_values, strict=True):
            values[j] = v
        computing = _Compute(fn, rec.calls, slots, zs)
        losses = _run(computing, loss_fn, treedef.unflatten(values), *args)
        if computing.k != len(rec.calls):
            raise RuntimeError(
                f"{fn}: `loss_fn` made {computing.k} jaxlinear layer calls when traced again,"
                f" {len(rec.calls)} the first time; its Python control flow must not change"
                " between traces"
            )
        return losses, computing.xs

    losses, pullback, xs = jax.vjp(losses_of, zs, [leaves[j] for j in other], has_aux=True)
    gs, _ = pullback(jnp.ones_like(losses))

    sq = jnp.zeros((n,), dtype)
    per_example_dw = []  # per tapped call: (n, d_in, d_out) where the route formed it
    for slot, k in enumerate(taps):
        sq_w, sq_b, dw = dense_sq_norms(xs[slot], gs[slot], dtype)
        per_example_dw.append(dw)
        for role, j in enumerate(rec.calls[k].leaves):
            if status[j] == "layer":
                sq = sq + (sq_w if role == 0 else sq_b)
    if other:
        sq = sq + _fallback_sq(loss_fn, leaves, treedef, args, other, dtype)
    norms = jnp.sqrt(sq)
    if not clip:
        return norms

    C = jnp.asarray(clip_norm, dtype)
    factors = C / jnp.maximum(norms, C)  # min(1, C/‖∇ℓ_i‖), 1 at a zero norm
    grads: list = [None] * L
    for slot, k in enumerate(taps):
        call, x, g, dw = rec.calls[k], xs[slot], gs[slot], per_example_dw[slot]
        if dw is None:  # Xᵀ diag(c) G: the layer's own pullback, with G's rows scaled
            scaled = g * factors.reshape(n, *(1,) * (g.ndim - 1)).astype(g.dtype)
            layer_params = call.treedef.unflatten([leaves[j] for j in call.leaves])
            _, layer_pullback = jax.vjp(lambda p, x=x, call=call: call.apply(p, x), layer_params)
            d_leaves = jax.tree.leaves(layer_pullback(scaled)[0])
        else:  # the per-example dW_i are at hand: Σ_i c_i dW_i and Σ_i c_i Σ_t G_i[t]
            db = jnp.tensordot(factors, g.reshape(n, -1, g.shape[-1]).astype(dtype).sum(1), 1)
            d_leaves = [jnp.tensordot(factors, dw, 1), db]
        for j, d in zip(call.leaves, d_leaves, strict=False):
            if status[j] == "layer":
                grads[j] = d.reshape(leaves[j].shape).astype(leaves[j].dtype)
    if other:  # one more backward pass, for these leaves only
        _, other_grads = pullback(factors.astype(losses.dtype))
        for j, d in zip(other, other_grads, strict=True):
            grads[j] = d
    grads = [jnp.zeros_like(a) if d is None else d for a, d in zip(leaves, grads, strict=True)]
    return treedef.unflatten(grads), norms


def _fallback_sq(loss_fn, leaves, treedef, args, other, dtype):
    """``(n,)`` squared norms of the per-example gradients w.r.t. the leaves ``other``."""

    def one(*example):  # every array of args without its leading axis
        def loss(values):
            full = list(leaves)
            for j, v in zip(other, values, strict=True):
                full[j] = v
            batch_of_one = jax.tree.map(lambda a: a[None], example)
            return loss_fn(treedef.unflatten(full), *batch_of_one)[0]

        grads = jax.grad(loss)([leaves[j] for j in other])
        return sum(jnp.sum(jnp.square(d.astype(dtype))) for d in grads)

    return jax.vmap(one)(*args)


# --------------------------------------------------------------------------------------
# Public functions.


def per_example_grad_norms(loss_fn: Callable, params, *args, fallback: str = "vmap"):
    r"""``‖∇_params ℓ_i‖₂`` for every example ``i``, from the layers' structure.

    .. math:: \|\nabla \ell_i\|^2 = \sum_{\text{layers}} \|X_i^\top G_i\|_F^2
              + \|\textstyle\sum_t G_i[t]\|^2 \;(+\text{fallback leaves})

    One forward and one backward pass (the backward pass stops at each layer's output
    cotangent ``G``; no weight gradient is formed), plus ``O(n (d_in + d_out))`` work per
    2-D layer; see the module docstring for inputs with a sequence axis.

    Args:
      loss_fn: ``loss_fn(params, *args) -> (n,)`` per-example losses. Example ``i`` is
        index ``i`` along axis 0 of every array in ``args``, and loss ``i`` depends on
        example ``i`` only (no statistics across the batch).
      params: a pytree of real floating arrays. Leaves used as the ``W`` or ``b`` of one
        ``jaxlinear.linear`` / ``dual_linear`` call (``mlp`` included) at the top level of
        ``loss_fn``, on an input ``(n, ..., d_in)``, get the structural formula; the
        others get ``fallback``.
      *args: pytrees of arrays, each with the ``n`` examples along axis 0.
      fallback: for the other leaves: ``"vmap"`` (per-example gradients of just those
        leaves, ``jax.vmap`` of ``jax.grad``) or ``"raise"`` (a ``ValueError`` naming the
        leaf and the reason).

    Returns:
      ``(n,)`` norms in the widest floating dtype of ``params`` (at least float32).

    Raises:
      TypeError: ``loss_fn`` returns something other than one real floating array;
        non-float params leaves; non-array ``args``.
      ValueError: losses not of shape ``(n,)``; ``args`` of different leading sizes;
        a leaf needing the fallback when ``fallback="raise"``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[1.0], [2.0]]), jnp.array([0.0]))
      >>> x = jnp.array([[2.0, 2.0], [0.0, 0.0]])
      >>> loss = lambda p, x: jaxlinear.linear(p, x)[:, 0]  # dW_i = x_i, db_i = 1
      >>> jaxlinear.per_example_grad_norms(loss, p, x).tolist()  # sqrt(‖x_i‖² + 1)
      [3.0, 1.0]
    """
    return _per_example("per_example_grad_norms", loss_fn, params, args, fallback, False)


def clipped_grad(loss_fn: Callable, params, *args, clip_norm, fallback: str = "vmap"):
    r"""``Σ_i min(1, C / ‖∇ℓ_i‖) ∇ℓ_i`` and the norms ``‖∇ℓ_i‖``: per-example clipping.

    .. math:: c_i = \min\!\left(1, \frac{C}{\|\nabla \ell_i\|}\right), \qquad
              \bar W = X^\top \operatorname{diag}(c)\, G, \quad
              \bar b = \textstyle\sum_i c_i \sum_t G_i[t]

    The norms come from ``per_example_grad_norms``' pass; the clipped gradient of each
    dense layer is its own pullback applied to ``G`` with row ``i`` scaled by ``c_i`` (one
    more set of ``Xᵀ G`` contractions, no second backward pass through the network; on the
    ``"per_example"`` sequence route, whose norms formed each ``dW_i``, ``Σ_i c_i dW_i``).
    Fallback leaves get theirs from one more backward pass with the loss cotangent ``c``.
    ``c_i = 1`` at a zero norm.

    Args:
      loss_fn, params, *args, fallback: as in ``per_example_grad_norms``.
      clip_norm: ``C > 0``, a scalar (checked at trace time when it is not traced).

    Returns:
      ``(grads, norms)``: ``grads`` in the structure and dtypes of ``params``; ``norms``
      ``(n,)`` the unclipped per-example norms.

    Raises:
      As ``per_example_grad_norms``, and ``ValueError`` for a ``clip_norm`` that is not a
      finite scalar ``> 0``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[1.0], [2.0]]), None)
      >>> x = jnp.array([[3.0, 4.0], [0.0, 1.0]])
      >>> grads, norms = jaxlinear.clipped_grad(lambda p, x: jaxlinear.linear(p, x)[:, 0],
      ...                                       p, x, clip_norm=2.5)
      >>> norms.tolist(), grads.W[:, 0].tolist()  # dW_i = x_i; c = (1/2, 1): x_0 / 2 + x_1
      ([5.0, 1.0], [1.5, 3.0])
    """
    return _per_example("clipped_grad", loss_fn, params, args, fallback, True, clip_norm)
