"""Embedding lookup: ``embed``/``dual_embed`` against a one-hot matmul under JAX's own AD.

The transform matrix (jvp, jacfwd, linear_transpose, forward-over-reverse, grad-of-jvp,
vmap, jit, adjoint test, bfloat16) runs on the ``embed`` case of ``tests/family_cases.py``;
here: out-of-range ids, repeated ids, batched tables, shard_map, errors.

The reference ``one_hot(ids) @ table`` is an independent statement of the same linear map
(a one-hot row of zeros for an id outside ``[-V, V)``), so its JAX-derived transpose is the
scatter-add we check against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlinear
from jaxlinear._src.ops import embed as embed_module
from tests.helpers import assert_trees_close

V, D = 5, 3
TABLE = np.random.default_rng(0).standard_normal((V, D))
IDS = np.array([[0, 3, 3], [4, 3, 1]])  # (2, 3); id 3 three times, id 2 never
OUT_OF_RANGE = np.array([-1, -5, -6, 5, 9, 2])  # -1 -> 4, -5 -> 0; -6, 5, 9 read zeros


def reference(table, ids):
    """``one_hot(ids) @ table``; negative ids in ``[-V, 0)`` count from the end."""
    vocab = table.shape[0]
    ids = jnp.where(ids < 0, ids + vocab, ids)
    return jax.nn.one_hot(ids, vocab, dtype=table.dtype) @ table  # (..., V) @ (V, d)


def _cotangent(shape):
    return np.cos(np.arange(np.prod(shape))).reshape(shape)


def test_values_and_repeated_ids_sum():
    table = jnp.arange(6.0).reshape(3, 2)
    ids = jnp.array([2, 0, 2, 2])
    assert jaxlinear.embed(table, ids).tolist() == [[4, 5], [0, 1], [4, 5], [4, 5]]
    g = jnp.array([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [100.0, 0.0]])
    for f in (jaxlinear.embed, jaxlinear.dual_embed):
        _, pull = jax.vjp(f, table, ids)
        dtable, dids = pull(g)
        assert dtable.tolist() == [[0, 1], [0, 0], [111, 0]]  # row 2: 1 + 10 + 100
        assert dids.dtype == jax.dtypes.float0  # integer ids get no gradient


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_out_of_range_ids_match_one_hot_reference(f):
    # In-range ids: the family case "embed". Here ids outside [-V, V) and negative ones.
    ids = OUT_OF_RANGE

    @jax.jit
    def run(table, ids):
        g = jnp.asarray(_cotangent((*ids.shape, D)))
        y, pull = jax.vjp(lambda t: f(t, ids), table)
        y_ref, pull_ref = jax.vjp(lambda t: reference(t, ids), table)
        return (y, *pull(g)), (y_ref, *pull_ref(g))

    ours, ref = run(TABLE, ids)
    assert_trees_close(ours, ref)


def test_vmap_over_ids_and_tables():
    tables = np.stack([TABLE, 2 * TABLE, -TABLE])
    ids = np.stack([IDS[0], np.array([-1, 5, 0]), np.array([2, 2, -6])])  # out of range too

    @jax.jit
    def run(tables, ids):
        out = []
        for f in (jaxlinear.dual_embed, jaxlinear.embed, reference):
            g = lambda t, i, f=f: jnp.sum(jnp.sin(f(t, i)))  # noqa: E731
            out.append(
                (
                    jax.vmap(f, in_axes=(None, 0))(tables[0], ids),  # ids batched
                    jax.vmap(f, in_axes=(0, None))(tables, ids[1]),  # tables batched
                    jax.vmap(f, in_axes=(0, 0))(tables, ids),  # both
                    jax.vmap(jax.grad(g), in_axes=(0, 1))(tables, ids.T),  # batch on axis 1
                )
            )
        return out

    dual, custom, ref = run(tables, ids)
    assert_trees_close(dual, ref)
    assert_trees_close(custom, ref)


def test_vmap_keeps_the_primitive():
    jaxpr = jax.make_jaxpr(jax.vmap(jaxlinear.dual_embed))(TABLE[None], IDS[:1])
    assert "jaxlinear_embed" in str(jaxpr)


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_adjoint_and_explicit_rule_ran(f, monkeypatch):
    calls = []
    scatter_add = embed_module.scatter_add

    def counting(*args):
        calls.append(1)
        return scatter_add(*args)

    monkeypatch.setattr(embed_module, "scatter_add", counting)
    u = jnp.asarray(_cotangent((*IDS.shape, D)))
    _, pull = jax.vjp(lambda t: f(t, IDS), TABLE)
    result = jaxlinear.adjoint_test(
        lambda t: f(t, IDS), lambda g: pull(g)[0], jnp.asarray(np.sin(TABLE)), u
    )
    assert float(result.residual) < 1e-14
    assert calls == [1]  # the scatter-add ran, once


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_grad_inside_shard_map_sums_the_replicated_table(f):
    mesh = jax.make_mesh((1,), ("data",))

    def body(table, ids):
        return jax.grad(lambda t: jnp.sum(f(t, ids) ** 2))(table)

    sm = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    expected = jax.grad(lambda t: jnp.sum(reference(t, IDS) ** 2))(TABLE)
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data")))
    assert_trees_close(jax.jit(sm)(TABLE, ids), expected)


def test_grad_on_a_mesh_with_explicit_axes():
    # Shardings are types there: the lookup is laid out like the ids, the gradient like table.
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    expected = jax.grad(lambda t: jnp.sum(jnp.sin(reference(t, OUT_OF_RANGE))))(TABLE)
    with jax.set_mesh(mesh):
        ids = jax.device_put(OUT_OF_RANGE, NamedSharding(mesh, P("data")))
        fs = (jaxlinear.embed, jaxlinear.dual_embed)

        def run(t):
            loss = lambda t, f: jnp.sum(jnp.sin(f(t, ids)))  # noqa: E731
            return [f(t, ids) for f in fs], [jax.grad(loss)(t, f) for f in fs]

        ys, grads = jax.jit(run)(TABLE)
    assert all(jax.typeof(y).sharding.spec == P("data", None) for y in ys)
    assert_trees_close(grads, [expected, expected])


def test_bf16_table_gradient_rounds_once():
    # Repeated ids are summed in float32 and rounded once to bfloat16: within u·|Σ g|.
    table = jnp.zeros((2, 1), jnp.bfloat16)
    ids = jnp.zeros((300,), jnp.int32)
    g = jnp.full((300, 1), 1.0 + 2.0**-7, jnp.bfloat16)  # exactly representable
    dtable = jax.jit(jax.grad(lambda t: jnp.sum(jaxlinear.embed(t, ids) * g).astype(jnp.float32)))(
        table
    )
    exact = 300 * (1.0 + 2.0**-7)
    assert dtable.dtype == jnp.bfloat16
    assert abs(float(dtable[0, 0]) - exact) <= 2.0**-8 * exact


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
@pytest.mark.parametrize(
    "table, ids, error, match",
    [
        (TABLE[0], IDS, ValueError, r"`table` must be 2-D \(V, d\), got shape \(3,\)"),
        (TABLE[None], IDS, ValueError, r"`table` must be 2-D \(V, d\), got shape \(1, 5, 3\)"),
        (IDS, IDS, TypeError, r"`table` has dtype int64; expected a floating"),
        ([[1.0]], IDS, TypeError, r"`table` must be an array.*, got list"),
        (TABLE, IDS.astype(np.float32), TypeError,
         r"`ids` must have an integer dtype, got float32"),
        (TABLE, np.array([True]), TypeError, r"`ids` must have an integer dtype, got bool"),
        (TABLE, "ids", TypeError, r"`ids` must be an integer array \(a jax.Array or numpy"),
        (TABLE, [0, 1], TypeError, r"`ids` must be an integer array .*, got list"),
        (TABLE, (0, 1), TypeError, r"`ids` must be an integer array .*, got tuple"),
    ],
)  # fmt: skip
def test_errors(f, table, ids, error, match):
    with pytest.raises(error, match=f"^{f.__name__}: {match}"):
        jax.eval_shape(lambda: f(table, ids))


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_unknown_mode(f):
    with pytest.raises(ValueError, match=f"^{f.__name__}: `mode` must be one of"):
        f(TABLE, IDS, mode="wrap")


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_ids_as_numpy_or_int(f):
    assert_trees_close(f(TABLE, np.int32(4)), TABLE[4], atol=0, rtol=0)
    assert_trees_close(f(TABLE, IDS), TABLE[IDS], atol=0, rtol=0)


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_mode_clip(f):
    """As NumPy's ``take(mode="clip")``; the gradient as JAX's AD of ``jnp.take(mode="clip")``."""
    g = _cotangent((len(OUT_OF_RANGE), D))
    y, vjp = jax.vjp(lambda t: f(t, OUT_OF_RANGE, mode="clip"), TABLE)
    assert_trees_close(y, np.take(TABLE, OUT_OF_RANGE, axis=0, mode="clip"), atol=0, rtol=0)
    _, vjp_ref = jax.vjp(lambda t: jnp.take(t, OUT_OF_RANGE, axis=0, mode="clip"), TABLE)
    assert_trees_close(vjp(g), vjp_ref(g))


@pytest.mark.parametrize("f", [jaxlinear.embed, jaxlinear.dual_embed])
def test_mode_checked(f):
    from jax.experimental import checkify

    name = f.__name__
    match = rf"^{name}: `ids` out of range: every id must be in \[-5, 5\) \(V=5\)"
    with pytest.raises(checkify.JaxRuntimeError, match=match):
        f(TABLE, OUT_OF_RANGE, mode="checked")  # eager: raises at once
    checked = checkify.checkify(jax.jit(lambda t, i: f(t, i, mode="checked")))
    err, y = checked(TABLE, OUT_OF_RANGE)
    assert err.get() is not None and err.get().startswith(f"{name}: `ids` out of range")
    err, y = checked(TABLE, IDS % V - 2)  # in [-V, V): no error, the same as mode="fill"
    assert err.get() is None
    assert_trees_close(y, reference(jnp.asarray(TABLE), IDS % V - 2), atol=0, rtol=0)
