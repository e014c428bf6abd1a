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

Every module that owns an ``nnx.Param`` and is not one of these layers is *untouched*
(a ``LayerNorm``, a ``BatchNorm``, a user's module using its parameters directly), and
``report`` lists it as such: nothing is skipped silently.

This module imports Flax; ``jaxlinear.nnx`` is its public face.
"""

from __future__ import annotations

import typing as tp

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding
from jax import lax

from jaxlinear._src.ops import conv as _conv
from jaxlinear._src.ops import conv_transpose as _conv_transpose
from jaxlinear._src.ops import dot_general as _dot_general
from jaxlinear._src.ops import einsum as _einsum
from jaxlinear._src.ops import embed as _embed

BINDINGS = ("custom_vjp", "dual")

# jaxlinear's op for each Flax op, per binding.
_OPS = {
    "dot_general": (_dot_general.dot_general, _dot_general.dual_dot_general),
    "einsum": (_einsum.einsum, _einsum.dual_einsum),
    "conv_general_dilated": (_conv.conv_general_dilated, _conv.dual_conv_general_dilated),
    "embed": (_embed.embed, _embed.dual_embed),
    "conv_transpose": (_conv_transpose.conv_transpose, _conv_transpose.dual_conv_transpose),
}


def _op(family: str, binding: str):
    """jaxlinear's function for ``family`` (``"dot_general"``, ...) in ``binding``."""
    return _OPS[family][BINDINGS.index(binding)]


def _check_binding(fn: str, binding) -> str:
    if binding not in BINDINGS:
        raise ValueError(f"{fn}: `binding` must be 'custom_vjp' or 'dual', got {binding!r}")
    return binding


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

    def __init__(self, *args, binding: str = "custom_vjp", **kwargs):
        super().__init__(*args, **kwargs)
        self.binding = _check_binding("jaxlinear.nnx.Embed", binding)

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
        """``query @ embeddingᵀ``: ``(..., features)`` -> ``(..., num_embeddings)``."""
        query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        dimension_numbers = (((query.ndim - 1,), (1,)), ((), ()))  # (..., d) · (V, d)ᵀ
        dot_general = _op("dot_general", self.binding)
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

    def __init__(self, *args, binding: str = "custom_vjp", **kwargs):
        super().__init__(*args, **kwargs)
        self.binding = _check_binding("jaxlinear.nnx.ConvTranspose", binding)

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

        y = _op("conv_transpose", self.binding)(
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


# --------------------------------------------------------------------------------------
# What each module type becomes, and how to say what it runs.


class Row(tp.NamedTuple):
    """One module of the model: where it is, what it is, what it runs."""

    path: str  # "blocks.0.attn.query"; "" for the model itself
    module: str  # its class name
    status: str  # "explicit" | "jax-ad" | "untouched" | "note"
    runs: str  # what its call runs, in words


STATUSES = {
    "explicit": "runs jaxlinear's op(s): the explicit rules",
    "jax-ad": "a layer `explicit` converts, still on Flax's op and JAX's AD",
    "untouched": "owns parameters used in a way `explicit` does not convert",
    "note": "no parameters of its own; information",
}


class Report:
    """What every module of an NNX model runs; ``str(report)`` is a table.

    ``report[path]`` is the ``Row`` of one module (path ``"a.b.0"``, ``""`` for the
    model itself); ``report.explicit`` / ``report.untouched`` are the paths with that
    status; iterating gives the rows in path order.
    """

    def __init__(self, rows: tp.Iterable[Row]):
        self.rows = tuple(rows)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, path: str) -> Row:
        for row in self.rows:
            if row.path == path:
                return row
        raise KeyError(f"jaxlinear.nnx.Report: no module at path {path!r}")

    def paths(self, status: str) -> tuple[str, ...]:
        """The paths of the modules with ``status`` (one of ``STATUSES``)."""
        if status not in STATUSES:
            raise ValueError(
                f"jaxlinear.nnx.Report.paths: `status` must be one of {list(STATUSES)},"
                f" got {status!r}"
            )
        return tuple(r.path for r in self.rows if r.status == status)

    @property
    def explicit(self) -> tuple[str, ...]:
        return self.paths("explicit")

    @property
    def untouched(self) -> tuple[str, ...]:
        return self.paths("untouched")

    def __str__(self):
        head = Row("path", "module", "status", "runs")
        cells = [head, *((r.path or "(model)", *r[1:]) for r in self.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
        lines.insert(1, "  ".join("-" * w for w in [*widths, len(head.runs)]))
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self):
        return f"jaxlinear.nnx.Report(\n{self}\n)"


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
}

_ATTENTION_NOTE = (
    "attention weights softmax(q·kᵀ)·v: activations only, no parameters: JAX's AD"
    " (projections query/key/value/out: their own rows)"
)


def _ours(family: str, op) -> str | None:
    """The name of jaxlinear's function ``op`` is (either binding), else ``None``."""
    return next((fn.__name__ for fn in _OPS[family] if op is fn), None)


def _name(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    return f"{module}.{getattr(fn, '__qualname__', type(fn).__name__)}".lstrip(".")


def _describe(module, own_params: tp.Sequence[str]) -> tuple[str, str] | None:
    """``(status, runs)`` of one module, or ``None`` if it needs no row."""
    kind = type(module)
    if kind in _INJECTED:
        rule = _INJECTED[kind]
        if kind is nnx.LinearGeneral and module.dot_general_cls is not None:
            return "untouched", f"its own dot_general_cls {_name(module.dot_general_cls)}"
        if kind is nnx.Einsum and "." in (module.einsum_str or ""):
            return "untouched", (
                f"jnp.einsum {module.einsum_str!r}: jaxlinear.einsum needs every axis named"
                " (no '...')"
            )
        op = getattr(module, rule.attr)
        ours = _ours(rule.family, op)
        if ours is not None:
            return "explicit", f"jaxlinear.{ours}"
        if any(op is d for d in rule.flax_defaults):
            return "jax-ad", f"{rule.flax_name} (JAX's AD)"
        return "untouched", f"its own {rule.attr} {_name(op)}"
    for flax_kind, (ours, flax_runs, our_runs) in _REPLACED.items():
        if kind is ours:
            return "explicit", our_runs[module.binding]
        if kind is flax_kind:
            return "jax-ad", f"{flax_runs} (JAX's AD)"
    if isinstance(module, nnx.MultiHeadAttention):
        return "note", _ATTENTION_NOTE
    if not own_params:
        return None
    known = next((k for k in (*_INJECTED, *_REPLACED) if isinstance(module, k)), None)
    if known is not None:
        return "untouched", (
            f"a subclass of nnx.{known.__name__} (its __call__ may differ), not converted"
            f" (params {', '.join(own_params)}): JAX's AD"
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


def explicit(model, *, binding: str = "custom_vjp", copy: bool = False):
    r"""Put every linear layer of an NNX model on jaxlinear's explicit rules.

    Sets the op of each ``nnx.Linear``, ``LinearGeneral`` (``dot_general=``), ``Einsum``
    (``einsum_op=``) and ``Conv`` (``conv_general_dilated=``) to jaxlinear's, including
    the ``query/key/value/out`` projections of ``MultiHeadAttention``; turns each
    ``nnx.Embed`` into ``jaxlinear.nnx.Embed`` and each ``nnx.ConvTranspose`` into
    ``jaxlinear.nnx.ConvTranspose`` (same attributes, same Variables). ``nnx.state(model)``
    is unchanged: the same paths, shapes, dtypes and Variable types (only the graphdef's
    static op attributes and classes change), so optimizer states and checkpoints stay
    valid. Values and gradients equal the original model's (up to rounding: the same
    products, in another order at most).

    Layers that already hold a jaxlinear op are set to ``binding``'s; layers holding a
    third party's op (e.g. AQT's ``dot_general``), subclasses of these layers and every
    other module with parameters are left as they are: ``report(model)`` lists them as
    ``untouched``.

    Args:
      model: an ``nnx.Module``.
      binding: ``"custom_vjp"`` (``jaxlinear.dot_general``, ``einsum``, ...: reverse mode)
        or ``"dual"`` (``dual_dot_general``, ...: every transform, forward mode included).
      copy: ``False`` (default): convert ``model`` in place (every module keeps its
        identity, so shared modules and references to the model stay valid) and return
        it. ``True``: convert and return an ``nnx.clone`` of it; ``model`` is left as it
        was (the clone's Variables are new objects holding the same arrays).

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
    if copy:
        model = nnx.clone(model)
    for _, module, _ in _modules(model):
        _convert(module, binding)
    return model


def _convert(module, binding: str) -> None:
    """Convert one module in place (if ``report`` would call it ``explicit`` or ``jax-ad``)."""
    kind = type(module)
    if kind in _INJECTED:
        status, _ = _describe(module, ())
        if status in ("explicit", "jax-ad"):
            rule = _INJECTED[kind]
            setattr(module, rule.attr, _op(rule.family, binding))
        return
    for flax_kind, (ours, _, _) in _REPLACED.items():
        if kind is flax_kind:
            # The class alone changes (bypassing nnx's attribute tracking): the instance,
            # its Variables and everything that refers to it stay the same objects.
            object.__setattr__(module, "__class__", ours)
        if kind in (flax_kind, ours):
            module.binding = binding


def per_example_loss(model, loss, *, params=None):
    r"""``(loss_fn, params)`` for ``per_example_grad_norms`` / ``clipped_grad`` from an NNX model.

    Splits ``model`` once (``nnx.split``) into its parameters (an ``nnx.State``) and the
    rest; ``loss_fn(params, x, *targets) = loss(nnx.merge(...)(x), *targets)`` runs the
    model on ``params``. The gradients come back as an ``nnx.State`` shaped like ``params``:
    apply them with ``nnx.update`` or an ``nnx.Optimizer``.

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
