"""The per-example benchmark's smoke mode runs every implementation (no timing checks)."""

from benchmarks import bench_per_example


def test_smoke(capsys):
    out = bench_per_example.main(["--smoke", "--only", "mlp"])
    (case,) = out["cases"]
    assert set(case["median_s"]) == set(bench_per_example.IMPLS)
    assert all(s > 0 for s in case["median_s"].values())
    assert set(case["temp_bytes"]) == set(bench_per_example.IMPLS)
    assert case["norms_rel_err_vs_naive"] < 1e-5  # float32: the two paths agree
    assert case["routes"] == ["rank_one"] * 3
    assert "norms ÷ naive" in capsys.readouterr().out
