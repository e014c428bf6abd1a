"""Bench models written the way Flax's and Equinox's own examples write them (issue 22).

- ``build_nnx_decoder``: a Gemma-style decoder in Flax NNX: RMSNorm ``x * (1 + scale)``,
  grouped-query attention by ``nnx.Einsum``, a gated MLP, the embedding tied to the
  logits through ``attend``, blocks made by ``nnx.vmap`` (stacked weights) and run by
  ``nnx.scan`` with ``nnx.remat``. Nothing converted: plain Flax.
- ``build_eqx_vit``: a ViT in Equinox (after its ``vision_transformer`` example): patch
  embedding by a strided ``Conv2d``, a class token and positional table, pre-LayerNorm
  blocks with ``MultiheadAttention``, the model taking one image and the loss
  ``jax.vmap``-ing it over the batch.

Both return ``(params, args, loss, None)`` (``dp_models``' convention; no per-layer
breakdown).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def build_nnx_decoder(n=32, T=64, vocab=512, d=128, heads=4, kv_heads=2, blocks=2, seed=0):
    from flax import nnx

    import jaxlinear.nnx

    k = d // heads

    class RMSNorm(nnx.Module):  # Gemma's: scale stored as an offset from 1
        def __init__(self, d):
            self.scale = nnx.Param(jnp.zeros((d,)))

        def __call__(self, x):
            var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
            return x * jax.lax.rsqrt(var + 1e-6) * (1 + self.scale.value)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
            self.q = nnx.Einsum("BTD,DNH->BTNH", (d, heads, k), rngs=rngs)
            self.kv = nnx.Einsum("BSD,CDKH->CBSKH", (2, d, kv_heads, k), rngs=rngs)
            self.o = nnx.Einsum("BTNH,NHD->BTD", (heads, k, d), rngs=rngs)
            self.gate = nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs)
            self.up = nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs)
            self.down = nnx.Linear(2 * d, d, use_bias=False, rngs=rngs)

        def __call__(self, x):
            h = self.norm1(x)
            q = self.q(h) * k**-0.5
            key, value = self.kv(h)
            g = heads // kv_heads
            q = q.reshape(*q.shape[:2], kv_heads, g, k)
            s = jnp.einsum("BTKGH,BSKH->BKGTS", q, key)
            mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
            s = jnp.where(mask, s, -1e9)
            att = jnp.einsum("BKGTS,BSKH->BTKGH", jax.nn.softmax(s, axis=-1), value)
            x = x + self.o(att.reshape(*att.shape[:2], heads, k))
            h = self.norm2(x)
            return x + self.down(jax.nn.gelu(self.gate(h)) * self.up(h))

    class Decoder(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(vocab, d, rngs=rngs)

            @nnx.split_rngs(splits=blocks)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)
            self.final = RMSNorm(d)

        def __call__(self, ids):
            x = self.embed(ids) * jnp.sqrt(d).astype(jnp.float32)

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            @nnx.remat
            def run(x, block):
                return block(x)

            x = run(x, self.blocks)
            return self.embed.attend(self.final(x))  # logits tied to the embedding

    model = Decoder(nnx.Rngs(seed))
    loss_fn, params = jaxlinear.nnx.per_example_loss(
        model, lambda logits, targets: jnp.mean(_cross_entropy(logits, targets), axis=1)
    )
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, size=(n, T + 1)), jnp.int32)
    return params, (tokens[:, :-1], tokens[:, 1:]), loss_fn, None


def build_eqx_vit(n=32, image=32, patch=4, d=128, heads=4, blocks=2, classes=10, seed=0):
    import equinox as eqx

    keys = iter(jax.random.split(jax.random.key(seed), 4 * blocks + 4))
    tokens = (image // patch) ** 2

    class PatchEmbedding(eqx.Module):
        conv: eqx.nn.Conv2d

        def __init__(self, key):
            self.conv = eqx.nn.Conv2d(3, d, patch, stride=patch, key=key)

        def __call__(self, x):  # (3, H, W) -> (tokens, d)
            return self.conv(x).reshape(d, -1).T

    class Block(eqx.Module):
        norm1: eqx.nn.LayerNorm
        attention: eqx.nn.MultiheadAttention
        norm2: eqx.nn.LayerNorm
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __init__(self, key):
            a, b, c = jax.random.split(key, 3)
            self.norm1, self.norm2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
            self.attention = eqx.nn.MultiheadAttention(heads, d, key=a)
            self.up = eqx.nn.Linear(d, 2 * d, key=b)
            self.down = eqx.nn.Linear(2 * d, d, key=c)

        def __call__(self, x):
            h = jax.vmap(self.norm1)(x)
            x = x + self.attention(h, h, h)
            h = jax.vmap(self.norm2)(x)
            return x + jax.vmap(lambda t: self.down(jax.nn.gelu(self.up(t))))(h)

    class VisionTransformer(eqx.Module):
        patches: PatchEmbedding
        cls_token: jax.Array
        positions: jax.Array
        blocks: list
        norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self):
            self.patches = PatchEmbedding(next(keys))
            self.cls_token = jax.random.normal(next(keys), (1, d))
            self.positions = jax.random.normal(next(keys), (tokens + 1, d))
            self.blocks = [Block(next(keys)) for _ in range(blocks)]
            self.norm = eqx.nn.LayerNorm(d)
            self.head = eqx.nn.Linear(d, classes, key=next(keys))

        def __call__(self, x):  # one image (3, H, W) -> (classes,)
            h = jnp.concatenate([self.cls_token, self.patches(x)], axis=0) + self.positions
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h[0]))

    model = VisionTransformer()
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, images, labels):
        model = eqx.combine(params, static)
        return _cross_entropy(jax.vmap(model)(images), labels)

    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(n, 3, image, image)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, size=n), jnp.int32)
    return params, (images, labels), loss, None
