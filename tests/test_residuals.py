"""``linear``'s residual policy (``residuals="exact" | "compute"``) and the memory benchmark.

``"compute"`` keeps the bfloat16 copies of ``x`` and ``W`` that the forward pass makes
instead of the float32 originals; the gradients must not change at all, and must still
match plain ``x @ W + b`` in float64 to bfloat16 accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear
from tests.helpers import reference, saved_residuals

BF16 = jnp.bfloat16


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    p = jaxlinear.Params(
        jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        jnp.asarray(rng.standard_normal(2), jnp.float32),
    )
    return p, x


def _grad(residuals, compute_dtype=BF16):
    def loss(p, x):
        y = jaxlinear.linear(p, x, compute_dtype=compute_dtype, residuals=residuals)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    return jax.grad(loss, argnums=(0, 1))


def test_compute_residuals_are_the_bf16_casts_and_change_no_gradient():
    p, x = _data()
    f = lambda r: lambda p, x: jaxlinear.linear(p, x, compute_dtype=BF16, residuals=r)  # noqa: E731
    exact, compute = saved_residuals(f("exact"), p, x), saved_residuals(f("compute"), p, x)
    assert [line.split(" ")[0] for line in exact] == ["f32[3,2]", "f32[4,3]"], exact
    assert all("from the argument" in line for line in exact), exact
    assert sorted(line.split(" ")[0] for line in compute) == ["bf16[3,2]", "bf16[4,3]"], compute

    g_exact, g_compute = _grad("exact")(p, x), _grad("compute")(p, x)
    assert jax.tree.map(lambda a: a.dtype, g_compute) == jax.tree.map(lambda a: a.dtype, (p, x))
    for a, e in zip(jax.tree.leaves(g_compute), jax.tree.leaves(g_exact), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))  # bit for bit

    # And both are JAX's AD of plain x @ W + b in float64, to bfloat16 accuracy.
    p64, x64 = jax.tree.map(lambda a: np.asarray(a, np.float64), (p, x))
    ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(reference(p, x))), argnums=(0, 1))(p64, x64)
    for a, e in zip(jax.tree.leaves(g_compute), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, atol=5e-2, rtol=5e-2)


def test_compute_residuals_without_compute_dtype_are_exact():
    p, x = _data()
    lines = saved_residuals(lambda p, x: jaxlinear.linear(p, x, residuals="compute"), p, x)
    assert all("from the argument" in line for line in lines), lines


def test_bad_residuals_policy():
    p, x = _data()
    with pytest.raises(ValueError, match=r"linear: `residuals` must be 'exact' or 'compute'"):
        jaxlinear.linear(p, x, residuals="bf16")


def test_bench_memory_smoke():
    from benchmarks import bench_memory
    from benchmarks.cases import Case

    case = Case("mlp-smoke", "mlp", (8,), (16, 32, 16), "bfloat16", 1)
    impls = ("linear (exact)", "linear (compute)")  # (the full set: `--smoke`, ~20 s)
    out = bench_memory.measure(case, impls=impls, rounds=1)
    assert set(out) == set(impls)
    for d in out.values():
        assert d["peak_bytes"] >= d["temp_bytes"] >= 0 and d["median_s"] > 0
    # exact keeps the float32 arguments; compute keeps new bfloat16 copies of x and W.
    assert (
        out["linear (compute)"]["residual_bytes_new"] > out["linear (exact)"]["residual_bytes_new"]
    )
    assert "| linear (compute) |" in bench_memory.table({"smoke bfloat16": out})
