"""``python -m benchmarks.bench_fsdp``: memory of FSDP training steps, by residual policy.

XLA's own accounting (``compiled.memory_analysis()``, per device) of ``jax.grad`` of three
models whose weights and batch are sharded over the 8 devices of one mesh axis
(``--xla_force_host_platform_device_count=8``: the script re-runs itself with it):

- ``mlp``: 8 tanh layers, ``W: (1024, 1024)``, 64 tokens (float32);
- ``cnn``: 4 convolutions 3×3, 128 → 128 channels, NHWC, 16×16 images, batch 32;
- ``transformer``: 2 pre-LayerNorm blocks (einsum attention projections ``(d, H, K)``,
  a 4·d MLP), ``d = 512``, 8 heads, 64 tokens, batch 16.

Each weight is sharded along one axis (``W``'s rows, a kernel's output channels, a
projection's ``d`` or heads). Variants:

- ``plain jit``: ``lax``/``jnp`` ops under ``jax.jit`` with ``NamedSharding`` weights
  (XLA's SPMD partitioner decides; Auto mesh axes);
- ``gathered kept``: jaxlinear ops in ``shard_map``, each weight ``lax.all_gather``\\ ed
  (the gathered weight is a residual until its backward pass);
- ``fsdp_gather``: the same with ``jaxlinear.fsdp_gather``: the shard is the residual,
  the backward pass gathers again;
- ``jit + fsdp_gather(spec=)``: plain ``jax.jit``, the weights marked with their spec.

Reported: ``temp`` (scratch, residuals included), the largest gathered weight, the
activations the backward pass keeps (each layer's local input and output), the target
``(one gathered weight + activations) × 1.5``, and the collectives of the compiled step.
No time is measured.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

FLAG = "--xla_force_host_platform_device_count=8"
N = 8


def _rerun():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip())
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.call([sys.executable, "-m", "benchmarks.bench_fsdp", *sys.argv[1:]], env=env)


def main() -> int:
    import jax

    if len(jax.devices()) < N:
        return _rerun()
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxlinear

    mesh = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    dn = ("NHWC", "HWIO", "NHWC")

    # -- the models: f(weights, x, get, ops); get(w, dim) is the weight a layer uses ------
    def mlp(ws, x, get, ops):
        h = x
        for W in ws:
            h = jnp.tanh(ops["dot"](h, get(W, 0)))
        return jnp.sum(h**2)

    def cnn(ws, x, get, ops):
        h = x
        for w in ws:
            h = jnp.tanh(ops["conv"](h, get(w, 3)))
        return jnp.sum(h**2)

    def layer_norm(h):
        mu = jnp.mean(h, -1, keepdims=True)
        return (h - mu) * lax.rsqrt(jnp.mean((h - mu) ** 2, -1, keepdims=True) + 1e-6)

    def transformer(ws, x, get, ops):
        h = x
        for wq, wk, wv, wo, w1, w2 in ws:
            a = layer_norm(h)
            q, k, v = (ops["einsum"]("btd,dhk->bthk", a, get(w, 0)) for w in (wq, wk, wv))
            s = jnp.einsum("bqhk,bshk->bhqs", q, k) / q.shape[-1] ** 0.5
            o = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, -1), v)
            h = h + ops["einsum"]("bthk,hkd->btd", o, get(wo, 0))
            m = jax.nn.gelu(ops["dot"](layer_norm(h), get(w1, 0)))
            h = h + ops["dot"](m, get(w2, 0))
        return jnp.sum(h**2)

    d, H, K, T, B = 512, 8, 64, 64, 16
    models = {
        "mlp": (mlp, [normal(1024, 1024, scale=1024**-0.5) for _ in range(8)], normal(64, 1024)),
        "cnn": (
            cnn,
            [normal(3, 3, 128, 128, scale=(9 * 128) ** -0.5) for _ in range(4)],
            normal(32, 16, 16, 128),
        ),
        "transformer": (
            transformer,
            [
                (
                    *(normal(d, H, K, scale=d**-0.5) for _ in range(3)),
                    normal(H, K, d, scale=d**-0.5),
                    normal(d, 4 * d, scale=d**-0.5),
                    normal(4 * d, d, scale=(4 * d) ** -0.5),
                )
                for _ in range(2)
            ],
            normal(B, T, d),
        ),
    }
    dims = {"mlp": lambda w: 0, "cnn": lambda w: 3, "transformer": lambda w: 0}
    plain_ops = dict(
        dot=lambda h, W: h @ W,
        conv=lambda h, w: lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=dn),
        einsum=jnp.einsum,
    )
    our_ops = dict(
        dot=lambda h, W: jaxlinear.linear((W, None), h),
        conv=lambda h, w: jaxlinear.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=dn
        ),
        einsum=jaxlinear.einsum,
    )

    def spec(w, dim):
        return P(*("data" if i == dim else None for i in range(w.ndim)))

    def collectives(text):
        ops = re.findall(
            r"= (?:\S+|\([^)]*\)) (all-gather|reduce-scatter|all-reduce)(?:-start)?\(", text
        )
        return {op: ops.count(op) for op in sorted(set(ops))}

    print(f"jax {jax.__version__}, {N} simulated CPU devices; memory_analysis() per device\n")
    print(
        "| model | variant | temp MiB | largest gathered W MiB | activations MiB |"
        " target MiB | collectives |"
    )
    print("|---|---|---|---|---|---|---|")

    def run_model(name, model, ws, x):
        dim_of = dims[name]
        w_specs = jax.tree.map(lambda w: spec(w, dim_of(w)), ws)
        put = lambda a, s: jax.device_put(  # noqa: E731
            a, jax.tree.map(lambda s: NamedSharding(mesh, s), s, is_leaf=lambda s: isinstance(s, P))
        )
        ws_s, x_s = put(ws, w_specs), put(x, P("data"))
        w_max = max(w.size * 4 for w in jax.tree.leaves(ws))

        # activations kept for the backward pass (one device): every layer's input and output
        acts = []
        jax.eval_shape(lambda ws, x: model(ws, x, lambda w, dim: w, _tap(plain_ops, acts)), ws, x)
        act_bytes = 2 * sum(acts)
        target = (w_max + act_bytes) * 1.5

        def shard_mapped(get):
            def step(ws, x):
                return jax.grad(lambda ws, x: model(ws, x, get, our_ops))(ws, x)

            return jax.jit(
                jax.shard_map(step, mesh=mesh, in_specs=(w_specs, P("data")), out_specs=w_specs)
            )

        variants = {
            "plain jit": jax.jit(jax.grad(lambda ws, x: model(ws, x, lambda w, dim: w, plain_ops))),
            "gathered kept": shard_mapped(
                lambda w, dim: lax.all_gather(w, "data", axis=dim, tiled=True)
            ),
            "fsdp_gather": shard_mapped(lambda w, dim: jaxlinear.fsdp_gather(w, "data", dim=dim)),
            "jit + fsdp_gather(spec=)": jax.jit(
                jax.grad(
                    lambda ws, x: model(
                        ws,
                        x,
                        lambda w, dim: jaxlinear.fsdp_gather(w, "data", dim=dim, spec=spec(w, dim)),
                        our_ops,
                    )
                )
            ),
        }
        for variant, f in variants.items():
            with jax.set_mesh(mesh):
                compiled = f.lower(ws_s, x_s).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
            print(
                f"| {name} | {variant} | {mib(temp)} | {mib(w_max)} | {mib(act_bytes)} |"
                f" {mib(target)} | {collectives(compiled.as_text())} |"
            )
            sys.stdout.flush()

    for name, (model, ws, x) in models.items():
        run_model(name, model, ws, x)
    return 0


def _tap(ops, acts):
    """``ops`` recording each layer's input size per device (for the activations column)."""

    def tapped(f):
        def op(*args):
            x = args[1] if isinstance(args[0], str) else args[0]  # einsum: after subscripts
            acts.append(x.size * 4 / N)
            return f(*args)

        return op

    return {k: tapped(f) for k, f in ops.items()}


if __name__ == "__main__":
    sys.exit(main())
