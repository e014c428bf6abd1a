"""A worker process that builds and times implementations on request, one call at a time.

The driver (``benchmarks.runner``) keeps the worker idle except while it asks it to
time something, so a PyTorch (or differently-flagged XLA) implementation can take its
turn in the same interleaved round as the in-process JAX ones without sharing cores.

Protocol: one JSON object per line on stdin, one JSON reply per line on the original
stdout (the worker's own ``print``s and library chatter go to stderr)::

    {"cmd": "setup", "backend": "torch" | "jax", "device": "cpu" | "gpu", "precision": null}
    {"cmd": "prepare", "key": "3d/torch", "impl": "torch", "case": {...}}  -> {"info": {...}}
    {"cmd": "time", "key": "3d/torch", "reps": 10, "warm": true}        -> {"s": 0.0123}
    {"cmd": "drop", "key": "3d/torch"}
    {"cmd": "quit"}

Every reply has ``"ok"``; a failure replies ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable


def time_call(call: Callable[[], None], reps: int, warm: bool = False) -> float:
    """Seconds per call of ``call`` (which blocks until its work is done), over ``reps`` calls.

    ``warm``: make one untimed call first, so that a short sample does not pay for the
    caches and sleeping threads that the previous implementation left behind.
    """
    if warm:
        call()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - t0) / reps


def _setup_jax(precision):
    import jax

    if precision:
        jax.config.update("jax_default_matmul_precision", precision)
    from benchmarks import jax_impls

    return jax_impls.prepare, {**jax_impls.versions(), "backend": jax.default_backend()}


def _setup_torch(device, precision):
    from benchmarks import torch_impls

    desc = torch_impls.setup(device, precision)
    return (lambda impl, case: torch_impls.prepare(impl, case, device)), desc


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel
    os.dup2(2, 1)  # everything else printed to stdout goes to stderr
    sys.stdout = sys.stderr

    from benchmarks.cases import Case

    prepare = None
    calls: dict[str, Callable[[], None]] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        try:
            if cmd == "setup":
                if msg["backend"] == "jax":
                    prepare, desc = _setup_jax(msg.get("precision"))
                else:
                    prepare, desc = _setup_torch(msg["device"], msg.get("precision"))
                reply = {"desc": desc}
            elif cmd == "prepare":
                calls[msg["key"]], info = prepare(msg["impl"], Case.from_json(msg["case"]))
                reply = {"info": info}
            elif cmd == "time":
                reply = {"s": time_call(calls[msg["key"]], msg["reps"], msg.get("warm", False))}
            elif cmd == "drop":
                calls.pop(msg["key"], None)
                reply = {}
            else:
                raise ValueError(f"worker: unknown command {cmd!r}")
            reply["ok"] = True
        except Exception as e:
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
