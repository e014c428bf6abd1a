"""``conv_transpose``/``dual_conv_transpose`` against JAX's AD of ``lax.conv_transpose``.

The shared transform matrix (jvp, jacfwd, linear_transpose, vmap, adjoint test, "the rule
ran", bfloat16) runs over the ``conv_transpose`` cases in ``tests/family_cases.py``; here:
values and both operands' derivatives over strides, paddings, dilations, layouts and
``transpose_kernel``, 0-D to 2-D, both bindings; the errors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlinear
from tests.helpers import assert_trees_close, eqns

BINDINGS = (jaxlinear.conv_transpose, jaxlinear.dual_conv_transpose)

# (id, x shape, w shape, kwargs); default layouts are channels last: x (N, *S, C), w (*K, I, O)
# (w (*K, O, I) with transpose_kernel). Sizes differ per axis so a mixed-up axis fails loudly.
CONFIGS = [
    ("0d_no_spatial_axis", (2, 3), (3, 4), dict(strides=(), padding="VALID")),  # (N, C), (I, O)
    ("1d_s2_same", (2, 4, 3), (3, 3, 2), dict(strides=(2,), padding="SAME")),
    ("1d_s3_valid_dil2_tk", (2, 3, 2), (2, 4, 2), dict(strides=(3,), padding="VALID",
                                                      rhs_dilation=(2,), transpose_kernel=True)),
    ("1d_explicit_negative", (1, 5, 2), (3, 2, 3), dict(strides=(2,), padding=((2, -1),))),
    ("2d_s21_same_tk", (2, 3, 4, 2), (3, 2, 3, 2), dict(strides=(2, 1), padding="SAME",
                                                        transpose_kernel=True)),
    ("2d_explicit_consistent_tk", (2, 3, 3, 2), (3, 2, 3, 2), dict(
        strides=(2, 2), padding=((1, 0), (0, 1)), transpose_kernel=True,
        use_consistent_padding=True)),
    ("2d_nchw_oihw_explicit", (2, 2, 3, 4), (3, 2, 2, 3), dict(
        strides=(2, 3), padding=((0, 1), (2, 2)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
        rhs_dilation=(1, 2))),
]  # fmt: skip


def _operands(x_shape, w_shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(x_shape), rng.standard_normal(w_shape)


@pytest.mark.parametrize("x_shape, w_shape, kw", [pytest.param(*c[1:], id=c[0]) for c in CONFIGS])
def test_matches_lax_autodiff(x_shape, w_shape, kw):
    # Values and the vjp in both operands, both bindings, float64, against JAX's AD of
    # lax.conv_transpose; one compile per configuration. (Forward mode, linear_transpose,
    # vmap: the conv_transpose cases of tests/family_cases.py.)
    x, w = _operands(x_shape, w_shape)

    @jax.jit
    def run(x, w):
        def reverse(f):
            y, pull = jax.vjp(functools.partial(f, **kw), x, w)
            return y, pull(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))

        return [reverse(f) for f in BINDINGS], [reverse(lax.conv_transpose)] * len(BINDINGS)

    ours, refs = run(x, w)
    assert_trees_close(ours, refs)


def test_transposes_are_a_convolution_and_a_correlation():
    # The dual binding is one primitive of its own; its rules are lax convolutions: the
    # forward dilates x by the strides, x̄ is a convolution of G strided by them (no
    # dilation), w̄ correlates the dilated x with G. (That grad runs exactly these rules:
    # test_family.py::test_the_explicit_rule_runs on the conv_transpose cases.)
    x, w = _operands((1, 3, 2), (2, 2, 3))
    jaxpr = jax.make_jaxpr(lambda x, w: jaxlinear.dual_conv_transpose(x, w, (2,), "SAME"))(x, w)
    assert [e.primitive.name for e in jaxpr.eqns] == ["jaxlinear_conv_transpose"]

    def pullback(x, w, g):
        return jax.vjp(lambda x, w: jaxlinear.conv_transpose(x, w, (2,), "SAME"), x, w)[1](g)

    jaxpr = jax.make_jaxpr(pullback)(x, w, np.ones((1, 6, 3)))
    convs = [e.params for e in eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]
    strides_and_dilation = [(p["window_strides"], p["lhs_dilation"]) for p in convs]
    assert strides_and_dilation == [((1,), (2,)), ((2,), (1,)), ((1,), (2,))]


# --- errors: one check per mistake -------------------------------------------------------

X = jnp.ones((2, 5, 5, 4), jnp.float32)
W = jnp.ones((3, 3, 4, 6), jnp.float32)  # (kH, kW, I, O)
ERRORS = [
    # (lhs, rhs, kwargs, error, message)
    (X, jnp.ones((3, 4, 6)), {}, ValueError, r"`rhs` must have rank 4 like `lhs`"),
    (jnp.ones((4,)), jnp.ones((4,)), {}, ValueError, r"`lhs` must have a batch and a feature"),
    (jnp.ones((1,) * 6), jnp.ones((1,) * 6), {"strides": (1,) * 4}, ValueError,
     r"no default `dimension_numbers` for operands of rank 6 .* pass dimension_numbers"),
    (X, W, {"strides": (2,)}, ValueError,
     r"`strides` must be a sequence of 2 positive ints .* got \(2,\)"),
    (X, W, {"strides": 2}, ValueError, r"`strides` must be a sequence of 2 positive ints.*got 2"),
    (X, W, {"rhs_dilation": (1, 0)}, ValueError, r"`rhs_dilation` must be a sequence of 2"),
    (X, W, {"padding": "same"}, ValueError,
     r"`padding` must be 'SAME', 'VALID' or 2 \(lo, hi\) int pairs .* got 'same'"),
    (X, W, {"padding": "SAME_LOWER"}, ValueError, r"`padding` must be 'SAME', 'VALID' or 2"),
    (X, W, {"padding": ((1, 1),)}, ValueError, r"`padding` must be one of .* got \(\(1, 1\),\)"),
    (X, jnp.ones((3, 3, 3, 6)), {}, ValueError,
     r"`rhs` \(shape \(3, 3, 3, 6\)\) takes 3 input channels per group × 1 group\(s\) = 3,"
     r" but `lhs` has 4"),
    # transpose_kernel swaps rhs's feature axes: (kH, kW, O, I), so I = 6 here.
    (X, W, {"transpose_kernel": True}, ValueError, r"`rhs` \(shape \(3, 3, 4, 6\)\) takes 6 input"),
    (X, W, {"transpose_kernel": "yes"}, TypeError, r"`transpose_kernel` must be a bool, got 'yes'"),
    (X, W, {"use_consistent_padding": None}, TypeError, r"`use_consistent_padding` must be a bool"),
    (X, W, {"dimension_numbers": ("NHWC", "HWIO", "NHW")}, ValueError,
     r"out string 'NHW' has 3 letters but the operands have 4 axes"),
    (X.astype(jnp.int32), W, {}, TypeError, r"`lhs` has dtype int32; expected a floating"),
    (X, W.astype(jnp.complex64), {}, TypeError,
     r"complex and real operands do not mix \(`lhs` float\d+, `rhs` complex64\)"),
    (X, W, {"preferred_element_type": jnp.int32}, TypeError,
     r"`preferred_element_type` must be a floating"),
]  # fmt: skip


@pytest.mark.parametrize("f", BINDINGS)
@pytest.mark.parametrize("lhs, rhs, kwargs, error, match", ERRORS)
def test_errors(f, lhs, rhs, kwargs, error, match):
    kwargs = {"strides": (1, 1), "padding": "SAME", **kwargs}
    with pytest.raises(error, match=f"^{f.__name__}: .*{match}"):
        jax.eval_shape(lambda: f(lhs, rhs, **kwargs))
