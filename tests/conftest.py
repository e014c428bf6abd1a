"""Test configuration: float64 references, no silent rank promotion, warnings as errors.

JAX's default configuration (x64 off) is tested too, in a subprocess that skips this
file: ``tests/test_default_config.py``. Hypothesis is derandomized (the examples are a
function of the test alone), so every run, in CI and here, draws the same cases.

The demos run once per session, in the background from the start (``demo_run.py``).
"""

import os
import shutil
import tempfile

# Several processes share an accelerator when one is present (pytest-xdist workers, the
# demo run): let none of them claim most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One compilation cache for the whole session, shared by the xdist workers and the
# subprocesses they start (the same small programs are compiled in several processes).
# Made afresh per session and removed at its end, so every run still compiles cold.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlinear-xla-cache-")
    os.environ["JAXLINEAR_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Most of the suite's time is XLA compiling many tiny programs, not running them: compile
# without most of XLA's optimisation passes (about 30% less CPU; the values checked are
# the same to the tolerances used). The subprocesses (demos, simulated devices, JAX's
# default configuration) inherit it. Benchmarks and demos run outside the suite optimise.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# Several processes share 2 cores (workers, the demo run, subprocesses): one thread each for
# XLA:CPU's Eigen kernels rather than thread pools that compete.
if "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

import demo_run
import jax
import pytest
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("jaxlinear", derandomize=True, database=None, deadline=None)
settings.load_profile("jaxlinear")


# JAX writes a cache entry in place (not atomically), and the cache is shared by concurrent
# processes: a process that reads an entry another is still writing gets a truncated file,
# warns "Error reading persistent compilation cache entry for ...", and compiles the
# program itself (a cache miss; results unchanged). Under `filterwarnings = ["error"]` that
# warning failed runs on a loaded machine, with no fault in the code under test. Ignore
# exactly it (and its twin for a failed write, e.g. a full disk); every other warning
# stays an error.
CACHE_WARNINGS = (
    "ignore:Error reading persistent compilation cache entry:UserWarning",
    "ignore:Error writing persistent compilation cache entry:UserWarning",
)


def pytest_configure(config):
    """Ignore the cache's warnings (above); start ``python -m demos`` in the background if
    the demo tests are selected.

    The demos start only in the controlling process (not in an xdist worker) and only
    once; the workers inherit the run's directory through the environment.
    """
    for line in CACHE_WARNINGS:  # added after pyproject's "error": they take precedence
        config.addinivalue_line("filterwarnings", line)
    if hasattr(config, "workerinput") or os.environ.get(demo_run.ENV):
        return
    if config.option.collectonly or not demo_run.selected(config.args, config.rootpath):
        return
    run, proc = demo_run.start()
    os.environ[demo_run.ENV] = str(run)
    config.stash[_DEMO_RUN] = (run, proc)


def pytest_collection_modifyitems(config, items):
    """The demo tests wait for the background run: put them last, when it has finished."""
    items.sort(key=lambda item: item.path.name == "test_demos.py")  # stable: order kept


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.get("JAXLINEAR_OWN_CACHE"):
        shutil.rmtree(os.environ["JAXLINEAR_OWN_CACHE"], ignore_errors=True)
    run, proc = config.stash.get(_DEMO_RUN, (None, None))
    if proc is not None:
        if proc.poll() is None:  # the session ended first (e.g. -x): stop the demos
            proc.kill()
        proc.wait()
        shutil.rmtree(run, ignore_errors=True)


_DEMO_RUN = pytest.StashKey()
