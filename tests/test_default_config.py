"""The default-configuration run: ``tests/default_config_checks.py`` with x64 off, in a subprocess.

This process runs with float64 on (``tests/conftest.py``), and JAX reads that setting
once, so the checks of JAX's defaults (x64 off, NumPy float64 inputs, warnings as
errors) run in a fresh interpreter that skips the conftest. Part of plain ``pytest``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_in_jax_default_configuration():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    # Compiling with fewer XLA passes (as the whole suite does, conftest.py) changes no
    # setting a user sees; the shared compilation cache stays out (its warnings are errors
    # under -W error there).
    if "JAX_DISABLE_MOST_OPTIMIZATIONS" in os.environ:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
    env["JAX_ENABLE_X64"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-W", "error", "-m", "pytest", "--noconftest", "-n", "0"]
    command += ["-p", "no:cacheprovider", "tests/default_config_checks.py"]  # -q: pyproject
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 25, out[-2000:]
    assert not re.search(r"\d+ (failed|skipped|warnings?|errors?)\b", out), out[-2000:]
