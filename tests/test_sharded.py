"""Sharded layers: the 8-device checks (in a subprocess) and the API's errors (here).

JAX fixes its device count when it starts, and this process already runs on one CPU
device, so the multi-device checks run ``tests/sharded_checks.py`` in a fresh Python with
``--xla_force_host_platform_device_count=8``: forward and gradients of every layout
(data parallel, column, row, the 2-layer block, data x tensor parallel) for ``linear`` and
``dual_linear`` against plain ``x @ W + b`` on one device, the all-reduces in the compiled
HLO, ``jvp`` under ``shard_map``, and ``jax.grad`` inside ``shard_map`` against JAX's AD;
FSDP and sequence parallelism (values, gradients, ``dW`` sharded like ``W``, the
all-gather forward and reduce-scatter backward in the HLO, ``jvp``, the mesh-wide
``adjoint_test``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlinear
from tests.helpers import assert_trees_close, make_layer, reference, run_on_simulated_devices


def test_eight_simulated_devices():
    out = run_on_simulated_devices("sharded_checks.py", 8, "--expect-devices", "8")
    assert "checks passed" in out
    # The value-level check of grad inside shard_map (float64, 8 devices), and its teeth:
    # a wrong cross-device sum is caught by value (see check_grad_values_float64).
    for name in ("linear", "dual_linear"):
        tag = f"[ok  ] {name} float64 grad in shard_map"
        for claim in (
            " == one-device AD of plain x @ W + b (value)",
            ": a rule with pmean instead of psum is caught by value",
            ": the per-device partial gradient (no psum) is caught by value",
        ):
            assert tag + claim in out, out


def _mesh(*names):
    return jax.make_mesh((1,) * len(names), names)


@pytest.mark.parametrize("layer", [jaxlinear.linear, jaxlinear.dual_linear])
def test_one_device_mesh_matches_reference(layer):
    # The same code on a 1-device mesh (this process): values and gradients.
    layers = [
        make_layer(jax.random.key(i), (4,), d_in, d_out)[0]
        for i, (d_in, d_out) in enumerate([(3, 6), (6, 2)])
    ]
    x = jax.random.normal(jax.random.key(9), (4, 3), jnp.float64)
    mesh = _mesh("data", "model")

    def ref(layers, x):
        return reference(layers[1], jax.nn.relu(reference(layers[0], x)))

    def ours(layers, x):
        return jaxlinear.tensor_parallel_mlp(layers, x, mesh=mesh, batch_axis="data", layer=layer)

    assert_trees_close(ours(layers, x), ref(layers, x))
    grad = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), argnums=(0, 1))
    ref_grad = jax.grad(lambda *a: jnp.sum(jnp.sin(ref(*a))), argnums=(0, 1))
    assert_trees_close(grad(layers, x), ref_grad(layers, x))
    p = layers[0]
    for f in (
        jaxlinear.data_parallel_linear,
        jaxlinear.column_parallel_linear,
        jaxlinear.row_parallel_linear,
    ):
        axis = "data" if f is jaxlinear.data_parallel_linear else "model"
        assert_trees_close(f(p, x, mesh=mesh, axis=axis, layer=layer), reference(p, x))


def test_dict_params_and_no_bias():
    params, x = make_layer(jax.random.key(0), (4,), 3, 2, kind="dict", bias="none")
    mesh = _mesh("model")
    for f in (jaxlinear.column_parallel_linear, jaxlinear.row_parallel_linear):
        assert_trees_close(f(params, x, mesh=mesh), reference(params, x))
    params, x = make_layer(jax.random.key(1), (4,), 3, 2, kind="dict", bias="row")
    g = jax.grad(lambda p: jaxlinear.row_parallel_linear(p, x, mesh=mesh).sum())(params)
    assert set(g) == {"W", "b"} and g["b"].shape == (1, 2)


def test_grad_inside_shard_map_sums_replicated_cotangents():
    # The pullback of a replicated W/b is a psum: the cotangent comes back invariant.
    params, x = make_layer(jax.random.key(0), (4,), 3, 2)
    mesh = _mesh("data")

    def body(p, x):
        return jax.grad(lambda p: jnp.sum(jaxlinear.linear(p, x) ** 2))(p)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    expected = jax.grad(lambda p: jnp.sum(reference(p, x) ** 2))(params)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))  # as in_specs (Explicit mesh axes)
    assert_trees_close(jax.jit(f)(params, x), expected)


def test_errors():
    params, x = make_layer(jax.random.key(0), (4,), 3, 6)
    mesh = jax.sharding.AbstractMesh((4,), ("model",))
    with pytest.raises(ValueError, match=r"mesh has no axis 'data'"):
        jaxlinear.data_parallel_linear(params, x, mesh=mesh)
    with pytest.raises(
        ValueError, match=r"row_parallel_linear: d_in of `W` \(shape \(3, 6\)\) is 3"
    ):
        jaxlinear.row_parallel_linear(params, x, mesh=mesh)
    with pytest.raises(ValueError, match=r"data_parallel_linear: the batch size of `x`"):
        jaxlinear.data_parallel_linear(params, x[:3], mesh=mesh, axis="model")
    with pytest.raises(ValueError, match=r"must have a leading batch axis"):
        jaxlinear.data_parallel_linear(params, x[0], mesh=mesh, axis="model")
    with pytest.raises(ValueError, match=r"tensor_parallel_mlp: `layers` must hold two"):
        jaxlinear.tensor_parallel_mlp([params], x, mesh=mesh)
    with pytest.raises(ValueError, match=r"column_parallel_linear: `x` has last dim 2"):
        jaxlinear.column_parallel_linear(params, x[:, :2], mesh=mesh)


def test_fsdp_and_sequence_parallel_one_device_and_errors():
    # The 8-device values, gradients and HLO are in sharded_checks.py; here: 1 device, errors.
    layers = [
        make_layer(jax.random.key(i), (4,), d_in, d_out)[0]
        for i, (d_in, d_out) in enumerate([(3, 6), (6, 2)])
    ]
    x = jax.random.normal(jax.random.key(9), (4, 3), jnp.float64)
    mesh = _mesh("data", "model")
    assert_trees_close(jaxlinear.fsdp_linear(layers[0], x, mesh=mesh), reference(layers[0], x))
    x3 = x.reshape(2, 2, 3)
    y = jax.jit(
        lambda layers, x: jaxlinear.tensor_parallel_mlp(
            layers, x, mesh=mesh, batch_axis="data", sequence_dim=1, fsdp=True
        )
    )(layers, x3)
    assert_trees_close(y, reference(layers[1], jax.nn.relu(reference(layers[0], x3))))

    # Errors are raised at trace time, from shapes alone.
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    with pytest.raises(ValueError, match=r"fsdp_linear: d_in of `W` \(shape \(3, 6\)\) is 3"):
        jaxlinear.fsdp_linear(layers[0], x, mesh=mesh)
    layers = [jaxlinear.Params(jnp.zeros((4, 8)), None), jaxlinear.Params(jnp.zeros((8, 4)), None)]
    x = jnp.zeros((8, 4))
    with pytest.raises(ValueError, match=r"tensor_parallel_mlp: `sequence_dim` must be an axis"):
        jaxlinear.tensor_parallel_mlp(layers, x, mesh=mesh, sequence_dim=-1)
    with pytest.raises(ValueError, match=r"other than the last and the batch axis 0; got 0"):
        jaxlinear.tensor_parallel_mlp(layers, x, mesh=mesh, batch_axis="data", sequence_dim=0)
    with pytest.raises(ValueError, match=r"the sequence length of `x` \(shape \(8, 3, 4\)\) is 3"):
        jaxlinear.tensor_parallel_mlp(layers, jnp.zeros((8, 3, 4)), mesh=mesh, sequence_dim=1)
    with pytest.raises(ValueError, match=r"`fsdp=True` shards the weights over `batch_axis`"):
        jaxlinear.tensor_parallel_mlp(layers, x, mesh=mesh, fsdp=True)
    narrow = [jaxlinear.Params(jnp.zeros((4, 4)), None)] * 2
    with pytest.raises(ValueError, match=r"not divisible by the 8 devices of \('model', 'data'\)"):
        jaxlinear.tensor_parallel_mlp(narrow, x, mesh=mesh, batch_axis="data", fsdp=True)


def test_fsdp_gather_one_device_and_errors():
    # 8-device values, gradients, HLO and memory: sharded_checks.py. Here: 1 device, errors.
    params, x = make_layer(jax.random.key(0), (4,), 3, 2)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(W, b, x):
        return jaxlinear.linear((jaxlinear.fsdp_gather(W, "data"), b), x)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P("data"))
    loss = lambda p, x: jnp.sum(jnp.sin(f(p.W, p.b, x)))  # noqa: E731
    ref_loss = lambda p, x: jnp.sum(jnp.sin(reference(p, x)))  # noqa: E731
    assert_trees_close(jax.jit(jax.grad(loss))(params, x), jax.grad(ref_loss)(params, x))

    # Under jax.vmap over the examples the mark is not used: tied to a batched x, the
    # re-gathered W would be batched too (one copy per example). Every gather is W-sized.
    def per_example(W, b, x):
        W = jaxlinear.fsdp_gather(W, "data")
        return jax.vmap(lambda x_i: jaxlinear.linear((W, b), x_i))(x)

    g = jax.shard_map(per_example, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                      out_specs=P("data"))  # fmt: skip
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(jnp.sin(g(p.W, p.b, x)))))(params, x)
    shapes = [
        v.aval.shape
        for e in _all_eqns(jaxpr.jaxpr)
        if e.primitive.name == "all_gather"
        for v in e.outvars
    ]
    assert shapes and all(s == params.W.shape for s in shapes), shapes
    for residuals in ("shard", "gathered"):
        y = jaxlinear.fsdp_linear(params, x, mesh=mesh, residuals=residuals)
        assert_trees_close(y, reference(params, x))
    with pytest.raises(ValueError, match=r"fsdp_linear: `residuals` must be 'shard' or 'gathered'"):
        jaxlinear.fsdp_linear(params, x, mesh=mesh, residuals="exact")
    with pytest.raises(ValueError, match=r"fsdp_gather: `dim` must be an axis of `w` \(shape"):
        jaxlinear.fsdp_gather(params.W, "data", dim=2)
    with pytest.raises(ValueError, match=r"fsdp_gather: `spec` .* must shard axis 0 of `w`"):
        jaxlinear.fsdp_gather(params.W, "data", spec=P(None, "data"))
    with (
        jax.set_mesh(mesh),
        pytest.raises(
            ValueError, match=r"affine: a weight marked by `fsdp_gather` under jit needs"
        ),
    ):
        W = jax.device_put(params.W, NamedSharding(mesh, P("data")))
        jax.jit(
            lambda W, x: jaxlinear.linear(
                (jaxlinear.fsdp_gather(W, "data", spec=P("data")), None), x[0]
            )
        )(W, x)


def _all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' params."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)
