r"""Sharded layers: data parallel, column- and row-parallel tensor parallel, the MLP block.

Each is ``linear`` (or ``dual_linear``) run under ``jax.shard_map`` on every device's
shard, with the collectives written where the math puts them. The rule behind every
one of them is the duality of *replicate* and *sum*:

    replicate: v ↦ (v, v, …, v),   replicateᵀ = sum: (u_1, …, u_n) ↦ Σ_k u_k,

the device-level twin of the bias broadcast ``b -> (b, ..., b)`` over the batch, whose
adjoint is ``db = Σ G`` over the batch. A value replicated along a mesh axis in the
forward pass gets its cotangent summed along it (``psum``) in the backward pass, and a
``psum`` in the forward pass hands the same cotangent to every device (replicate) in the
backward pass. The backward ``psum``\ s of replicated operands are done by the layers'
own pullback rules (``jaxlinear._src.vma.psum_to``), which read the varying manual axes
that ``shard_map`` records in each value's type.

FSDP and sequence parallelism use the second adjoint pair, *gather* and *scatter-sum*:

    all_gather: (v_1, …, v_n) ↦ [v_1; …; v_n] on every device,
    all_gatherᵀ = reduce_scatter: (u⁽¹⁾, …, u⁽ⁿ⁾) ↦ (Σ_k u⁽ᵏ⁾_j)_j,

device ``j`` keeping the ``j``-th block of the sum. JAX registers exactly this pair as
each other's transpose (``lax.all_gather``'s transpose rule is ``lax.psum_scatter`` and
``psum_scatter``'s is ``all_gather``, in ``jax/_src/lax/parallel.py``), so the layers
below write only the forward collective and autodiff inserts its adjoint.

Shapes are global: ``x: (batch, ..., d_in)``, ``W: (d_in, d_out)``, ``b: (d_out,)``;
each function shards them over ``mesh`` itself (``in_specs`` below) and returns a global
``Y`` sharded as stated. Call them inside or outside ``jax.jit``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlinear._src import formulas
from jaxlinear._src.fsdp import fsdp_gather
from jaxlinear._src.linear import _prepare, linear
from jaxlinear._src.params import Params
from jaxlinear._src.validation import plain_params_only


def _axis_size(fn: str, mesh, axis) -> int:
    """Number of devices along ``axis`` (a mesh axis name or a tuple of them)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    sizes = dict(mesh.shape)
    names = axis if isinstance(axis, tuple) else (axis,)
    for name in names:
        if name not in sizes:
            raise ValueError(
                f"{fn}: the mesh has no axis {name!r}; its axes are {tuple(sizes)}"
                " (pass `mesh=`, or set one with `jax.set_mesh`)"
            )
    return math.prod(sizes[name] for name in names)


def _check_divides(fn: str, what: str, size: int, axis, n: int) -> None:
    if size % n:
        raise ValueError(f"{fn}: {what} is {size}, not divisible by the {n} devices of {axis!r}")


def _spec(ndim: int, first=None, last=None) -> P:
    """``PartitionSpec`` of an ``ndim``-array: leading axis over ``first``, last over ``last``."""
    entries = [None] * ndim
    if first is not None:
        entries[0] = first
    if last is not None:
        entries[-1] = last
    return P(*entries)


def _param_specs(params, layout, W_spec: P, b_last):
    """``in_specs`` for a params pytree: ``W_spec`` for ``W``; ``b`` (any rank) over ``b_last``."""
    b = params.b if layout.kind == "params" else params.get("b")
    b_spec = None if b is None else _spec(b.ndim, None, b_last)
    if layout.kind == "params":
        return Params(W_spec, b_spec)
    return {"W": W_spec, "b": b_spec} if layout.b_key else {"W": W_spec}


def _check_batch(fn: str, x, axis, n: int) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{fn}: `x` must have a leading batch axis to shard over {axis!r}; got shape {x.shape}"
        )
    _check_divides(fn, f"the batch size of `x` (shape {x.shape})", x.shape[0], axis, n)


def _tensor_parallel_setup(
    fn, params, x, mesh, axis, batch_axis, layer, w_axis, precision, compute_dtype
):
    """Validate a tensor-parallel layer: ``W``'s ``w_axis`` (0: d_in, 1: d_out) and the batch
    must divide over their mesh axes. Returns ``(layout, layer, layer keyword arguments)``."""
    layout, precision, compute_dtype = _prepare(fn, params, x, precision, compute_dtype)
    plain_params_only(fn, layout)
    W = params.W if layout.kind == "params" else params["W"]
    what = f"{('d_in', 'd_out')[w_axis]} of `W` (shape {W.shape})"
    _check_divides(fn, what, W.shape[w_axis], axis, _axis_size(fn, mesh, axis))
    if batch_axis is not None:
        _check_batch(fn, x, batch_axis, _axis_size(fn, mesh, batch_axis))
    layer = linear if layer is None else layer
    return layout, layer, dict(precision=precision, compute_dtype=compute_dtype)


def _shard_map(body, mesh, in_specs, out_specs, *args):
    """``jax.shard_map(body)(*args)``, first putting ``args`` where ``in_specs`` say.

    With a concrete ``mesh``, ``args`` are laid out as ``in_specs`` first (``device_put``:
    nothing moves when they already are, and Explicit-axes meshes require it); with
    ``mesh=None`` the mesh set by ``jax.set_mesh`` is used and ``args`` must be laid out.
    """
    if isinstance(mesh, jax.sharding.Mesh):
        shardings = jax.tree.map(
            lambda s: NamedSharding(mesh, s), in_specs, is_leaf=lambda s: isinstance(s, P)
        )
        args = jax.device_put(args, shardings)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*args)


def _row_local(params, x, *, axis, layer, kw, scatter_dim=None):
    """One device's row-parallel layer: ``Y = psum_k(x_k W_k) + b``.

    With ``scatter_dim``, the sum is a reduce-scatter: this device keeps its block of
    ``Y`` along ``scatter_dim`` (sequence parallelism).
    """
    W = params.W if isinstance(params, Params) else params["W"]
    b = params.b if isinstance(params, Params) else params.get("b")
    # (..., d_in/n) @ (d_in/n, d_out) -> (..., d_out): this device's partial sum of X W.
    y = layer(Params(W, None), x, **kw)
    if scatter_dim is None:
        y = lax.psum(y, axis)
    else:  # (..., s, ..., d_out) -> (..., s/n, ..., d_out): the sum, this device's block
        y = lax.psum_scatter(y, axis, scatter_dimension=scatter_dim, tiled=True)
    if b is None:
        return y
    return y + b.reshape(-1).astype(y.dtype)[(None,) * (y.ndim - 1)]  # b added once, after


_FSDP_RESIDUALS = ("shard", "gathered")


def _check_residuals(fn: str, residuals) -> None:
    if residuals not in _FSDP_RESIDUALS:
        raise ValueError(f"{fn}: `residuals` must be 'shard' or 'gathered', got {residuals!r}")


def _gather_rows(params, axis, residuals="shard"):
    """FSDP: ``W``'s rows all-gathered over ``axis``; ``b`` untouched.

    ``(d_in/n, d_out) -> (d_in, d_out)``. The adjoint (JAX's transpose of ``all_gather``)
    reduce-scatters ``dW`` back to this device's rows. ``residuals="shard"``: the gathered
    ``W`` is marked (``fsdp_gather``), so the layer saves the shard and gathers again in
    the backward pass; ``"gathered"``: the layer keeps the gathered ``W``.
    """
    W = params.W if isinstance(params, Params) else params["W"]
    if residuals == "shard":
        W = fsdp_gather(W, axis)
    else:
        W = lax.all_gather(W, axis, axis=0, tiled=True)
    return params._replace(W=W) if isinstance(params, Params) else {**params, "W": W}


def data_parallel_linear(
    params,
    x,
    *,
    mesh=None,
    axis="data",
    layer: Callable | None = None,
    precision=None,
    compute_dtype=None,
):
    r"""Data parallel ``Y = X W + b``: ``x`` sharded over the batch, ``W``, ``b`` replicated.

    Each device computes ``Y_k = X_k W + b`` on its slice ``X_k`` of the batch.

    Collectives: none in the forward pass. In the backward pass, ``psum`` over ``axis``
    of ``dW = Σ_k X_kᵀ G_k`` and ``db = Σ_k Σ_batch G_k``, done by the layer's pullback
    rule: ``W`` and ``b`` are *replicated* over ``axis`` (one copy per device), and the
    adjoint of replicating is *summing across devices*, exactly as the adjoint of
    broadcasting ``b`` over the batch is the sum of ``G`` over the batch. ``dx`` needs
    no collective: ``x`` is sharded, not replicated.

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``: ``W: (d_in, d_out)``, ``b: (d_out,)``,
        ``(1, d_out)`` or ``None``; replicated over ``axis``.
      x: ``(batch, ..., d_in)``; ``batch`` divisible by the size of ``axis``.
      mesh: a ``jax.sharding.Mesh``; ``None`` for the one set with ``jax.set_mesh``.
      axis: the mesh axis (or tuple of axes) the batch is sharded over.
      layer: ``linear`` (default) or ``dual_linear``.
      precision: passed to the layer (``jax.lax.Precision``).
      compute_dtype: passed to the layer (e.g. ``jnp.bfloat16``).

    Returns:
      ``Y: (batch, ..., d_out)``, sharded over ``axis`` along the batch.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> mesh = jax.make_mesh((1,), ("data",))  # one device here; the same code on many
      >>> p = jaxlinear.Params(jnp.ones((3, 2)), jnp.zeros(2))
      >>> jaxlinear.data_parallel_linear(p, jnp.ones((4, 3)), mesh=mesh).shape
      (4, 2)
    """
    fn = "data_parallel_linear"
    layout, precision, compute_dtype = _prepare(fn, params, x, precision, compute_dtype)
    plain_params_only(fn, layout)
    _check_batch(fn, x, axis, _axis_size(fn, mesh, axis))
    layer = linear if layer is None else layer
    kw = dict(precision=precision, compute_dtype=compute_dtype)
    spec = _spec(x.ndim, axis)
    return _shard_map(lambda p, x: layer(p, x, **kw), mesh, (P(), spec), spec, params, x)


def fsdp_linear(
    params,
    x,
    *,
    mesh=None,
    axis="data",
    layer: Callable | None = None,
    precision=None,
    compute_dtype=None,
    residuals: str = "shard",
):
    r"""Fully sharded data parallel (FSDP, ZeRO-3) ``Y = X W + b``: ``x`` and ``W`` sharded.

    ``x`` is sharded over the batch and ``W`` is *stored* sharded over its rows
    (``d_in``) along the same mesh ``axis``: device ``k`` holds ``X_k`` and ``W[k-th
    block of rows]``. ``b`` is replicated.

    Collectives: in the forward pass, ``all_gather`` of ``W``'s rows over ``axis`` (every
    device then computes ``Y_k = X_k W + b``). In the backward pass, the adjoint of that
    gather, ``psum_scatter`` (reduce-scatter) of ``dW = Σ_k X_kᵀ G_k``: each device
    receives only the sum of *its* rows, so ``dW`` comes back sharded like ``W``.
    ``db`` (``b`` replicated) is ``psum``\ med. Per step each device sends
    ``(n-1)/n·|W|`` for the gather and as much for the reduce-scatter: the
    ``2(n-1)/n·|W|`` of ``data_parallel_linear``'s all-reduce (which is a reduce-scatter
    followed by an all-gather), while storing ``1/n`` of ``W`` and of ``dW``.
    JAX transposes ``all_gather`` into ``psum_scatter`` itself; the layer's pullback
    rule leaves the gathered ``W``'s cotangent unsummed because that ``W`` varies over
    ``axis`` (``all_gather``'s output type).

    Memory (``residuals="shard"``, the default): the layer saves its *shard* of ``W`` for
    the backward pass and gathers ``W`` again there (``fsdp_gather``), as PyTorch FSDP and
    ZeRO-3 do: one more all-gather per step, and a gathered ``W`` lives only while its
    layer runs. ``residuals="gathered"`` keeps the gathered ``W`` from the forward pass
    (one all-gather, ``|W|`` more memory per layer until its backward pass).

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``: ``W: (d_in, d_out)`` with ``d_in``
        divisible by the size of ``axis``; ``b: (d_out,)``, ``(1, d_out)`` or ``None``.
      x: ``(batch, ..., d_in)``; ``batch`` divisible by the size of ``axis``.
      mesh: a ``jax.sharding.Mesh``; ``None`` for the one set with ``jax.set_mesh``.
      axis: the mesh axis (or tuple of axes) ``x``'s batch and ``W``'s rows are sharded over.
      layer: ``linear`` (default) or ``dual_linear``.
      precision: passed to the layer (``jax.lax.Precision``).
      compute_dtype: passed to the layer (e.g. ``jnp.bfloat16``).
      residuals: ``"shard"`` (default): re-gather ``W`` in the backward pass;
        ``"gathered"``: keep the gathered ``W`` as a residual.

    Returns:
      ``Y: (batch, ..., d_out)``, sharded over ``axis`` along the batch. Gradients come
      back laid out as the inputs: ``dW`` over ``axis`` along ``d_in``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> p = jaxlinear.Params(jnp.ones((3, 2)), jnp.zeros(2))
      >>> jaxlinear.fsdp_linear(p, jnp.ones((4, 3)), mesh=mesh).tolist()[0]
      [3.0, 3.0]
    """
    _check_residuals("fsdp_linear", residuals)
    layout, layer, kw = _tensor_parallel_setup(
        "fsdp_linear", params, x, mesh, axis, axis, layer, 0, precision, compute_dtype
    )
    in_specs = (_param_specs(params, layout, P(axis, None), None), _spec(x.ndim, axis))

    def body(p, x):  # p.W: (d_in/n, d_out) -> gathered (d_in, d_out); x: (batch/n, ..., d_in)
        return layer(_gather_rows(p, axis, residuals), x, **kw)

    return _shard_map(body, mesh, in_specs, _spec(x.ndim, axis), params, x)


def column_parallel_linear(
    params,
    x,
    *,
    mesh=None,
    axis="model",
    batch_axis=None,
    layer: Callable | None = None,
    precision=None,
    compute_dtype=None,
):
    r"""Column-parallel ``Y = X W + b``: ``W``, ``b`` and ``Y`` sharded over ``d_out``.

    Device ``k`` holds the columns ``W_k: (d_in, d_out/n)``, ``b_k`` and the whole ``x``,
    and computes its columns ``Y_k = X W_k + b_k``.

    Collectives: none in the forward pass. In the backward pass, ``psum`` over ``axis``
    of ``dX = Σ_k G_k W_kᵀ``, done by the layer's pullback rule: ``x`` is *replicated*
    over ``axis``, so its cotangent is the *sum* of every device's contribution
    (Megatron's ``f``: identity forward, all-reduce backward). ``dW_k``, ``db_k`` stay
    local, sharded like ``W`` and ``b``. With ``batch_axis``, ``x`` is also sharded over
    the batch, and ``dW``, ``db`` are summed over ``batch_axis`` as in
    ``data_parallel_linear``.

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``; ``d_out`` divisible by the size of ``axis``.
      x: ``(..., d_in)``, replicated over ``axis``.
      mesh: a ``jax.sharding.Mesh``; ``None`` for the one set with ``jax.set_mesh``.
      axis: the mesh axis ``W``'s columns are sharded over.
      batch_axis: optional mesh axis for the leading (batch) axis of ``x`` and ``Y``.
      layer: ``linear`` (default) or ``dual_linear``.
      precision: passed to the layer (``jax.lax.Precision``).
      compute_dtype: passed to the layer (e.g. ``jnp.bfloat16``).

    Returns:
      ``Y: (..., d_out)``, sharded over ``axis`` along ``d_out`` (and over ``batch_axis``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> p = jaxlinear.Params(jnp.ones((3, 2)), jnp.zeros(2))
      >>> jaxlinear.column_parallel_linear(p, jnp.ones((4, 3)), mesh=mesh).shape
      (4, 2)
    """
    layout, layer, kw = _tensor_parallel_setup(
        "column_parallel_linear",
        params,
        x,
        mesh,
        axis,
        batch_axis,
        layer,
        1,
        precision,
        compute_dtype,
    )
    in_specs = (_param_specs(params, layout, P(None, axis), axis), _spec(x.ndim, batch_axis))
    out_specs = _spec(x.ndim, batch_axis, axis)
    return _shard_map(lambda p, x: layer(p, x, **kw), mesh, in_specs, out_specs, params, x)


def row_parallel_linear(
    params,
    x,
    *,
    mesh=None,
    axis="model",
    batch_axis=None,
    layer: Callable | None = None,
    precision=None,
    compute_dtype=None,
):
    r"""Row-parallel ``Y = X W + b``: ``W`` sharded over ``d_in``, ``x`` over its last axis.

    Device ``k`` holds the rows ``W_k: (d_in/n, d_out)`` and the matching slice
    ``X_k: (..., d_in/n)``; ``X W = Σ_k X_k W_k`` is a sum of per-device partial products.

    Collectives: in the forward pass, ``psum`` over ``axis`` of the partial products
    ``X_k W_k`` (then ``b``, replicated, is added once). In the backward pass, none: the
    adjoint of *summing across devices* is *replicating*, so every device receives the
    same ``G`` and computes ``dX_k = G W_kᵀ``, ``dW_k = X_kᵀ G`` locally (Megatron's
    ``g``: all-reduce forward, identity backward). With ``batch_axis``, ``dW`` and ``db``
    are summed over ``batch_axis`` as in ``data_parallel_linear``. With ``compute_dtype``
    (e.g. bfloat16) the partial products are rounded to it before they are summed.

    Args:
      params: ``Params(W, b)`` or ``{"W", "b"}``; ``d_in`` divisible by the size of ``axis``.
      x: ``(..., d_in)``, sharded over ``axis`` along ``d_in``.
      mesh: a ``jax.sharding.Mesh``; ``None`` for the one set with ``jax.set_mesh``.
      axis: the mesh axis ``W``'s rows (and ``x``'s last axis) are sharded over.
      batch_axis: optional mesh axis for the leading (batch) axis of ``x`` and ``Y``.
      layer: ``linear`` (default) or ``dual_linear``.
      precision: passed to the layer (``jax.lax.Precision``).
      compute_dtype: passed to the layer (e.g. ``jnp.bfloat16``).

    Returns:
      ``Y: (..., d_out)``, replicated over ``axis`` (sharded over ``batch_axis``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> p = jaxlinear.Params(jnp.ones((3, 2)), jnp.zeros(2))
      >>> jaxlinear.row_parallel_linear(p, jnp.ones((4, 3)), mesh=mesh).shape
      (4, 2)
    """
    layout, layer, kw = _tensor_parallel_setup(
        "row_parallel_linear", params, x, mesh, axis, batch_axis, layer, 0, precision, compute_dtype
    )
    in_specs = (_param_specs(params, layout, P(axis, None), None), _spec(x.ndim, batch_axis, axis))
    body = functools.partial(_row_local, axis=axis, layer=layer, kw=kw)
    return _shard_map(body, mesh, in_specs, _spec(x.ndim, batch_axis), params, x)


def tensor_parallel_mlp(
    layers: Sequence,
    x,
    *,
    mesh=None,
    axis="model",
    batch_axis=None,
    sequence_dim: int | None = None,
    fsdp: bool = False,
    activation: Callable = jax.nn.relu,
    layer: Callable | None = None,
    precision=None,
    compute_dtype=None,
    residuals: str = "shard",
):
    r"""A Megatron-style MLP block: column-parallel layer, activation, row-parallel layer.

    ``Y = act(X W_1 + b_1) W_2 + b_2``, equal to ``mlp(layers, x, activation=...)``. The
    hidden width ``h`` is sharded over ``axis``: device ``k`` holds the columns ``W_1k``,
    ``b_1k`` and the matching rows ``W_2k``, and the hidden activations never leave it
    (no all-gather): the column-parallel output is exactly the sharded input the
    row-parallel layer needs.

    Collectives: one ``psum`` over ``axis`` in the forward pass (the row-parallel sum of
    partial products) and one in the backward pass (``dX`` of the column-parallel layer,
    whose ``x`` is replicated): each is the adjoint of the other's forward, as in
    ``row_parallel_linear`` and ``column_parallel_linear``. With ``batch_axis``, the
    parameter cotangents are also summed over ``batch_axis`` (data parallel).

    **Sequence parallelism** (Megatron-SP, ``sequence_dim``): ``x`` and ``Y`` are sharded
    over ``axis`` along the sequence axis ``sequence_dim`` of ``x``. The block starts with
    an ``all_gather`` of ``x`` over the sequence (in place of the replicated input) and
    ends with a ``psum_scatter`` (reduce-scatter) of the partial products over the
    sequence (in place of the ``psum``). The backward pass runs their adjoints: an
    all-gather of ``G`` and a reduce-scatter of ``dX``. Same bytes as the ``psum`` pair
    (an all-reduce is a reduce-scatter plus an all-gather), but activations outside the
    block are ``1/n`` the size; ``db_2`` (``b_2`` replicated) is ``psum``\ med.

    **FSDP** (``fsdp=True``, needs ``batch_axis``): both weights are also stored sharded
    over ``batch_axis`` along their rows (``W_1: P(batch_axis, axis)``, ``W_2: P((axis,
    batch_axis), None)``) and all-gathered over ``batch_axis`` before use; their
    gradients come back reduce-scattered, sharded like the weights (see ``fsdp_linear``).
    With ``residuals="shard"`` (default) each layer saves its shard and gathers again in
    the backward pass; ``"gathered"`` keeps the gathered weights as residuals.

    Args:
      layers: two layers' params ``[p1, p2]``, e.g. ``init_mlp(key, [d, h, d])``;
        ``p1.W: (d_in, h)``, ``p2.W: (h, d_out)``, ``h`` divisible by the size of ``axis``
        (times that of ``batch_axis`` with ``fsdp``).
      x: ``(..., d_in)``, replicated over ``axis`` (sharded along ``sequence_dim`` if given).
      mesh: a ``jax.sharding.Mesh``; ``None`` for the one set with ``jax.set_mesh``.
      axis: the mesh axis the hidden width (and the sequence, with ``sequence_dim``) is
        sharded over.
      batch_axis: optional mesh axis for the leading (batch) axis of ``x`` and ``Y``.
      sequence_dim: optional axis of ``x`` (not the last; not 0 with ``batch_axis``), e.g.
        ``1`` for ``x: (batch, seq, d_in)``, whose length must divide over ``axis``.
      fsdp: store the weights sharded over ``batch_axis`` too (ZeRO-3).
      activation: elementwise function between the two layers.
      layer: ``linear`` (default) or ``dual_linear``.
      precision: passed to both layers (``jax.lax.Precision``).
      compute_dtype: passed to both layers (e.g. ``jnp.bfloat16``).
      residuals: with ``fsdp``: ``"shard"`` (default) or ``"gathered"`` (see ``fsdp_linear``).

    Returns:
      ``Y: (..., d_out)``, replicated over ``axis`` (sharded over it along
      ``sequence_dim`` if given; over ``batch_axis`` along the batch).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> layers = jaxlinear.init_mlp(jax.random.key(0), [3, 8, 3])
      >>> jaxlinear.tensor_parallel_mlp(layers, jnp.ones((4, 3), jnp.float32), mesh=mesh).shape
      (4, 3)
    """
    fn = "tensor_parallel_mlp"
    _check_residuals(fn, residuals)
    layers = list(layers)
    if len(layers) != 2:
        raise ValueError(f"{fn}: `layers` must hold two layers' params, got {len(layers)}")
    p1, p2 = layers
    layout1, precision, compute_dtype = _prepare(fn, p1, x, precision, compute_dtype)
    plain_params_only(fn, layout1)
    W1 = p1.W if layout1.kind == "params" else p1["W"]
    hidden = jax.ShapeDtypeStruct(
        (*x.shape[:-1], W1.shape[1]), formulas.output_dtype(x.dtype, compute_dtype)
    )
    layout2, _, _ = _prepare(fn, p2, hidden, precision, compute_dtype)
    plain_params_only(fn, layout2)
    n = _axis_size(fn, mesh, axis)
    if batch_axis is not None:
        _check_batch(fn, x, batch_axis, _axis_size(fn, mesh, batch_axis))
    seq = _check_sequence(fn, x, sequence_dim, batch_axis, axis, n)
    w_rows, h_axes = None, axis  # the mesh axes W_1's rows and the hidden width are over
    if fsdp:
        if batch_axis is None:
            raise ValueError(f"{fn}: `fsdp=True` shards the weights over `batch_axis`; got None")
        n_batch = _axis_size(fn, mesh, batch_axis)
        what = f"d_in of `W` of layer 1 (shape {W1.shape})"
        _check_divides(fn, what, W1.shape[0], batch_axis, n_batch)
        w_rows, h_axes, n = batch_axis, (axis, batch_axis), n * n_batch
    _check_divides(fn, f"the hidden width (`W` of layer 1: {W1.shape})", W1.shape[1], h_axes, n)
    layer = linear if layer is None else layer
    kw = dict(precision=precision, compute_dtype=compute_dtype)

    def block(p1, p2, x):
        if fsdp:  # this device's rows of W_1 and W_2, gathered over batch_axis
            p1, p2 = (
                _gather_rows(p1, batch_axis, residuals),
                _gather_rows(p2, batch_axis, residuals),
            )
        if seq is not None:  # (..., s/n, ..., d_in) -> (..., s, ..., d_in): the whole sequence
            x = lax.all_gather(x, axis, axis=seq, tiled=True)
        h = activation(layer(p1, x, **kw))  # (..., h/n): this device's hidden columns
        return _row_local(p2, h, axis=axis, layer=layer, kw=kw, scatter_dim=seq)

    x_spec = _spec(x.ndim, batch_axis)
    if seq is not None:
        x_spec = P(*(axis if i == seq else e for i, e in enumerate(x_spec)))
    in_specs = (
        _param_specs(p1, layout1, P(w_rows, axis), axis),
        _param_specs(p2, layout2, P(h_axes, None), None),
        x_spec,
    )
    return _shard_map(block, mesh, in_specs, x_spec, p1, p2, x)


def _check_sequence(fn, x, sequence_dim, batch_axis, axis, n):
    """``sequence_dim`` as a non-negative axis of ``x`` (or ``None``), after checking it."""
    if sequence_dim is None:
        return None
    seq = sequence_dim % x.ndim if -x.ndim <= sequence_dim < x.ndim else None
    if seq is None or seq == x.ndim - 1 or (seq == 0 and batch_axis is not None):
        raise ValueError(
            f"{fn}: `sequence_dim` must be an axis of `x` (shape {x.shape}) other than the"
            f" last{' and the batch axis 0' if batch_axis is not None else ''};"
            f" got {sequence_dim}"
        )
    _check_divides(fn, f"the sequence length of `x` (shape {x.shape})", x.shape[seq], axis, n)
    return seq
