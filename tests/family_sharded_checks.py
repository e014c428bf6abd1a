"""The family under ``shard_map``: grad with a replicated kernel, on 3 simulated devices.

Run as a script (``tests/test_family.py`` runs it in a fresh Python, since JAX fixes its
device count when it starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=3 JAX_PLATFORMS=cpu \\
        python tests/family_sharded_checks.py

For every case of ``tests/family_cases.py`` with a ``shard_axis`` and both bindings:
``x`` split along that axis over the devices, ``w`` replicated, ``jax.grad`` of a
per-device loss inside ``shard_map`` (``check_vma=True``, so ``w̄`` must come out summed
over the devices: ``vma.psum_to``) against JAX's AD of the plain op on one device, in
float64. Prints one line per check; exits 1 if any fails. Importing it does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

N_DEVICES = 3


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    from tests.family_cases import CASES

    if len(jax.devices()) != N_DEVICES:
        print(f"expected {N_DEVICES} devices, got {len(jax.devices())}")
        return 1
    mesh = jax.make_mesh((N_DEVICES,), ("d",))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    failed = 0
    for case in CASES:
        if case.shard_axis is None:
            continue
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, case.x_shape, jnp.float64)
        w = jax.random.normal(kw, case.w_shape, jnp.float64)
        spec = P(*(None,) * case.shard_axis, "d")

        expected = jax.grad(loss(case.reference), argnums=(0, 1))(x, w)
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        ws = jax.device_put(w, NamedSharding(mesh, P()))
        for binding in ("custom_vjp", "dual"):
            body = jax.grad(loss(getattr(case, binding)), argnums=(0, 1))
            f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, P()), out_specs=(spec, P())))
            try:
                got = f(xs, ws)
                err = max(float(np.max(np.abs(a - b))) for a, b in zip(got, expected, strict=True))
                ok = err < 1e-12
            except Exception as e:  # reported as a failed check
                err, ok = repr(e), False
            failed += not ok
            print(f"[{'PASS' if ok else 'FAIL'}] {case.name} {binding}: grad in shard_map ({err})")
    print(f"{'all' if not failed else 'NOT all'} family sharded checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
