"""``python -m examples [NAME ...] [--smoke] [--out DIR]``: run the examples one after another.

In one process (each example's ``main``), so ``--smoke`` over all of them costs one
interpreter start and one import of JAX; what the tests run.
"""

from __future__ import annotations

import argparse
import importlib
import time

from examples._common import DEFAULT_OUT

EXAMPLES = ("cnn_digits", "nnx_digits", "dp_digits", "char_transformer", "gauss_newton")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"any of {', '.join(EXAMPLES)} (default: all)")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny sizes each")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"figures folder ({DEFAULT_OUT}/)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.names) - set(EXAMPLES))
    if unknown:
        p.error(f"unknown example(s) {unknown}; choose from {', '.join(EXAMPLES)}")
    for name in args.names or EXAMPLES:
        print(f"\n=== examples.{name}", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        module = importlib.import_module(f"examples.{name}")
        module.main(["--out", args.out, *(["--smoke"] if args.smoke else [])])
        print(
            f"=== examples.{name}: {time.perf_counter() - start:.1f} s"
            f" ({time.process_time() - cpu:.1f} s CPU)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
