"""Per-example norms and clipping on models written the ordinary way (issue 22).

Each case is a loss written as users write it (plain ``jnp``/``lax``, Flax NNX, Equinox
under ``jax.vmap``), with every leaf required to be structural (``fallback="raise"``). The
reference is JAX's own ``vmap(grad)`` of the single-example loss in float64 (for dropout,
``jacrev`` of the batched loss, which draws the plain step's masks); the clipped sum is
checked with the clip active for half the batch and inactive (then it is the plain
gradient of the summed loss), in one jitted program that is traced once.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_per_example import assert_rel_close, reference, reference_clipped, reference_norms

import jaxlinear

N, T, D = 4, 3, 4
rng = np.random.default_rng(22)


@pytest.fixture(autouse=True)
def _rank_promotion():
    with jax.numpy_rank_promotion("allow"):  # the models broadcast as users write them
        yield


def normal(*shape, scale=0.5):
    return jnp.asarray(scale * rng.normal(size=shape))


def check(loss, params, *args, routes=None, per_example=None):
    """Norms and clipped sums against the reference; ``routes``: the report's counts."""
    if per_example is None:
        per_example = reference(loss, params, *args)
    expected = reference_norms(per_example)
    clip = float(np.median(expected))
    big = 10 * float(expected.max())

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, args):
        def clipped(c):
            return jaxlinear.clipped_grad(loss, params, *args, clip_norm=c, fallback="raise")

        return clipped(clip), clipped(big)[0]

    (grads, norms), unclipped = step(params, args)
    assert_rel_close(norms, expected, 1e-10)
    assert_rel_close(grads, reference_clipped(per_example, clip)[0], 1e-10)
    assert_rel_close(unclipped, jax.tree.map(lambda a: a.sum(0), per_example), 1e-10)
    step(params, args)  # traced once
    report = jaxlinear.per_example_routes(loss, params, *args)
    assert "fallback" not in report.counts(), str(report)
    if routes is not None:
        assert report.counts() == routes, str(report)
    return report


# -- plain jnp / lax models ---------------------------------------------------------------


def layer_norm(x, scale, bias):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + 1e-5) * scale + bias


def rms_norm(x, scale):  # Gemma's: x * (1 + scale)
    return x * lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + scale)


def _norms(p, x):
    h = layer_norm(x, p["ln_scale"], p["ln_bias"])
    h = rms_norm(h @ p["W"], p["rms_scale"])
    return jnp.sum(jnp.tanh(h) ** 2, axis=(1, 2))


def _tables(p, x):  # a positional table, a class token, a head on the class token
    h = x + p["pos"]
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, D))
    h = jnp.concatenate([cls, h], axis=1)
    return jnp.sin(jnp.einsum("btd,dk->btk", h, p["W"])[:, 0]).sum(-1)


def _time_major(p, x):  # the tables of `_tables`, with the examples on axis 1
    h = jnp.swapaxes(x, 0, 1) + p["pos"][:, None]
    cls = jnp.broadcast_to(p["cls"], (1, x.shape[0], D))
    h = jnp.concatenate([cls, h], axis=0)
    return jnp.sin(jnp.einsum("tbd,dk->tbk", h, p["W"])[0]).sum(-1)


def _shared(p, x):  # one weight used by two layers
    return jnp.sum(jnp.tanh(jnp.tanh(x @ p["W"]) @ p["W"]) ** 2, axis=(1, 2))


def _raw_ops(p, x):  # lax.dot_general, jnp.einsum, lax.conv_general_dilated, x @ W
    h = lax.dot_general(x, p["A"], (((2,), (0,)), ((), ())))
    h = jnp.einsum("btd,de->bte", jnp.tanh(h), p["B"])
    h = lax.conv_general_dilated(h, p["K"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.sum(jnp.tanh(h) @ p["C"], axis=(1, 2))


_block = jax.jit(jax.checkpoint(lambda p, h: h + jnp.tanh(layer_norm(h, p["s"], p["b"]) @ p["W"])))


def _jit_remat(p, x):  # the usual way to save memory, inside loss_fn
    return jnp.sum(_block(p, x) ** 2, axis=(1, 2))


def _scan(p, x):  # stacked weights (one per step) and a weight shared by every step
    def body(h, W):
        return jnp.tanh(h @ W + h @ p["U"]), None

    return jnp.sum(lax.scan(body, x, p["Ws"])[0] ** 2, axis=(1, 2))


def _rnn(p, x):  # RNNs from a zero state (U's first step: × 0) and a state of ones (V's)
    def rnn(U, h):
        body = lambda h, x_t: (jnp.tanh(x_t @ p["W"] + h @ U), None)  # noqa: E731
        return lax.scan(body, h, jnp.moveaxis(x, 1, 0))[0]

    h = rnn(p["U"], jnp.zeros((x.shape[0], D))) + rnn(p["V"], jnp.ones((x.shape[0], D)))
    return jnp.sum(h**2, axis=1)


def _tied(p, ids):  # an embedding used for the lookup and for the logits
    h = jnp.tanh(jnp.take(p["E"], ids, axis=0) @ p["W"])
    return jnp.sum(jax.nn.log_softmax(h @ p["E"].T)[..., 0], axis=1)


@jax.custom_vjp
def _ste_round(x):  # a straight-through estimator: rounds, passes the cotangent unchanged
    return jnp.round(x)


_ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))


def _custom_rules(p, x):
    """Functions with derivative rules of their own keep them: ``jax.nn.relu`` has slope 0
    at exactly 0 (AD of its ``max`` would give ½: rows of ``x`` are zero and ``b[0] = 0``),
    and the straight-through estimator's slope is 1 (AD of ``round`` would give 0)."""
    h = jax.nn.relu(x @ p["W"] + p["b"])
    return jnp.sum(jnp.sin(_ste_round(3 * h @ p["V"])), axis=(1, 2))


PLAIN = {
    # name: (loss, params, arg)
    "norms": (_norms, dict(ln_scale=1 + normal(D), ln_bias=normal(D), W=normal(D, D),
                           rms_scale=normal(D)), normal(N, T, D)),
    "tables": (_tables, dict(pos=normal(T, D), cls=normal(1, 1, D), W=normal(D, 2)),
               normal(N, T, D)),
    "time_major": (_time_major, dict(pos=normal(T, D), cls=normal(1, 1, D), W=normal(D, 2)),
                   normal(N, T, D)),
    "shared": (_shared, dict(W=normal(D, D)), normal(N, T, D)),
    "raw_ops": (_raw_ops, dict(A=normal(D, 5), B=normal(5, D), K=normal(3, D, 2),
                               C=normal(2, 3)), normal(N, T, D)),
    "jit_remat": (_jit_remat, dict(s=1 + normal(D), b=normal(D), W=normal(D, D)),
                  normal(N, T, D)),
    "scan": (_scan, dict(Ws=normal(2, D, D), U=normal(D, D)), normal(N, T, D)),
    "rnn": (_rnn, dict(W=normal(D, D), U=normal(D, D), V=normal(D, D)), normal(N, T, D)),
    "tied": (_tied, dict(E=normal(7, D), W=normal(D, D)),
             jnp.asarray(rng.integers(-7, 7, size=(N, T)))),
    "custom_rules": (_custom_rules, dict(W=normal(D, D), b=normal(D).at[0].set(0.0),
                                         V=normal(D, D)), normal(N, T, D).at[:, 0].set(0.0)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_models(name):
    loss, params, arg = PLAIN[name]
    check(loss, params, arg)


def test_routes_name_the_forms():
    """Contractions keep their ghost rules; tied and shared leaves sum their calls' rules;
    elementwise leaves take a copy."""
    loss, params, arg = PLAIN["scan"]
    report = {r.leaf: r for r in jaxlinear.per_example_routes(loss, params, arg)}
    assert report["params['U']"].detail.startswith("tied: 2 calls")  # shared by the steps
    assert report["params['Ws']"].op == "dot_general"  # one tapped product per step
    assert not report["params['Ws']"].detail.startswith("tied")
    loss, params, arg = PLAIN["rnn"]
    report = {r.leaf: r for r in jaxlinear.per_example_routes(loss, params, arg)}
    assert report["params['W']"].detail.startswith(f"tied: {2 * T} calls")
    assert report["params['U']"].detail.startswith(f"tied: {T - 1} calls")  # (not on 0)
    assert report["params['V']"].route == "broadcast"  # (its first step on ones: copies)
    loss, params, arg = PLAIN["tied"]
    report = {r.leaf: r for r in jaxlinear.per_example_routes(loss, params, arg)}
    assert report["params['E']"].op == "embed+dot_general"  # the lookup and the logits
    assert report["params['E']"].detail.startswith("tied: 2 calls")
    loss, params, arg = PLAIN["norms"]
    report = {r.leaf: r for r in jaxlinear.per_example_routes(loss, params, arg)}
    assert report["params['rms_scale']"].route == "broadcast"


def _all_tied(p, ids):
    """A tied embedding, weights shared by two layers (one 3-D, read in two layouts) and
    one shared by scan steps."""
    h = jnp.take(p["E"], ids, axis=0)
    h = jnp.tanh(jnp.tanh(h @ p["W"]) @ p["W"])
    a = jnp.einsum("btd,dhk->bthk", h, p["H"]).reshape(h.shape)
    b = jnp.einsum("btd,dkh->btkh", jnp.tanh(a), p["H"].transpose(0, 2, 1)).reshape(h.shape)
    h = jnp.tanh(b)
    h = lax.scan(lambda h, _: (jnp.tanh(h @ p["U"] + h), None), h, None, 3)[0]
    return jnp.sum(jax.nn.log_softmax(h @ p["E"].T)[..., 0], axis=1)


@pytest.mark.parametrize("setting", ["gram", "per_example", "kept"])
def test_tied_leaves(monkeypatch, setting):
    """Tied and shared leaves, whose per-example gradient is the sum over their calls:
    the Gram over the calls' rows (cross terms; the lookup's one-hot rows never formed),
    and the per-example sum of the calls' ``w̄_{k,i}``, both in blocks of 1 and 2 examples
    of 5 with the clipped sum recomputed per call (``B_wᵀ(c ⊙ g_k; x_k)``); and the sum in
    one block, kept for ``Σ_i c_i w̄_i``."""
    from jaxlinear._src import ghost

    if setting != "kept":
        monkeypatch.setattr(ghost, "BLOCK_ELEMENTS", 2 * 7 * D)  # 2 examples of E, 1 of W
        monkeypatch.setattr(ghost, "keeps", lambda *_: False)
        monkeypatch.setattr(ghost, "tied_gram_pays", lambda *_: setting == "gram")
    params = dict(E=normal(7, D), H=normal(D, 2, D // 2), W=normal(D, D), U=normal(D, D))
    report = check(_all_tied, params, jnp.asarray(rng.integers(-7, 7, size=(5, T))))
    assert all(r.detail.startswith("tied: ") for r in report), str(report)
    assert [r.route for r in report] == ["per_example" if setting == "kept" else setting] * 4
    assert [r.detail.endswith("kept") for r in report] == [setting == "kept"] * 4


def test_shared_conv_kernel_keeps_its_copies():
    """A kernel shared by two convolutions keeps the per-example copies: its per-example
    sum would ``vmap`` the conv's transpose, which XLA:CPU miscomputes batch-sharded."""

    def loss(p, x):
        conv = lambda h: lax.conv_general_dilated(  # noqa: E731
            h, p["K"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.sum(jnp.tanh(conv(jnp.tanh(conv(x)))) ** 2, axis=(1, 2))

    report = check(loss, dict(K=normal(3, D, D)), normal(N, T, D))
    assert [r.route for r in report] == ["broadcast"], str(report)


def test_unsupported_is_named():
    """A leaf used inside ``lax.cond`` with the examples falls back, and says so; then the
    whole model takes the textbook ``vmap(grad)`` (never slower than it)."""
    p = dict(W=normal(D, D), s=normal(D))

    def loss(p, x):
        h = lax.cond(p["s"][0] > 0, lambda h: h @ p["W"], jnp.tanh, x * p["s"])
        return jnp.sum(h, axis=(1, 2))

    x = normal(N, T, D)
    report = {r.leaf: r for r in jaxlinear.per_example_routes(loss, p, x)}
    assert report["params['W']"].route == "fallback"
    assert "`cond`" in report["params['W']"].detail
    assert report["params['s']"].route == "vmap"
    with pytest.raises(ValueError, match=r"per_example_grad_norms: `params\['W'\]` .*`cond`"):
        jaxlinear.per_example_grad_norms(loss, p, x, fallback="raise")
    expected = reference_norms(reference(loss, p, x))
    assert_rel_close(jaxlinear.per_example_grad_norms(loss, p, x), expected, 1e-10)


# -- Flax NNX -----------------------------------------------------------------------------

nnx = pytest.importorskip("flax.nnx")
import jaxlinear.nnx  # noqa: E402


class NnxNorms(nnx.Module):
    """Flax's LayerNorm, RMSNorm, GroupNorm and BatchNorm (eval mode) around a Linear."""

    def __init__(self, rngs):
        f64 = dict(param_dtype=jnp.float64, rngs=rngs)
        self.ln = nnx.LayerNorm(D, **f64)
        self.rms = nnx.RMSNorm(D, **f64)
        self.gn = nnx.GroupNorm(D, num_groups=2, **f64)
        self.bn = nnx.BatchNorm(D, use_running_average=True, **f64)
        self.lin = nnx.Linear(D, D, **f64)

    def __call__(self, x):
        return self.bn(self.gn(self.lin(self.rms(self.ln(x)))))


class NnxTied(nnx.Module):
    """An embedding tied to the output logits (``attend``) and an ``nnx.Einsum``."""

    def __init__(self, rngs):
        f64 = dict(param_dtype=jnp.float64, rngs=rngs)
        self.embed = nnx.Embed(7, D, **f64)
        self.proj = nnx.Einsum("btd,dhk->bthk", (D, 2, 2), **f64)

    def __call__(self, ids):
        h = self.proj(self.embed(ids)).reshape((*ids.shape, D))
        return self.embed.attend(jnp.tanh(h))


class NnxDropout(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


def _randomized(model):
    """Every param drawn afresh (Flax initialises scales to 1 and biases to 0)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: normal(*a.shape) if a.dtype == jnp.float64 else a, state)
    return nnx.merge(graphdef, state)


def _sum_sq(y):
    return jnp.sum(jnp.tanh(y) ** 2, axis=tuple(range(1, y.ndim)))


def test_nnx_norm_layers():
    model = _randomized(NnxNorms(nnx.Rngs(0)))
    loss, params = jaxlinear.nnx.per_example_loss(model, _sum_sq)
    check(loss, params, normal(N, T, D))


def test_nnx_tied_embedding_attend():
    model = _randomized(NnxTied(nnx.Rngs(0)))
    loss, params = jaxlinear.nnx.per_example_loss(model, _sum_sq)
    report = check(loss, params, jnp.asarray(rng.integers(0, 7, size=(N, T))))
    table = next(r for r in report if "embedding" in r.leaf)
    assert table.detail.startswith("tied: 2 calls"), str(report)  # the lookup and attend


def test_nnx_dropout_in_training_mode():
    """Each example's mask is the plain step's: the reference is ``jacrev`` of the batched
    loss (one draw of the masks), and the unclipped sum is the plain gradient."""
    model = _randomized(NnxDropout(nnx.Rngs(0)))
    loss, params = jaxlinear.nnx.per_example_loss(model, _sum_sq)
    x = normal(N, T, D)
    per_example = jax.jacrev(loss)(params, x)
    assert np.any(np.asarray(jax.tree.leaves(per_example)[0]) == 0)  # a mask did drop
    check(loss, params, x, per_example=per_example)


# -- Equinox ------------------------------------------------------------------------------

eqx = pytest.importorskip("equinox")


class EqxBlock(eqx.Module):
    """A per-example model (run under ``jax.vmap``): Linear, LayerNorm, a class token."""

    lin: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    cls: jax.Array

    def __init__(self, key):
        a, b = jax.random.split(key)
        self.lin = eqx.nn.Linear(D, D, key=a, dtype=jnp.float64)
        self.norm = eqx.nn.LayerNorm(D, dtype=jnp.float64)
        self.head = eqx.nn.Linear(D, 2, key=b, dtype=jnp.float64)
        self.cls = jnp.zeros((1, D))

    def __call__(self, x):  # x: (T, D)
        h = jnp.concatenate([self.cls, x], axis=0)
        h = jax.vmap(lambda t: self.norm(jax.nn.gelu(self.lin(t))))(h)
        return self.head(h[0])


def test_equinox_model_under_vmap():
    model = EqxBlock(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(lambda a: normal(*a.shape), params)

    def loss(params, x):
        model = eqx.combine(params, static)
        return jax.vmap(lambda x: jnp.sum(jnp.sin(model(x))))(x)

    report = check(loss, params, normal(N, T, D))
    assert report.counts().get("rank_one", 0) + report.counts().get("gram", 0) >= 1


class EqxTied(eqx.Module):
    """A per-example model: ``Embedding`` (``weight[i]`` under ``jax.vmap``: a gather of
    clamped rows) tied to the logits, one ``Linear`` used twice."""

    embed: eqx.nn.Embedding
    lin: eqx.nn.Linear

    def __init__(self, key):
        a, b = jax.random.split(key)
        self.embed = eqx.nn.Embedding(7, D, key=a, dtype=jnp.float64)
        self.lin = eqx.nn.Linear(D, D, use_bias=False, key=b, dtype=jnp.float64)

    def __call__(self, ids):  # ids: (T,)
        h = jax.vmap(lambda t: self.lin(jnp.tanh(self.lin(self.embed(t)))))(ids)
        return jnp.tanh(h) @ self.embed.weight.T


def test_equinox_tied_embedding_under_vmap():
    params, static = eqx.partition(EqxTied(jax.random.key(0)), eqx.is_array)
    params = jax.tree.map(lambda a: normal(*a.shape), params)

    def loss(params, ids):
        return jax.vmap(lambda i: _sum_sq(eqx.combine(params, static)(i)[None])[0])(ids)

    ids = jnp.asarray(rng.integers(-9, 9, size=(N, T)))  # (Equinox wraps once, clamps the rest)
    report = check(loss, params, ids)
    assert [r.detail.split(",")[0] for r in report] == ["tied: 2 calls"] * 2, str(report)
    assert report[0].op == "embed+dot_general", str(report)


def test_equinox_dropout_with_per_example_keys():
    """Equinox's dropout under ``jax.vmap`` with one key per example (as its ViT example
    trains): the keys are data, so each example's mask is the plain step's."""
    lin = eqx.nn.Linear(D, D, key=jax.random.key(1), dtype=jnp.float64)
    drop = eqx.nn.Dropout(0.3)
    params = jax.tree.map(lambda a: normal(*a.shape), eqx.filter(lin, eqx.is_array))

    def loss(params, x, keys):
        model = eqx.combine(params, lin)
        return jax.vmap(lambda x, k: jnp.sum(jnp.tanh(drop(model(x), key=k)) ** 2))(x, keys)

    x, keys = normal(N, D), jax.random.split(jax.random.key(3), N)
    per_example = jax.jacrev(loss)(params, x, keys)
    assert np.any(np.asarray(per_example.bias) == 0)  # a mask did drop
    check(loss, params, x, keys, per_example=per_example)


def test_position_table_read_by_embed_with_broadcast_ids():
    """``embed(pos, broadcast_to(arange(T), (n, T)))``: the ids are example-free, so the
    table takes a per-example copy; copy ``i`` reads row ``i`` of the ids only (the program
    has no ``n·n·T·d`` buffer), values against ``vmap(grad)``."""
    n, T, V, d = 4, 3, 5, 6
    params = {"tok": normal(V, d), "pos": normal(T, d), "scale": 1 + normal(d), "w": normal(d)}
    ids = jnp.asarray(np.random.default_rng(3).integers(0, V, (n, T)))

    def loss(p, ids):
        positions = jnp.broadcast_to(jnp.arange(T, dtype=ids.dtype), ids.shape)
        h = jaxlinear.embed(p["tok"], ids) + jaxlinear.embed(p["pos"], positions)
        h = layer_norm(h, p["scale"], 0.0)
        return jnp.sum(jnp.tanh(h) @ p["w"], axis=1)

    report = check(loss, params, ids)
    assert {r.leaf: r.route for r in report}["params['pos']"] == "bias", str(report)
    hlo = jax.jit(lambda p, ids: jaxlinear.clipped_grad(loss, p, ids, clip_norm=1.0)).lower(
        params, ids).as_text()  # fmt: skip
    assert f"{n}x{n}x{T}x{d}x" not in hlo and f"{n * n * T}x" not in hlo
