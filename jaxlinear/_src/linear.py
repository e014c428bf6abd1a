r"""``linear``: ``Y = X W + b`` as a ``jax.custom_vjp`` whose backward rule is ``pullback``.

Also the public, validated ``pushforward`` and ``pullback`` (params-structured
wrappers of ``formulas``) and ``mlp``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxlinear._src import formulas, ghost, vma
from jaxlinear._src.bilinear import BatchRule, bilinear_op
from jaxlinear._src.ops.dot_general import DOT_GENERAL
from jaxlinear._src.params import Layout
from jaxlinear._src.quant import resolve
from jaxlinear._src.validation import (
    canonical_compute_dtype,
    canonical_precision,
    check_layer,
    check_same,
    layer_inputs,
    like_inputs,
    promoted_compute_dtype,
)


def _prepare(fn, params, x, precision, compute_dtype):
    """Validate; return ``(layout, precision, compute_dtype)`` in hashable form.

    Operands of different dtypes follow JAX's promotion (``promoted_compute_dtype``).
    """
    compute_dtype = canonical_compute_dtype(fn, compute_dtype)
    layout = check_layer(fn, params, x, compute_dtype)
    compute_dtype = promoted_compute_dtype(layout, params, x, compute_dtype)
    return layout, canonical_precision(precision), compute_dtype


def pushforward(params, x, dparams, dx, *, precision=None, compute_dtype=None):
    r"""The pushforward (JVP) of the layer: ``dY = dX W + X dW + db``.

        Ẏ = Ẋ W + X Ẇ + ḃ

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``; ``W: (d_in, d_out)``, ``b: (d_out,)``,
        ``(1, d_out)`` or ``None``.
      x: ``(..., d_in)`` primal input.
      dparams: tangent of ``params`` in the same structure, or ``None`` (zero); a
        ``None`` leaf inside it is a zero tangent for that leaf.
      dx: ``(..., d_in)`` tangent of ``x``, or ``None`` (zero).
      precision: passed to every matmul.
      compute_dtype: run the matmuls in this dtype (float32 accumulation).

    Returns:
      ``dY: (..., d_out)`` in the dtype of ``Y``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.eye(2), jnp.zeros(2))
      >>> dp = jaxlinear.Params(jnp.eye(2), jnp.ones(2))
      >>> jaxlinear.pushforward(p, jnp.ones(2), dp, None).tolist()
      [2.0, 2.0]
    """
    params, x = layer_inputs(params, x)  # NumPy/weakly typed -> the arrays JAX computes on
    dparams, dx = like_inputs(dparams, params), like_inputs(dx, x)
    layout, precision, compute_dtype = _prepare("pushforward", params, x, precision, compute_dtype)
    W, b = layout.unpack(params)
    dW = db = None
    if dparams is not None:
        d_layout = check_layer("pushforward", dparams, x, compute_dtype)
        if d_layout.kind != layout.kind or d_layout.bias not in ("none", layout.bias):
            raise TypeError(
                "pushforward: `dparams` must have the same structure as `params` (a `b` of"
                f" None is a zero tangent); got {d_layout} for params of {layout}"
            )
        dW, db = d_layout.unpack(dparams)
        check_same("pushforward", "dparams.W", dW, "params.W", W)
        if db is not None:
            check_same("pushforward", "dparams.b", db, "params.b", b)
    if dx is not None:
        check_same("pushforward", "dx", dx, "x", x)
    return formulas.pushforward(x, W, dx, dW, db, precision=precision, compute_dtype=compute_dtype)


def pullback(params, x, g, *, precision=None, compute_dtype=None):
    r"""The pullback (VJP) of the layer: ``dX = G Wᵀ``, ``dW = Xᵀ G``, ``db = Σ G``.

        X̄ = G Wᵀ,   W̄ = Xᵀ G,   b̄ = Σ_batch G

    ``dW`` and ``db`` contract every leading axis of ``x``/``g``.

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``.
      x: ``(..., d_in)`` primal input.
      g: ``(..., d_out)`` cotangent of ``Y``, in the dtype of ``Y``.
      precision: passed to every matmul.
      compute_dtype: run the matmuls in this dtype (float32 accumulation).

    Returns:
      ``(dparams, dx)``: ``dparams`` in the structure of ``params`` (``dW: (d_in, d_out)``,
      ``db`` shaped like ``b``), ``dx: (..., d_in)``; each in the dtype of its primal.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> X = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> dp, dx = jaxlinear.pullback(p, X, jnp.ones((3, 2)))
      >>> dp.W.tolist(), dp.b.tolist()
      ([[2.0, 2.0], [2.0, 2.0]], [3.0, 3.0])
    """
    params, x = layer_inputs(params, x)  # NumPy/weakly typed -> the arrays JAX computes on
    layout, precision, compute_dtype = _prepare("pullback", params, x, precision, compute_dtype)
    W, _ = layout.unpack(params)
    y_shape = (*np.shape(x)[:-1], W.shape[1])
    y = jax.ShapeDtypeStruct(y_shape, formulas.output_dtype(x.dtype, compute_dtype))
    g = like_inputs(g, y)
    check_same("pullback", "g", g, "Y = linear(params, x)", y)
    return _pullback(layout, precision, compute_dtype, x, W, g)


def _pullback(layout: Layout, precision, compute_dtype, x, W, g):
    """``formulas.pullback``, packed into ``layout`` (the public ``pullback``).

    Inside ``shard_map`` each cotangent is then summed (``psum``) over the manual axes
    along which it varies but its primal is replicated: the adjoint of replication.
    """
    wrt = ("x", "W") if layout.bias == "none" else ("x", "W", "b")
    dx, dW, db = formulas.pullback(
        x, W, g, precision=precision, compute_dtype=compute_dtype, wrt=wrt
    )
    dx, dW, db = vma.psum_to(dx, x), vma.psum_to(dW, W), vma.psum_to(db, W)
    return layout.pack(dW, db), dx


# --------------------------------------------------------------------------------------
# The dense layer as one instance of the rule builder. Its three functions are
# formulas.matmul and its two transposes; its fused pullback and pushforward are
# formulas.pullback / formulas.pushforward (one call per backward / forward-mode pass).
# AFFINE.custom_vjp is linear's binding (fwd/bwd: BilinearOp._vjp_fwd / _vjp_bwd),
# AFFINE.dual is dual_linear's (primitives "jaxlinear_affine", "jaxlinear_affine_pushforward").


def _affine_pullback(x, W, g, *, wrt, compute_dtype, out_dtype, precision):
    del out_dtype  # always None: Y is in the compute dtype
    wrt = tuple("W" if n == "w" else n for n in wrt)
    return formulas.pullback(x, W, g, precision=precision, compute_dtype=compute_dtype, wrt=wrt)


def _affine_pushforward(x, W, dx, dW, db, *, compute_dtype, out_dtype, precision):
    del out_dtype  # always None: Y is in the compute dtype
    return formulas.pushforward(x, W, dx, dW, db, precision=precision, compute_dtype=compute_dtype)


def _affine_batch(x_ndim, W_ndim, x_batched, W_batched, *, axis_size, precision):
    """vmap. ``W`` unbatched: the vmapped axis is one more leading axis of ``x`` and ``Y``.

    ``W`` batched, ``(B, d_in, d_out)``: a ``dot_general`` (the family's ``DOT_GENERAL``
    op, with its own explicit rules) contracting ``x``'s last axis with ``W``'s ``d_in``,
    and pairing the vmapped axes as a batch axis if ``x`` is batched too:
    ``(..., d_in) · (B, d_in, d_out) -> (..., B, d_out)`` or
    ``(B, ..., d_in) · (B, d_in, d_out) -> (B, ..., d_out)``.
    """
    del W_ndim, axis_size, precision
    if not W_batched:
        return {}, 0
    if x_batched:  # x: (B, ..., d_in)
        dims = (((x_ndim,), (1,)), ((0,), (0,)))
        return BatchRule({"dimension_numbers": dims}, 0, op=DOT_GENERAL)
    dims = (((x_ndim - 1,), (1,)), ((), ()))  # x: (..., d_in)
    return BatchRule({"dimension_numbers": dims}, x_ndim - 1, op=DOT_GENERAL)


def _affine_factors(x, g, W_aval, *, y_axis, preferred_element_type, precision):
    """``W̄_i = X_iᵀ G_i``: ``x: (n, ..., d_in)`` read as ``X_i: (T, d_in)`` (``W``'s axis 0),
    ``g`` as ``G_i: (T, d_out)`` (axis 1)."""
    del W_aval, y_axis, preferred_element_type, precision  # y_axis is 0: x's leading axis
    n = x.shape[0]
    return x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1]), (0,), (1,)


def _affine_per_example(x, g, W_aval, **kw):
    """Ghost norms of ``W̄_i = X_iᵀ G_i`` (``_affine_factors``)."""
    return ghost.matmul_route(*_affine_factors(x, g, W_aval, **kw)[:2])


def _affine_scale_axes(product, a_ndim, b_ndim, *, precision):
    """Quantization: the axes each product keeps (``bilinear_op``'s ``scale_axes``).

    ``Y = X W``: ``x``'s rows and ``W``'s columns (d_out); ``X̄ = G Wᵀ``: ``g``'s rows and
    ``W``'s d_in; ``W̄ = Xᵀ G``: ``g``'s and ``x``'s last axes (their columns).
    """
    del precision
    rows = tuple((i, i) for i in range(a_ndim - 1))  # x's (or g's) leading axes
    if product == "forward":  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
        return rows, ((1, a_ndim - 1),)
    if product == "grad_x":  # (..., d_out) @ (d_in, d_out)ᵀ -> (..., d_in)
        return rows, ((0, a_ndim - 1),)
    return ((a_ndim - 1, 1),), ((b_ndim - 1, 0),)  # (n, d_in)ᵀ @ (n, d_out) -> (d_in, d_out)


AFFINE = bilinear_op(
    "affine",
    formulas.matmul,
    formulas.matmul_transpose_x,
    formulas.matmul_transpose_W,
    batch=_affine_batch,
    out_sharding=vma.typed_output,
    pullback=_affine_pullback,
    pushforward=_affine_pushforward,
    per_example=_affine_per_example,
    factors=_affine_factors,
    scale_axes=_affine_scale_axes,
)


def linear(params, x, *, precision=None, compute_dtype=None, residuals="exact", quant=None):
    r"""The affine layer ``Y = X W + b`` with an explicit backward rule (``pullback``).

        Y = X W + b,   X̄ = G Wᵀ,  W̄ = Xᵀ G,  b̄ = Σ G

    A ``jax.custom_vjp`` function: works under ``jit``, ``grad``, ``vjp``,
    ``value_and_grad``, ``jacrev``, ``vmap``, ``checkpoint`` and ``lax.scan``. The
    forward pass saves only ``x`` and ``W`` for the backward pass. Forward-mode
    transforms (``jvp``, ``jacfwd``, ``hessian``, ``linearize``) raise JAX's
    ``TypeError``: use ``dual_linear`` for those.

    Args:
      params: ``Params(W, b)``, a dict ``{"W": W, "b": b}``, Flax's
        ``{"kernel": W, "bias": b}`` or a tuple ``(W, b)``; ``W: (d_in, d_out)``,
        ``b: (d_out,)``, the row vector ``(1, d_out)``, or ``None``.
      x: ``(..., d_in)``, any number of leading axes (none: a single vector).
      precision: ``jax.lax.Precision`` (or a pair), passed to every matmul, backward too.
      compute_dtype: e.g. ``jnp.bfloat16``: run forward and backward matmuls in this
        dtype with float32 accumulation. ``Y`` comes out in ``compute_dtype``;
        gradients come back in the dtypes of ``params`` and ``x``.
      residuals: what the forward pass saves for the backward pass. ``"exact"``
        (default): ``x`` and ``W`` as given. ``"compute"``: with ``compute_dtype``, their
        copies cast to it (the casts the forward pass makes anyway), so the backward
        pass does not cast again; the same gradients, bit for bit. Which one pays is
        measured in ``benchmarks/bench_memory.py`` (see ``benchmarks/RESULTS.md``).
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see ``docs/guides/quantization.md``).

    Returns:
      ``Y: (..., d_out)``, in ``compute_dtype`` if given, else in the dtype
      ``x @ W + b`` has (``jnp.result_type(x, W, b)``: bfloat16 params with a float32
      ``x`` give float32, and the matmul runs in float32).

    Raises:
      TypeError: bad params structure (another library's layout is refused with the
        converter to use), integer/bool dtypes, complex and real operands mixed.
      ValueError: ``W`` not 2-D, ``x`` 0-d or of the wrong width, ``b`` not
        ``(d_out,)``/``(1, d_out)``, ``residuals`` not ``"exact"``/``"compute"``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> jaxlinear.linear(p, jnp.array([1., 1.])).tolist()
      [1.5, 2.0]
      >>> jax.grad(lambda p: jaxlinear.linear(p, jnp.ones((3, 2))).sum())(p).b.tolist()
      [3.0, 3.0]
    """
    if residuals not in ("exact", "compute"):
        raise ValueError(f"linear: `residuals` must be 'exact' or 'compute', got {residuals!r}")
    params, x = layer_inputs(params, x)  # NumPy/weakly typed -> the arrays JAX computes on
    layout, precision, compute_dtype = _prepare("linear", params, x, precision, compute_dtype)
    W, b = layout.unpack(params)
    quant = resolve("linear", quant)
    return AFFINE.custom_vjp(
        x, W, b, precision=precision, compute_dtype=compute_dtype, residuals=residuals, quant=quant
    )


def mlp(
    layers: Sequence,
    x,
    *,
    activation: Callable | None = jax.nn.relu,
    layer: Callable | None = None,
    precision=None,
    compute_dtype=None,
):
    """A chain of affine layers with ``activation`` between them (not after the last).

    Args:
      layers: a non-empty sequence of ``Params`` (or dicts), e.g. from ``init_mlp``;
        ``layers[i].W: (d_i, d_{i+1})``.
      x: ``(..., d_0)``.
      activation: elementwise function applied after every layer but the last;
        ``None`` is the identity (a chain of affine maps).
      layer: the binding to use for each layer: ``linear`` (default) or ``dual_linear``.
      precision: passed to every layer (``jax.lax.Precision``).
      compute_dtype: passed to every layer (e.g. ``jnp.bfloat16``).

    Returns:
      ``(..., d_L)``.

    Raises:
      ValueError, TypeError: ``layers`` empty, ``activation`` or ``layer`` not callable;
        a layer's own error, prefixed with the layer it came from:
        ``mlp: layer 1 (5 → 2): linear: `x` has last dim 4 ...`` (``layers[1]``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> layers = jaxlinear.init_mlp(jax.random.key(0), [3, 8, 2])
      >>> jaxlinear.mlp(layers, jnp.ones((5, 3), jnp.float32)).shape
      (5, 2)
      >>> p = jaxlinear.Params(jnp.array([[2.0]]), jnp.array([-1.0]))
      >>> jaxlinear.mlp([p, p], jnp.array([1.0]), activation=None).tolist()  # 2(2·1 − 1) − 1
      [1.0]
    """
    layer = linear if layer is None else layer
    activation = (lambda h: h) if activation is None else activation
    for name, f in (("activation", activation), ("layer", layer)):
        if not callable(f):
            raise TypeError(f"mlp: `{name}` must be callable or None, got {type(f).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError("mlp: `layers` is empty; expected at least one layer's params")
    for i, params in enumerate(layers):
        try:
            x = layer(params, x, precision=precision, compute_dtype=compute_dtype)
        except (ValueError, TypeError) as e:
            if type(e) not in (ValueError, TypeError):  # JAX's own subclasses: unchanged
                raise
            W = params.get("W") if isinstance(params, dict) else getattr(params, "W", None)
            shape = tuple(getattr(W, "shape", ()))
            widths = f" ({shape[0]} → {shape[1]})" if len(shape) == 2 else ""
            raise type(e)(f"mlp: layer {i}{widths}: {e}") from e
        if i < len(layers) - 1:
            x = activation(x)
    return x
