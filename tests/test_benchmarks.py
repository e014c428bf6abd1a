"""The benchmark suite's smoke mode runs every available implementation (no timing checks).

Runs ``python -m benchmarks --smoke`` in a subprocess (a fresh JAX, not this session's
float64 configuration) and checks its JSON. Peers that are not installed (flax,
equinox, torch: the ``bench`` extra) must be skipped with a note, not fail the run.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jaxlinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected() -> dict[str, set[str]]:
    """Implementations the smoke run must report, per case kind, given what is installed."""
    layer = {"linear", "plain", "gemm"}
    mlp = {"linear", "plain"}
    if getattr(jaxlinear, "dual_linear", None) is not None:
        layer.add("dual_linear")
        mlp.add("dual_linear")
    for peer in ("flax", "equinox"):
        if importlib.util.find_spec(peer) is not None:
            layer.add(peer)
            mlp.add(peer)
    if importlib.util.find_spec("torch") is not None:
        layer |= {"torch", "torch_gemm"}
        mlp.add("torch")
    return {"layer": layer, "mlp": mlp}


def test_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results_smoke.json") as f:
        results = json.load(f)
    assert (tmp_path / "results_smoke.md").exists()

    expected = _expected()
    assert not results["errors"]
    assert {c["case"]["kind"] for c in results["cases"]} == {"layer", "mlp"}
    for case in results["cases"]:
        kind = case["case"]["kind"]
        assert set(case["impls"]) == expected[kind], case["name"]
        for impl, d in case["impls"].items():
            assert len(d["samples_s"]) == case["rounds"] == 1, (case["name"], impl)
            assert d["median_s"] > 0
    skipped = set(results["meta"]["skipped"])
    for peer in ("flax", "equinox", "torch"):
        if importlib.util.find_spec(peer) is None:
            assert peer in skipped
            assert f"note: skipping {peer}" in proc.stdout
    # jaxlinear saves exactly x and W for the backward pass (a structural, not timing, fact).
    for case in results["cases"]:
        if case["case"]["kind"] == "layer":
            assert len(case["impls"]["linear"]["residuals"]) == 2, case["impls"]["linear"]
