r"""A whole Flax NNX model on explicit rules: ``explicit(model)`` and ``report(model)``.

Flax NNX's linear layers take their op through an injection point (``Linear`` and
``LinearGeneral``: ``dot_general=``; ``Einsum``: ``einsum_op=``; ``Conv``:
``conv_general_dilated=``); ``explicit`` sets it to jaxlinear's op of the chosen binding.
``Embed`` and ``ConvTranspose`` have none (``jnp.take``, ``lax.conv_transpose`` are
written into their ``__call__``), so their instances become the subclasses below, which
keep every attribute and Variable and change only the op. ``MultiHeadAttention`` holds
four ``LinearGeneral`` projections, converted like any other; its attention weights
(``softmax(q kᵀ) v``, inside ``attention_fn``) multiply activations by activations, have
no parameters and stay on JAX's AD.

``LoRA`` (``x @ lora_a @ lora_b``, written into its ``__call__``) becomes
``jaxlinear.nnx.LoRA``: two contractions, one per factor. A user's subclass of one of
these layers (Gemma's ``ScaledEmbed(nnx.Embed)``) is converted when its overrides reach
the parent's computation (``super().__call__(x) * scale``), with jaxlinear's layer placed
under it in the MRO; one that replaces the computation is left as it is (the shared
subclass rule, ``jaxlinear._src.adapt.replaced_by``).

Every module that owns an ``nnx.Param`` and is not one of these layers is *untouched*
(a ``LayerNorm``, a ``BatchNorm``, a user's module using its parameters directly), and
``report`` lists it as such: nothing is skipped silently.

This module imports Flax; ``jaxlinear.nnx`` is its public face.
"""

from __future__ import annotations

import functools
import typing as tp

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding
from jax import lax

from jaxlinear._src import adapt
from jaxlinear._src.adapt import BINDINGS as BINDINGS
from jaxlinear._src.adapt import STATUSES as STATUSES
from jaxlinear._src.adapt import Report as Report
from jaxlinear._src.adapt import Row as Row
from jaxlinear._src.adapt import check_binding as _check_binding
from jaxlinear._src.adapt import op as _op
from jaxlinear._src.quant import resolve as _resolve

_OPS = adapt.OPS


def _check_model(fn: str, model) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"{fn}: `model` must be a Flax NNX module (an `nnx.Module`), got"
            f" {type(model).__name__}; for parameters alone, call jaxlinear's ops directly"
        )


def _no_out_sharding(fn: str, out_sharding) -> None:
    if out_sharding is not None:
        raise NotImplementedError(
            f"{fn}: `out_sharding` must be None, got {out_sharding!r}; jaxlinear places the"
            " result where its operands' shardings put it (shard the operands instead)"
        )


# --------------------------------------------------------------------------------------
# The replacement modules: Flax's layers with the op swapped, nothing else.


class Embed(nnx.Embed):
    r"""``nnx.Embed`` whose lookup is ``jaxlinear.embed`` and whose ``attend`` is ``dot_general``.

    Same constructor, attributes and ``nnx.state`` as ``nnx.Embed`` (one ``Param``
    ``embedding: (num_embeddings, features)``), plus ``binding``: ``"custom_vjp"``
    (``jaxlinear.embed``, ``jaxlinear.dot_general``) or ``"dual"`` (``dual_embed``,
    ``dual_dot_general``). The backward pass of the lookup is the scatter-add of the
    cotangent into the looked-up rows.

    One difference from ``nnx.Embed``: an id outside ``[-V, V)`` reads a row of zeros and
    sends no gradient (``jnp.take`` in ``nnx.Embed`` reads NaN). With
    ``num_embeddings == 1`` every id reads row 0, as in ``nnx.Embed``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear.nnx
      >>> from flax import nnx
      >>> ones = nnx.initializers.ones
      >>> emb = jaxlinear.nnx.Embed(3, 2, rngs=nnx.Rngs(0), embedding_init=ones)
      >>> emb(jnp.array([[2, 0]])).shape, emb.attend(jnp.ones(2)).tolist()
      ((1, 2, 2), [2.0, 2.0, 2.0])
      >>> grad = nnx.grad(lambda m: m(jnp.array([2, 0, 2])).sum())(emb)  # row 2 twice
      >>> grad["embedding"][...].tolist()
      [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
    """

    def __init__(self, *args, binding: str = "custom_vjp", quant=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.binding = _check_binding("jaxlinear.nnx.Embed", binding)
        self.quant = _resolve("jaxlinear.nnx.Embed", quant)  # for `attend` (a lookup is exact)

    def __call__(self, inputs, out_sharding=None):
        """``embedding[inputs]``: integer ``(...)`` -> ``(..., features)``."""
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")  # Flax's
        _no_out_sharding("jaxlinear.nnx.Embed", out_sharding)
        (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
        if self.num_embeddings == 1:  # nnx.Embed broadcasts its one row to every id
            inputs = jnp.zeros_like(inputs)
        return _op("embed", self.binding)(embedding, inputs)

    def attend(self, query, out_sharding=None):
        """``query @ embeddingᵀ``: ``(..., features)`` -> ``(..., num_embeddings)``.

        Args:
          query: ``(..., features)``.
          out_sharding: accepted as in Flax; must be ``None``.
        """
        query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        dimension_numbers = (((query.ndim - 1,), (1,)), ((), ()))  # (..., d) · (V, d)ᵀ
        dot_general = _op("dot_general", self.binding, getattr(self, "quant", None))
        return dot_general(query, embedding, dimension_numbers, out_sharding=out_sharding)


class ConvTranspose(nnx.ConvTranspose):
    r"""``nnx.ConvTranspose`` whose op is ``jaxlinear.conv_transpose``.

    Same constructor, attributes and ``nnx.state`` as ``nnx.ConvTranspose`` (``kernel:
    (*kernel_size, in_features, out_features)``, or ``(..., out, in)`` with
    ``transpose_kernel``; ``bias: (out_features,)``), plus ``binding``: ``"custom_vjp"``
    (``jaxlinear.conv_transpose``) or ``"dual"`` (``dual_conv_transpose``). The call is
    Flax's, line for line (batch axes flattened, ``mask``, ``promote_dtype``,
    ``"CIRCULAR"`` padding as a periodic wrap of the result), with ``lax.conv_transpose``
    replaced: its backward pass is a strided convolution of ``G`` (``x̄``) and a
    correlation of the input with ``G`` (``w̄``).

    Examples:
      >>> import jax.numpy as jnp, jaxlinear.nnx
      >>> from flax import nnx
      >>> up = jaxlinear.nnx.ConvTranspose(  # (W, C) = (2, 1) -> (4, 1)
      ...     1, 1, (2,), strides=2, padding="VALID", kernel_init=nnx.initializers.ones,
      ...     rngs=nnx.Rngs(0))
      >>> up(jnp.array([[1.0], [2.0]]))[:, 0].tolist()
      [1.0, 1.0, 2.0, 2.0]
    """

    def __init__(self, *args, binding: str = "custom_vjp", quant=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.binding = _check_binding("jaxlinear.nnx.ConvTranspose", binding)
        self.quant = _resolve("jaxlinear.nnx.ConvTranspose", quant)

    def __call__(self, inputs):
        """``(*batch, *spatial, in_features) -> (*batch, *spatial', out_features)``."""
        # Flax 0.12's nnx.ConvTranspose.__call__, with lax.conv_transpose replaced.
        kernel_size = self.kernel_size

        def maybe_broadcast(x):
            if x is None:
                x = 1
            if isinstance(x, int):
                return (x,) * len(kernel_size)
            return tuple(x)

        num_batch_dimensions = inputs.ndim - (len(kernel_size) + 1)
        if num_batch_dimensions != 1:
            input_batch_shape = inputs.shape[:num_batch_dimensions]
            inputs = jnp.reshape(inputs, (-1, *inputs.shape[num_batch_dimensions:]))

        strides = maybe_broadcast(self.strides)
        kernel_dilation = maybe_broadcast(self.kernel_dilation)
        if self.mask is not None and self.mask.shape != self.kernel_shape:
            raise ValueError(
                "Mask needs to have the same shape as weights. "
                f"Shapes are: {self.mask.shape}, {self.kernel_shape}"
            )
        kernel = self.kernel[...]
        if self.mask is not None:
            kernel *= self.mask
        padding_lax = canonicalize_padding(self.padding, len(kernel_size))
        if padding_lax == "CIRCULAR":
            padding_lax = "VALID"
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)

        y = _op("conv_transpose", self.binding, getattr(self, "quant", None))(
            inputs,
            kernel,
            strides,
            padding_lax,
            rhs_dilation=kernel_dilation,
            transpose_kernel=self.transpose_kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )

        if self.padding == "CIRCULAR":  # wrap the result periodically, as Flax does
            scaled_x_dims = [n * s for n, s in zip(inputs.shape[1:-1], strides, strict=True)]
            size_diffs = [
                -(y_dim - x_dim) % (2 * x_dim)
                for y_dim, x_dim in zip(y.shape[1:-1], scaled_x_dims, strict=True)
            ]
            if self.transpose_kernel:
                total_pad = [(d // 2, (d + 1) // 2) for d in size_diffs]
            else:
                total_pad = [((d + 1) // 2, d // 2) for d in size_diffs]
            y = jnp.pad(y, [(0, 0), *total_pad, (0, 0)])
            for i in range(1, y.ndim - 1):
                y = y.reshape((*y.shape[:i], -1, scaled_x_dims[i - 1], *y.shape[i + 1 :]))
                y = y.sum(axis=i)

        if self.use_bias:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if num_batch_dimensions != 1:
            y = jnp.reshape(y, input_batch_shape + y.shape[1:])
        return y


class LoRA(nnx.LoRA):
    r"""``nnx.LoRA`` whose ``x @ lora_a @ lora_b`` is two of jaxlinear's ``dot_general`` s.

    Same constructor, attributes and ``nnx.state`` as ``nnx.LoRA`` (``LoRAParam`` s
    ``lora_a: (in, rank)`` and ``lora_b: (rank, out)``, the optional ``base_module``),
    plus ``binding``: ``"custom_vjp"`` (``jaxlinear.dot_general``) or ``"dual"``
    (``dual_dot_general``). Each factor is the weight of one contraction, so each gets
    its own explicit rules (and per-example gradients): ``h = x A``, ``y = h B``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear.nnx
      >>> from flax import nnx
      >>> ones = nnx.initializers.ones
      >>> lora = jaxlinear.nnx.LoRA(2, 1, 3, a_initializer=ones, b_initializer=ones,
      ...                           rngs=nnx.Rngs(0))
      >>> lora(jnp.array([1.0, 2.0])).tolist()
      [3.0, 3.0, 3.0]
    """

    def __init__(self, *args, binding: str = "custom_vjp", **kwargs):
        super().__init__(*args, **kwargs)
        self.binding = _check_binding("jaxlinear.nnx.LoRA", binding)

    def __call__(self, x, **kwargs):
        """``x @ lora_a @ lora_b (+ base_module(x))``: ``(..., in) -> (..., out)``."""
        x, lora_a, lora_b = self.promote_dtype(
            (x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
        )
        matmul = adapt.matmul(self.binding)
        out = matmul(matmul(x, lora_a), lora_b)  # (..., in) @ (in, r) @ (r, out)
        if self.base_module is not None:
            if not callable(self.base_module):
                raise ValueError("`self.base_module` must be callable.")  # Flax's
            out += self.base_module(x, **kwargs)
        return out


# --------------------------------------------------------------------------------------
# What each module type becomes, and how to say what it runs.


class _Injected(tp.NamedTuple):
    """A Flax layer with an injection point: attribute ``attr`` holds its op."""

    attr: str  # "dot_general"
    family: str  # key of _OPS
    flax_defaults: tuple  # values that mean "Flax's own op": lax.dot_general, None, ...
    flax_name: str  # what Flax runs by default, for the report


_INJECTED = {
    nnx.Linear: _Injected("dot_general", "dot_general", (lax.dot_general,), "lax.dot_general"),
    nnx.LinearGeneral: _Injected(
        "dot_general", "dot_general", (None, lax.dot_general), "lax.dot_general"
    ),
    nnx.Einsum: _Injected("einsum_op", "einsum", (jnp.einsum,), "jnp.einsum"),
    nnx.Conv: _Injected(
        "conv_general_dilated",
        "conv_general_dilated",
        (lax.conv_general_dilated,),
        "lax.conv_general_dilated",
    ),
}

# Flax layer -> (jaxlinear's replacement, what Flax runs, what the replacement runs).
_REPLACED: dict[type, tuple[type, str, dict[str, str]]] = {
    nnx.Embed: (
        Embed,
        "jnp.take; attend: jnp.dot",
        {
            b: f"jaxlinear.{_op('embed', b).__name__};"
            f" attend: jaxlinear.{_op('dot_general', b).__name__}"
            for b in BINDINGS
        },
    ),
    nnx.ConvTranspose: (
        ConvTranspose,
        "lax.conv_transpose",
        {b: f"jaxlinear.{_op('conv_transpose', b).__name__}" for b in BINDINGS},
    ),
    nnx.LoRA: (
        LoRA,
        "x @ lora_a @ lora_b",
        {b: f"jaxlinear.{_op('dot_general', b).__name__} ×2 (x·A, then ·B)" for b in BINDINGS},
    ),
}

# The methods a subclass must leave reaching the parent's computation to be converted.
_METHODS = {nnx.Embed: ("__call__", "attend")}


def _known(kind: type) -> tuple[type | None, str | None]:
    """``(base, why_not)``: the known layer ``kind`` is or derives from (``None`` if none),
    and why it is not converted (``None`` if ``kind`` computes what ``base`` does)."""
    base = adapt.known_base(kind, (*_INJECTED, *_REPLACED))
    if base is None or kind is base or any(issubclass(kind, r[0]) for r in _REPLACED.values()):
        return base, None
    return base, adapt.replaced_by(kind, base, _METHODS.get(base, ("__call__",)))


_ATTENTION_NOTE = (
    "attention weights softmax(q·kᵀ)·v: activations only, no parameters: JAX's AD"
    " (projections query/key/value/out: their own rows)"
)


def _ours(family: str, op) -> str | None:
    """The name of jaxlinear's function ``op`` is (either binding; with its recipe if
    ``explicit`` bound one), else ``None``."""
    if isinstance(op, functools.partial) and set(op.keywords) == {"quant"} and not op.args:
        name = _ours(family, op.func)
        return None if name is None else f"{name} (quant={op.keywords['quant'].name})"
    return next((fn.__name__ for fn in _OPS[family] if op is fn), None)


def _name(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{getattr(fn, '__qualname__', type(fn).__name__)}".lstrip(".")


def _describe(module, own_params: tp.Sequence[str]) -> tuple[str, str] | None:
    """``(status, runs)`` of one module, or ``None`` if it needs no row."""
    kind = type(module)
    base, why_not = _known(kind)
    if base in _INJECTED and why_not is None:
        rule = _INJECTED[base]
        if base is nnx.LinearGeneral and module.dot_general_cls is not None:
            return "untouched", f"its own dot_general_cls {_name(module.dot_general_cls)}"
        op = getattr(module, rule.attr)
        ours = _ours(rule.family, op)
        if ours is not None:
            return "explicit", f"jaxlinear.{ours}"
        if any(op is d for d in rule.flax_defaults):
            return "jax-ad", f"{rule.flax_name} (JAX's AD)"
        return "untouched", f"its own {rule.attr} {_name(op)}"
    if base in _REPLACED and why_not is None:
        ours, flax_runs, our_runs = _REPLACED[base]
        if isinstance(module, ours):
            recipe = getattr(module, "quant", None)
            return "explicit", our_runs[module.binding] + (
                f" (quant={recipe.name})" if recipe is not None else ""
            )
        return "jax-ad", f"{flax_runs} (JAX's AD)"
    if isinstance(module, nnx.MultiHeadAttention):
        return "note", _ATTENTION_NOTE
    if not own_params:
        return None
    if base is not None:
        return "untouched", (
            f"a subclass of nnx.{base.__name__}: {why_not}; params {', '.join(own_params)}:"
            " JAX's AD"
        )
    return "untouched", (f"not converted (params {', '.join(own_params)}): JAX's AD")


_CONTAINERS = (nnx.List, nnx.Dict)


def _modules(model):
    """``(path, module, own_param_names)`` for every module, each once, in path order.

    A ``Param`` belongs to the nearest module above it on its path; ``nnx.List`` and
    ``nnx.Dict`` are containers, not modules, here (a list of parameters belongs to the
    module holding the list).
    """
    nodes = dict(nnx.iter_graph(model, graph=True))
    modules = {
        p: n
        for p, n in nodes.items()
        if isinstance(n, nnx.Module) and not (p and isinstance(n, _CONTAINERS))
    }
    owned: dict[tuple, list[str]] = {p: [] for p in modules}
    for path, node in nodes.items():
        if isinstance(node, nnx.Param):
            owner = next(path[:i] for i in range(len(path) - 1, -1, -1) if path[:i] in modules)
            owned[owner].append(".".join(map(str, path[len(owner) :])))
    order = sorted(
        modules, key=lambda p: tuple((1, 0, k) if isinstance(k, str) else (0, k, "") for k in p)
    )
    return [(p, modules[p], sorted(owned[p])) for p in order]


def report(model) -> Report:
    """What every module of ``model`` runs now, as a ``Report`` (``print`` it for a table).

    Lists each module once (shared modules at their first path): a layer on jaxlinear's
    ops (``explicit``), a layer ``explicit`` would convert still on Flax's op
    (``jax-ad``), a module owning ``nnx.Param`` s that ``explicit`` does not convert
    (``untouched``, e.g. ``LayerNorm``), and notes (``MultiHeadAttention``'s attention
    weights). Modules without parameters of their own (containers, ``Dropout``) have no
    row.

    Args:
      model: an ``nnx.Module``.

    Returns:
      A ``Report``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``.

    Examples:
      >>> import jaxlinear.nnx
      >>> from flax import nnx
      >>> rngs = nnx.Rngs(0)
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.LayerNorm(3, rngs=rngs))
      >>> print(jaxlinear.nnx.report(jaxlinear.nnx.explicit(model)))
      path      module     status     runs
      --------  ---------  ---------  ----
      layers.0  Linear     explicit   jaxlinear.dot_general
      layers.1  LayerNorm  untouched  not converted (params bias, scale): JAX's AD
    """
    _check_model("jaxlinear.nnx.report", model)
    rows = []
    for path, module, own in _modules(model):
        described = _describe(module, own)
        if described is not None:
            rows.append(Row(".".join(map(str, path)), type(module).__name__, *described))
    return Report(rows)


def explicit(model, *, binding: str = "custom_vjp", copy: bool = False, quant=None):
    r"""Put every linear layer of an NNX model on jaxlinear's explicit rules.

    Sets the op of each ``nnx.Linear``, ``LinearGeneral`` (``dot_general=``), ``Einsum``
    (``einsum_op=``) and ``Conv`` (``conv_general_dilated=``) to jaxlinear's, including
    the ``query/key/value/out`` projections of ``MultiHeadAttention``; turns each
    ``nnx.Embed`` into ``jaxlinear.nnx.Embed`` and each ``nnx.ConvTranspose`` into
    ``jaxlinear.nnx.ConvTranspose`` and each ``nnx.LoRA`` (also inside ``LoRALinear``)
    into ``jaxlinear.nnx.LoRA`` (same attributes, same Variables); a user's subclass of
    these layers whose overrides reach the parent's computation (through ``super()``) is
    converted too. ``nnx.state(model)``
    is unchanged: the same paths, shapes, dtypes and Variable types (only the graphdef's
    static op attributes and classes change), so optimizer states and checkpoints stay
    valid. Values and gradients equal the original model's (up to rounding: the same
    products, in another order at most).

    Layers that already hold a jaxlinear op are set to ``binding``'s; layers holding a
    third party's op (e.g. AQT's ``dot_general``), subclasses replacing their parent's
    computation and every other module with parameters are left as they are:
    ``report(model)`` lists them as ``untouched``.

    Args:
      model: an ``nnx.Module``.
      binding: ``"custom_vjp"`` (``jaxlinear.dot_general``, ``einsum``, ...: reverse mode)
        or ``"dual"`` (``dual_dot_general``, ...: every transform, forward mode included).
      copy: ``False`` (default): convert ``model`` in place (every module keeps its
        identity, so shared modules and references to the model stay valid) and return
        it. ``True``: convert and return an ``nnx.clone`` of it; ``model`` is left as it
        was (the clone's Variables are new objects holding the same arrays).
      quant: low-precision training (``docs/guides/quantization.md``): ``None`` (default),
        a recipe (``"fp8_hybrid"``, ``"fp8_rowwise"``, ``"int8"`` or a
        ``jaxlinear.Recipe``) for every converted layer, or a function ``(path, module)
        -> recipe | None`` choosing per layer (``path`` as ``report`` prints it, e.g.
        ``"layers.0"``): return ``None`` to keep a layer, such as the first and the last,
        in full precision. Embedding lookups are never quantized (``attend`` is).

    Returns:
      The converted model (``model`` itself unless ``copy=True``).

    Raises:
      ValueError: an unknown ``binding``.
      TypeError: ``model`` is not an ``nnx.Module``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear.nnx
      >>> from flax import nnx
      >>> model = jaxlinear.nnx.explicit(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> model.dot_general is jaxlinear.dot_general
      True
      >>> model(jnp.ones((4, 2))).shape
      (4, 3)
    """
    fn = "jaxlinear.nnx.explicit"
    _check_binding(fn, binding)
    _check_model(fn, model)
    choose = quant if callable(quant) else lambda path, module: quant
    if copy:
        model = nnx.clone(model)
    for path, module, _ in _modules(model):
        _convert(module, binding, _resolve(fn, choose(".".join(map(str, path)), module)))
    return model


def _convert(module, binding: str, quant=None) -> None:
    """Convert one module in place (if ``report`` would call it ``explicit`` or ``jax-ad``)."""
    kind = type(module)
    base, why_not = _known(kind)
    if base is None or why_not is not None:
        return
    if base in _INJECTED:
        status, _ = _describe(module, ())
        if status in ("explicit", "jax-ad"):
            rule = _INJECTED[base]
            setattr(module, rule.attr, _op(rule.family, binding, quant))
        return
    ours = _REPLACED[base][0]
    if not isinstance(module, ours):
        # The class alone changes (bypassing nnx's attribute tracking): the instance,
        # its Variables and everything that refers to it stay the same objects. A user's
        # subclass gets jaxlinear's layer under it, so its super() calls land there.
        new = ours if kind is base else adapt.converted_subclass(kind, ours)
        object.__setattr__(module, "__class__", new)
    module.binding = binding
    module.quant = quant


def per_example_loss(model, loss, *, params=None):
    r"""``(loss_fn, params)`` for ``per_example_grad_norms`` / ``clipped_grad`` from an NNX model.

    Splits ``model`` once (``nnx.split``) into its parameters (an ``nnx.State``) and the
    rest; ``loss_fn(params, x, *targets) = loss(nnx.merge(...)(x), *targets)`` runs the
    model on ``params``. The gradients come back as an ``nnx.State`` shaped like ``params``:
    apply them with ``nnx.update`` or an ``nnx.Optimizer``.

    Dropout and batch statistics: ``loss_fn`` runs the model in the mode it is in.
    - Dropout in training mode (``model.train()``) works: the loss is traced once, so each
      example's mask is the one the plain step draws, and the RNG counters advance on
      copies made inside the trace. ``model``'s own RNG state is not advanced by the
      per-example functions: reseed between steps (``nnx.reseed``), or split a new key.
    - ``nnx.BatchNorm`` in training mode normalizes with statistics of the whole batch,
      which mixes the examples: a per-example gradient is not defined there.
      ``per_example_routes`` names the leaves and the reduction that mixes them, and
      ``fallback="raise"`` raises. Use ``model.eval()`` (running averages: each example's
      loss depends on that example alone), or a per-example norm such as ``LayerNorm``
      or ``GroupNorm``.
    The guide: ``docs/guides/dp-real-models.md``.

    Args:
      model: an NNX module, e.g. after ``explicit(model)``.
      loss: ``loss(outputs, *targets) -> (n,)`` per-example losses.
      params: the ``nnx.split`` filter of the differentiated state (default ``nnx.Param``).

    Returns:
      ``(loss_fn, params)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear, jaxlinear.nnx
      >>> from flax import nnx
      >>> model = jaxlinear.nnx.explicit(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> loss_fn, params = jaxlinear.nnx.per_example_loss(model, lambda y: jnp.sum(y, 1))
      >>> x = jnp.ones((4, 3))
      >>> [r.route for r in jaxlinear.per_example_routes(loss_fn, params, x)]
      ['bias', 'rank_one']
    """
    _check_model("per_example_loss", model)
    if not callable(loss):
        raise TypeError(f"per_example_loss: `loss` must be callable, got {type(loss).__name__}")
    graphdef, state, rest = nnx.split(model, nnx.Param if params is None else params, ...)

    def loss_fn(state, x, *targets):
        # copy: the RNG counters (dropout) are advanced on copies made inside the trace.
        return loss(nnx.merge(graphdef, state, rest, copy=True)(x), *targets)

    return loss_fn, state
