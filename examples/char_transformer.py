"""A character-level transformer language model on CPython's bundled docs (``pydoc_data.topics``).

``pydoc_data.topics`` ships with Python: the text of the language reference's topics that
``help()`` shows, about 0.46 M characters of English and code. A two-layer decoder-only
transformer is trained on the first 90% (next-character prediction) and evaluated on the
last 10%, in bits per character. Every weight-bearing op is jaxlinear's:

- ``jaxlinear.embed`` for the token and position tables (backward: scatter-add),
- ``jaxlinear.einsum`` for the attention projections (``"btd,dhk->bthk"``, ``"bthk,hkd->btd"``),
- ``jaxlinear.dot_general`` for the scores ``q·k`` (batch axes b, h; contracted k) and
  ``jaxlinear.einsum`` for the attention-weighted values,
- ``jaxlinear.linear`` for the MLP and the output layer.

    python -m examples.char_transformer            # full run
    python -m examples.char_transformer --smoke    # a few steps, seconds
    python -m examples.char_transformer --quant fp8  # weight products in fp8

``--quant`` (``fp8`` = ``fp8_hybrid``, ``fp8_rowwise``, ``int8``; see
``docs/guides/quantization.md``) runs every product with a weight (the attention
projections, the MLP, the output layer) and its two transposes in that format;
``--keep-ends`` keeps the output layer in float32 (the embeddings are lookups, never
quantized). The attention scores and weighted values (activation × activation) stay
float32.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python examples/char_transformer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlinear
from examples import _common


def corpus() -> str:
    """The topics of ``help()``, concatenated in a fixed order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def init_lm(key, *, vocab: int, context: int, d: int, heads: int, layers: int) -> dict:
    """Token and position tables ``(vocab, d)``, ``(context, d)``; per layer the attention
    weights ``(d, heads, d/heads)`` and ``(heads, d/heads, d)`` and a ``d -> 4d -> d`` MLP."""
    k = d // heads
    keys = iter(jax.random.split(key, 3 + 6 * layers))

    def normal(shape, fan_in):
        return jax.random.normal(next(keys), shape) / math.sqrt(fan_in)

    def norm():
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    blocks = [
        {
            "ln1": norm(),
            "q": normal((d, heads, k), d),
            "k": normal((d, heads, k), d),
            "v": normal((d, heads, k), d),
            "o": normal((heads, k, d), d) / math.sqrt(2 * layers),
            "ln2": norm(),
            "fc1": jaxlinear.init(next(keys), d, 4 * d),
            "fc2": jaxlinear.Params(
                jaxlinear.init(next(keys), 4 * d, d).W / math.sqrt(2 * layers), jnp.zeros(d)
            ),
        }
        for _ in range(layers)
    ]
    return {
        "tok": normal((vocab, d), 1) * 0.1,
        "pos": normal((context, d), 1) * 0.1,
        "blocks": blocks,
        "ln_f": norm(),
        "head": jaxlinear.init(next(keys), d, vocab),
    }


def layer_norm(p, x):  # (..., d) -> (..., d)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def attention(blk, x, quant=None):
    """Causal multi-head self-attention: ``(b, t, d) -> (b, t, d)``."""
    q = jaxlinear.einsum("btd,dhk->bthk", x, blk["q"], quant=quant)  # (b, t, h, k)
    k = jaxlinear.einsum("btd,dhk->bthk", x, blk["k"], quant=quant)
    v = jaxlinear.einsum("btd,dhk->bthk", x, blk["v"], quant=quant)
    # scores[b, h, t, s] = Σ_k q[b, t, h, k] k[b, s, h, k]: batch axes (b, h), contract k
    scores = jaxlinear.dot_general(q, k, (((3,), (3,)), ((0, 2), (0, 2))))  # (b, h, t, s)
    t = x.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores / math.sqrt(q.shape[-1]), -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)  # (b, h, t, s)
    out = jaxlinear.einsum("bhts,bshk->bthk", weights, v)  # (b, t, h, k)
    return jaxlinear.einsum("bthk,hkd->btd", out, blk["o"], quant=quant)  # (b, t, d)


def lm(params, ids, quant=None, keep_ends=False):
    """``(b, t)`` character ids -> ``(b, t, vocab)`` next-character logits; ``quant``: a
    recipe for the weight products (``keep_ends``: not the output layer's)."""
    t = ids.shape[1]
    x = jaxlinear.embed(params["tok"], ids) + jaxlinear.embed(params["pos"], jnp.arange(t))[None]
    for blk in params["blocks"]:
        x = x + attention(blk, layer_norm(blk["ln1"], x), quant)
        h = layer_norm(blk["ln2"], x)
        h = jax.nn.gelu(jaxlinear.linear(blk["fc1"], h, quant=quant))  # (b, t, 4d)
        x = x + jaxlinear.linear(blk["fc2"], h, quant=quant)
    head_quant = None if keep_ends else quant
    h = layer_norm(params["ln_f"], x)
    return jaxlinear.linear(params["head"], h, quant=head_quant)  # (b, t, vocab)


def loss_fn(params, ids, **quant):
    """Mean next-character cross-entropy (nats) of ``ids: (b, t + 1)``."""
    logits = lm(params, ids[:, :-1], **quant)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """``(len(starts), length)``: ``data[s : s + length]`` for each start."""
    return data[starts[:, None] + np.arange(length)]


def main(argv=None) -> dict:
    p = _common.parser(__doc__.splitlines()[0], steps=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--d", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sample", type=int, default=240, help="characters to sample at the end")
    quants = {"fp8": "fp8_hybrid", "fp8_hybrid": "fp8_hybrid", "fp8_rowwise": "fp8_rowwise"}
    quants["int8"] = "int8"
    p.add_argument("--quant", choices=sorted(quants), default=None, help="low-precision recipe")
    p.add_argument("--keep-ends", action="store_true", help="output layer in float32")
    args = _common.parse(p, argv)
    quant = {"quant": quants.get(args.quant), "keep_ends": args.keep_ends}
    if args.smoke:
        args.batch, args.context, args.d, args.layers, args.sample = 4, 16, 16, 1, 20

    text = corpus()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, valid = data[:split], data[split:]
    print(
        f"pydoc_data.topics: {len(text):,} characters, {len(chars)} distinct;"
        f" {len(train):,} training, {len(valid):,} validation"
    )

    T = args.context
    init = functools.partial(init_lm, vocab=len(chars), context=T, d=args.d, heads=4,
                             layers=args.layers)  # fmt: skip
    params = jax.jit(init)(jax.random.key(args.seed))  # one compilation, not one per shape
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model: {args.layers} layers, d = {args.d}, 4 heads, context {T}, {n_params:,} parameters"
    )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, max(1, args.steps // 10), args.steps
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, **quant))(params, ids)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    n_valid = 8 if args.smoke else 256  # fixed validation windows, the same every time
    valid_ids = windows(valid, rng.integers(0, len(valid) - T - 1, n_valid), T + 1)
    eval_loss = jax.jit(functools.partial(loss_fn, **quant))

    progress = _common.Progress(args.steps)
    losses, evals = [], []
    for i in range(1, args.steps + 1):
        ids = windows(train, rng.integers(0, len(train) - T - 1, args.batch), T + 1)
        params, opt_state, loss = step(params, opt_state, ids)
        losses.append(float(loss) / math.log(2))
        if progress.due(i):
            bpc = float(eval_loss(params, valid_ids)) / math.log(2)
            evals.append((i, bpc))
            progress(i, losses[-1], valid_bpc=bpc)
    print(f"trained {args.steps} steps in {progress.seconds:.1f} s")

    # Sampling: a validation window as the prompt, then one character at a time (temperature
    # 0.8), always feeding the last T characters (one compiled shape).
    @jax.jit
    def next_char(params, window, key):
        return jax.random.categorical(key, lm(params, window[None], **quant)[0, -1] / 0.8)

    window = valid[:T].copy()
    key, out = jax.random.key(args.seed + 1), []
    for _ in range(args.sample):
        key, k = jax.random.split(key)
        c = int(next_char(params, window, k))
        out.append(chars[c])
        window = np.append(window[1:], c)
    prompt = "".join(chars[c] for c in valid[:T])
    print(f"sample (prompt: the first {T} validation characters, ending {prompt[-24:]!r}):")
    print("  " + "".join(out).replace("\n", "\n  "))
    bpc = evals[-1][1]
    print(f"final: validation loss {bpc:.3f} bits per character")

    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, args.steps + 1), losses, lw=0.6, alpha=0.6, label="training batch")
    ax.plot(*zip(*evals, strict=True), marker="o", label="validation")
    ax.axhline(math.log2(len(chars)), color="0.6", ls="--", lw=0.8, label="uniform guess")
    ax.set(xlabel="step", ylabel="bits per character")
    ax.legend()
    ax.set_title(
        f"char transformer on pydoc_data.topics: validation {bpc:.2f} bits/char", fontsize=10
    )
    name = f"char_transformer_{args.quant}{'_keep_ends' * args.keep_ends}" if args.quant else ""
    _common.save(fig, args.out, f"{name or 'char_transformer'}.png")
    return {"valid_bpc": bpc, "seconds": progress.seconds}


if __name__ == "__main__":
    main()
