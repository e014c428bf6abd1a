r"""Equinox models on jaxlinear's explicit rules, in one call: ``explicit(model)``.

Equinox layers have no injection point (``self.weight @ x``, direct ``lax`` calls), so
``explicit`` swaps each layer it knows for a subclass of the layer's own class that
runs the same computation through a jaxlinear op:

| Equinox layer | now runs |
|---|---|
| ``eqx.nn.Linear`` (also ``"scalar"``) | ``linear`` / ``dual_linear`` on ``W = weight.T`` |
| ``eqx.nn.Conv``, ``Conv1d/2d/3d`` | ``conv_general_dilated`` (every option) ¹ |
| ``eqx.nn.ConvTranspose`` (1-3D) | ``conv_general_dilated`` of the dilated input ² |
| ``eqx.nn.Embedding`` | ``embed``, indexing as ``weight[x]`` does ⁴ |
| ``eqx.nn.MultiheadAttention`` | its four ``Linear`` projections ³ |
| ``eqx.nn.GRUCell``, ``LSTMCell`` | ``linear`` on ``weight_ih.T`` and ``weight_hh.T`` |

¹ A ``padding_mode`` other than zeros pads first, as Equinox does. ² As Equinox computes
it. ³ The two activation-activation einsums (``q·kᵀ``, ``softmax·v``) stay JAX's.
⁴ A negative id wraps once, an out-of-range id is clamped to an end row (``mode="clip"``).

The new modules have exactly the fields of the old ones (same names, shapes, dtypes,
weight layout ``(out, in)`` and conv ``(O, I/groups, *kernel)``, same static fields), so
``eqx.tree_at``, ``eqx.tree_serialise_leaves`` / ``tree_deserialise_leaves`` in either
direction and optimizer states see the same leaves; only the class in the tree
structure differs (``isinstance(new, type(old))`` holds). Bias adds stay plain ``+``.
A user's subclass of one of these layers whose ``__call__`` reaches the parent's (through
``super()``, or by not overriding it) is converted too: its converted class has the user's
class first and jaxlinear's layer under it, so ``super()`` lands on jaxlinear's op. A
subclass replacing ``__call__`` and every other module holding arrays (``LayerNorm``,
...) are left as they are, and ``report`` lists them as untouched, with the reason.

Equinox models run per example under ``jax.vmap``: in both bindings the ops' batching
rules bind jaxlinear's op again on the batched shapes, so ``jax.grad`` of the vmapped
model runs jaxlinear's transposes once on all examples, contracting over them as JAX's
own AD does (and at its cost: ``benchmarks/RESULTS.md``).

Importing this module imports Equinox (``import jaxlinear`` does not).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

try:
    import equinox as eqx
except ImportError as e:  # pragma: no cover - exercised by a test that hides the module
    raise ImportError(
        "jaxlinear.equinox needs Equinox, which is not installed: pip install equinox"
    ) from e

import jax
import jax.numpy as jnp

import jaxlinear
from jaxlinear._src import adapt
from jaxlinear._src import quant as _quant
from jaxlinear._src.params import Params

__all__ = ["BINDINGS", "Report", "Row", "explicit", "report"]

BINDINGS = ("custom_vjp", "dual")

_OPS = {  # binding -> the jaxlinear functions a converted layer calls
    "custom_vjp": {
        "linear": jaxlinear.linear,
        "conv": jaxlinear.conv_general_dilated,
        "embed": jaxlinear.embed,
    },
    "dual": {
        "linear": jaxlinear.dual_linear,
        "conv": jaxlinear.dual_conv_general_dilated,
        "embed": jaxlinear.dual_embed,
    },
}


def _op(module, kind):
    fn = _OPS[type(module).jaxlinear_binding][kind]
    recipe = getattr(type(module), "jaxlinear_quant", None)
    if recipe is None or kind == "embed":  # a lookup is a gather: nothing to quantize
        return fn
    return functools.partial(fn, quant=recipe)


# --------------------------------------------------------------------------------------
# The converted layers' forward passes. Each is the original ``__call__`` with the
# contraction replaced by a jaxlinear op; checks and shapes as in Equinox.


def _linear_call(self, x, *, key=None):
    """``weight @ x + bias`` as ``linear(Params(weight.T, bias), x)``: ``(in,) -> (out,)``."""
    del key
    if self.in_features == "scalar":
        if jnp.shape(x) != ():
            raise ValueError("x must have scalar shape")
        x = jnp.broadcast_to(x, (1,))
    # (in,) @ (in, out) + (out,) -> (out,); W = weight.T: Equinox stores (out, in)
    y = _op(self, "linear")(Params(self.weight.T, self.bias), x)
    if self.out_features == "scalar":
        y = jnp.squeeze(y)
    return y


def _rank_check(self, x, name):
    unbatched_rank = self.num_spatial_dims + 1
    if x.ndim != unbatched_rank:
        raise ValueError(
            f"Input to `{name}` needs to have rank {unbatched_rank}, but input has shape {x.shape}."
        )


def _conv_call(self, x, *, key=None):
    """Equinox's ``Conv``: ``(C_in, *spatial) -> (C_out, *spatial_out)``, weight ``(O, I, *k)``."""
    del key
    _rank_check(self, x, "Conv")
    if self.padding_mode != "ZEROS":
        x, padding = self._nonzero_pad(x), "VALID"  # reflect / replicate / circular: pad first
    else:
        padding = self.padding
    y = _op(self, "conv")(
        x[None],  # (1, C_in, *spatial): lax's default NC... / OI... / NC... layout
        self.weight,
        self.stride,
        padding,
        rhs_dilation=self.dilation,
        feature_group_count=self.groups,
    )[0]
    return y + self.bias if self.use_bias else y


def _conv_transpose_call(self, x, *, key=None):
    """Equinox's ``ConvTranspose``: a convolution of the stride-dilated input."""
    del key
    _rank_check(self, x, "ConvTranspose")
    padding_t = self._padding_transpose()
    if self.padding_mode == "CIRCULAR":
        x, padding_t = self._circular_pad(x, padding_t)
    y = _op(self, "conv")(
        x[None],
        self.weight,
        (1,) * self.num_spatial_dims,
        padding_t,
        lhs_dilation=self.stride,
        rhs_dilation=self.dilation,
        feature_group_count=self.groups,
    )[0]
    return y + self.bias if self.use_bias else y


def _embedding_call(self, x, *, key=None):
    """``weight[x]`` for a scalar integer index: ``() -> (embedding_size,)``."""
    del key
    if jnp.shape(x) != ():
        raise ValueError(
            "`eqx.nn.Embedding()(x)` should be called with a scalar index `x`. "
            "Use `jax.vmap` if you would like to index with multiple values."
        )
    # Equinox indexes `weight[x]`: JAX wraps a negative index once, then clamps into
    # [0, V) (its gather's default), so an out-of-range id reads, and trains, an end row.
    x = jnp.asarray(x)
    x = jnp.where(x < 0, x + self.num_embeddings, x)
    return _op(self, "embed")(self.weight, x, mode="clip")


def _gru_call(self, input, hidden, *, key=None):
    """Equinox's ``GRUCell``: ``weight_ih @ input`` and ``weight_hh @ hidden`` as ``linear``."""
    del key
    linear = _op(self, "linear")
    bias, bias_n = (self.bias, self.bias_n) if self.use_bias else (None, 0)
    igates = jnp.split(linear(Params(self.weight_ih.T, bias), input), 3)  # (3·hidden,)
    hgates = jnp.split(linear(Params(self.weight_hh.T), hidden), 3)
    reset = jax.nn.sigmoid(igates[0] + hgates[0])
    inp = jax.nn.sigmoid(igates[1] + hgates[1])
    new = jnp.tanh(igates[2] + reset * (hgates[2] + bias_n))
    return new + inp * (hidden - new)


def _lstm_call(self, input, hidden, *, key=None):
    """Equinox's ``LSTMCell``: its two matrix-vector products as ``linear``."""
    del key
    linear = _op(self, "linear")
    h, c = hidden
    bias = self.bias if self.use_bias else None
    # (in,) @ (in, 4·hidden) + b + (hidden,) @ (hidden, 4·hidden) -> (4·hidden,)
    lin = linear(Params(self.weight_ih.T, bias), input) + linear(Params(self.weight_hh.T), h)
    i, f, g, o = jnp.split(lin, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c)


# class -> (its new __call__, the op it runs, what the report says)
_KNOWN = {
    eqx.nn.Linear: (_linear_call, "linear", "weight.T"),
    eqx.nn.Conv: (_conv_call, "conv", None),
    eqx.nn.Conv1d: (_conv_call, "conv", None),
    eqx.nn.Conv2d: (_conv_call, "conv", None),
    eqx.nn.Conv3d: (_conv_call, "conv", None),
    eqx.nn.ConvTranspose: (_conv_transpose_call, "conv", "input dilated by the stride"),
    eqx.nn.ConvTranspose1d: (_conv_transpose_call, "conv", "input dilated by the stride"),
    eqx.nn.ConvTranspose2d: (_conv_transpose_call, "conv", "input dilated by the stride"),
    eqx.nn.ConvTranspose3d: (_conv_transpose_call, "conv", "input dilated by the stride"),
    eqx.nn.Embedding: (_embedding_call, "embed", None),
    eqx.nn.GRUCell: (_gru_call, "linear", "weight_ih.T, weight_hh.T"),
    eqx.nn.LSTMCell: (_lstm_call, "linear", "weight_ih.T, weight_hh.T"),
}


@functools.cache
def _converted_class(cls, binding, quant=None):
    """The subclass of ``cls`` whose ``__call__`` runs jaxlinear's op (one per binding and
    quantization recipe)."""
    call = _KNOWN[cls][0]
    prefix = "Explicit" if binding == "custom_vjp" else "Dual"
    name = f"{prefix}{cls.__name__}"
    return type(
        name,
        (cls,),
        {
            "__call__": call,
            "jaxlinear_binding": binding,
            "jaxlinear_quant": quant,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"``eqx.nn.{cls.__name__}`` on jaxlinear's explicit rules"
            f" (binding {binding!r}); same fields, same weight layout.",
        },
    )


def _original_class(cls):
    """The Equinox (or user's) class a converted class was made from (itself otherwise)."""
    if getattr(cls, "__module__", None) == __name__:
        return cls.__mro__[1]
    return adapt.original_class(cls)


def _known(cls):
    """``(base, why_not)``: the Equinox layer ``cls`` derives from (or ``None``), and why
    it is not converted (``None``: it computes what ``base`` does)."""
    base = adapt.known_base(cls, _KNOWN)
    if base is None or cls is base:
        return base, None
    return base, adapt.replaced_by(cls, base, ("__call__",))


def _convert(module, binding, quant=None):
    """A new ``module`` of the converted class, sharing every field's value."""
    cls = _original_class(type(module))
    base, _ = _known(cls)
    converted = _converted_class(base, binding, quant)
    if cls is not base:  # a user's subclass: jaxlinear's layer goes under it
        converted = adapt.converted_subclass(cls, converted)
    new = object.__new__(converted)
    for f in dataclasses.fields(module):
        object.__setattr__(new, f.name, getattr(module, f.name))
    return new


def _is_known(x):
    """A layer ``explicit`` converts: a known layer, a subclass computing what it does,
    or one ``explicit`` converted."""
    if not isinstance(x, eqx.Module):
        return False
    base, why_not = _known(_original_class(type(x)))
    return base is not None and why_not is None


def explicit(model, *, binding: str = "custom_vjp", quant=None):
    r"""``model`` with every Equinox layer jaxlinear knows running on its explicit rules.

    A new pytree (Equinox modules are immutable); ``model`` is unchanged. Known layers:
    ``eqx.nn.Linear``, ``Conv`` (1-3D, every option), ``ConvTranspose`` (1-3D),
    ``Embedding``, ``GRUCell``, ``LSTMCell``, ``MultiheadAttention``'s projections, and
    subclasses of these reaching the parent's ``__call__`` (see the module docstring).
    Each becomes a subclass of its own class with the same fields, so values, gradients,
    ``eqx.tree_at``, serialisation and optimizer states behave as before. Layers already
    converted are converted again to ``binding``. ``model`` may be any pytree holding
    modules (a list of models, an optimizer state whose moments mirror the model).

    Args:
      model: an Equinox module or any pytree containing some.
      binding: ``"custom_vjp"`` (``linear``, ``conv_general_dilated``, ``embed``:
        reverse mode) or ``"dual"`` (``dual_linear``, ...: every transform, forward mode
        included).
      quant: low-precision training (``docs/guides/quantization.md``): ``None`` (default),
        a recipe (``"fp8_hybrid"``, ``"fp8_rowwise"``, ``"int8"`` or a
        ``jaxlinear.Recipe``) for every converted layer, or a function ``(path, layer) ->
        recipe | None`` choosing per layer (``path`` as ``report`` prints it, e.g.
        ``".layers[0]"``): return ``None`` to keep a layer, such as the first and the
        last, in full precision. Embeddings are lookups and are never quantized.

    Returns:
      The converted pytree. ``report(new)`` lists module path → what it runs, and the
      layers left untouched.

    Raises:
      ValueError: ``binding`` is not one of ``BINDINGS``.

    Examples:
      >>> import jax, jax.numpy as jnp, equinox as eqx, jaxlinear.equinox
      >>> mlp = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
      >>> new = jaxlinear.equinox.explicit(mlp)
      >>> bool(jnp.allclose(jax.vmap(new)(jnp.ones((4, 2))), jax.vmap(mlp)(jnp.ones((4, 2)))))
      True
      >>> print(jaxlinear.equinox.report(new))
      path        module          runs
      .layers[0]  ExplicitLinear  jaxlinear.linear (custom_vjp) on weight.T
      .layers[1]  ExplicitLinear  jaxlinear.linear (custom_vjp) on weight.T
    """
    if binding not in BINDINGS:
        raise ValueError(
            f"jaxlinear.equinox.explicit: `binding` must be one of {BINDINGS}, got {binding!r}"
        )
    choose = quant if callable(quant) else lambda path, layer: quant
    resolve = functools.partial(_quant.resolve, "jaxlinear.equinox.explicit")

    def convert(path, m):
        if not _is_known(m):
            return m
        return _convert(m, binding, resolve(choose(jax.tree_util.keystr(path), m)))

    return jax.tree_util.tree_map_with_path(convert, model, is_leaf=_is_known)


# --------------------------------------------------------------------------------------
# The report.


class Row(NamedTuple):
    """One line of a ``Report``: where the module is, its class, what it runs."""

    path: str
    module: str
    runs: str


class Report(NamedTuple):
    """What each module of a model runs; ``str(report)`` is a table.

    Attributes:
      rows: one ``Row(path, module, runs)`` per converted layer, per
        ``MultiheadAttention`` and per other module holding arrays (untouched).
    """

    rows: tuple[Row, ...]

    @property
    def untouched(self) -> tuple[Row, ...]:
        """The rows of modules still running their own code (``runs`` starts with it)."""
        return tuple(r for r in self.rows if r.runs.startswith("untouched"))

    def __str__(self):
        head = Row("path", "module", "runs")
        rows = [head, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(
            f"{r.path:<{widths[0]}}  {r.module:<{widths[1]}}  {r.runs}".rstrip() for r in rows
        )


def _children(tree):
    """``(key_path, module)`` for every module inside ``tree`` at any depth, pre-order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is not tree and isinstance(x, eqx.Module)
    )
    for path, leaf in leaves:
        if isinstance(leaf, eqx.Module) and leaf is not tree:
            yield path, leaf
            yield from (((*path, *p), m) for p, m in _children(leaf))


def _holds_arrays(module):
    """Whether ``module`` holds arrays itself (not only through child modules)."""
    child = lambda x: x is not module and isinstance(x, eqx.Module)  # noqa: E731
    leaves = jax.tree.leaves(module, is_leaf=child)
    return any(eqx.is_array(leaf) for leaf in leaves)


def _describe(module):
    cls = type(module)
    original = _original_class(cls)
    if original is not cls and _known(original) == (_known(original)[0], None):
        _, kind, note = _KNOWN[_known(original)[0]]
        binding = cls.jaxlinear_binding
        fn = _OPS[binding][kind].__name__
        if cls.jaxlinear_quant is not None and kind != "embed":
            binding += f", quant={cls.jaxlinear_quant.name}"
        return f"jaxlinear.{fn} ({binding})" + (f" on {note}" if note else "")
    if cls is eqx.nn.MultiheadAttention:
        return (
            "its projections (rows below); the einsums q·kᵀ and softmax·v stay JAX's"
            " (activation × activation, no weights)"
        )
    if cls in _KNOWN:
        return "JAX's own rules (not converted)"
    base, why_not = _known(cls)
    if base is not None:
        if why_not is None:
            return f"JAX's own rules (a subclass of eqx.nn.{base.__name__}, not converted)"
        return f"untouched: a subclass of eqx.nn.{base.__name__}: {why_not}"
    if _holds_arrays(module):
        return f"untouched: {cls.__module__.split('.')[0]}'s own code (not a layer jaxlinear knows)"
    return ""


def report(model) -> Report:
    """What each module of ``model`` runs: converted layers, attention, untouched modules.

    Modules holding no arrays of their own (containers such as ``eqx.nn.MLP``,
    ``Sequential``, activations) are not listed.

    Args:
      model: an Equinox module or any pytree containing some.

    Returns:
      A ``Report``; ``print`` it for a table, ``report.untouched`` for what was not converted.
    """
    found = list(_children(model))
    if isinstance(model, eqx.Module):
        found.insert(0, ((), model))
    rows = []
    for path, module in found:
        runs = _describe(module)
        if runs:
            name = type(module).__name__
            rows.append(Row(jax.tree_util.keystr(tuple(path)) or "(model)", name, runs))
    return Report(tuple(rows))
