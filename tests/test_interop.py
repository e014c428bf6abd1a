"""Parameters across libraries, and JAX's dtype promotion, against independent references.

References: plain ``x @ W + b`` / ``lax`` ops under JAX's own autodiff, PyTorch's layouts
written out by hand (``y = x weightᵀ + bias``; a conv as ``lax.conv_general_dilated`` on
``OIHW``), and Flax NNX's own layers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.standard_normal((4, 3)))
B = jnp.asarray(RNG.standard_normal(3))
X = jnp.asarray(RNG.standard_normal((2, 5, 4)))
BINDINGS = [jaxlinear.linear, jaxlinear.dual_linear]


def add_b(y, b):
    """``y + b`` on the last axis, broadcast explicitly (rank promotion raises here)."""
    return y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))


def loss(f):
    return lambda p, x: jnp.sum(jnp.sin(f(p, x)))


# -- params accepted directly: gradients in the structure given -------------------------


@pytest.mark.parametrize("f", BINDINGS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "params",
    [{"kernel": W, "bias": B}, {"kernel": W}, (W, B), (W,), (W, None)],
    ids=["flax", "flax_no_bias", "tuple", "tuple_W", "tuple_None"],
)
def test_flax_dicts_and_tuples_are_params(f, params):
    if isinstance(params, dict):
        W_, b_ = params["kernel"], params.get("bias")
    else:
        W_, b_ = params[0], params[1] if len(params) == 2 else None

    def ref(Wb, x):  # Wb = (W, b or None)
        return x @ Wb[0] if Wb[1] is None else add_b(x @ Wb[0], Wb[1])

    np.testing.assert_allclose(f(params, X), ref((W_, b_), X), rtol=1e-13)
    grads, dx = jax.grad(loss(f), argnums=(0, 1))(params, X)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    (want_W, want_b), want_dx = jax.grad(loss(ref), argnums=(0, 1))((W_, b_), X)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12)
    got_W = grads["kernel"] if isinstance(grads, dict) else grads[0]
    np.testing.assert_allclose(got_W, want_W, rtol=1e-12)
    if b_ is not None:
        got_b = grads["bias"] if isinstance(grads, dict) else grads[1]
        np.testing.assert_allclose(got_b, want_b, rtol=1e-12)


def test_pullback_packs_into_the_structure_given():
    for params in ({"kernel": W, "bias": B}, (W, B)):
        dparams, _ = jaxlinear.pullback(params, X, jnp.ones((2, 5, 3)))
        assert jax.tree.structure(dparams) == jax.tree.structure(params)
    np.testing.assert_allclose(dparams[1], jnp.full(3, 10.0))


def test_sharded_layers_name_the_conversion():
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(TypeError, match=r"data_parallel_linear: .* got a flax .*from_flax"):
        jaxlinear.data_parallel_linear({"kernel": W, "bias": B}, X, mesh=mesh)


# -- PyTorch ----------------------------------------------------------------------------


class FakeTensor:
    """What ``from_torch`` reads from a ``torch.Tensor`` (no torch here): ``detach``,
    ``cpu``, ``numpy``, ``float``, ``__array__`` and a ``dtype`` that names the tensor's own
    dtype, as torch does (``"torch.float16"``, ...). As in torch, a bfloat16 tensor has no
    NumPy form (``.numpy()`` raises ``TypeError``); ``.float()`` converts it exactly."""

    def __init__(self, a, dtype=None):
        a = np.asarray(a)
        self.dtype = f"torch.{dtype or a.dtype}"
        if self.dtype == "torch.bfloat16":  # kept as float32 holding bfloat16 values
            a = np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
        self.a = a

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        if self.dtype == "torch.bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")  # torch's message
        return self.a

    def float(self):
        return FakeTensor(self.a.astype(np.float32))

    def __array__(self, dtype=None, copy=None):  # np.asarray(tensor), through .numpy() in torch
        return np.asarray(self.numpy(), dtype)


def test_torch_linear_round_trip_and_values():
    weight, bias = RNG.standard_normal((3, 4)), RNG.standard_normal(3)  # nn.Linear(4, 3)
    sd = {"fc.weight": FakeTensor(weight), "fc.bias": FakeTensor(bias), "other.weight": 0}
    p = jaxlinear.from_torch(sd, prefix="fc")
    x = RNG.standard_normal((5, 4))
    np.testing.assert_allclose(
        jaxlinear.linear(p, x), add_b(x @ weight.T, bias), rtol=1e-13
    )  # torch's
    back = jaxlinear.to_torch(p)
    assert sorted(back) == ["bias", "weight"] and back["weight"].flags.writeable
    np.testing.assert_array_equal(back["weight"], weight)
    np.testing.assert_array_equal(back["bias"], bias)
    assert list(jaxlinear.to_torch((p.W,))) == ["weight"]


@pytest.mark.parametrize("f", [jaxlinear.conv, jaxlinear.dual_conv], ids=lambda f: f.__name__)
def test_torch_conv2d_oihw_round_trip_and_values(f):
    weight = RNG.standard_normal((6, 2, 3, 2))  # Conv2d(4, 6, (3, 2), groups=2): OIHW
    bias = RNG.standard_normal(6)
    p = jaxlinear.from_torch({"weight": weight, "bias": bias})
    assert p.W.shape == (3, 2, 2, 6)  # (*kernel, C_in/groups, C_out)
    x = RNG.standard_normal((2, 5, 4, 4))  # NHWC
    want = (
        jax.lax.conv_general_dilated(  # PyTorch's convolution: NCHW input, OIHW weight
            jnp.moveaxis(x, -1, 1), weight, (1, 1), "VALID", feature_group_count=2
        )
        + bias[None, :, None, None]
    )
    got = f(p, x, padding="VALID", groups=2)
    np.testing.assert_allclose(got, jnp.moveaxis(want, 1, -1), rtol=1e-12)
    np.testing.assert_array_equal(jaxlinear.to_torch(p)["weight"], weight)
    for shape in ((6, 2, 3), (6, 2, 3, 2, 2)):  # Conv1d, Conv3d
        w = RNG.standard_normal(shape)
        np.testing.assert_array_equal(jaxlinear.to_torch(jaxlinear.from_torch({"weight": w}))
                                      ["weight"], w)  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_dtypes_every_rank_and_prefixes(dtype):
    """bf16, f16 and f32 tensors keep their dtype (bf16 through ``.float()``, exactly) and
    their values, for a Linear and a Conv1d/2d/3d (non-square kernels, ``I ≠ O``), read
    from a whole model's state dict by (nested) prefix; ``to_torch`` gives them back."""
    want = jnp.dtype(dtype)
    shapes = {"fc": (3, 4), "enc.conv1": (5, 2, 3), "enc.conv2": (5, 2, 3, 2),
              "enc.block.conv3": (5, 2, 3, 2, 1)}  # fmt: skip
    arrays = {k: np.asarray(jnp.asarray(RNG.standard_normal(s), want), np.float32)
              for k, s in shapes.items()}  # fmt: skip
    biases = {k: np.asarray(jnp.asarray(RNG.standard_normal(s[0]), want), np.float32)
              for k, s in shapes.items()}  # fmt: skip
    held = np.float32 if dtype == "bfloat16" else dtype  # what the stand-in holds
    sd = {}
    for k in shapes:  # as a torch model's state dict: "<prefix>.weight", "<prefix>.bias"
        sd[f"{k}.weight"] = FakeTensor(arrays[k].astype(held), dtype)
        sd[f"{k}.bias"] = FakeTensor(biases[k].astype(held), dtype)
    for k, shape in shapes.items():
        p = jaxlinear.from_torch(sd, prefix=k)
        assert p.W.dtype == p.b.dtype == want, (k, p.W.dtype, p.b.dtype)
        # PyTorch (out, in) / (O, I, *kernel) -> (in, out) / (*kernel, I, O), by hand
        moved = np.moveaxis(arrays[k], (0, 1), (-1, -2))
        assert p.W.shape == moved.shape, (k, p.W.shape)
        np.testing.assert_array_equal(np.asarray(p.W, np.float32), moved)
        np.testing.assert_array_equal(np.asarray(p.b, np.float32), biases[k])
        back = jaxlinear.to_torch(p)
        assert back["weight"].dtype == want and back["weight"].shape == shape
        np.testing.assert_array_equal(np.asarray(back["weight"], np.float32), arrays[k])


def test_equinox_conv_bias_is_flattened():
    p = jaxlinear.from_torch({"weight": np.ones((4, 2, 3)), "bias": np.ones((4, 1))})
    assert p.b.shape == (4,) and p.W.shape == (3, 2, 4)


def test_torch_refusals():
    with pytest.raises(TypeError, match=r"^linear: `params` looks like a PyTorch state dict"):
        jaxlinear.linear({"weight": W.T, "bias": B}, X)
    conv_sd = {"weight": jnp.ones((6, 4, 3, 3))}
    with pytest.raises(TypeError, match=r"^conv: .*\(C_out, C_in/groups, \*kernel\).*from_torch"):
        jaxlinear.conv(conv_sd, jnp.ones((1, 5, 5, 4)))
    with pytest.raises(KeyError, match=r"from_torch: `state_dict` has no 'fc2.weight'"):
        jaxlinear.from_torch({"fc1.weight": W}, prefix="fc2")
    with pytest.raises(TypeError, match=r"from_torch: `weight` has shape \(3,\); expected"):
        jaxlinear.from_torch({"weight": np.ones(3)})
    with pytest.raises(TypeError, match=r"from_torch: expected `state_dict` \(a mapping\)"):
        jaxlinear.from_torch([W])
    with pytest.raises(TypeError, match=r"to_torch: `W` has shape \(3,\)"):
        jaxlinear.to_torch({"W": np.ones(3)})


def test_layer_objects_are_refused_with_the_way_in():
    class Layer:  # an Equinox or PyTorch layer: holds `weight`, is not a mapping
        weight = W.T

    with pytest.raises(TypeError, match=r"is a Layer layer.*jaxlinear.equinox.explicit\(model\)"):
        jaxlinear.linear(Layer(), X)


# -- Flax -------------------------------------------------------------------------------


def test_flax_nnx_linear_state_round_trip():
    nnx = pytest.importorskip("flax.nnx")
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    state = nnx.state(layer)
    with pytest.raises(TypeError, match=r"looks like a Flax NNX state .*from_flax\(nnx.state"):
        jaxlinear.linear(state, X)
    p = jaxlinear.from_flax(state)
    np.testing.assert_allclose(jaxlinear.linear(p, X), layer(X), rtol=1e-13)
    # Back: new values into the layer, through Flax's own update.
    new = jaxlinear.Params(p.W * 2, p.b + 1)
    nnx.update(layer, jaxlinear.to_flax(new))
    np.testing.assert_array_equal(layer.kernel[...], new.W)
    np.testing.assert_array_equal(layer.bias[...], new.b)
    # nnx.grad's state converts the same way: gradients equal jaxlinear's own.
    g = nnx.grad(lambda m: jnp.sum(jnp.sin(m(X))))(layer)
    want = jax.grad(loss(jaxlinear.linear))(new, X)
    np.testing.assert_allclose(jaxlinear.from_flax(g).W, want.W, rtol=1e-12)
    assert jaxlinear.to_flax((new.W,)) == {"kernel": new.W}
    with pytest.raises(KeyError, match=r"from_flax: `tree` has no 'kernel'"):
        jaxlinear.from_flax({"W": W})
    with pytest.raises(TypeError, match=r"has Flax Variables in \['kernel', 'bias'\]"):
        jaxlinear.linear(dict(state.items()), X)


# -- JAX's dtype promotion --------------------------------------------------------------

# (x, W, b) dtypes; the result is jnp.result_type of the three, as for x @ W + b.
PROMOTIONS = [
    ("float32", "bfloat16", "bfloat16"),  # bf16 params, float32 x -> float32
    ("bfloat16", "float32", "float32"),
    ("float32", "float64", "float32"),
    ("float16", "bfloat16", "bfloat16"),  # -> float32, as JAX promotes
    ("bfloat16", "bfloat16", "float32"),  # a wider bias: float32 out
]


def _operands(dtypes, shapes):
    return [jnp.asarray(RNG.standard_normal(s), d) for d, s in zip(dtypes, shapes, strict=True)]


def _promoted(*arrays):
    dtype = jnp.result_type(*arrays)
    return [a.astype(dtype) for a in arrays]


def _check(f, ref, args):
    """``f`` against ``ref`` on the operands cast to their promoted dtype (as Flax's
    ``promote_dtype`` does), under JAX's AD; the result dtype is checked against the plain op
    on the uncast operands (``x @ W + b``), each gradient against its primal's dtype."""
    y, want = f(*args), ref(*_promoted(*args))
    assert y.dtype == jnp.result_type(*args) == want.dtype
    tol = 1e-5 if want.dtype == jnp.float32 else 1e-13
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args)
    wants = jax.grad(lambda *a: jnp.sum(jnp.sin(ref(*_promoted(*a)))), argnums=tuple(
        range(len(args))))(*args)  # fmt: skip
    for g, w, a in zip(grads, wants, args, strict=True):
        assert g.dtype == w.dtype == a.dtype
        # A 16-bit primal's gradient is rounded to its dtype (as JAX's own AD rounds it):
        # one bf16 ulp apart where the float32 sums ran in another order. Every other
        # gradient is computed and rounded in the promoted dtype (a float32 `b` beside a
        # bfloat16 `W` included: its gradient is summed wide and rounded once, to float32).
        gtol = 1e-2 if a.dtype.itemsize == 2 else tol
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                   rtol=gtol, atol=gtol)  # fmt: skip


@pytest.mark.parametrize("dtypes", PROMOTIONS, ids="-".join)
@pytest.mark.parametrize("f", BINDINGS, ids=lambda f: f.__name__)
def test_linear_follows_jax_promotion(f, dtypes):
    args = _operands(dtypes, [(3, 4), (4, 2), (2,)])  # x, W, b
    x, W_, b = args
    assert f((W_, b), x).dtype == (x @ W_ + b[None]).dtype  # as plain x @ W + b
    _check(lambda x, W, b: f((W, b), x), lambda x, W, b: add_b(x @ W, b), args)


_DN = (((1,), (0,)), ((), ()))
FAMILY = {
    "dot_general": (lambda x, w: jaxlinear.dot_general(x, w, _DN),
                    lambda x, w: jax.lax.dot_general(x, w, _DN), (3, 4), (4, 2)),
    "dual_einsum": (lambda x, w: jaxlinear.dual_einsum("btd,dk->btk", x, w),
                    lambda x, w: jnp.einsum("btd,dk->btk", x, w), (2, 3, 4), (4, 2)),
    "conv_general_dilated": (
        lambda x, w: jaxlinear.conv_general_dilated(x, w, (1,), "SAME"),
        lambda x, w: jax.lax.conv_general_dilated(x, w, (1,), "SAME"), (2, 3, 5), (2, 3, 2)),
}  # fmt: skip


@pytest.mark.parametrize("name", FAMILY)
def test_family_follows_jax_promotion(name):
    op, ref, x_shape, w_shape = FAMILY[name]
    _check(op, ref, _operands(("float32", "bfloat16"), [x_shape, w_shape]))


@pytest.mark.parametrize("f", [jaxlinear.conv, jaxlinear.dual_conv], ids=lambda f: f.__name__)
def test_conv_layer_follows_jax_promotion(f):
    def ref(x, W, b):
        dn = ("NWC", "WIO", "NWC")
        return add_b(jax.lax.conv_general_dilated(x, W, (1,), "SAME", dimension_numbers=dn), b)

    x, W_, b = _operands(("float32", "bfloat16", "float64"), [(2, 5, 3), (2, 3, 2), (2,)])
    _check(lambda x, W, b: f((W, b), x), ref, [x, W_, b])


def test_weak_scalars_promote_as_lax_and_jnp_do():
    w = jnp.ones((4, 2), jnp.bfloat16)
    x = jnp.full((3, 4), 0.5)  # weakly typed (float64 here), as x * 0.5 would be
    assert x.weak_type
    # lax.dot_general keeps the weak operand's dtype; jnp.einsum lets the strong one win.
    assert jaxlinear.dot_general(x, w, _DN).dtype == jax.lax.dot_general(x, w, _DN).dtype
    assert jaxlinear.einsum("ij,jk->ik", x, w).dtype == jnp.einsum("ij,jk->ik", x, w).dtype
    assert jaxlinear.einsum("ij,jk->ik", x, w).dtype == jnp.bfloat16


def test_complex_and_real_do_not_mix_in_the_family():
    w = jnp.ones((4, 2), jnp.complex64)
    with pytest.raises(TypeError, match=r"^dot_general: complex and real operands do not mix"):
        jaxlinear.dot_general(jnp.ones((3, 4), jnp.float32), w, _DN)
    with pytest.raises(TypeError, match=r"^einsum: .*\(`x` float32, `w` complex64\)"):
        jaxlinear.einsum("ij,jk->ik", jnp.ones((3, 4), jnp.float32), w)
