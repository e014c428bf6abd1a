"""The interleaved measurement loop.

For each case, every implementation is built, compiled and warmed up first (excluded
from the timings); its repetitions per sample are calibrated so that one sample takes
about ``target_s``. Then, round by round, each implementation takes one sample, in a
fresh random order each round (seeded), so no implementation always follows the same
neighbour: the in-process JAX ones directly, PyTorch in its worker process driven from
this same loop (the other side is idle meanwhile). A sample of calls shorter than
``WARM_BELOW_S`` starts with one untimed call, so it does not pay for the caches and
sleeping threads its predecessor left. Ratios are formed per round, so a slow round
(another process on the machine) shifts numerator and denominator alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks.cases import Case
from benchmarks.worker import time_call

WARM_BELOW_S = 0.01  # calls shorter than this get one untimed call before each sample
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds benchmarks/


class WorkerError(RuntimeError):
    pass


class Local:
    """Runs JAX implementations in this process."""

    name = "local"

    def __init__(self):
        self._calls: dict[str, Callable[[], None]] = {}

    def prepare(self, key: str, impl: str, case: Case) -> dict:
        from benchmarks import jax_impls

        self._calls[key], info = jax_impls.prepare(impl, case)
        return info

    def time(self, key: str, reps: int, warm: bool = False) -> float:
        return time_call(self._calls[key], reps, warm)

    def drop(self, key: str) -> None:
        self._calls.pop(key, None)

    def close(self) -> None:
        self._calls.clear()


class Worker:
    """Runs implementations in a child process (``python -m benchmarks.worker``).

    The child starts importing at once; its setup reply is read on first use, so a
    PyTorch import overlaps with JAX compiling in this process.
    """

    def __init__(self, name: str, backend: str, device: str, precision=None, env=None, stderr=None):
        self.name = name
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"],
            cwd=_ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
        )
        self._pending_setup = True
        self.desc: dict | None = None
        self._send({"cmd": "setup", "backend": backend, "device": device, "precision": precision})

    def _send(self, msg: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"{self.name}: worker process exited ({e})") from None

    def _recv(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise WorkerError(f"{self.name}: worker process exited with code {code}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise WorkerError(f"{self.name}: {reply['error']}")
        return reply

    def ready(self) -> dict:
        """Wait for the setup reply; return the worker's description (versions, device)."""
        if self._pending_setup:
            self._pending_setup = False
            self.desc = self._recv()["desc"]
        return self.desc

    def _ask(self, msg: dict) -> dict:
        self.ready()
        self._send(msg)
        return self._recv()

    def prepare(self, key: str, impl: str, case: Case) -> dict:
        msg = {"cmd": "prepare", "key": key, "impl": impl, "case": case.to_json()}
        return self._ask(msg)["info"]

    def time(self, key: str, reps: int, warm: bool = False) -> float:
        return self._ask({"cmd": "time", "key": key, "reps": reps, "warm": warm})["s"]

    def drop(self, key: str) -> None:
        self._ask({"cmd": "drop", "key": key})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send({"cmd": "quit"})
                self._proc.wait(timeout=30)
            except (WorkerError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()


@dataclasses.dataclass
class CaseResult:
    case: Case
    samples: dict[str, list[float]]  # impl -> seconds per call, one per round (same order)
    reps: dict[str, int]  # impl -> calls per sample
    info: dict[str, dict]  # impl -> compile time, residuals, library calls, where it ran
    errors: dict[str, str]  # impl -> why it could not run
    wall_s: float


def run_case(
    case: Case,
    executors: dict[str, Local | Worker],
    *,
    target_s: float,
    log: Callable[[str], None],
    max_reps: int = 20000,
    seed: int = 0,
) -> CaseResult:
    """Time every implementation in ``executors`` (impl -> where it runs) on ``case``."""
    t_start = time.perf_counter()
    ready: dict[str, tuple] = {}
    info: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for impl, ex in executors.items():
        key = f"{case.name}/{impl}"
        try:
            info[impl] = {**ex.prepare(key, impl, case), "runs_in": ex.name}
            t1 = min(ex.time(key, 1), ex.time(key, 1))
            reps = max(1, min(max_reps, round(target_s / max(t1, 1e-7))))
            warm = t1 < WARM_BELOW_S
            ex.time(key, reps, warm)  # warm-up sample at the calibrated length (excluded)
        except Exception as e:
            errors[impl] = f"{type(e).__name__}: {e}"
            log(f"  ! {impl} failed on {case.name}: {errors[impl]}")
            continue
        ready[impl] = (ex, key, reps, warm)

    names = list(ready)
    samples: dict[str, list[float]] = {impl: [] for impl in names}
    rng = random.Random(seed)
    for r in range(case.rounds):
        t_round = time.perf_counter()
        for impl in rng.sample(names, len(names)):
            ex, key, reps, warm = ready[impl]
            samples[impl].append(ex.time(key, reps, warm))
        log(f"  round {r + 1}/{case.rounds} ({time.perf_counter() - t_round:.1f} s)")
    for ex, key, _, _ in ready.values():
        ex.drop(key)
    reps = {impl: ready[impl][2] for impl in names}
    return CaseResult(case, samples, reps, info, errors, time.perf_counter() - t_start)
