r"""FSDP residuals: a weight stored sharded, gathered where an op uses it, and gathered again
in the backward pass instead of being kept.

An op of the family (``bilinear_op``) bound with ``gather=Gather(axis, dim)`` receives the
*shard* of its weight. Its forward pass gathers the whole weight, uses it and drops it; it
saves the shard (``1/n`` of the weight) as its residual; its backward pass gathers the
weight again from the shard, and returns the shard's cotangent through the gather's
adjoint, the reduce-scatter:

.. math::

    y = B(x, \text{gather}(w_k)), \qquad
    \bar x = B_x^\top(g; \text{gather}(w_k)), \qquad
    \bar w_k = \text{gather}^\top\bigl(B_w^\top(g; x)\bigr) = \text{reduce\_scatter}(\cdot)_k.

Inside ``jax.shard_map`` the gather is ``lax.all_gather`` over the manual mesh axis and its
adjoint ``lax.psum_scatter``. Under plain ``jax.jit`` (``spec`` given), an op bound on a
sharded global weight runs itself inside a ``shard_map`` manual over that axis only
(``on_shards``), and so gathers the same way: XLA's own partitioning of a sharding
constraint keeps every gathered weight (measured: ``benchmarks/RESULTS.md``).

Each gather is made to depend on the value the op is about to use it with (``x`` in the
forward pass, ``g`` in the backward pass), through an exact ``+ 0`` on the shard: XLA then
can neither merge the two gathers of one weight into one (common-subexpression
elimination; XLA:CPU drops ``optimization_barrier``\ s before that pass) nor start every
layer's gather at once (the scheduler hoists work that depends only on parameters). So at
most the gathered weights of the layer in flight, and of the next one, are live.

``fsdp_gather(w, axis)`` is the public way to mark a weight: it returns the gathered
weight, and an op of the family that receives exactly that array binds itself on the
shard with this policy instead.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlinear._src import vma


def _names(axis) -> tuple:
    return axis if isinstance(axis, tuple) else (axis,)


def _after(w, dep):
    """``w`` unchanged in value, but computed after ``dep`` (an exact ``+ 0``; see above).

    The zero is ``0 · s`` for one entry ``s`` of ``dep`` (its sum where ``dep``'s type
    carries an Explicit-axes sharding, which a reshape would have to state), a
    non-finite ``s`` counting as ``0``: no value of ``dep`` changes ``w``.
    """
    if dep is None or not hasattr(dep, "ravel") or getattr(dep, "size", 0) == 0:
        return w
    if vma._explicit_mesh(dep) is not None:  # sharded in its type: no reshape, a sum
        s = jnp.sum(dep)
    else:
        s = jnp.ravel(dep)[0]
    s = jnp.where(jnp.isfinite(s), s, jnp.zeros_like(s)).astype(w.dtype)
    return w + s * jnp.zeros((), w.dtype)


class Gather(NamedTuple):
    """A weight stored sharded along its axis ``dim`` over the mesh axis ``axis``.

    Attributes:
      axis: the mesh axis (or tuple of axes) the weight's ``dim`` is sharded over.
      dim: the weight's sharded axis (``0``: a dense ``W``'s ``d_in`` rows).
      spec: ``None`` inside ``jax.shard_map`` (the weight given is this device's shard);
        under plain ``jax.jit``, the ``PartitionSpec`` of the (global) weight, whose
        entry ``dim`` is ``axis``; the mesh is the one set with ``jax.set_mesh`` or the
        weight's own (Explicit axes).
      mesh: optional ``jax.sharding.Mesh`` for ``spec`` (Auto axes without ``set_mesh``).
    """

    axis: Any
    dim: int = 0
    spec: P | None = None
    mesh: Any = None

    # -- the gather and its adjoint ----------------------------------------------------

    def mesh_of(self, a):
        """The mesh of ``spec``: ``mesh``, else ``a``'s own (Explicit axes), else the one set
        with ``jax.set_mesh``."""
        if self.mesh is not None:
            return self.mesh
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if mesh is None or not getattr(mesh, "axis_names", ()):
            mesh = jax.sharding.get_abstract_mesh()
        return mesh

    def _constrain(self, a, spec):
        mesh = self.mesh_of(a)
        if not getattr(mesh, "axis_names", ()):
            return lax.with_sharding_constraint(a, spec)  # JAX's own error: no mesh
        explicit = any(t == AxisType.Explicit for t in tuple(getattr(mesh, "axis_types", ())))
        if explicit:
            return jax.sharding.reshard(a, NamedSharding(mesh, spec))
        return lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    def _whole_spec(self):
        entries = list(self.spec) + [None] * (self.dim + 1 - len(self.spec))
        entries[self.dim] = None
        return P(*entries)

    def gather(self, w, after=None):
        """The whole weight from ``w`` (the shard; global and sharded under ``jit``)."""
        w = _after(w, after)
        if self.spec is None:  # (..., d/n, ...) -> (..., d, ...) on every device
            return lax.all_gather(w, self.axis, axis=self.dim, tiled=True)
        return self._constrain(w, self._whole_spec())

    # Inside shard_map (``spec=None``; an op given a ``spec`` runs there, see on_shards):

    def scatter(self, w_bar):
        """The adjoint of ``gather``: the shard's cotangent, summed over the devices.

        ``(..., d, ...) -> (..., d/n, ...)``: this device's block of the sum."""
        return lax.psum_scatter(w_bar, self.axis, scatter_dimension=self.dim, tiled=True)

    def whole_type(self, aval):
        """The shard's abstract value with the gathered weight's shape."""
        return aval.update(shape=self.whole_aval(aval).shape)

    def whole_aval(self, aval):
        """The shape and dtype of the gathered weight, from the shard's."""
        n = math.prod(lax.axis_size(a) for a in _names(self.axis))
        shape = list(aval.shape)
        shape[self.dim] *= n
        return jax.ShapeDtypeStruct(tuple(shape), aval.dtype)


def _explicit_elsewhere(w, names) -> bool:
    """Whether ``w``'s type shards it over an Explicit mesh axis not in ``names``."""
    sharding = getattr(jax.typeof(w), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    types = dict(
        zip(getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ()), strict=False)
    )
    used = {a for e in getattr(sharding, "spec", ()) if e is not None for a in _names(e)}
    return any(types.get(a) == AxisType.Explicit for a in used - set(names))


def on_shards(fn: str, bind, x, w, b, gather: Gather, y_axis):
    """Under ``jax.jit``: ``bind(x, w_shard, b, gather=...)`` inside a ``shard_map`` manual
    over ``gather.axis`` only (the other mesh axes stay with the compiler), with ``x``'s
    axis 0 (the batch) and ``y``'s ``y_axis`` sharded over it, ``w`` over its ``dim``.

    So the op runs on each device's examples and shard exactly as inside ``shard_map``:
    the residual policy above, with the collectives in its rules (XLA's own partitioning
    of a sharded weight under ``jit`` gathers every layer's weight at once).
    """
    names = _names(gather.axis)
    mesh = gather.mesh_of(w)
    sizes = dict(getattr(mesh, "shape", {}))
    if not all(a in sizes for a in names):
        raise ValueError(
            f"{fn}: a weight marked by `fsdp_gather` under jit needs a mesh with axis"
            f" {gather.axis!r} (pass `mesh=` to fsdp_gather or use `jax.set_mesh`); got {mesh}"
        )
    n = math.prod(sizes[a] for a in names)
    if y_axis is None or x.ndim == 0 or x.shape[0] % n:
        raise ValueError(
            f"{fn}: a weight marked by `fsdp_gather` under jit needs `x`'s axis 0 (the batch,"
            f" shape {x.shape}) divisible by the {n} devices of {gather.axis!r} and kept as"
            " an axis of the output"
        )
    if _explicit_elsewhere(w, names):
        # The weight is also sharded over other Explicit mesh axes (FSDP × tensor
        # parallel): jax 0.10's psum_scatter cannot be lowered there inside a partially
        # manual shard_map (an AssertionError in _reduce_scatter_lowering, measured). The
        # op runs on the gathered weight instead: same values, the gathered weight kept.
        return bind(x, gather.gather(w), b, gather=None)
    inner = gather._replace(spec=None, mesh=None)
    w_spec = P(*(gather.axis if i == gather.dim else None for i in range(w.ndim)))
    specs = (P(gather.axis), w_spec) + (() if b is None else (P(),))

    def body(x, w, *b):
        return bind(x, w, *(b or [None]), gather=inner)

    out_spec = P(*(None,) * y_axis, gather.axis)
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=specs,
        out_specs=out_spec,
        axis_names=frozenset(names),
    )
    return run(x, w, *(() if b is None else (b,)))


# --------------------------------------------------------------------------------------
# Marking: fsdp_gather's result, recognised by the ops that receive it.

_MARKED: dict[int, tuple] = {}


def _forget(key):
    _MARKED.pop(key, None)


def fsdp_gather(w, axis, *, dim: int = 0, spec: P | None = None, mesh=None):
    r"""The whole weight from its FSDP shard, re-gathered in the backward pass by the ops.

    Returns ``w`` gathered along ``dim`` over the mesh ``axis``. Any op of the family
    (``linear``, ``dual_linear``, ``dot_general``, ``einsum``, ``conv``,
    ``conv_transpose``, ``embed``, both bindings, or an op of your own from
    ``bilinear_op``) that receives *this very array* as its weight binds itself on the
    shard instead: it saves the shard for the backward pass (not the gathered weight),
    gathers again there, and returns the shard's gradient through a reduce-scatter. Used
    anywhere else (cast, sliced, or given to another function), the result is an
    ordinary gathered array, differentiated by JAX (all-gather forward, reduce-scatter
    backward; the gathered weight is then kept for the backward pass).

    Two settings:

    - inside ``jax.shard_map`` (``spec=None``): ``w`` is this device's shard and ``axis``
      a manual mesh axis; the gather is ``lax.all_gather(w, axis, axis=dim, tiled=True)``.
    - under plain ``jax.jit`` (``spec=`` the weight's ``PartitionSpec``, ``axis`` at entry
      ``dim``): ``w`` is the global weight laid out as ``spec``; the gather is a sharding
      constraint to ``spec`` with ``dim`` unsharded, and the gradient is constrained back
      to ``spec``.

    Args:
      w: the shard (``shard_map``) or the sharded global weight (``jit``).
      axis: the mesh axis (or tuple of axes) ``w``'s ``dim`` is sharded over.
      dim: the sharded axis of ``w`` (``0``: a dense ``W``'s rows).
      spec: ``None`` inside ``shard_map``; the weight's ``PartitionSpec`` under ``jit``.
      mesh: the mesh for ``spec`` when none is set with ``jax.set_mesh`` (Auto axes).

    Returns:
      The whole weight, ``w.shape`` with ``dim`` multiplied by the size of ``axis``
      (inside ``shard_map``; under ``jit`` the same global shape, unsharded along ``dim``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> def body(W, b, x):
      ...     return jaxlinear.linear((jaxlinear.fsdp_gather(W, "data"), b), x)
      >>> f = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P("data")),
      ...                   out_specs=P("data"))
      >>> f(jnp.ones((3, 2)), jnp.zeros(2), jnp.ones((4, 3))).tolist()[0]
      [3.0, 3.0]
    """
    if not isinstance(dim, int) or not -w.ndim <= dim < w.ndim:
        raise ValueError(f"fsdp_gather: `dim` must be an axis of `w` (shape {w.shape}), got {dim}")
    dim %= w.ndim
    if spec is not None:
        spec = P(*spec)
        if len(spec) <= dim or spec[dim] != axis:
            raise ValueError(
                f"fsdp_gather: `spec` {spec} must shard axis {dim} of `w` over {axis!r}"
            )
    gather = Gather(axis, dim, spec, mesh)
    whole = gather.gather(w)
    key = id(whole)
    try:
        _MARKED[key] = (weakref.ref(whole, lambda _, key=key: _forget(key)), w, gather)
    except TypeError:  # not weak-referenceable: an ordinary gathered array
        pass
    return whole


def fsdp_gather_tree(tree, specs, axis, *, mesh=None, in_shard_map: bool = False):
    r"""``fsdp_gather`` on every leaf of ``tree`` whose ``PartitionSpec`` shards it over ``axis``.

    For whole models: gather a model's parameters (an ``nnx.State``, an Equinox model's
    arrays, a dict) inside the loss, and every op of the family that receives one of the
    gathered weights saves its shard and gathers again in the backward pass. Leaves whose
    spec does not name ``axis`` (biases, norms' scales, replicated weights) and ``None``
    specs are returned unchanged.

    Args:
      tree: a pytree of arrays (the weights as stored: global arrays laid out as ``specs``
        under ``jit``; this device's shards inside ``shard_map``).
      specs: a pytree of ``PartitionSpec`` (or ``None``) matching ``tree``'s leaves, e.g.
        ``nnx.get_partition_spec(state)`` or the ``in_specs`` given to ``shard_map``.
      axis: the FSDP mesh axis.
      mesh: for ``jit`` on Auto axes without ``jax.set_mesh``.
      in_shard_map: ``True`` inside ``shard_map`` (``axis`` manual), ``False`` under ``jit``.

    Returns:
      ``tree`` with those leaves gathered (see ``fsdp_gather``).
    """

    def one(leaf, spec):
        spec = spec.get_value() if hasattr(spec, "get_value") else spec  # an nnx.Variable
        if not isinstance(spec, P) or axis not in tuple(spec):
            return leaf
        dim = tuple(spec).index(axis)
        return fsdp_gather(leaf, axis, dim=dim, spec=None if in_shard_map else spec, mesh=mesh)

    is_spec = lambda s: s is None or isinstance(s, P)  # noqa: E731
    return jax.tree.map(lambda s, leaf: one(leaf, s), specs, tree, is_leaf=is_spec)


def resolve(w, gather):
    """``(w, gather)`` for an op about to bind on ``w``: a weight marked by ``fsdp_gather``
    becomes ``(its shard, its Gather)``; anything else is returned as it is."""
    if gather is not None:
        return w, gather
    entry = _MARKED.get(id(w))
    if entry is None or entry[0]() is not w:
        return w, None
    return entry[1], entry[2]
