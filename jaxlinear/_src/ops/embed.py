r"""Embedding lookup ``y = table[ids]``: a gather, whose transpose is a scatter-add.

The lookup is linear in ``table: (V, d)`` (not bilinear: the integer ``ids`` are not
differentiated), so one formula and its transpose are the whole story:

    y[…, :] = table[ids[…], :],   tablē[v, :] = Σ_{…: ids[…] = v} G[…, :]

Rows looked up more than once receive the *sum* of their cotangents (repeated ids sum),
the same broadcast ↔ sum duality as a bias. Because the map is linear, its pushforward is
the map itself applied to the tangent, ``dy = embed(dtable, ids)``, so the dual binding
needs a single primitive: its JVP binds itself on the tangent and its transpose rule is
the scatter-add.

Out-of-range ids: ``ids`` in ``[-V, V)`` index as in NumPy (negative ones count from the
end); any other id looks up a row of zeros and sends no gradient anywhere (JAX's
``mode="fill"`` gather with ``fill_value=0`` and ``mode="drop"`` scatter, a consistent
transpose pair). Plain ``table[ids]`` in JAX clamps such ids in the forward pass but
drops their gradient, which is not a transpose pair; ``jnp.take`` fills with NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from jaxlinear._src import ghost, taps, vma
from jaxlinear._src.bilinear import accumulation_dtype
from jaxlinear._src.validation import _dtype


def _typed(table, ids):
    """Where ``table[ids]`` lives on a mesh whose shardings are types (Explicit axes):
    ``ids``' axes as ``ids`` are sharded, the last like the table's columns; else ``None``."""
    mesh = vma._explicit_mesh(ids) or vma._explicit_mesh(table)
    if mesh is None:
        return None
    entries = [vma._entry(ids, axis) for axis in range(np.ndim(ids))]
    return NamedSharding(mesh, PartitionSpec(*entries, vma._entry(table, 1)))


def lookup(table, ids):
    """``table[ids]``: ``(V, d)``, integer ``(...)`` -> ``(..., d)``; zeros outside [-V, V)."""
    return (
        jnp.asarray(table).at[ids].get(mode="fill", fill_value=0, out_sharding=_typed(table, ids))
    )


def scatter_add(g, ids, table_aval):
    """The transpose of ``lookup`` in ``table``: ``G: (..., d)`` summed into the rows ``ids`` name.

    ``table_aval`` needs only ``.shape`` and ``.dtype``. Sums run in the accumulation
    dtype (float32 for 16-bit tables), then round once to the table's dtype.
    """
    acc = accumulation_dtype(table_aval.dtype)
    like = None  # where the result lives, on meshes whose shardings are types: like the table
    if vma._explicit_mesh(table_aval) is not None:
        like = vma._aval(table_aval).sharding
    elif vma._explicit_mesh(ids) is not None:
        like = NamedSharding(vma._explicit_mesh(ids), PartitionSpec())
    rows = jnp.zeros(table_aval.shape, acc, out_sharding=like)  # laid out like the table
    rows = rows.at[ids].add(g.astype(acc), mode="drop", out_sharding=like)
    return rows.astype(table_aval.dtype)


# --------------------------------------------------------------------------------------
# Binding 1: jax.custom_vjp. Saves exactly (table, ids); the values of table are not read.


@jax.custom_vjp
def _embed(table, ids):
    return lookup(table, ids)


def _embed_fwd(table, ids):
    return lookup(table, ids), (table, ids)


def _embed_bwd(residuals, g):
    table, ids = residuals  # table: for its shape, dtype and (in shard_map) varying axes
    # Inside shard_map: sum over the manual axes along which the table is replicated.
    return vma.psum_to(scatter_add(g, ids, table), table), None


_embed.defvjp(_embed_fwd, _embed_bwd)


# --------------------------------------------------------------------------------------
# Binding 2: one primitive, linear in `table`; JVP = itself, transpose = scatter_add.

embed_p = Primitive("jaxlinear_embed")
embed_p.def_impl(lookup)
mlir.register_lowering(embed_p, mlir.lower_fun(lookup, multiple_results=False))


@embed_p.def_abstract_eval
def _embed_abstract_eval(table, ids):
    aval = table.update(shape=(*ids.shape, table.shape[1]), weak_type=False)
    sharding = _typed(table, ids)  # only where shardings are types
    if sharding is not None:
        aval = aval.update(sharding=sharding)
    return vma.with_varying(aval, vma.varying_axes(table) | vma.varying_axes(ids))


def _embed_jvp(primals, tangents):
    table, ids = primals
    y = embed_p.bind(table, ids)
    dtable = tangents[0]
    return y, jnp.zeros_like(y) if type(dtable) is ad.Zero else embed_p.bind(dtable, ids)


def _embed_transpose(ct, table, ids):
    if ad.is_undefined_primal(ids) or not ad.is_undefined_primal(table):
        raise ValueError(
            "dual_embed: the lookup is linear in `table` only; it has no transpose in `ids`"
        )
    if type(ct) is ad.Zero:
        return [None, None]
    return [vma.psum_to(scatter_add(ct, ids, table.aval), table.aval), None]


def _embed_batch(args, dims, *, prim=embed_p):
    """vmap of ``prim`` (either binding's primitive): the same primitive, bound once."""
    table, ids = args
    t_dim, i_dim = dims
    if t_dim is None:  # only ids batched: the vmapped axis is one more axis of ids
        return prim.bind(table, ids), i_dim
    # A batch of tables (B, V, d): stack them into one (B·V, d) table and offset each id
    # by b·V; ids outside [-V, V) stay outside the stacked table, so they still read zeros.
    table = jnp.moveaxis(table, t_dim, 0)
    size, vocab = table.shape[:2]
    ids = (
        jnp.moveaxis(ids, i_dim, 0)
        if i_dim is not None
        else jnp.broadcast_to(ids, (size, *ids.shape))
    )
    offset = jnp.arange(size, dtype=ids.dtype).reshape(size, *(1,) * (ids.ndim - 1)) * vocab
    inside = (ids >= -vocab) & (ids < vocab)
    flat = jnp.where(inside, jnp.where(ids < 0, ids + vocab, ids) + offset, size * vocab)
    return prim.bind(table.reshape(size * vocab, table.shape[2]), flat), 0


ad.primitive_jvps[embed_p] = _embed_jvp
ad.primitive_transposes[embed_p] = _embed_transpose
batching.primitive_batchers[embed_p] = _embed_batch


# Binding 1 is bound through a primitive too, so that ``vmap`` sees the lookup whole (the
# batching rule above binds it again); its JVP is ``jax.jvp`` of the ``custom_vjp``, so
# ``grad`` runs ``_embed_bwd`` and forward mode raises JAX's error (see ``bilinear``).
embed_vjp_p = Primitive("jaxlinear_embed_custom_vjp")
embed_vjp_p.def_impl(lookup)
embed_vjp_p.def_abstract_eval(_embed_abstract_eval)
mlir.register_lowering(embed_vjp_p, mlir.lower_fun(lookup, multiple_results=False))


def _embed_vjp_jvp(primals, tangents):
    table, ids = primals
    if type(tangents[0]) is ad.Zero:
        y = embed_vjp_p.bind(table, ids)
        return y, jnp.zeros_like(y)
    return jax.jvp(lambda t: _embed(t, ids), (table,), (tangents[0],))


ad.primitive_jvps[embed_vjp_p] = _embed_vjp_jvp
ad.primitive_transposes[embed_vjp_p] = _embed_transpose
batching.primitive_batchers[embed_vjp_p] = functools.partial(_embed_batch, prim=embed_vjp_p)


# --------------------------------------------------------------------------------------
# Per-example gradient norms (per_example_grad_norms, clipped_grad): the rule of the op.


class _Rule:
    r"""Example ``i``'s ``tablē_i`` is the scatter-add of its own rows of ``G``, so

        ‖tablē_i‖² = Σ_{t, s: ids_it = ids_is} ⟨g_it, g_is⟩

    over example ``i``'s ``T`` ids (out-of-range ids send nothing): ``"rank_one"`` for one
    id, ``"gram"`` (``(T, T)`` per example) when ``gram_pays(T, V, d)``, else
    ``"per_example"`` (the ``n`` scatter-adds, ``(n, V, d)``).
    """

    name = "embed"

    @staticmethod
    def example_axis(ids, table):
        del table
        return 0 if np.ndim(ids) else None

    @staticmethod
    def sq_norms(ids, g, table_aval, y_axis, dtype):
        del y_axis  # 0: ids' first axis
        (V, d), n = table_aval.shape, ids.shape[0]
        ids, g = ids.reshape(n, -1), g.astype(dtype).reshape(n, -1, d)
        T = ids.shape[1]
        inside = (ids >= -V) & (ids < V)
        if T == 1:
            return "rank_one", jnp.where(inside[:, 0], jnp.sum(g[:, 0] ** 2, axis=-1), 0), None
        if not ghost.gram_pays(T, V, d):
            rows = _Rule.per_example_w(ids, g, table_aval, 0, dtype)
            return "per_example", jnp.sum(rows**2, axis=(1, 2)), rows
        row = jnp.where(ids < 0, ids + V, ids)
        same = (row[:, :, None] == row[:, None, :]) & inside[:, :, None] & inside[:, None, :]
        gg = jnp.einsum("ntd,nsd->nts", g, g)  # (n, T, T)
        return "gram", jnp.sum(jnp.where(same, gg, 0), axis=(1, 2)), None

    @staticmethod
    def factors(ids, g, table_aval, y_axis, dtype):
        """``tablē_i = Σ_t onehot(ids_it) ⊗ g_it``: ``(rows, G, (0,), (1,))`` with ``rows:
        (n, T)`` the table rows (``-1`` for an id out of range: a zero row), never one-hot."""
        del y_axis  # 0
        (V, d), n = table_aval.shape, ids.shape[0]
        ids = ids.reshape(n, -1)
        rows = jnp.where((ids >= -V) & (ids < V), jnp.where(ids < 0, ids + V, ids), -1)
        return rows, g.astype(dtype).reshape(n, -1, d), (0,), (1,)

    @staticmethod
    def per_example_w(ids, g, table_aval, y_axis, dtype):
        """``tablē_i``, the scatter-add of example ``i``'s rows of ``G``: ``(n, V, d)``."""
        del y_axis  # 0
        (V, d), n = table_aval.shape, ids.shape[0]
        like = jax.ShapeDtypeStruct((V, d), dtype)
        ids, g = ids.reshape(n, -1), g.astype(dtype).reshape(n, -1, d)
        return jax.vmap(lambda g_i, ids_i: scatter_add(g_i, ids_i, like))(g, ids)

    @staticmethod
    def weight_grad(ids, g, table_aval):
        return scatter_add(g, ids, table_aval)


_RULE = _Rule()


# --------------------------------------------------------------------------------------


MODES = ("fill", "clip", "checked")


def _prepare(fn, table, ids, mode="fill"):
    """Check ``table`` (floating, 2-D), ``ids`` (integer array) and ``mode``; return the
    arrays, with ``ids`` clamped into ``[0, V)`` for ``mode="clip"`` and checked against
    ``[-V, V)`` by ``checkify.check`` for ``mode="checked"``.

    ``ids`` follow the rule of every other input: a ``jax.Array``, a NumPy array or a
    scalar; a list or tuple is refused, as ``linear`` refuses one for ``x``.
    """
    if isinstance(table, (np.ndarray, np.generic)):
        table = jnp.asarray(table)  # canonical under the x64 setting, as jnp would compute
    _dtype(fn, "table", table)
    if table.ndim != 2:
        raise ValueError(f"{fn}: `table` must be 2-D (V, d), got shape {tuple(table.shape)}")
    if isinstance(ids, (int, np.ndarray, np.generic)) and not isinstance(ids, bool):
        ids = jnp.asarray(ids)
    if not (hasattr(ids, "dtype") and hasattr(ids, "shape")):
        raise TypeError(
            f"{fn}: `ids` must be an integer array (a jax.Array or numpy.ndarray),"
            f" got {type(ids).__name__}"
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: `ids` must have an integer dtype, got {ids.dtype} (shape {tuple(ids.shape)})"
        )
    if mode not in MODES:
        raise ValueError(f"{fn}: `mode` must be one of {MODES}, got {mode!r}")
    vocab = table.shape[0]
    if mode == "clip":  # as jnp.take(mode="clip"): negative ids read row 0
        ids = jnp.clip(ids, 0, vocab - 1)
    elif mode == "checked":
        checkify.check(
            jnp.all((ids >= -vocab) & (ids < vocab)),
            f"{fn}: `ids` out of range: every id must be in [-{vocab}, {vocab}) (V={vocab})",
        )
    return table, ids


def embed(table, ids, *, mode="fill"):
    r"""Embedding lookup ``table[ids]`` with its transpose written out (``custom_vjp``).

    The backward pass is the scatter-add of ``G`` into the rows of ``table``; rows looked
    up several times receive the sum. ``ids`` get no gradient (``jax.vjp`` returns a
    ``float0`` zero for them, as for any integer input). Reverse mode only: for ``jvp``,
    ``jacfwd`` or ``linear_transpose`` use ``dual_embed``.

        y = table[ids],   tablē[v] = Σ_{…: ids[…] = v} G[…]

    Args:
      table: ``(V, d)`` floating.
      ids: integer array of any shape (a ``jax.Array``, a NumPy array or an int; not a
        list). Ids in ``[-V, V)`` index as in NumPy.
      mode: what an id outside ``[-V, V)`` does, in the spirit of ``jnp.take``:
        ``"fill"`` (default): it reads a row of zeros and its cotangent is dropped;
        ``"clip"``: every id is clamped into ``[0, V)`` first (as ``jnp.take(mode="clip")``:
        a negative id reads row 0), and the clamped row gets its gradient;
        ``"checked"``: a ``jax.experimental.checkify.check`` that every id is in
        ``[-V, V)``; it raises at once outside ``jit``, and inside ``jit`` needs the
        function wrapped in ``checkify.checkify`` (then ``err.throw()``), as any
        ``checkify.check``.

    Returns:
      ``(*ids.shape, d)`` in ``table``'s dtype.

    Raises:
      TypeError: ``table`` not floating, ``ids`` not an integer array.
      ValueError: ``table`` not 2-D, an unknown ``mode``.
      JaxRuntimeError: ``mode="checked"`` with an id out of range (from ``checkify``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> table = jnp.array([[1., 2.], [3., 4.], [5., 6.]])
      >>> ids = jnp.array([2, 0, 2])
      >>> jaxlinear.embed(table, ids).tolist()
      [[5.0, 6.0], [1.0, 2.0], [5.0, 6.0]]
      >>> jax.grad(lambda t: jaxlinear.embed(t, ids).sum())(table).tolist()  # row 2 twice
      [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
      >>> jaxlinear.embed(table, jnp.array([3, -4]), mode="clip").tolist()  # rows 2 and 0
      [[5.0, 6.0], [1.0, 2.0]]

      A bounds check under ``jit``, with ``checkify``:

      >>> from jax.experimental import checkify
      >>> f = checkify.checkify(jax.jit(lambda t, i: jaxlinear.embed(t, i, mode="checked")))
      >>> err, y = f(table, jnp.array([0, 3]))
      >>> print(err.get().split(" (`check` failed")[0])
      embed: `ids` out of range: every id must be in [-3, 3) (V=3)
    """
    table, ids = _prepare("embed", table, ids, mode)
    return taps.call(_RULE, lambda ids, table, _: embed_vjp_p.bind(table, ids), ids, table)


def dual_embed(table, ids, *, mode="fill"):
    r"""``embed`` as a primitive with an explicit JVP and transpose: every transform works.

    Same arguments (``mode`` included), result and validation as ``embed``. The JVP is
    the lookup of the tangent table, ``embed(dtable, ids)``; the transpose is the
    scatter-add. ``jvp``, ``jacfwd``, ``hessian``, ``linear_transpose`` in ``table``,
    ``grad``, ``vmap`` (over ids or tables), ``jit``, ``shard_map``.

    Args:
      table: as in ``embed``.
      ids: as in ``embed``.
      mode: as in ``embed``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> ids = jnp.array([1, 1])
      >>> f = jax.linear_transpose(lambda t: jaxlinear.dual_embed(t, ids), jnp.zeros((2, 1)))
      >>> f(jnp.array([[1.], [2.]]))[0].tolist()
      [[0.0], [3.0]]
    """
    table, ids = _prepare("dual_embed", table, ids, mode)
    return taps.call(_RULE, lambda ids, table, _: embed_p.bind(table, ids), ids, table)
