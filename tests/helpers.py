"""Independent references and small utilities shared by the tests.

The reference is the plain affine map under JAX's own autodiff, never jaxlinear's code.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, Phase, settings
from jax.ad_checkpoint import print_saved_residuals
from jax.extend.core import jaxprs_in_params

import jaxlinear


def reference(params, x):
    """Plain ``x @ W + b`` (explicit broadcast: tests run with rank promotion disallowed)."""
    W = params.W if isinstance(params, jaxlinear.Params) else params["W"]
    b = params.b if isinstance(params, jaxlinear.Params) else params.get("b")
    y = x @ W
    if b is not None:
        y = y + jnp.broadcast_to(b.reshape(-1), y.shape)
    return y


def make_layer(key, lead, d_in, d_out, *, bias="vector", kind="params", dtype=jnp.float64):
    """Random ``(params, x)`` with ``x: (*lead, d_in)``; ``bias`` in {"vector", "row", "none"}."""
    # NumPy draws seeded by the key: jax.random would compile its sampler for every new shape.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    x = jnp.asarray(rng.standard_normal((*lead, d_in)), dtype)
    W = jnp.asarray(rng.standard_normal((d_in, d_out)), dtype)
    b = {
        "vector": jnp.asarray(rng.standard_normal((d_out,)), dtype),
        "row": jnp.asarray(rng.standard_normal((1, d_out)), dtype),
        "none": None,
    }[bias]
    params = jaxlinear.Params(W, b) if kind == "params" else {"W": W, "b": b}
    return params, x


def eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, custom_vjp, scan, ...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from eqns(sub)


def assert_trees_close(actual, expected, *, atol=1e-12, rtol=1e-12):
    """Same structure, shapes, dtypes, and values (float64 references: ~1e-12)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.shape == e.shape, (a.shape, e.shape)
        assert a.dtype == e.dtype, (a.dtype, e.dtype)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol)


def saved_residuals(f, *args):
    """The lines of ``jax.ad_checkpoint.print_saved_residuals``: what the backward pass keeps."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    return out.getvalue().strip().splitlines()


def run_on_simulated_devices(script, count, *args):
    """Run ``tests/<script>`` in a fresh interpreter with ``count`` simulated CPU devices.

    Returns its stdout and stderr together; fails the test if it exits non-zero. (The
    device count is read once, when JAX starts, so it takes a fresh process.)
    """
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={count}"]
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(root / "tests" / script), *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


LONG = bool(os.environ.get("JAXLINEAR_LONG"))  # JAXLINEAR_LONG=1: 20× the property examples


def hypothesis_examples(ci):
    """``ci`` examples (20× with ``JAXLINEAR_LONG=1``); no shrinking: every example compiles,
    so a failure is reported as drawn (shrinking one would cost minutes)."""
    return settings(
        max_examples=ci * 20 if LONG else ci,
        deadline=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),  # drawing builds arrays: slow when loaded
    )
