"""Per-example rules on every layout they accept, through the public API only.

Each hypothesis example builds a few independent layers (drawn layouts) into one loss
``ℓ_i = Σ_layers ⟨sin(y_layer)_i, R_layer⟩`` (``R`` a fixed random readout, so a permuted
or misplaced axis changes the numbers) and checks ``clipped_grad`` (clip active for part of
the batch) and ``per_example_grad_norms`` with ``fallback="raise"`` against ``vmap(grad)``
of the same loss written with the plain ``jnp``/``lax`` ops, in float64. Routes are not
pinned by name (the driver is being rewritten): only "structural, not fallback". The
shapes are drawn so that both the ghost and the per-example route occur.

Several layers share one jitted program per example (compilation is the cost here). CI
runs a few examples per test; ``JAXLINEAR_LONG=1`` runs many more.
"""

import functools
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hypothesis_examples as examples
from hypothesis import given
from hypothesis import strategies as st
from jax import lax
from test_per_example import assert_rel_close, reference, reference_clipped, reference_norms

import jaxlinear
from jaxlinear._src import ghost

N = 3  # examples



class Layer:
    """One layer of a drawn case: ``ours(p, x) -> y`` and ``plain(p, x) -> y`` (the
    reference op), its params, its input, where the examples land in ``y`` and a readout."""

    def __init__(self, ours, plain, params, x, y_axis, rng):
        self.ours, self.plain, self.params, self.x, self.y_axis = ours, plain, params, x, y_axis
        shape = list(jax.eval_shape(plain, params, x).shape)
        del shape[y_axis]
        self.readout = jnp.asarray(rng.normal(size=shape))

    def loss(self, op, p, x):
        y = jnp.moveaxis(jnp.sin(op(p, x)), self.y_axis, 0)
        return jnp.sum(y * self.readout[None], axis=tuple(range(1, y.ndim)))


def check(layers, *, extra=None):
    """``extra(params) -> (n,)``: a further term of every example's loss (a regulariser);
    then the leaves it reads may take the fallback (``fallback="vmap"``)."""
    fallback = "raise" if extra is None else "vmap"

    def make(which):
        def loss(params, *xs):
            total = sum(
                layer.loss(getattr(layer, which), p, x)
                for layer, p, x in zip(layers, params, xs, strict=True)
            )
            return total if extra is None else total + extra(params)

        return loss

    loss, plain = make("ours"), make("plain")
    params, xs = [la.params for la in layers], [la.x for la in layers]
    per_example = reference(plain, params, *xs)
    expected = reference_norms(per_example)
    clip = float(np.median(expected))

    @jax.jit
    def run(params, xs):
        grads, norms = jaxlinear.clipped_grad(loss, params, *xs, clip_norm=clip, fallback=fallback)
        return grads, norms, jaxlinear.per_example_grad_norms(loss, params, *xs, fallback=fallback)

    grads, norms, norms2 = run(params, xs)
    assert_rel_close(norms, expected, 1e-10)
    assert_rel_close(norms2, expected, 1e-10)
    assert_rel_close(grads, reference_clipped(per_example, clip)[0], 1e-10)
    report = jaxlinear.per_example_routes(loss, params, *xs)
    if os.environ.get("JAXLINEAR_SHOW_ROUTES"):
        print(report.counts())
    if extra is None:
        assert "fallback" not in report.counts(), str(report)
    return report


# -- einsum: any permutation of the output subscripts --------------------------------------


@st.composite
def einsum_layers(draw):
    """``"e<x letters>,<w letters>-><y letters>"`` with the examples' letter ``e`` first in
    ``x`` (the driver's contract) and anywhere in ``y``; letters of ``x`` and ``y`` (T),
    contracted (d), of ``w`` and ``y`` (p), of ``x`` alone and of ``w`` alone; optionally a
    Flax-style bias added after the op, along one axis of ``y``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    letters = iter(string.ascii_lowercase)
    counts = (("T", 0, 2), ("d", 1, 2), ("p", 1, 2), ("xa", 0, 1), ("wa", 0, 1))
    group = {
        k: "".join(next(letters) for _ in range(draw(st.integers(lo, hi)))) for k, lo, hi in counts
    }
    e = next(letters)
    size = {c: draw(st.integers(1, 3)) for c in "".join(group.values())}
    size[e] = N
    xs = e + "".join(draw(st.permutations(group["T"] + group["d"] + group["xa"])))
    ws = "".join(draw(st.permutations(group["d"] + group["p"] + group["wa"])))
    ys = "".join(draw(st.permutations(e + group["T"] + group["p"])))
    subscripts = f"{xs},{ws}->{ys}"
    y_axis = ys.index(e)
    # a bias along one axis of y other than the examples' (before or after them), or none
    at = draw(st.sampled_from([None, *(i for i in range(len(ys)) if i != y_axis)]))
    w = jnp.asarray(rng.normal(size=[size[c] for c in ws]))
    x = jnp.asarray(rng.normal(size=[size[c] for c in xs]))
    b = None if at is None else jnp.asarray(rng.normal(size=size[ys[at]]))

    def layer(einsum):
        def apply(p, x):
            y = einsum(subscripts, x, p["w"])
            if p.get("b") is None:
                return y
            return y + p["b"].reshape([-1 if i == at else 1 for i in range(y.ndim)])

        return apply

    params = {"w": w} if b is None else {"w": w, "b": b}
    ours = layer(draw(st.sampled_from([jaxlinear.einsum, jaxlinear.dual_einsum])))
    return Layer(ours, layer(jnp.einsum), params, x, y_axis, rng)


@examples(4)
@given(st.lists(einsum_layers(), min_size=3, max_size=3))
def test_einsum_any_output_order(layers):
    check(layers)


# -- dot_general: batch axes shared with the weight ----------------------------------------


@st.composite
def dot_general_layers(draw):
    """``x: (n, ...)`` with 0, 1 or 2 batch axes shared with ``w``, kept and contracted axes,
    all at drawn positions of ``x`` (the examples at 0) and of ``w``; the examples land at
    axis ``len(batch)`` of ``y``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    nb, nk, nc, nwk = draw(st.integers(0, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2)), 1
    roles = ["b"] * nb + ["k"] * nk + ["c"] * nc
    x_roles = ["n", *draw(st.permutations(roles))]
    w_roles = list(draw(st.permutations(["b"] * nb + ["c"] * nc + ["o"] * nwk)))
    sizes = {("b", i): draw(st.integers(1, 3)) for i in range(nb)}
    sizes |= {("c", i): draw(st.integers(1, 3)) for i in range(nc)}
    # the i-th batch (contracted) axis of x pairs with the i-th of w, in a drawn order
    pair_b, pair_c = draw(st.permutations(range(nb))), draw(st.permutations(range(nc)))

    def axes(roles, role, order=None):
        at = [i for i, r in enumerate(roles) if r == role]
        return tuple(at[j] for j in order) if order is not None else tuple(at)

    xb, wb = axes(x_roles, "b"), axes(w_roles, "b", pair_b)
    xc, wc = axes(x_roles, "c"), axes(w_roles, "c", pair_c)

    def shape(roles, batch, contract):
        out = []
        for i, r in enumerate(roles):
            if r == "n":
                out.append(N)
            elif r == "b":
                out.append(sizes[("b", batch.index(i))])
            elif r == "c":
                out.append(sizes[("c", contract.index(i))])
            else:
                out.append(draw(st.integers(2, 3)))
        return out

    x = jnp.asarray(rng.normal(size=shape(x_roles, xb, xc)))
    w = jnp.asarray(rng.normal(size=shape(w_roles, wb, wc)))
    dims = ((xc, wc), (xb, wb))
    op = draw(st.sampled_from([jaxlinear.dot_general, jaxlinear.dual_dot_general]))
    return Layer(
        lambda w, x: op(x, w, dims), lambda w, x: lax.dot_general(x, w, dims), w, x, nb, rng
    )


@examples(4)
@given(st.lists(dot_general_layers(), min_size=3, max_size=3))
def test_dot_general_batch_axes_shared_with_the_weight(layers):
    check(layers)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "not_kept"])
def test_dot_general_one_and_two_shared_batch_axes(keep, monkeypatch):
    """The two layouts the issue names, fixed (not left to the draw); with ``w̄_i`` kept
    (small shapes) and not (the Gram's turn: declined with batch axes)."""
    if not keep:
        monkeypatch.setattr(ghost, "keeps", lambda *a: False)
    rng = np.random.default_rng(1)
    one = (((2,), (1,)), ((1,), (0,)))  # x (n, h, d), w (h, d, k) -> y (h, n, k)
    two = (((1,), (2,)), ((3, 2), (1, 0)))  # x (n, d, j, h), w (j, h, d, k) -> (h, j, n, k)
    cases = [((N, 2, 3), (2, 3, 4), one, 1), ((N, 3, 2, 2), (2, 2, 3, 2), two, 2)]
    layers = []
    for op in (jaxlinear.dot_general, jaxlinear.dual_dot_general):
        for xs, ws, dims, y_axis in cases:
            x, w = jnp.asarray(rng.normal(size=xs)), jnp.asarray(rng.normal(size=ws))
            ours, plain = (functools.partial(_dot, f, dims) for f in (op, lax.dot_general))
            layers.append(Layer(ours, plain, w, x, y_axis, rng))
    check(layers)


def _dot(op, dims, w, x):
    return op(x, w, dims)


# -- convolutions: every layout, groups, strides, dilations --------------------------------


@st.composite
def conv_layers(draw):
    """``conv_general_dilated`` with drawn layouts of x, w and y (2-D: NCHW/NHWC,
    OIHW/HWIO, and 1-D), feature groups, strides, input and kernel dilation, padding."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    spatial = draw(st.sampled_from([1, 2]))
    s = "HW"[-spatial:]
    lhs = draw(st.sampled_from([f"NC{s}", f"N{s}C"]))
    rhs = draw(st.sampled_from([f"OI{s}", f"{s}IO"]))
    out = draw(st.sampled_from([f"NC{s}", f"N{s}C"]))
    groups = draw(st.sampled_from([1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 2)) for _ in s]
    size = [draw(st.integers(3, 5)) for _ in s]
    strides = tuple(draw(st.integers(1, 2)) for _ in s)
    lhs_dil = tuple(draw(st.integers(1, 2)) for _ in s)
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in s)
    padding = draw(st.sampled_from(["SAME", "VALID", tuple((1, 0) for _ in s)]))
    if max(lhs_dil) > 1 and isinstance(padding, str):  # lax: explicit padding only
        padding = tuple((0, 0) if padding == "VALID" else (1, 1) for _ in s)
    x_dims = {"N": N, "C": c_in, **dict(zip(s, size, strict=True))}
    w_dims = {"O": c_out, "I": c_in // groups, **dict(zip(s, kernel, strict=True))}
    x = jnp.asarray(rng.normal(size=[x_dims[c] for c in lhs]))
    w = jnp.asarray(rng.normal(size=[w_dims[c] for c in rhs]))
    args = (strides, padding, lhs_dil, rhs_dil, (lhs, rhs, out))
    op = draw(
        st.sampled_from([jaxlinear.conv_general_dilated, jaxlinear.dual_conv_general_dilated])
    )

    def layer(conv):
        return lambda w, x: conv(x, w, *args, feature_group_count=groups)

    return Layer(layer(op), layer(lax.conv_general_dilated), w, x, out.index("N"), rng)


@examples(5)
@given(st.lists(conv_layers(), min_size=3, max_size=3))
def test_conv_every_layout(layers):
    check(layers)


@st.composite
def conv_transpose_layers(draw):
    """``conv_transpose`` with drawn layouts, strides, kernel dilation, padding and
    ``transpose_kernel``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    lhs = draw(st.sampled_from(["NCHW", "NHWC"]))
    rhs = draw(st.sampled_from(["OIHW", "HWIO"]))
    out = draw(st.sampled_from(["NCHW", "NHWC"]))
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in "HW"]
    strides = tuple(draw(st.integers(1, 2)) for _ in "HW")
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in "HW")
    padding = draw(st.sampled_from(["SAME", "VALID", ((1, 0), (0, 2))]))
    transpose_kernel = draw(st.booleans())
    x_dims = {"N": N, "C": c_in, "H": draw(st.integers(2, 4)), "W": draw(st.integers(2, 4))}
    # transpose_kernel: w holds the forward convolution's kernel, I and O exchanged
    w_dims = {
        "O": c_in if transpose_kernel else c_out,
        "I": c_out if transpose_kernel else c_in,
        "H": kernel[0],
        "W": kernel[1],
    }
    x = jnp.asarray(rng.normal(size=[x_dims[c] for c in lhs]))
    w = jnp.asarray(rng.normal(size=[w_dims[c] for c in rhs]))
    kw = dict(
        rhs_dilation=rhs_dil, dimension_numbers=(lhs, rhs, out), transpose_kernel=transpose_kernel
    )
    op = draw(st.sampled_from([jaxlinear.conv_transpose, jaxlinear.dual_conv_transpose]))

    def layer(conv):
        return lambda w, x: conv(x, w, strides, padding, **kw)

    return Layer(layer(op), layer(lax.conv_transpose), w, x, out.index("N"), rng)


@examples(4)
@given(st.lists(conv_transpose_layers(), min_size=3, max_size=3))
def test_conv_transpose_every_layout(layers):
    check(layers)


# -- embed: one id or several per example; in range, negative, out of range -----------------


def _plain_embed(table, ids):  # out-of-range ids read zeros and send no gradient
    V = table.shape[0]
    inside = (ids >= -V) & (ids < V)
    return jnp.where(inside[..., None], table[jnp.clip(ids, -V, V - 1)], 0)


def test_embed_one_and_several_ids_in_and_out_of_range():
    """``ids: (n,)``, ``(n, 1)`` (T = 1), ``(n, 2)`` against ``(5, 2)`` (the Gram route) and
    ``(n, 7)`` (the per-example route), each with in-range, negative and out-of-range ids
    (one example with every id out of range: a zero gradient), and ``mode="clip"``."""
    rng = np.random.default_rng(2)
    V = 5
    cases = [
        (np.array([1, -2, 7]), "fill"),  # (n,): 7 is out of range
        (np.array([[-6], [4], [0]]), "fill"),  # (n, 1): -6 is out of range
        (np.array([[1, -4], [5, -6], [2, 2]]), "fill"),  # (n, 2): -4 is row 1; example 1 all out
        (
            np.array([[3, -2, 3, 0, 8, -5, 1], [0, 0, 0, 0, 0, 0, -1], [6, 2, -3, 4, 4, 1, 2]]),
            "fill",
        ),  # (n, 7) fmt: skip
        (np.array([[9, -3], [4, 0], [-1, 7]]), "clip"),  # clamped into [0, V): rows 4 and 0
    ]
    layers = []
    for i, (ids, mode) in enumerate(cases):
        op = functools.partial((jaxlinear.embed, jaxlinear.dual_embed)[i % 2], mode=mode)
        plain = _plain_embed if mode == "fill" else _clipped_embed
        table = jnp.asarray(rng.normal(size=(V, 2)))
        layers.append(Layer(op, plain, table, jnp.asarray(ids), 0, rng))
    check(layers)


def _clipped_embed(table, ids):
    return table[jnp.clip(ids, 0, table.shape[0] - 1)]


# -- a structural leaf also used elsewhere in the loss -----------------------------------


def test_leaf_used_by_an_op_and_a_regulariser():
    """A weight, an in-op bias and a Flax-style bias (added after the op) each also appear
    in an L2 term of every example's loss: their per-example gradients include it."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(N, 2, 3)))
    dense = jaxlinear.Params(jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=4)))
    w, b = jnp.asarray(rng.normal(size=(3, 2))), jnp.asarray(rng.normal(size=2))

    def flax_style(dot):
        def apply(p, x):
            return dot(x, p[0], (((2,), (0,)), ((), ()))) + p[1].reshape(1, 1, -1)

        return apply

    def linear_plain(p, x):
        return x @ p.W + p.b.reshape(1, 1, -1)

    layers = [
        Layer(jaxlinear.linear, linear_plain, dense, x, 0, rng),
        Layer(flax_style(jaxlinear.dot_general), flax_style(lax.dot_general), (w, b), x, 0, rng),
    ]

    def regulariser(params):  # (n,): the same term in every example's loss
        (dense, (w, b)) = params
        r = 0.3 * jnp.sum(dense.W**2) + 0.2 * jnp.sum(jnp.sin(dense.b)) + jnp.sum(w * b[None])
        return jnp.full((N,), r) + 0.1 * jnp.sum(b**2)

    check(layers, extra=regulariser)


# -- axis 0 of an op's input with n entries that are not the examples --------------------


def test_time_major_input_with_as_many_steps_as_examples():
    """``x: (n, T, d)`` made time-major ``(T, n, d)`` before the op, with ``T = n``: axis 0
    of the op's input has ``n`` entries but they are time steps. Its leaves must not be
    read as structural (``fallback="raise"`` names them; the fallback's numbers are right).
    A loss with the batch size written into it (not traceable at another size) keeps
    today's reading of axis 0 as the examples."""
    rng = np.random.default_rng(4)
    p = jaxlinear.Params(jnp.asarray(rng.normal(size=(2, 4))), jnp.asarray(rng.normal(size=4)))
    x = jnp.asarray(rng.normal(size=(N, N, 2)))

    def time_major(linear):
        def loss(p, x):
            y = linear(p, jnp.swapaxes(x, 0, 1))  # (T, n, 4)
            return jnp.sum(jnp.sin(y) * _readout_like(y), axis=(0, 2))

        return loss

    def fixed_batch(linear):
        def loss(p, x):
            y = linear(p, x.reshape(N, N, 2))  # N written in: no other batch size traces
            return jnp.sum(jnp.sin(y) * _readout_like(y), axis=(1, 2))

        return loss

    def plain(p, x):
        return x @ p.W + p.b.reshape(1, 1, -1)

    loss = time_major(jaxlinear.linear)
    with pytest.raises(
        ValueError,
        match=r"per_example_grad_norms: `params\.W` is used where the examples have no single"
        r" axis: the affine op's input `x` \(shape \(3, 3, 2\)\) has the examples on axis 1,"
        r" not on axis 0",
    ):
        jaxlinear.per_example_grad_norms(loss, p, x, fallback="raise")
    expected = reference_norms(reference(time_major(plain), p, x))
    assert_rel_close(
        jax.jit(lambda p, x: jaxlinear.per_example_grad_norms(loss, p, x))(p, x), expected, 1e-10
    )
    assert jaxlinear.per_example_routes(loss, p, x).counts() == {"fallback": 2}
    # The batch size written in: vmap(grad) over batches of one cannot run it; the
    # reference is the Jacobian of the n losses (row i: example i's gradient).
    loss = fixed_batch(jaxlinear.linear)
    jac = jax.jacrev(fixed_batch(plain))(p, x)
    norms = jax.jit(lambda p, x: jaxlinear.per_example_grad_norms(loss, p, x, fallback="raise"))
    assert_rel_close(norms(p, x), reference_norms(jac), 1e-10)
    assert "fallback" not in jaxlinear.per_example_routes(loss, p, x).counts()


def _readout_like(y):
    return jnp.cos(jnp.arange(y[0].size, dtype=y.dtype).reshape(y.shape[1:]))[None]


# -- per-example buffers formed a block of examples at a time -----------------------------


@pytest.mark.parametrize("block_elements", [12, 400, 1700])
def test_norms_and_clipped_sum_in_blocks_of_examples(monkeypatch, block_elements):
    """The routes that form per-example buffers, their blocks of the 5 examples: conv's
    ``"per_example"`` (810 elements an example: blocks of 1, 1, 2) and ``"gram"`` (its
    patches, 176: 1, 2, all), conv_transpose (conv's rule; 840: 1, 1, 2), the generic
    route (einsum where the Gram does not pay; 6: 2, all, all), conv (2064: 1, 1, 1); 2
    leaves a remainder. The
    last conv's ``w̄_i`` outweigh twice its ``x`` and ``g`` (``ghost.keeps``, conv's rule):
    its clipped sum is ``B_wᵀ(c ⊙ g; x)``; the others' ``Σ c_i w̄_i``."""
    from jaxlinear._src import ghost

    monkeypatch.setattr(ghost, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(7)
    n, dims = 5, ("NHWC", "HWIO", "NHWC")

    def conv(op, strides):
        return lambda w, x: op(x, w, strides, "SAME", dimension_numbers=dims)

    def transpose(op):
        return lambda w, x: op(x, w, (2, 2), "SAME", dimension_numbers=dims)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape))

    layers = [
        Layer(conv(jaxlinear.conv_general_dilated, (1, 1)), conv(lax.conv_general_dilated, (1, 1)),
              normal(3, 3, 2, 3), normal(n, 6, 6, 2), 0, rng),
        Layer(conv(jaxlinear.conv_general_dilated, (3, 3)), conv(lax.conv_general_dilated, (3, 3)),
              normal(3, 3, 4, 4), normal(n, 6, 6, 4), 0, rng),
        Layer(transpose(jaxlinear.conv_transpose), transpose(lax.conv_transpose),
              normal(2, 2, 2, 3), normal(n, 3, 3, 2), 0, rng),
        Layer(lambda w, x: jaxlinear.einsum("ntd,dp->ntp", x, w),
              lambda w, x: jnp.einsum("ntd,dp->ntp", x, w), normal(2, 3), normal(n, 6, 2), 0, rng),
        Layer(conv(jaxlinear.conv_general_dilated, (1, 1)), conv(lax.conv_general_dilated, (1, 1)),
              normal(5, 5, 4, 4), normal(n, 4, 4, 4), 0, rng),
    ]
    held = [2 * (la.x.size + jax.eval_shape(la.plain, la.params, la.x).size) for la in layers]
    keeps = [ghost.keeps(n, la.params.size, h) for la, h in zip(layers, held, strict=True)]
    assert keeps[::4] == [True, False]  # conv's rule: w̄_i kept up to 2(|x| + |g|)
    routes = [r.route for r in check(layers)]
    assert routes == ["per_example", "gram", "per_example", "per_example", "per_example"], routes
