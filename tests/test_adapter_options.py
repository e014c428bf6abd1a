"""The adapters against the original layers, option by option (non-default values).

Each hypothesis example draws a few layers, converts a copy of each with
``jaxlinear.nnx.explicit`` / ``jaxlinear.equinox.explicit``, and compares the converted
layer with the original (Flax's or Equinox's own code under JAX's AD, float64): the output
and the gradients in the parameters and the input of ``⟨sin(y), R⟩`` (``R`` varies with
the position, so a shifted or permuted output changes the numbers). All layers of one
example run in one jitted program. ``JAXLINEAR_LONG=1`` runs many more examples.

Also: subclasses of every layer type the adapters convert are left as they are (their
``__call__`` may compute something else), and mixed dtypes / ``param_dtype``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import assert_trees_close
from tests.helpers import hypothesis_examples as examples

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")
jlnnx = pytest.importorskip("jaxlinear.nnx")
import jaxlinear.equinox as je  # noqa: E402

BINDINGS = ("custom_vjp", "dual")



def _readout(y):
    return jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))


def _draw(key, shape, dtype=jnp.float64):
    """A Flax initializer drawing with NumPy, seeded by the shape: nothing to compile."""
    del key
    scale = 1 / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    return jnp.asarray(np.random.default_rng(list(shape)).standard_normal(shape) * scale, dtype)


def _x(shape, dtype=jnp.float64, seed=0):
    return jnp.asarray(np.random.default_rng([seed, *shape]).standard_normal(shape), dtype)


# -- Flax NNX ------------------------------------------------------------------------------

F64 = dict(kernel_init=_draw, bias_init=_draw, dtype=jnp.float64, param_dtype=jnp.float64)


def _nnx_value_and_grads(m, x):
    def loss(m, x):
        y = m(x)
        return jnp.sum(jnp.sin(y) * _readout(y)), y

    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
    return y, grads


def check_nnx(layers, xs):
    """Each Flax layer against its converted copy (one binding each, alternating)."""
    pairs = [
        (jlnnx.explicit(m, binding=BINDINGS[i % 2], copy=True), m) for i, m in enumerate(layers)
    ]
    for ours, _ in pairs:
        assert all(r.status != "jax-ad" for r in jlnnx.report(ours).rows), jlnnx.report(ours)

    @nnx.jit
    def run(pairs, xs):
        return [
            [_nnx_value_and_grads(m, x) for m in pair] for pair, x in zip(pairs, xs, strict=True)
        ]

    for got, expected in run(pairs, xs):
        assert_trees_close(got, expected, atol=1e-11, rtol=1e-11)


def _padding(draw, rank, modes):
    return draw(
        st.sampled_from(
            [
                *modes,
                1,
                tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(rank)),
            ]
        )
    )


def _mask(draw, shape):
    if not draw(st.booleans()):
        return None
    bits = draw(st.lists(st.booleans(), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return jnp.asarray(np.reshape(bits, shape), jnp.float64)


@st.composite
def nnx_conv_transposes(draw):
    """``nnx.ConvTranspose``: rank 1 or 2, strides, every padding (CIRCULAR with and
    without ``transpose_kernel``), kernel dilation, mask, bias on/off, batch axes."""
    rank = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    transpose_kernel = draw(st.booleans())
    kw = dict(
        strides=tuple(draw(st.integers(1, 3)) for _ in range(rank)),
        padding=_padding(draw, rank, ["SAME", "VALID", "CIRCULAR"]),
        kernel_dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        use_bias=draw(st.booleans()),
        transpose_kernel=transpose_kernel,
    )
    shape = (*kernel, c_out, c_in) if transpose_kernel else (*kernel, c_in, c_out)
    kw["mask"] = _mask(draw, shape)
    layer = nnx.ConvTranspose(c_in, c_out, kernel, rngs=nnx.Rngs(0), **kw, **F64)
    batch = draw(st.sampled_from([(2,), (1, 2)]))
    x = _x((*batch, *(draw(st.integers(2, 4)) for _ in range(rank)), c_in))
    return layer, x


@examples(5)
@given(st.lists(nnx_conv_transposes(), min_size=3, max_size=3))
def test_nnx_conv_transpose_options(cases):
    check_nnx(*zip(*cases, strict=True))


def test_nnx_conv_transpose_circular_masked_and_valid():
    """The cases the issue names, fixed: CIRCULAR without ``transpose_kernel`` where the
    wrap is uneven, a masked layer, VALID with a dilated kernel larger than the stride."""
    mask = jnp.asarray([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])  # (3, 1, 2)
    layers = [
        nnx.ConvTranspose(1, 2, (3,), strides=2, padding="CIRCULAR", rngs=nnx.Rngs(0), **F64),
        nnx.ConvTranspose(1, 2, (2,), strides=3, padding="CIRCULAR", rngs=nnx.Rngs(0), **F64),
        nnx.ConvTranspose(1, 2, (3,), padding="SAME", mask=mask, rngs=nnx.Rngs(0), **F64),
        nnx.ConvTranspose(
            1, 2, (3,), strides=2, padding="VALID", kernel_dilation=2, rngs=nnx.Rngs(0), **F64
        ),
    ]
    check_nnx(layers, [_x((2, 5, 1)), _x((2, 4, 1)), _x((2, 4, 1)), _x((2, 3, 1))])


@st.composite
def nnx_convs(draw):
    """``nnx.Conv`` (jaxlinear's op injected): rank 1 or 2, strides, every padding mode
    Flax has, input and kernel dilation, feature groups, mask, bias on/off."""
    rank = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    modes = ["SAME", "VALID", "CIRCULAR", "REFLECT"] + (["CAUSAL"] if rank == 1 else [])
    kw = dict(
        strides=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        padding=_padding(draw, rank, modes),
        input_dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        kernel_dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
        feature_group_count=groups,
        use_bias=draw(st.booleans()),
    )
    if max(kw["input_dilation"]) > 1 and isinstance(kw["padding"], str):
        kw["padding"] = 1  # lax (so Flax) defines no padding by name with input dilation
    kw["mask"] = _mask(draw, (*kernel, c_in // groups, c_out))
    layer = nnx.Conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), **kw, **F64)
    x = _x((2, *(draw(st.integers(3, 5)) for _ in range(rank)), c_in))
    return layer, x


@examples(5)
@given(st.lists(nnx_convs(), min_size=3, max_size=3))
def test_nnx_conv_options(cases):
    check_nnx(*zip(*cases, strict=True))


DTYPES = [  # (param_dtype, dtype, x dtype, tolerance)
    (jnp.float32, None, jnp.float64, 1e-6),
    (jnp.float64, jnp.float32, jnp.float64, 1e-6),
    (jnp.float32, jnp.bfloat16, jnp.float32, 2e-2),
    (jnp.bfloat16, None, jnp.float32, 2e-2),
]


@pytest.mark.parametrize("param_dtype,dtype,x_dtype,tol", DTYPES, ids=str)
def test_nnx_dtypes_and_param_dtype(param_dtype, dtype, x_dtype, tol):
    """Every converted NNX layer type with ``dtype`` / ``param_dtype``: the same result
    dtypes and values as Flax's (a rounding of the same products)."""

    def init(key, shape, dtype=jnp.float64):
        return _draw(key, shape, dtype)

    kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0))
    ki = dict(kernel_init=init, bias_init=init, **kw)
    layers = [
        nnx.Linear(3, 2, **ki),
        nnx.LinearGeneral(3, (2, 2), **ki),
        nnx.Einsum("btd,dk->btk", (3, 2), (2,), **ki),
        nnx.Conv(3, 2, (2,), **ki),
        nnx.ConvTranspose(3, 2, (2,), strides=2, **ki),
        nnx.Embed(4, 3, embedding_init=init, **kw),
    ]
    xs = [
        _x((2, 3), x_dtype),
        _x((2, 3), x_dtype),
        _x((2, 2, 3), x_dtype),
        _x((2, 4, 3), x_dtype),
        _x((2, 3, 3), x_dtype),
        jnp.asarray([[0, 3], [-1, 2]]),
    ]
    pairs = [(jlnnx.explicit(m, copy=True), m) for m in layers]

    @nnx.jit
    def run(pairs, xs):
        out = []
        for pair, x in zip(pairs, xs, strict=True):
            if jnp.issubdtype(x.dtype, jnp.integer):  # embed: the table's gradient only
                out.append(
                    [(m(x), nnx.grad(lambda m, x=x: jnp.sum(jnp.sin(m(x))))(m)) for m in pair]
                )
            else:
                out.append([_nnx_value_and_grads(m, x) for m in pair])
        return out

    for got, expected in run(pairs, xs):
        assert_trees_close(got, expected, atol=tol, rtol=tol)


def test_nnx_dense_family_options():
    """``Linear`` without bias, ``LinearGeneral`` over several input/output axes and with a
    batch axis, ``Einsum`` with the examples inside the output and a bias broadcast along
    a middle axis, ``precision``: each against Flax's own layer."""

    def init(key, shape, dtype=jnp.float64):
        return _draw(key, shape, dtype)

    kw = dict(kernel_init=init, bias_init=init, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    layers = [
        nnx.Linear(3, 2, use_bias=False, precision=jax.lax.Precision.HIGHEST, **kw),
        nnx.LinearGeneral((2, 3), (2, 2), axis=(-2, -1), **kw),
        nnx.LinearGeneral(3, 2, axis=-1, batch_axis={0: 2}, **kw),
        nnx.Einsum("nhk,kj->jnh", (3, 4), (4, 1, 1), **kw),
    ]
    check_nnx(layers, [_x((2, 3)), _x((2, 2, 3)), _x((2, 4, 3)), _x((3, 2, 3))])


def test_nnx_per_example_through_the_adapter():
    """``jaxlinear.nnx.per_example_loss`` on converted ``LinearGeneral`` (several axes) and
    ``Einsum`` (examples inside the output, a bias on a middle axis): every leaf
    structural, norms and clipped gradients as ``vmap(grad)`` of Flax's own model."""
    from test_per_example import reference, reference_clipped, reference_norms

    import jaxlinear

    def init(key, shape, dtype=jnp.float64):
        return _draw(key, shape, dtype)

    kw = dict(kernel_init=init, bias_init=init, param_dtype=jnp.float64, rngs=nnx.Rngs(0))

    class Model(nnx.Module):
        def __init__(self):
            self.a = nnx.LinearGeneral(3, (2, 2), axis=-1, **kw)
            self.b = nnx.LinearGeneral((2, 2), 3, axis=(-2, -1), **kw)
            self.c = nnx.Einsum("nhk,kj->njh", (3, 4), (4, 1), **kw)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x))).sum(-1) + self.c(x).sum(1)

    def loss(y):
        return jnp.sum(jnp.sin(y) * _readout(y[0])[None], axis=1)

    model, x = Model(), _x((3, 2, 3))
    plain, params = jlnnx.per_example_loss(model, loss)
    per_example = reference(plain, params, x)
    loss_fn, params = jlnnx.per_example_loss(jlnnx.explicit(model), loss)
    grads, norms = jax.jit(
        lambda p: jaxlinear.clipped_grad(loss_fn, p, x, clip_norm=1.0, fallback="raise")
    )(params)
    expected = reference_norms(per_example)
    np.testing.assert_allclose(norms, expected, rtol=1e-12)
    assert_trees_close(grads, reference_clipped(per_example, 1.0)[0], atol=1e-12)
    counts = jaxlinear.per_example_routes(loss_fn, params, x).counts()
    assert "fallback" not in counts and counts.get("bias") == 3, counts


def _nnx_subclasses():
    """A subclass of each layer type ``explicit`` converts, whose ``__call__`` differs."""

    def doubled(cls):
        def call(self, x):
            return 2 * cls.__call__(self, x)

        return type(f"My{cls.__name__}", (cls,), {"__call__": call})

    rngs = nnx.Rngs(0)
    return [
        (doubled(nnx.Linear)(3, 2, rngs=rngs, **F64), _x((2, 3))),
        (doubled(nnx.LinearGeneral)(3, 2, rngs=rngs, **F64), _x((2, 3))),
        (doubled(nnx.Einsum)("bd,dk->bk", (3, 2), rngs=rngs, **F64), _x((2, 3))),
        (doubled(nnx.Conv)(3, 2, (2,), rngs=rngs, **F64), _x((2, 4, 3))),
        (doubled(nnx.ConvTranspose)(3, 2, (2,), rngs=rngs, **F64), _x((2, 4, 3))),
        (
            doubled(nnx.Embed)(4, 3, rngs=rngs, param_dtype=jnp.float64, embedding_init=_draw),
            jnp.asarray([0, 3]),
        ),
        (  # the lookup inherited, ``attend`` replaced (no call of Embed.attend)
            type("NegatedAttend", (nnx.Embed,), {"attend": _negated_attend})(
                4, 3, rngs=rngs, param_dtype=jnp.float64, embedding_init=_draw
            ),
            jnp.asarray([0, 3]),
        ),
    ]


def _negated_attend(self, query):
    return -(query @ self.embedding[...].T)


def test_nnx_subclasses_of_every_converted_type_are_left_alone():
    for layer, x in _nnx_subclasses():
        before = layer(x)
        model = jlnnx.explicit(nnx.Sequential(layer))
        sub = model.layers[0]
        assert type(sub) is type(layer), type(sub)
        assert jlnnx.report(model).rows[0].status == "untouched"
        assert "subclass of nnx." in jlnnx.report(model).rows[0].runs
        for attr in ("dot_general", "einsum_op", "conv_general_dilated"):
            assert not getattr(getattr(sub, attr, None), "__module__", "").startswith("jaxlinear")
        np.testing.assert_array_equal(sub(x), before)
        if hasattr(layer, "attend"):
            q = _x((2, 3))
            np.testing.assert_array_equal(sub.attend(q), layer.attend(q))


# -- Equinox -------------------------------------------------------------------------------


def _eqx_value_and_grads(m, x):
    def loss(m, x):
        y = jax.vmap(m)(x)
        return jnp.sum(jnp.sin(y) * _readout(y)), y

    (_, y), grads = eqx.filter_value_and_grad(loss, has_aux=True)(m, x)
    dx = jax.grad(lambda x: loss(m, x)[0])(x)
    return y, grads, dx


def check_eqx(layers, xs):
    pairs = [(je.explicit(m, binding=BINDINGS[i % 2]), m) for i, m in enumerate(layers)]
    for ours, m in pairs:
        assert type(ours) is not type(m) and isinstance(ours, type(m))

    @eqx.filter_jit
    def run(pairs, xs):
        return [
            [_eqx_value_and_grads(m, x) for m in pair] for pair, x in zip(pairs, xs, strict=True)
        ]

    for got, expected in run(pairs, xs):
        # (the converted layer's grads are a module of another class: compare the leaves)
        assert_trees_close(jax.tree.leaves(got), jax.tree.leaves(expected), atol=1e-11, rtol=1e-11)


@st.composite
def eqx_convs(draw):
    """``eqx.nn.Conv`` / ``ConvTranspose``, 1-3 D: every padding mode, padding forms,
    strides, dilation, groups, output padding, bias on/off."""
    transpose = draw(st.booleans())
    rank = draw(st.integers(1, 3 if not transpose else 2))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    size = tuple(draw(st.integers(3, 5)) for _ in range(rank))
    key = jax.random.key(0)
    common = dict(
        stride=stride,
        dilation=dilation,
        groups=groups,
        use_bias=draw(st.booleans()),
        dtype=jnp.float64,
        key=key,
    )
    if transpose:
        mode = draw(st.sampled_from(["ZEROS", "CIRCULAR"]))
        # (Equinox: CIRCULAR only with SAME / SAME_LOWER padding)
        padding = draw(
            st.sampled_from([0, 1, "SAME", "VALID"] if mode == "ZEROS" else ["SAME", "SAME_LOWER"])
        )
        out_pad = tuple(draw(st.integers(0, s - 1)) for s in stride)  # Equinox: < stride
        if mode == "CIRCULAR" or isinstance(padding, str):
            out_pad = 0
        layer = eqx.nn.ConvTranspose(
            rank,
            c_in,
            c_out,
            kernel,
            padding=padding,
            output_padding=out_pad,
            padding_mode=mode,
            **common,
        )
    else:
        mode = draw(st.sampled_from(["ZEROS", "REFLECT", "REPLICATE", "CIRCULAR"]))
        pads = [
            0,
            1,
            "SAME",
            "SAME_LOWER",
            "VALID",
            tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in size),
        ]
        padding = draw(st.sampled_from(pads))
        if mode != "ZEROS" and not isinstance(padding, str):  # non-zero modes: pad < size
            padding = 1
        layer = eqx.nn.Conv(rank, c_in, c_out, kernel, padding=padding, padding_mode=mode, **common)
    return layer, _x((2, c_in, *size))


@examples(6)
@given(st.lists(eqx_convs(), min_size=3, max_size=3))
def test_equinox_conv_and_conv_transpose_options(cases):
    check_eqx(*zip(*cases, strict=True))


def test_equinox_conv_transpose_dilated_and_circular():
    """The cases the issue names, fixed: ``ConvTranspose`` with dilation > 1 (with output
    padding), and CIRCULAR padding with a stride."""
    key = jax.random.key(0)
    layers = [
        eqx.nn.ConvTranspose1d(
            2, 3, 3, stride=2, dilation=2, padding=1, output_padding=1, key=key, dtype=jnp.float64
        ),
        eqx.nn.ConvTranspose2d(
            2,
            2,
            (2, 3),
            stride=(1, 2),
            dilation=(2, 1),
            groups=2,
            use_bias=False,
            key=key,
            dtype=jnp.float64,
        ),
        eqx.nn.ConvTranspose1d(
            1, 2, 3, stride=2, padding="SAME", padding_mode="CIRCULAR", key=key, dtype=jnp.float64
        ),
    ]
    check_eqx(layers, [_x((2, 2, 4)), _x((2, 2, 3, 4)), _x((2, 1, 5))])


def test_equinox_dtypes():
    """float32 and bfloat16 layers (Equinox's ``dtype``) on inputs of that dtype: the same
    result and gradient dtypes as Equinox's, values within a rounding (one program)."""
    key = jax.random.key(0)
    layers, xs = [], []
    for dtype in (jnp.float32, jnp.bfloat16):
        layers += [
            eqx.nn.Linear(3, 2, key=key, dtype=dtype),
            eqx.nn.Conv1d(3, 2, 2, stride=2, key=key, dtype=dtype),
            eqx.nn.ConvTranspose1d(3, 2, 2, stride=2, key=key, dtype=dtype),
        ]
        xs += [_x((2, 3), dtype), _x((2, 3, 4), dtype), _x((2, 3, 3), dtype)]
    pairs = [(je.explicit(m), m) for m in layers]
    tables = [eqx.nn.Embedding(4, 3, key=key, dtype=d) for d in (jnp.float32, jnp.bfloat16)]
    ids = jnp.asarray([0, 3, -1])

    @eqx.filter_jit
    def run(pairs, xs, tables):
        dense = [[_eqx_value_and_grads(m, x) for m in p] for p, x in zip(pairs, xs, strict=True)]
        return dense, [[jax.vmap(t)(ids) for t in (je.explicit(t), t)] for t in tables]

    dense, lookups = run(pairs, xs, tables)
    for got, expected in dense:
        tol = 1e-6 if got[0].dtype == jnp.float32 else 2e-2  # got[0]: the layer's output
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            assert a.dtype == e.dtype == got[0].dtype, (a.dtype, e.dtype)
            a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
            np.testing.assert_allclose(a, e, rtol=tol, atol=tol * np.abs(e).max())
    for got, want in lookups:
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))


def test_equinox_embedding_ids_out_of_range_as_equinox():
    """``eqx.nn.Embedding`` indexes ``weight[x]``: a negative id in ``[-V, 0)`` wraps, any
    other id is clamped to an end row, which also gets its gradient. The converted layer
    does the same (value and gradient), in both bindings."""
    table = eqx.nn.Embedding(4, 3, weight=_x((4, 3)))
    ids = jnp.asarray([0, 3, -1, -4, 4, 9, -5, -9, 2, 2])

    def value_and_grad(m):
        def loss(m):
            y = jax.vmap(m)(ids)
            return jnp.sum(jnp.sin(y) * _readout(y)), y

        (_, y), grads = eqx.filter_value_and_grad(loss, has_aux=True)(m)
        return y, grads.weight

    run = eqx.filter_jit(lambda ms: [value_and_grad(m) for m in ms])
    expected, *got = run([table, *(je.explicit(table, binding=b) for b in BINDINGS)])
    for g in got:
        assert_trees_close(g, expected)


def test_equinox_subclasses_of_every_converted_type_are_left_alone():
    key = jax.random.key(0)

    def doubled(cls):
        def call(self, x, *, key=None):
            return 2 * cls.__call__(self, x)

        return type(f"My{cls.__name__}", (cls,), {"__call__": call})

    layers = [
        (doubled(eqx.nn.Linear)(3, 2, key=key), _x((3,))),
        (doubled(eqx.nn.Conv)(1, 3, 2, 2, key=key), _x((3, 4))),
        (doubled(eqx.nn.Conv2d)(3, 2, 2, key=key), _x((3, 4, 4))),
        (doubled(eqx.nn.ConvTranspose1d)(3, 2, 2, key=key), _x((3, 4))),
        (doubled(eqx.nn.Embedding)(4, 3, key=key), jnp.asarray(2)),
    ]
    for layer, x in layers:
        new = je.explicit([layer])[0]
        assert type(new) is type(layer)
        np.testing.assert_array_equal(new(x), layer(x))
        assert "subclass of eqx.nn." in je.report([layer]).rows[0].runs
