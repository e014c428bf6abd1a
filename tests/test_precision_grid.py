"""The compile-and-run grid (``tests/precision_grid_checks.py``) under XLA's default flags.

The suite runs XLA:CPU with one Eigen thread per process (``tests/conftest.py``); that
single-threaded path multiplies 16-bit operands into float32 where the default,
multi-threaded one cannot (``UNIMPLEMENTED: Unsupported element type for
DotThunk::Execute: BF16 x BF16 = F32``, issue #29), so the grid runs in a fresh
interpreter with the flags a user has. Four processes, so that xdist spreads them; the
last runs the NNX and Equinox bfloat16 steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {  # the variants (and the adapter steps) each process runs; how many tests
    "16bit": "bfloat16,float16,bfloat16_pet_float32",
    "mixed": "float16_pet_float32,float32_compute_bfloat16,float32_compute_float16",
    "wide": "float64,float32,bfloat16_x_float32_w",
    "adapters": "adapters",  # the NNX and Equinox steps
}


@pytest.mark.parametrize("group", GROUPS)
def test_precision_grid_with_default_xla_flags(group):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    if "JAX_DISABLE_MOST_OPTIMIZATIONS" in os.environ:  # (issue #29 shows either way)
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
    env.update(JAX_PLATFORMS="cpu", JAXLINEAR_GRID_VARIANTS=GROUPS[group])
    command = [sys.executable, "-W", "error", "-m", "pytest", "--noconftest", "-n", "0"]
    command += ["-p", "no:cacheprovider", "tests/precision_grid_checks.py"]
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    expected = 2 if group == "adapters" else len(GROUPS[group].split(","))
    assert passed and int(passed.group(1)) == expected, out[-2000:]
    assert not re.search(r"\d+ (failed|warnings?|errors?)\b", out), out[-2000:]
