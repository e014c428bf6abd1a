"""per_example_grad_norms and clipped_grad against vmap(grad) of a plain-jnp model.

The reference is independent of jaxlinear: the same MLP written as ``x @ W + b`` in jnp,
differentiated by JAX for one example at a time (``jax.vmap(jax.grad(...))`` over a batch
of one), in float64.
"""

import functools
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear


def plain_mlp(layers, x, activation=jnp.tanh):
    """``x @ W + b`` per layer in jnp (bias broadcast explicitly), activation between."""
    for i, p in enumerate(layers):
        x = x @ p.W
        if p.b is not None:
            x = x + p.b.reshape((1,) * (x.ndim - 1) + (-1,))
        if i < len(layers) - 1:
            x = activation(x)
    return x


def per_example_loss(model):
    """Squared error per example: ``(n, ..., d_in), (n, ..., d_out) -> (n,)``."""

    def loss(params, x, y):
        err = model(params, x) - y
        return jnp.sum(err**2, axis=tuple(range(1, err.ndim)))

    return loss


PLAIN_LOSS = per_example_loss(plain_mlp)  # one object: reference() compiles once per shape


@functools.partial(jax.jit, static_argnums=0)
def reference(loss, params, *args):
    """Per-example gradients (vmap of grad over batches of one): ``(n, *leaf.shape)`` leaves."""

    def one(*example):
        return jax.grad(lambda p: loss(p, *(a[None] for a in example))[0])(params)

    return jax.vmap(one)(*args)


def reference_norms(per_example_grads):
    """``(n,)`` norms of the per-example gradients (NumPy)."""
    leaves = [np.asarray(a) for a in jax.tree.leaves(per_example_grads)]
    n = leaves[0].shape[0]
    return np.sqrt(sum(np.sum(a.reshape(n, -1) ** 2, axis=1) for a in leaves))


def reference_clipped(per_example_grads, clip_norm):
    """``Σ_i min(1, C/‖∇ℓ_i‖) ∇ℓ_i`` (NumPy) and the norms."""
    norms = reference_norms(per_example_grads)
    c = np.minimum(1.0, clip_norm / norms)
    return jax.tree.map(lambda a: np.tensordot(c, np.asarray(a), axes=1), per_example_grads), norms


def assert_rel_close(actual, expected, rtol):
    """Same structure, shapes and dtypes; max abs difference ≤ rtol · max |expected|."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        assert np.max(np.abs(a - e)) <= rtol * np.max(np.abs(e)), (a, e)


def setup(sizes, x_shape, *, bias=True, dtype=np.float64, seed=0):
    """An MLP's ``Params`` (nonzero biases, so a wrong bias term would show), ``x``, ``y``."""
    rng = np.random.default_rng(seed)
    layers = [
        jaxlinear.Params(
            jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), dtype),
            jnp.asarray(rng.normal(size=d_out) * 0.1, dtype) if bias else None,
        )
        for d_in, d_out in itertools.pairwise(sizes)
    ]
    x = rng.normal(size=(*x_shape, sizes[0])).astype(dtype)
    y = rng.normal(size=(*x_shape, sizes[-1])).astype(dtype)
    return layers, jnp.asarray(x), jnp.asarray(y)


# -- against the reference, float64 ----------------------------------------------------

CASES = {
    # name: (sizes, x shape without d_in, the sequence route of the first layer)
    "2d": ([3, 5, 4], (6,), "rank_one"),
    "3d_gram": ([6, 5, 4], (4, 2), "gram"),  # T=2: 2·(6+5) = 22 ≤ 30
    "3d_per_example": ([3, 2, 2], (4, 5), "per_example"),  # T=5: 5·(3+2) = 25 > 6
    # T=2: 4·8 > 2·(4+8) (w̄_i not kept), 2·2² ≤ 32: the Gram; the clipped sum scales the
    # smaller operand, x (4 < 8) here and g (3 < 8) in the next layer
    "3d_gram_widening": ([4, 8, 3], (4, 2), "gram"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_norms_and_clipped_grad_match_vmap_grad(case):
    sizes, x_shape, route = CASES[case]
    for bias in (True, False):
        layers, x, y = setup(sizes, x_shape, bias=bias)
        for layer in (jaxlinear.linear, jaxlinear.dual_linear):
            model = functools.partial(jaxlinear.mlp, activation=jnp.tanh, layer=layer)
            report = jaxlinear.per_example_routes(per_example_loss(model), layers, x, y)
            y_shape = (*x.shape[:-1], sizes[1])
            assert report[0] == ("params[0].W", route, "affine", f"x {x.shape} -> y {y_shape}")
        per_example = reference(PLAIN_LOSS, layers, x, y)
        expected = reference_norms(per_example)
        clip_norm = float(np.median(expected))  # active for some examples, not for others
        assert expected.min() < clip_norm < expected.max()
        want, _ = reference_clipped(per_example, clip_norm)

        @jax.jit
        def run(layers, x, y, clip_norm):
            out = {}
            for layer in (jaxlinear.linear, jaxlinear.dual_linear):
                model = lambda p, x, layer=layer: jaxlinear.mlp(  # noqa: E731
                    p, x, activation=jnp.tanh, layer=layer
                )
                loss = per_example_loss(model)
                norms = jaxlinear.per_example_grad_norms(loss, layers, x, y)
                grads, norms2 = jaxlinear.clipped_grad(loss, layers, x, y, clip_norm=clip_norm)
                out[layer.__name__] = norms, norms2, grads
            return out

        for norms, norms2, grads in run(layers, x, y, clip_norm).values():
            assert_rel_close(norms, expected, 1e-10)
            assert_rel_close(norms2, expected, 1e-10)
            assert_rel_close(grads, want, 1e-10)
            assert jax.tree.structure(grads) == jax.tree.structure(layers)


def test_clip_inactive_is_the_plain_gradient_and_active_bounds_every_norm():
    layers, x, y = setup([3, 4, 2], (5,))
    loss = per_example_loss(lambda p, x: jaxlinear.mlp(p, x, activation=jnp.tanh))
    clipped = jax.jit(lambda *a, clip_norm: jaxlinear.clipped_grad(loss, *a, clip_norm=clip_norm))
    total = jax.jit(jax.grad(lambda p: jnp.sum(PLAIN_LOSS(p, x, y))))(layers)
    grads, norms = clipped(layers, x, y, clip_norm=1e6)
    assert_rel_close(grads, total, 1e-12)
    norms = np.asarray(norms)
    # every factor active: each c_i ∇ℓ_i has norm exactly C
    per_example = reference(PLAIN_LOSS, layers, x, y)
    clip_norm = 0.5 * float(norms.min())
    grads, _ = clipped(layers, x, y, clip_norm=clip_norm)
    unit = jax.tree.map(lambda a: np.tensordot(clip_norm / norms, a, axes=1), per_example)
    assert_rel_close(grads, unit, 1e-10)


def test_zero_gradient_example_is_safe():
    layers, x, y = setup([3, 2], (4,), bias=False)
    x, y = np.array(x), np.array(y)
    x[0], y[0] = 0.0, 0.0  # example 0: zero input, zero residual
    loss = per_example_loss(lambda p, x: jaxlinear.mlp(p, x))
    run = jax.jit(lambda *a: jaxlinear.clipped_grad(loss, *a, clip_norm=0.1))
    grads, norms = run(layers, x, y)
    assert float(norms[0]) == 0.0
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(grads))


# -- jit, float32 ----------------------------------------------------------------------


@pytest.mark.parametrize("x_shape", [(8,), (4, 3)], ids=["2d", "3d"])
def test_jit_float32_traces_once(x_shape):
    layers, x, y = setup([4, 6, 3], x_shape, dtype=np.float32)
    loss = per_example_loss(lambda p, x: jaxlinear.mlp(p, x, activation=jnp.tanh))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(layers, x, y, clip_norm):
        return jaxlinear.clipped_grad(loss, layers, x, y, clip_norm=clip_norm)

    chex.clear_trace_counter()
    for scale in (1.0, 2.0):
        grads, norms = step(layers, scale * x, y, jnp.float32(0.5))
        assert norms.dtype == jnp.float32
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(grads))
        args64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (layers, scale * x, y))
        per_example = reference(PLAIN_LOSS, *args64)
        want, want_norms = reference_clipped(per_example, 0.5)
        assert_rel_close(norms, want_norms.astype(np.float32), 1e-5)
        assert_rel_close(grads, jax.tree.map(lambda a: a.astype(np.float32), want), 1e-5)


# -- params that do not reach the loss through one layer call ----------------------------


def plain_linear(params, x):
    """``x @ W + b`` in jnp for ``Params`` or a dict (``b`` may be a ``(1, d_out)`` row)."""
    W, b = (params.W, params.b) if isinstance(params, jaxlinear.Params) else params.values()
    return x @ W + b.reshape((1,) * (x.ndim - 1) + (-1,))


# Each model takes the layer as ``lin``: jaxlinear.linear under test, plain_linear for the
# reference.


def _shared(p, x, lin):  # one leaf used by two layer calls
    return lin(p["square"], jnp.tanh(lin(p["square"], x)))


def _elementwise(p, x, lin):  # a leaf used outside the layers
    return p["scale"] * lin(p["square"], x)


def _both(p, x, lin):  # a leaf used by a layer and outside it
    return lin(p["square"], x) + jnp.sum(p["square"].W ** 2)


def _derived(p, x, lin):  # the layer gets an array computed from a leaf
    return lin(jaxlinear.Params(2.0 * p["square"].W, p["square"].b), x)


def _in_scan(p, x, lin):  # a layer inside lax.scan
    return jax.lax.scan(lambda h, _: (jnp.tanh(lin(p["square"], h)), None), x, None, 2)[0]


def _in_cond(p, x, lin):  # a layer inside lax.cond (whose branches are not entered)
    return jax.lax.cond(p["scale"] > 0, lambda x: lin(p["square"], x), jnp.tanh, x)


def _in_vmap(p, x, lin):  # a layer inside vmap over the examples
    return jax.vmap(lambda v: lin(p["square"], v))(x)


def _flattened(p, x, lin):  # the layer sees (n·T, d): not the examples on axis 0
    return lin(p["square"], x.reshape(-1, 3)).reshape(x.shape)


# name: (model, leaf, its route; or for a fallback, the reason)
OTHER = {
    "shared": (_shared, "params['square'].W", "per_example"),  # summed over the two calls
    "elementwise": (_elementwise, "params['scale']", "broadcast"),
    "both": (_both, "params['square'].W", "broadcast"),
    "derived": (_derived, "params['square'].W", "broadcast"),
    "vmap": (_in_vmap, "params['square'].W", "per_example"),  # w̄_i kept: 4·9 ≤ 4·2·(3 + 3)
    "scan": (_in_scan, "params['square'].W", "per_example"),  # shared by the steps
    "cond": (_in_cond, "params['square'].W", "`cond`"),
    "flattened": (_flattened, "params['square'].W", r"`reshape` \(4, 2, 3\) -> \(8, 3\) merges"),
}
FALLS_BACK = ("cond", "flattened")


def _other_params():
    rng = np.random.default_rng(3)
    params = {
        "square": jaxlinear.Params(
            jnp.asarray(rng.normal(size=(3, 3))), jnp.array([0.1, -0.2, 0.3])
        ),
        "scale": jnp.array(1.5),
        "unused": jnp.ones(2),
    }
    return params, jnp.asarray(rng.normal(size=(4, 2, 3)))


@pytest.mark.parametrize("name", list(OTHER))
def test_other_uses_are_structural_or_fall_back(name):
    model, leaf, reason = OTHER[name]
    params, x = _other_params()

    def loss(p, x, lin=jaxlinear.linear):
        return jnp.sum(jnp.sin(model(p, x, lin)), axis=(1, 2))

    per_example = reference(functools.partial(loss, lin=plain_linear), params, x)
    expected = reference_norms(per_example)
    clip_norm = float(np.median(expected))
    run = jax.jit(lambda p, x: jaxlinear.clipped_grad(loss, p, x, clip_norm=clip_norm))
    grads, norms = run(params, x)
    assert_rel_close(norms, expected, 1e-10)
    assert_rel_close(grads, reference_clipped(per_example, clip_norm)[0], 1e-10)
    assert not np.any(np.asarray(grads["unused"]))
    raising = jax.jit(lambda p, x: jaxlinear.per_example_grad_norms(loss, p, x, fallback="raise"))
    routes = {r.leaf: r.route for r in jaxlinear.per_example_routes(loss, params, x)}
    if name not in FALLS_BACK:  # structural: the same norms with no fallback
        assert routes[leaf] == reason
        assert_rel_close(raising(params, x), expected, 1e-10)
        return
    assert routes[leaf] == "fallback"
    match = rf"per_example_grad_norms: `{re.escape(leaf)}` .*{reason}"
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(raising, params, x)


def test_structural_leaves_need_no_fallback():
    params, x = _other_params()

    def loss(p, x, lin=jaxlinear.linear):
        return jnp.sum(lin(p["square"], x) ** 2, axis=(1, 2))

    norms = jaxlinear.per_example_grad_norms(loss, params, x, fallback="raise")  # no error
    expected = reference_norms(reference(functools.partial(loss, lin=plain_linear), params, x))
    assert_rel_close(norms, expected, 1e-10)


def test_dict_params_and_row_bias():
    rng = np.random.default_rng(5)
    params = {"W": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(1, 4)))}
    x = jnp.asarray(rng.normal(size=(5, 3)))

    def loss(p, x, lin=jaxlinear.linear):
        return jnp.sum(jnp.tanh(lin(p, x)), axis=1)

    per_example = reference(functools.partial(loss, lin=plain_linear), params, x)
    expected = reference_norms(per_example)
    clip_norm = float(np.median(expected))
    run = jax.jit(
        lambda p, x: jaxlinear.clipped_grad(loss, p, x, clip_norm=clip_norm, fallback="raise")
    )
    grads, norms = run(params, x)
    assert_rel_close(norms, expected, 1e-10)
    assert_rel_close(grads, reference_clipped(per_example, clip_norm)[0], 1e-10)


# -- bad input -------------------------------------------------------------------------


def test_bad_input():
    layers, x, y = setup([3, 2], (4,))
    loss = per_example_loss(lambda p, x: jaxlinear.mlp(p, x))
    f, c = jaxlinear.per_example_grad_norms, jaxlinear.clipped_grad
    with pytest.raises(
        ValueError,
        match=r"per_example_grad_norms: `loss_fn` must return per-"
        r"example losses of shape \(4,\) .* got shape \(\) \(a scalar",
    ):
        f(lambda *a: jnp.sum(loss(*a)), layers, x, y)
    wrong_length = r"clipped_grad: `loss_fn` .* shape \(4,\) .* got shape \(2,\)"
    with pytest.raises(ValueError, match=wrong_length):
        c(lambda *a: loss(*a)[:2], layers, x, y, clip_norm=1.0)
    with pytest.raises(TypeError, match=r"per_example_grad_norms: `loss_fn` must return one array"):
        f(lambda *a: (loss(*a), 0.0), layers, x, y)
    with pytest.raises(
        ValueError,
        match=r"per_example_grad_norms: `args\[1\]` has leading size 3 "
        r"\(shape \(3, 2\)\) but `args\[0\]` has 4 \(shape \(4, 3\)\)",
    ):
        f(loss, layers, x, np.asarray(y)[:3])
    with pytest.raises(ValueError, match=r"per_example_grad_norms: `args` holds no arrays"):
        f(lambda p: jnp.zeros(4), layers)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        match = rf"clipped_grad: `clip_norm` must be a finite number > 0, got {bad}"
        with pytest.raises(ValueError, match=match):
            c(loss, layers, x, y, clip_norm=bad)
    with pytest.raises(ValueError, match=r"clipped_grad: `clip_norm` must be a scalar, got shape"):
        c(loss, layers, x, y, clip_norm=jnp.ones(2))
    with pytest.raises(ValueError, match=r"per_example_grad_norms: `fallback` must be one of"):
        f(loss, layers, x, y, fallback="ignore")
