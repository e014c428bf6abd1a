"""Per-example norms and clipping for every op of the family, and for Flax NNX models.

Each case is a small model written twice: with jaxlinear's op (under test) and with the
plain ``lax``/``jnp`` op (the reference, differentiated by JAX one example at a time,
``vmap(grad)`` over batches of one, in float64). Every case runs with
``fallback="raise"``, so a parameter that silently took the fallback fails the test, and
checks the route report. The ghost and the per-example routes are both forced on each op
(``ghost.gram_pays`` patched) where the shapes alone would pick one.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_per_example import assert_rel_close, reference, reference_clipped, reference_norms

import jaxlinear
from jaxlinear._src import ghost

N = 4  # examples
rng = np.random.default_rng(17)


def normal(*shape):
    return jnp.asarray(rng.normal(size=shape))


def check(loss, plain, params, *args, routes, full=False):
    """Clipped gradients (clip active for half the batch) and norms against ``vmap(grad)``
    of ``plain``; the route report against ``routes``. ``full``: also
    ``per_example_grad_norms`` alone and an inactive clip (the plain summed gradient)."""
    per_example = reference(plain, params, *args)
    expected = reference_norms(per_example)
    clip = float(np.median(expected))
    big = 10 * float(expected.max())  # clipping inactive: the plain gradient of the sum

    @jax.jit
    def run(params, args):
        out = [jaxlinear.clipped_grad(loss, params, *args, clip_norm=clip, fallback="raise")]
        if full:
            out.append(jaxlinear.clipped_grad(loss, params, *args, clip_norm=big))
            out.append(jaxlinear.per_example_grad_norms(loss, params, *args, fallback="raise"))
        return out

    (grads, norms), *more = run(params, args)
    assert_rel_close(norms, expected, 1e-10)
    assert_rel_close(grads, reference_clipped(per_example, clip)[0], 1e-10)
    if full:
        (unclipped, _), norms2 = more
        assert_rel_close(norms2, expected, 1e-10)
        total = jax.grad(lambda p: jnp.sum(plain(p, *args)))(params)
        assert_rel_close(unclipped, total, 1e-10)
    report = jaxlinear.per_example_routes(loss, params, *args)
    assert report.counts() == routes, str(report)


def routes_and_bindings(custom_vjp, dual):
    """Each route once and each binding once: the ghost route on the custom_vjp binding,
    the per-example route on the dual one (the route is chosen alike for both)."""
    return pytest.mark.parametrize(
        "route,op", [("gram", custom_vjp), ("per_example", dual)], ids=["gram", "per_example"]
    )


def bindings(custom_vjp, dual):
    return pytest.mark.parametrize("op", [custom_vjp, dual], ids=["custom_vjp", "dual"])


def force(monkeypatch, route):
    """Make every ghost rule take (``"gram"``) or decline (``"per_example"``) its route."""
    monkeypatch.setattr(ghost, "gram_pays", lambda T, d, p: route == "gram")
    if route == "gram":  # before it, the matmul ops' kept w̄_i where they fit (matmul_route)
        monkeypatch.setattr(ghost, "keeps", lambda n, w_size, held: False)


# -- convolutions ------------------------------------------------------------------------

CONVS = {
    # name: (x shape, kernel (*k, C_in/groups, C_out), conv kwargs)
    "1d_stride_valid": ((N, 9, 2), (3, 2, 3), dict(strides=2, padding="VALID")),
    "2d_dilated_groups": ((N, 6, 5, 4), (2, 3, 2, 6), dict(dilation=(2, 1), groups=2)),
    "3d_padded": ((N, 4, 3, 4, 2), (2, 2, 2, 2, 3), dict(padding=((1, 0), (0, 1), (1, 1)))),
}


@pytest.mark.parametrize("case", list(CONVS))
@routes_and_bindings(jaxlinear.conv, jaxlinear.dual_conv)
def test_conv(case, route, op, monkeypatch):
    force(monkeypatch, route)
    x_shape, k_shape, kw = CONVS[case]
    params = jaxlinear.Params(normal(*k_shape), normal(k_shape[-1]))
    x = normal(*x_shape)
    spatial = len(x_shape) - 2
    strides = kw.get("strides", 1)
    padding = kw.get("padding", "SAME")
    groups = kw.get("groups", 1)
    dilation = kw.get("dilation", 1)

    def loss(p, x):
        return jnp.sum(jnp.tanh(op(p, x, **kw)), axis=tuple(range(1, spatial + 2)))

    def plain(p, x):
        y = lax.conv_general_dilated(
            x,
            p.W,
            (strides,) * spatial,
            padding,
            rhs_dilation=dilation if isinstance(dilation, tuple) else (dilation,) * spatial,
            dimension_numbers=_specs(spatial),
            feature_group_count=groups,
        )
        y = y + jnp.broadcast_to(p.b, y.shape)
        return jnp.sum(jnp.tanh(y), axis=tuple(range(1, spatial + 2)))

    check(loss, plain, params, x, routes={route: 1, "bias": 1}, full=case == "3d_padded")


def _specs(spatial):
    s = "DHW"[-spatial:]
    return (f"N{s}C", f"{s}IO", f"N{s}C")


def test_conv_general_dilated_nchw_and_lhs_dilation(op=jaxlinear.dual_conv_general_dilated):
    """NCHW / OIHW layouts, input dilation and strides: the examples on lhs's batch axis."""
    x, w = normal(N, 2, 5, 4), normal(3, 2, 2, 3)
    args = ((2, 1), ((1, 1), (0, 1)), (2, 1), (1, 2), ("NCHW", "OIHW", "NCHW"))

    def loss(w, x, conv=op):
        return jnp.sum(jnp.sin(conv(x, w, *args)), axis=(1, 2, 3))

    check(loss, functools.partial(loss, conv=lax.conv_general_dilated), w, x,
          routes={"per_example": 1})  # fmt: skip


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
def test_conv_patches_every_spatial_argument(keep, monkeypatch):
    """conv's patches (padding and strided slices) under every spatial argument at once:
    NCHW / OIHW, strides, a negative padding, input and kernel dilation, feature groups;
    the clipped sum from kept ``w̄_i`` and from ``B_wᵀ(c ⊙ g; x)``."""
    force(monkeypatch, "per_example")
    monkeypatch.setattr(ghost, "keeps", lambda n, size, held: keep)
    x, w = normal(N, 4, 5, 6), normal(6, 2, 2, 3)  # 2 groups of 2 -> 3 channels
    args = ((2, 1), ((-1, 2), (1, 0)), (2, 1), (1, 2), ("NCHW", "OIHW", "NCHW"))

    def loss(w, x, conv=jaxlinear.conv_general_dilated):
        y = conv(x, w, *args, feature_group_count=2)
        return jnp.sum(jnp.sin(y), axis=(1, 2, 3))

    check(loss, functools.partial(loss, conv=lax.conv_general_dilated), w, x,
          routes={"per_example": 1})  # fmt: skip


@pytest.mark.parametrize("transpose_kernel", [False, True])
@routes_and_bindings(jaxlinear.conv_transpose, jaxlinear.dual_conv_transpose)
def test_conv_transpose(transpose_kernel, route, op, monkeypatch):
    force(monkeypatch, route)
    x, w = normal(N, 4, 3, 2), normal(*((3, 2, 3, 2) if transpose_kernel else (3, 2, 2, 3)))
    kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=transpose_kernel)

    def loss(w, x, conv=op):
        return jnp.sum(jnp.sin(conv(x, w, (2, 1), "SAME", **kw)), axis=(1, 2, 3))

    check(loss, functools.partial(loss, conv=lax.conv_transpose), w, x, routes={route: 1})


# -- dot_general, einsum -----------------------------------------------------------------


@routes_and_bindings(jaxlinear.dot_general, jaxlinear.dual_dot_general)
def test_dot_general_several_contracting_axes(route, op, monkeypatch):
    force(monkeypatch, route)
    x, w = normal(N, 2, 4, 3), normal(3, 2, 5)
    dims = (((3, 1), (0, 1)), ((), ()))

    def loss(w, x, dot=op):
        return jnp.sum(jnp.sin(dot(x, w, dims)), axis=(1, 2))

    check(loss, functools.partial(loss, dot=lax.dot_general), w, x, routes={route: 1})


ATTENTION = {
    # name: (subscripts, x shape, w shape, route or None: the one forced)
    "qkv": ("btd,dhk->bthk", (N, 5, 6), (6, 2, 3), None),
    "out": ("bthk,hkd->btd", (N, 5, 2, 3), (2, 3, 6), None),
    # a letter of x summed out alone, at a non-leading position; a letter of w alone
    "x_alone": ("bst,tu->bu", (N, 2, 3), (3, 4), "rank_one"),
    "w_alone": ("bt,tuv->bu", (N, 3), (3, 4, 2), "rank_one"),
}


@pytest.mark.parametrize("case", list(ATTENTION))
@routes_and_bindings(jaxlinear.einsum, jaxlinear.dual_einsum)
def test_einsum(case, route, op, monkeypatch):
    subscripts, x_shape, w_shape, fixed = ATTENTION[case]
    if fixed and route == "per_example":
        pytest.skip("one example row (T = 1): the rank-one route whatever is forced")
    force(monkeypatch, route)
    x, w = normal(*x_shape), normal(*w_shape)
    rank = len(subscripts.split("->")[1])

    def loss(w, x, einsum=op):
        return jnp.sum(jnp.sin(einsum(subscripts, x, w)), axis=tuple(range(1, rank)))

    check(loss, functools.partial(loss, einsum=jnp.einsum), w, x, routes={fixed or route: 1})


# -- embed -------------------------------------------------------------------------------


@routes_and_bindings(jaxlinear.embed, jaxlinear.dual_embed)
def test_embed_repeated_and_out_of_range_ids(route, op, monkeypatch):
    force(monkeypatch, route)
    table = normal(7, 3)
    ids = jnp.asarray(rng.integers(-7, 7, size=(N, 5)))
    ids = ids.at[0, :3].set(2).at[1, 1].set(-5).at[1, 2].set(2).at[2, 0].set(9)  # 9: out

    def loss(table, ids, lookup=op):
        return jnp.sum(jnp.sin(lookup(table, ids)), axis=(1, 2))

    def plain(table, ids):  # out-of-range ids read zeros and get no gradient
        rows = jnp.where(((ids >= -7) & (ids < 7))[..., None], table[jnp.clip(ids, -7, 6)], 0)
        return jnp.sum(jnp.sin(rows), axis=(1, 2))

    check(loss, plain, table, ids, routes={route: 1})


# -- a user's own op: the generic route ----------------------------------------------------


def _corr(x, w, *, preferred_element_type):  # y[n, i] = Σ_k x[n, i + k] w[k]
    m = x.shape[1] - w.shape[0] + 1
    return sum(x[:, k : k + m] * w[k] for k in range(w.shape[0]))


def _corr_tx(g, w, x_aval, *, preferred_element_type):
    return jax.vmap(lambda g: jnp.convolve(g, w, mode="full"))(g)


def _corr_tw(g, x, w_aval, *, preferred_element_type):
    return jnp.sum(jax.vmap(lambda x, g: jnp.correlate(x, g, mode="valid"))(x, g), axis=0)


CORR = jaxlinear.bilinear_op("test_batched_corr", _corr, _corr_tx, _corr_tw)


@bindings(CORR.custom_vjp, CORR.dual)
def test_user_op_takes_the_generic_route(op):
    w, b, x = normal(3), normal(6), normal(N, 8)  # y: (N, 6)

    def loss(p, x):
        return jnp.sum(jnp.sin(op(x, p[0], p[1])), axis=1)

    def plain(p, x):
        y = _corr(x, p[0], preferred_element_type=None)
        return jnp.sum(jnp.sin(y + jnp.broadcast_to(p[1], y.shape)), axis=1)

    check(loss, plain, (w, b), x, routes={"per_example": 1, "bias": 1})


# -- the dense layer: mixed precision, one trace -----------------------------------------


def test_bf16_compute_norms_are_float32_within_a_stated_bound():
    """``compute_dtype=bfloat16`` with float32 params: norms come back in float32, summed
    from the bf16 cotangents in float32. The reference runs the same bf16 products in plain
    jnp (``preferred_element_type=float32``, one rounding to bf16) under ``vmap(grad)``; the
    two differ only by the rounding of the accumulated norms, so 2⁻⁸ (one bf16 ulp, the
    precision of every ``G``) relative to the largest norm bounds them."""
    layers = [jaxlinear.init(jax.random.key(i), a, b) for i, (a, b) in enumerate([(6, 5), (5, 3)])]
    x = jnp.asarray(rng.normal(size=(8, 2, 6)), jnp.float32)
    bf16 = jnp.bfloat16

    def model(layers, x, layer):
        for i, p in enumerate(layers):
            x = layer(p, x)
            x = jnp.tanh(x) if i == 0 else x
        return jnp.sum(x.astype(jnp.float32) ** 2, axis=(1, 2))

    def plain_layer(p, x):
        y = jnp.einsum("...i,io->...o", x.astype(bf16), p.W.astype(bf16),
                       preferred_element_type=jnp.float32)  # fmt: skip
        return (y + jnp.broadcast_to(p.b, y.shape)).astype(bf16)

    loss = functools.partial(model, layer=functools.partial(jaxlinear.linear, compute_dtype=bf16))
    norms = jax.jit(lambda p, x: jaxlinear.per_example_grad_norms(loss, p, x, fallback="raise"))(
        layers, x
    )
    assert norms.dtype == jnp.float32
    want = reference_norms(reference(functools.partial(model, layer=plain_layer), layers, x))
    assert np.max(np.abs(np.asarray(norms) - want)) <= 2.0**-8 * want.max()


def test_jitted_step_traces_once():
    layers = jaxlinear.init_mlp(jax.random.key(0), [4, 6, 2])
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def loss(layers, x):
        return jnp.sum(jaxlinear.mlp(layers, x) ** 2, axis=1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(layers, x):
        return jaxlinear.clipped_grad(loss, layers, x, clip_norm=1.0, fallback="raise")

    for _ in range(3):
        step(layers, x)


# -- Flax NNX models with jaxlinear's ops injected -----------------------------------------

nnx = pytest.importorskip("flax.nnx")


def _nnx_loss(model):
    """``(loss_fn, params)`` with params an ``nnx.State`` (``nnx.split``): cross entropy."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x, labels):
        logits = nnx.merge(graphdef, params, rest)(x)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]

    return loss, params


class CNN(nnx.Module):
    def __init__(self, rngs):
        f64 = dict(param_dtype=jnp.float64, rngs=rngs)
        self.conv1 = nnx.Conv(2, 4, (3, 3), **f64)
        self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, **f64)
        self.head = nnx.Linear(4 * 9, 3, **f64)

    def inject(self, conv, dot):
        self.conv1.conv_general_dilated = self.conv2.conv_general_dilated = conv
        self.head.dot_general = dot

    def __call__(self, x):
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(h.reshape(h.shape[0], -1))


class Block(nnx.Module):
    """A transformer block: einsum projections, attention, LayerNorm (fallback), MLP."""

    def __init__(self, rngs, d=6, heads=2, k=3):
        f64 = dict(param_dtype=jnp.float64, rngs=rngs)
        # No bias on k: softmax is invariant to it (its gradient is zero up to rounding).
        self.q, self.k, self.v = (
            nnx.Einsum("btd,dhk->bthk", (d, heads, k), bias, **f64)
            for bias in ((heads, k), None, (heads, k))
        )
        self.out = nnx.Einsum("bthk,hkd->btd", (heads, k, d), (d,), **f64)
        self.norm = nnx.LayerNorm(d, **f64)
        self.mlp = nnx.Linear(d, d, **f64)
        self.head = nnx.Linear(d, 3, **f64)

    def inject(self, einsum, dot):
        for m in (self.q, self.k, self.v, self.out):
            m.einsum_op = einsum
        self.mlp.dot_general = self.head.dot_general = dot

    def __call__(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k), axis=-1)
        x = x + self.out(jnp.einsum("bhts,bshk->bthk", a, v))
        x = x + jnp.tanh(self.mlp(self.norm(x)))
        return self.head(x.mean(axis=1))


NNX = {
    # name: (model, x shape, ops (custom_vjp), ops (dual), routes)
    "cnn": (CNN, (N, 6, 6, 2), (jaxlinear.conv_general_dilated, jaxlinear.dot_general),
            (jaxlinear.dual_conv_general_dilated, jaxlinear.dual_dot_general),
            {"per_example": 2, "rank_one": 1, "bias": 3}),
    "block": (Block, (N, 5, 6), (jaxlinear.einsum, jaxlinear.dot_general),
              (jaxlinear.dual_einsum, jaxlinear.dual_dot_general),
              {"per_example": 5, "rank_one": 1, "bias": 6, "broadcast": 1}),
}  # fmt: skip


@functools.cache
def _model(cls):
    """One model per class, its params drawn with NumPy (Flax's initialisers compile)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
    state = jax.tree.map(lambda a: normal(*a.shape) / np.sqrt(max(a.shape[0], 1)), state)
    return nnx.merge(graphdef, state)


def _with_ops(cls, ops):
    model = nnx.clone(_model(cls))
    model.inject(*ops)
    return model


@pytest.mark.parametrize("binding", ["custom_vjp", "dual"])
@pytest.mark.parametrize("name", list(NNX))
def test_nnx_models_with_injected_ops(name, binding):
    """Every leaf is structural: kernels, the biases Flax adds after the op, LayerNorm's
    scale (a per-example copy) and bias."""
    cls, x_shape, custom_vjp_ops, dual_ops, routes = NNX[name]
    ops = custom_vjp_ops if binding == "custom_vjp" else dual_ops
    loss, params = _nnx_loss(_with_ops(cls, ops))
    plain_ops = (lax.conv_general_dilated if cls is CNN else jnp.einsum), lax.dot_general
    plain, _ = _nnx_loss(_with_ops(cls, plain_ops))
    x, labels = normal(*x_shape), jnp.asarray(rng.integers(0, 3, size=N))
    # (The full run, an inactive clip too, once: on the CNN; it compiles the model twice more.)
    full = binding == "custom_vjp" and cls is CNN
    check(loss, plain, params, x, labels, routes=routes, full=full)
