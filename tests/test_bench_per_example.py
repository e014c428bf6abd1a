"""The per-example benchmark's smoke mode runs every implementation (no timing checks)."""

import numpy as np
import pytest

from benchmarks import bench_per_example


def test_smoke(capsys):
    out = bench_per_example.main(["--smoke", "--only", "mlp"])
    (case,) = out["cases"]
    expected = set(bench_per_example.IMPLS)
    if bench_per_example._jax_privacy() is not None:
        expected.add("jax_privacy")
    assert set(case["median_s"]) == expected
    assert all(s > 0 for s in case["median_s"].values())
    assert set(case["temp_bytes"]) == expected
    # float32: every path agrees with vmap(grad) (the benchmark raises beyond 1e-4)
    assert max(case["rel_err_vs_naive"].values()) < 1e-5
    assert case["routes"] == {"rank_one": 3, "bias": 3}
    assert "jax_privacy ÷ clipped_grad" in capsys.readouterr().out


def test_a_wrong_result_is_not_timed():
    """The correctness gate: a norm or a clipped sum off by 1e-3 raises (nothing compiled)."""
    grads, norms = [np.array([[1.0, 2.0]]), np.array([3.0])], np.array([1.0, 2.0])
    right = {
        "naive_clipped": lambda: (grads, norms),
        "naive_norms": lambda: norms,
        "norms": lambda: norms * (1 + 1e-6),
        "clipped": lambda: (grads, norms),
    }
    assert max(bench_per_example._check("ok", right).values()) < 1e-5
    for name, wrong in [
        ("norms", lambda: norms * (1 + 1e-3)),
        ("clipped", lambda: ([grads[0], grads[1] * 1.001], norms)),
        ("jax_privacy", lambda: [grads[0] * 0.999, grads[1]]),
    ]:
        with pytest.raises(RuntimeError, match=f"case: .*'{name}.*not timing a wrong result"):
            bench_per_example._check("case", right | {name: wrong})
