r"""A whole Flax linen model on explicit rules: ``explicit(module)`` and ``report(module, x)``.

Linen submodules exist only while the model runs, so there is no tree to rewrite in
advance. ``explicit`` intercepts instead (``flax.linen.intercept_methods``, the tool qwix
and AQT use): while a converted module runs, every call of a known layer's own method
(``Dense.__call__``, ``Embed.attend``, ...), at any depth and inside ``nn.scan`` /
``nn.remat`` / ``nn.vmap``-lifted modules, runs Flax's own code for that method with
``lax.dot_general`` / ``jnp.einsum`` / ``lax.conv_general_dilated`` /
``lax.conv_transpose`` / ``jnp.take`` / ``jnp.dot`` bound to jaxlinear's op of the chosen
binding (the function is rebuilt with those names rebound; nothing global is patched).
Parameters are created and read by Flax's code, so ``init`` and ``apply`` take and return
exactly the original's variables.

Because the rule is "the known layer's own method runs", a user's subclass is converted
exactly when its ``__call__`` reaches the parent's (through ``super()`` or by not
overriding it), and left on JAX's AD when it replaces it.

``ConvLocal`` runs JAX's own ``lax.conv_general_dilated_local`` (patches, then one
batched ``dot_general`` with the unshared kernel) with that ``dot_general`` jaxlinear's.

Untouched, and listed by ``report``: a layer given its own op (``dot_general=``,
``dot_general_cls=``, ``conv_general_dilated=``, e.g. AQT's), an ``Embed`` with one row
(Flax broadcasts it, no lookup), and every other module holding parameters
(``LayerNorm``, ``BatchNorm``, a user's ``self.param`` used directly). The
attention weights of ``MultiHeadDotProductAttention`` (``softmax(q kᵀ) v``) multiply
activations by activations and stay on JAX's AD; its four projections are
``DenseGeneral`` s and are converted.

This module imports Flax; ``jaxlinear.linen`` is its public face.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import types
import typing as tp

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import recurrent as _recurrent
from jax import lax

from jaxlinear._src import adapt
from jaxlinear._src.adapt import BINDINGS, STATUSES, Report, Row

__all__ = ["BINDINGS", "STATUSES", "Report", "Row", "explicit", "per_example_loss", "report"]


# --------------------------------------------------------------------------------------
# Flax's methods, rebuilt with jaxlinear's ops bound to the names they call.


class _Namespace:
    """``base`` (a module such as ``jax.lax``) with some attributes replaced."""

    def __init__(self, base, replaced: dict):
        self._base = base
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _rebind(function, **namespaces):
    """``function`` with the globals in ``namespaces`` replaced (``lax={"dot_general": f}``)."""
    function = inspect.unwrap(function)
    g = dict(function.__globals__)
    for name, replaced in namespaces.items():
        g[name] = _Namespace(g[name], replaced)
    new = types.FunctionType(
        function.__code__, g, function.__name__, function.__defaults__, function.__closure__
    )
    new.__kwdefaults__ = function.__kwdefaults__
    return new


def _take(binding):
    embed = adapt.op("embed", binding)

    def take(a, indices, axis=None, **kwargs):
        if axis != 0 or kwargs:  # not the lookup Embed does: JAX's own
            return jnp.take(a, indices, axis=axis, **kwargs)
        return embed(a, indices)  # (V, d)[ids] -> (*ids.shape, d)

    return take


def _attend(binding):
    dot_general = adapt.op("dot_general", binding)

    def attend(self, query):
        """Flax's ``Embed.attend`` with ``jnp.dot(query, embedding.T)`` as one contraction."""
        query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        # (..., d) · (V, d)ᵀ -> (..., V)
        return dot_general(query, embedding, (((query.ndim - 1,), (1,)), ((), ())))

    return attend


def _dense_refusal(module):
    if module.dot_general_cls is not None:
        return f"its own dot_general_cls {_name(module.dot_general_cls)}"
    if module.dot_general is not None:
        return f"its own dot_general {_name(module.dot_general)}"
    return None


def _local(binding):
    """JAX's own ``lax.conv_general_dilated_local`` (patches, then one batched
    ``dot_general`` of the patches with the unshared kernel), that ``dot_general`` jaxlinear's."""
    return _rebind(lax.conv_general_dilated_local, lax=_dot(binding))


_LOCAL_REBINDS = "lax" in getattr(lax.conv_general_dilated_local, "__globals__", {})


def _conv_refusal(module):
    if not module.shared_weights:  # ConvLocal: its conv_general_dilated only sizes the kernel
        if not _LOCAL_REBINDS:
            return "lax.conv_general_dilated_local (unshared weights): not rebindable here"
        return None
    if module.conv_general_dilated_cls is not None:
        return f"its own conv_general_dilated_cls {_name(module.conv_general_dilated_cls)}"
    if module.conv_general_dilated is not None:
        return f"its own conv_general_dilated {_name(module.conv_general_dilated)}"
    return None


class _Rule(tp.NamedTuple):
    """How one of Flax's methods runs on jaxlinear's op."""

    layer: type  # the Flax class that defines the method
    method: str
    flax_runs: str | tp.Callable  # what Flax runs, for the report (or module -> it)
    family: str | tp.Callable  # the op family it runs instead (or module -> it)
    build: tp.Callable  # binding -> the replacement function (self, *args, **kwargs)
    refusal: tp.Callable = lambda module: None  # module -> why it stays untouched, or None


def _dot(binding):
    return {"dot_general": adapt.op("dot_general", binding)}


def _per_module(value, module):
    return value(module) if callable(value) else value


def _rules():
    dot = _dot
    return (
        _Rule(nn.Dense, "__call__", "lax.dot_general", "dot_general",
              lambda b: _rebind(nn.Dense.__call__, lax=dot(b)), _dense_refusal),
        _Rule(nn.DenseGeneral, "__call__", "lax.dot_general", "dot_general",
              lambda b: _rebind(nn.DenseGeneral.__call__, lax=dot(b)), _dense_refusal),
        _Rule(nn.Einsum, "__call__", "jnp.einsum", "einsum",
              lambda b: _rebind(nn.Einsum.__call__, jnp={"einsum": adapt.op("einsum", b)})),
        _Rule(nn.Conv, "__call__",  # nn.Conv and nn.ConvLocal (shared_weights=False)
              lambda m: "lax.conv_general_dilated" + ("" if m.shared_weights else "_local"),
              lambda m: "conv_general_dilated" if m.shared_weights else "dot_general",
              lambda b: _rebind(nn.Conv.__call__, lax={
                  "conv_general_dilated": adapt.op("conv_general_dilated", b),
                  "conv_general_dilated_local": _local(b)}),
              _conv_refusal),
        _Rule(nn.ConvTranspose, "__call__", "lax.conv_transpose", "conv_transpose",
              lambda b: _rebind(nn.ConvTranspose.__call__, lax={
                  "conv_transpose": adapt.op("conv_transpose", b)})),
        _Rule(nn.Embed, "__call__", "jnp.take", "embed",
              lambda b: _rebind(nn.Embed.__call__, jnp={"take": _take(b)}),
              lambda m: "num_embeddings == 1: Flax broadcasts its one row (no lookup)"
              if m.num_embeddings == 1 else None),
        _Rule(nn.Embed, "attend", "jnp.dot", "dot_general", _attend),
        _Rule(nn.OptimizedLSTMCell, "__call__", "jnp.dot", "dot_general",
              lambda b: _rebind(nn.OptimizedLSTMCell.__call__, jnp={"dot": adapt.matmul(b)})),
    )  # fmt: skip


# nn.Conv and nn.ConvLocal share _Conv.__call__: one entry for the function.
_RULES = {inspect.unwrap(getattr(r.layer, r.method)): r for r in _rules()}
assert _recurrent.OptimizedLSTMCell is nn.OptimizedLSTMCell
_KNOWN = (*dict.fromkeys(r.layer for r in _RULES.values()), nn.ConvLocal)


@functools.cache
def _replacement(function, binding):
    return _RULES[function].build(binding)


def _name(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{getattr(fn, '__qualname__', type(fn).__name__)}".lstrip(".")


# --------------------------------------------------------------------------------------
# The interceptor.

_state = threading.local()  # .binding: the active binding or None; .log: list or None


def _log(module, method, status, runs):
    log = getattr(_state, "log", None)
    if log is not None:
        log.append((tuple(module.path), module, method, status, runs))


def _interceptor(next_fun, args, kwargs, context):
    binding = getattr(_state, "binding", None)
    function = getattr(context.orig_method, "func", None)
    rule = _RULES.get(function)
    module = context.module
    if rule is None:
        _log(module, context.method_name, None, None)
        return next_fun(*args, **kwargs)
    refusal = rule.refusal(module)
    if refusal is not None:
        _log(module, rule.method, "untouched", refusal)
        return next_fun(*args, **kwargs)
    if binding is None:
        _log(module, rule.method, "jax-ad", f"{_per_module(rule.flax_runs, module)} (JAX's AD)")
        return next_fun(*args, **kwargs)
    ours = adapt.op(_per_module(rule.family, module), binding).__name__
    _log(module, rule.method, "explicit", f"jaxlinear.{ours}")
    return _replacement(function, binding)(module, *args, **kwargs)


@contextlib.contextmanager
def _intercepting(binding):
    """Run known layers' methods on ``binding``'s ops (``None``: Flax's, logged only)."""
    outer = getattr(_state, "binding", None)
    _state.binding = binding
    try:
        if getattr(_state, "depth", 0):  # our interceptor is already on the stack
            yield
            return
        _state.depth = 1
        try:
            with nn.intercept_methods(_interceptor):
                yield
        finally:
            _state.depth = 0
    finally:
        _state.binding = outer


class _Explicit:
    """Mixin of a converted module's class: every method call runs under the interceptor."""

    jaxlinear_binding: str

    def _call_wrapped_method(self, fun, args, kwargs):
        with _intercepting(type(self).jaxlinear_binding):
            return super()._call_wrapped_method(fun, args, kwargs)


@functools.cache
def _explicit_class(cls, binding):
    name = f"{'Explicit' if binding == 'custom_vjp' else 'Dual'}{cls.__name__}"
    return types.new_class(
        name,
        (_Explicit, cls),
        exec_body=lambda ns: ns.update(
            __module__=__name__, __qualname__=name, jaxlinear_binding=binding,
            jaxlinear_converted_from=cls,
        ),
    )  # fmt: skip


def _check_module(fn: str, module) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{fn}: `module` must be a Flax linen module (an `nn.Module`), got"
            f" {type(module).__name__}; for an NNX model use jaxlinear.nnx"
        )


def explicit(module, *, binding: str = "custom_vjp"):
    r"""A linen module computing what ``module`` does, its linear layers on jaxlinear's ops.

    Returns a module of a subclass of ``type(module)`` with the same fields; every method
    call on it (``init``, ``apply``, ``bind``, or as a submodule of a bigger model) runs
    with Flax's ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``, ``ConvLocal``, ``ConvTranspose``,
    ``Embed`` (lookup and ``attend``) and ``OptimizedLSTMCell`` on jaxlinear's ops, at any
    depth: inside ``MultiHeadDotProductAttention`` (its projections), ``LSTMCell`` /
    ``GRUCell`` (their ``Dense`` s), ``ConvLSTMCell`` (its ``Conv`` s), ``nn.scan`` /
    ``nn.remat`` / ``nn.vmap``. ``init`` and ``apply`` take and return exactly the
    original's variables (same tree, shapes, dtypes); values and gradients equal the
    original's up to rounding.

    Args:
      module: a linen ``nn.Module`` (bound or not).
      binding: ``"custom_vjp"`` (``jaxlinear.dot_general``, ...: reverse mode) or
        ``"dual"`` (``dual_dot_general``, ...: every transform, forward mode included).

    Returns:
      The converted module. ``module`` is unchanged (a clone is converted), except when
      it was made inside a parent's compact method (``explicit(nn.Dense(3))(x)`` in a
      ``@nn.compact`` body): it is then the parent's child already and is converted in
      place. Converting a converted module again switches its binding.

    Raises:
      ValueError: an unknown ``binding``.
      TypeError: ``module`` is not a linen module.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlinear.linen
      >>> model = jaxlinear.linen.explicit(nn.Dense(3))
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
      >>> jax.tree.map(jnp.shape, variables)
      {'params': {'bias': (3,), 'kernel': (2, 3)}}
      >>> print(jaxlinear.linen.report(model, jnp.ones((1, 2))))
      path     module  status    runs
      -------  ------  --------  ----
      (model)  Dense   explicit  jaxlinear.dot_general
    """
    fn = "jaxlinear.linen.explicit"
    adapt.check_binding(fn, binding)
    _check_module(fn, module)
    cls = adapt.original_class(type(module))
    # A module made inside a parent's compact method is already the parent's child (a
    # clone would be a second child): it is converted in place. Others are cloned.
    new = module if isinstance(module.parent, nn.Module) else module.clone()
    object.__setattr__(new, "__class__", _explicit_class(cls, binding))
    return new


def _rows(log, params_owner):
    """The report's rows from the interceptor's log and who owns which parameters."""
    seen: dict[tuple, list] = {}
    for path, module, method, status, runs in log:
        seen.setdefault(path, [module, {}])[1].setdefault(method, (status, runs))
    contracted_by = {  # OptimizedLSTMCell's path -> how it contracts its DenseParams'
        path: methods["__call__"]
        for path, (module, methods) in seen.items()
        if isinstance(module, nn.OptimizedLSTMCell) and "__call__" in methods
    }
    rows = []
    for path in sorted(set(seen) | set(params_owner), key=adapt.path_order):
        module, methods = seen.get(path, (None, {}))
        cls = adapt.original_class(type(module)) if module is not None else None
        name = cls.__name__ if cls is not None else "?"
        statuses = {s for s, _ in methods.values() if s is not None}
        own = params_owner.get(path, [])
        if "untouched" in statuses or "jax-ad" in statuses or "explicit" in statuses:
            status = next(s for s in ("untouched", "jax-ad", "explicit") if s in statuses)
            parts = [
                runs if method == "__call__" else f"{method}: {runs}"
                for method, (s, runs) in methods.items()
                if s is not None
            ]
            rows.append(Row(".".join(map(str, path)), name, status, "; ".join(parts)))
        elif cls is not None and issubclass(cls, nn.MultiHeadDotProductAttention):
            rows.append(Row(".".join(map(str, path)), name, "note", _ATTENTION_NOTE))
        elif own and cls is _recurrent.DenseParams and path[:-1] in contracted_by:
            status, runs = contracted_by[path[:-1]]  # OptimizedLSTMCell contracts them
            rows.append(Row(".".join(map(str, path)), name, status, f"by its parent: {runs}"))
        elif own:
            base = adapt.known_base(cls, _KNOWN) if cls is not None else None
            if base is not None:
                why = adapt.replaced_by(cls, base, ("__call__", "attend")) or (
                    f"never runs nn.{base.__name__}'s computation"
                )
                runs = f"a subclass of nn.{base.__name__}: {why}; params {', '.join(own)}: JAX's AD"
            else:
                runs = f"not converted (params {', '.join(own)}): JAX's AD"
            rows.append(Row(".".join(map(str, path)), name, "untouched", runs))
    return rows


_ATTENTION_NOTE = (
    "attention weights softmax(q·kᵀ)·v: activations only, no parameters: JAX's AD"
    " (projections query/key/value/out: their own rows)"
)


def report(module, *args, method=None, rngs=None, **kwargs) -> Report:
    r"""What every submodule of ``module`` runs when called on ``args``, as a ``Report``.

    Traces ``module.init(rngs, *args, **kwargs)`` abstractly (``jax.eval_shape``: no
    FLOPs) and lists each submodule once: a layer on jaxlinear's ops (``explicit``), a
    layer ``explicit`` converts still on Flax's op (``jax-ad``: ``module`` was not
    converted), a module with parameters that stays on JAX's AD (``untouched``, with the
    reason: a ``LayerNorm``, a layer given its own ``dot_general``, a subclass replacing
    its parent's computation), and notes (attention weights). Modules without parameters
    of their own and no known layer method have no row.

    Args:
      module: a linen module, converted or not.
      *args: example inputs (shapes and dtypes matter, not values).
      method: the method to trace, as for ``init`` (default ``__call__``).
      rngs: the ``init`` rngs (default: ``jax.random.key(0)`` for ``params`` and
        ``dropout``).
      **kwargs: keyword arguments of the call.

    Returns:
      A ``Report`` (``print`` it for a table).

    Raises:
      TypeError: ``module`` is not a linen module.
    """
    _check_module("jaxlinear.linen.report", module)
    if rngs is None:
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    log: list = []
    outer = getattr(_state, "log", None)
    _state.log = log
    try:
        with _intercepting(getattr(type(module), "jaxlinear_binding", None)):
            variables = jax.eval_shape(lambda: module.init(rngs, *args, method=method, **kwargs))
    finally:
        _state.log = outer
    owner: dict[tuple, list[str]] = {}
    params = nn.meta.unbox(variables.get("params", {}))  # nn.Partitioned boxes: their value
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for keys, _ in flat:
        names = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keys)
        owner.setdefault(names[:-1], []).append(str(names[-1]))
    return Report(_rows(log, owner))


def per_example_loss(module, loss, variables):
    r"""``(loss_fn, params)`` for ``per_example_grad_norms`` / ``clipped_grad`` from a linen model.

    ``loss_fn(params, x, *targets) = loss(module.apply({**variables, "params": params},
    x), *targets)``; the other collections (``batch_stats``, ...) are held fixed (run
    ``apply`` in inference mode, or pass a ``module`` that needs no mutable state).

    Args:
      module: a linen module, e.g. after ``explicit(module)``.
      loss: ``loss(outputs, *targets) -> (n,)`` per-example losses.
      variables: the module's variables (``module.init(...)``), with a ``"params"`` entry.

    Returns:
      ``(loss_fn, variables["params"])``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlinear, jaxlinear.linen
      >>> model = jaxlinear.linen.explicit(nn.Dense(2))
      >>> x = jnp.ones((4, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> loss_fn, params = jaxlinear.linen.per_example_loss(
      ...     model, lambda y: jnp.sum(y, 1), variables)
      >>> [r.route for r in jaxlinear.per_example_routes(loss_fn, params, x)]
      ['bias', 'rank_one']
    """
    _check_module("jaxlinear.linen.per_example_loss", module)
    if not callable(loss):
        raise TypeError(
            f"jaxlinear.linen.per_example_loss: `loss` must be callable, got {type(loss).__name__}"
        )
    if "params" not in variables:
        raise ValueError(
            "jaxlinear.linen.per_example_loss: `variables` must hold a 'params' collection,"
            f" got collections {list(variables)}"
        )
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params, x, *targets):
        return loss(module.apply({**rest, "params": params}, x), *targets)

    return loss_fn, variables["params"]
