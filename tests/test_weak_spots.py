"""Checks aimed at the spots a mutation audit found no test watching (issue 16).

Each section kills one mutant of ``tools/mutate.py`` (run ``python tools/mutate.py`` to
see the table). References are independent: JAX's AD of the plain ``lax``/``jnp`` op in
float64, or ``jax.vmap(jax.grad(...))`` in float32.

* A letter summed out of ``x`` alone at a non-leading axis: ``family_cases.py``
  (``einsum_lone_sum``, ``"bac,cd->bd"``; its transpose broadcasts back at axis 1).
* Second order with one operand's tangent alone (``grad`` of ``jvp``, ``jacfwd`` of
  ``jacfwd``), for every op: the pushforward's own JVP pairs each new tangent with the
  right old one. (With tangents in both operands, as in ``test_family.py``, a swap of the
  two pairings cancels out; with one alone it does not.)
* ``preferred_element_type`` wider than the operands: accumulated in the wider dtype.
* Per-example norms with bfloat16 params: summed in float32 at least.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlinear
from tests.family_cases import CASES, Case
from tests.helpers import assert_trees_close


def _normal(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# --- second order in one operand alone, every op's dual binding --------------------------

_B = _normal(50, (3,))  # a fixed bias for the layers (not differentiated)


def _one_case_per_op():
    seen, cases = set(), []
    for case in CASES:  # dual_dot_general, dual_einsum, dual_conv_general_dilated, dual_embed
        if case.op is not None and case.op.name in seen:
            continue
        seen.add(case.op.name if case.op is not None else case.name)
        cases.append(case)
    conv_dn = ("NWC", "WIO", "NWC")
    cases += [
        Case(
            name="dual_linear",
            custom_vjp=None,
            dual=lambda x, w: jaxlinear.dual_linear(jaxlinear.Params(w, _B), x),
            reference=lambda x, w: x @ w + _B[None, :],
            x_shape=(3, 3),
            w_shape=(3, 3),
        ),
        Case(
            name="dual_conv",
            custom_vjp=None,
            dual=lambda x, w: jaxlinear.dual_conv(jaxlinear.Params(w, _B), x, padding="SAME"),
            reference=lambda x, w: (
                lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=conv_dn)
                + _B[None, None, :]
            ),
            x_shape=(2, 3, 3),
            w_shape=(3, 3, 3),
        ),
    ]
    return cases


@pytest.mark.parametrize("case", _one_case_per_op(), ids=str)
def test_second_order_in_one_operand_alone(case):
    x, w = _normal(0, case.x_shape), _normal(1, case.w_shape)
    if case.make_x:
        x = case.make_x(jax.random.key(0), case.x_shape)
    tx, tw = _normal(2, case.x_shape), _normal(3, case.w_shape)
    names = ("x", "w") if case.differentiable_x else ("w",)

    def second_order(f, x, w):
        out = []
        for name in names:
            # f as a function of one operand alone (the other held fixed).
            f1 = (lambda a: f(a, w)) if name == "x" else (lambda a: f(x, a))
            t = tx if name == "x" else tw
            # grad of jvp, the tangent in this operand alone, w.r.t. both operands: the
            # pushforward differentiated in its primals.
            jvp_loss = lambda x, w, n=name, t=t: jnp.sum(  # noqa: E731
                jnp.sin(
                    jax.jvp((lambda a: f(a, w)) if n == "x" else (lambda a: f(x, a)),
                            (x if n == "x" else w,), (t,))[1]
                )
            )  # fmt: skip
            argnums = (0, 1) if case.differentiable_x else (1,)
            out.append(jax.grad(jvp_loss, argnums)(x, w))
            # jacfwd of jacfwd in this operand alone (zero for a bilinear op: B(x, ·) is
            # linear) and across the two operands.
            primal = x if name == "x" else w
            out.append(jax.jacfwd(jax.jacfwd(f1))(primal))
        if case.differentiable_x:
            out.append(jax.jacfwd(jax.jacfwd(f, 1), 0)(x, w))
            out.append(jax.jacfwd(jax.jacfwd(f, 0), 1)(x, w))
        return out

    ours, ref = jax.jit(lambda x, w: (second_order(case.dual, x, w),
                                      second_order(case.reference, x, w)))(x, w)  # fmt: skip
    assert_trees_close(ours, ref)


# --- preferred_element_type wider than the operands ----------------------------------------
# float32 operands, float64 result: the products of two float32 numbers are exact in
# float64 and the sums of K terms are off by at most γ_K(float64)·Σ|x||w| ≈ 1e-15 relative.
# Accumulating in float32 instead would be off by ~1e-7.

_WIDE = [
    ("dot_general", lambda f, x, w: f(x, w, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float64),
     lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ()))), (4, 64), (64, 4)),
    ("einsum", lambda f, x, w: f("bd,dk->bk", x, w, preferred_element_type=jnp.float64),
     lambda x, w: jnp.einsum("bd,dk->bk", x, w), (4, 64), (64, 4)),
    ("conv_general_dilated", lambda f, x, w: f(x, w, (1,), "VALID",
                                               preferred_element_type=jnp.float64),
     lambda x, w: lax.conv_general_dilated(x, w, (1,), "VALID"), (2, 16, 8), (4, 16, 4)),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, call, reference, x_shape, w_shape", _WIDE, ids=[w[0] for w in _WIDE]
)
def test_wider_out_dtype_accumulates_wide(name, call, reference, x_shape, w_shape):
    bindings = (getattr(jaxlinear, name), getattr(jaxlinear, "dual_" + name))
    x, w = _normal(0, x_shape, jnp.float32), _normal(1, w_shape, jnp.float32)
    tx, tw = _normal(2, x_shape, jnp.float32), _normal(3, w_shape, jnp.float32)

    def ours(x, w, tx, tw):
        out = [call(f, x, w) for f in bindings]
        out.append(jax.jvp(lambda x, w: call(bindings[1], x, w), (x, w), (tx, tw))[1])
        return out

    def ref(x, w, tx, tw):  # the same float32 values, in float64
        x, w, tx, tw = (a.astype(jnp.float64) for a in (x, w, tx, tw))
        y = reference(x, w)
        return [y, y, reference(tx, w) + reference(x, tw)]

    got, want = jax.jit(ours)(x, w, tx, tw), jax.jit(ref)(x, w, tx, tw)
    assert [a.dtype for a in got] == [jnp.float64] * 3
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13 * float(jnp.max(jnp.abs(b))))


# --- per-example norms with bfloat16 params --------------------------------------------------
# A dense layer y = x W + b, loss_i = y_i · c. Every value is a bfloat16 number: x, W, b, c.
# The per-example gradients are dW_i = Σ_t x_i[t]ᵀ c (over the sequence axis, if any) and
# db_i = Σ_t c: products of two bfloat16 numbers are exact in float32, so in float32 each
# norm² is a sum of K ≤ 64 non-negative exact terms (plus the T-term sums of the sequence
# route), off by at most γ_K ≈ K·2⁻²⁴ relative; the square root halves that. Bound: 1e-5
# relative. Summed in bfloat16 instead, each addition rounds to 2⁻⁹ relative: ~4e-3.


@pytest.mark.parametrize("lead", [(6,), (6, 4)], ids=["flat", "sequence"])
def test_per_example_norms_bf16_params_in_float32(lead):
    bf16 = jnp.bfloat16
    x = _normal(0, (*lead, 8), bf16)
    p = jaxlinear.Params(_normal(1, (8, 5), bf16), _normal(2, (5,), bf16))
    c = _normal(3, (5,), bf16)

    def loss(p, x):  # (n,) per-example losses
        y = jaxlinear.linear(p, x)  # (n, ..., 5), bfloat16
        return jnp.sum(y * jnp.broadcast_to(c, y.shape), axis=tuple(range(1, y.ndim)))

    norms = jax.jit(lambda p, x: jaxlinear.per_example_grad_norms(loss, p, x))(p, x)
    assert norms.dtype == jnp.float32

    # Reference: JAX's per-example gradients of the plain layer in float32, of the same
    # bfloat16-rounded values; the norm of those float32 gradients taken in float64.
    def loss_one(p, x):  # one example, plain float32
        y = x @ p.W + jnp.broadcast_to(p.b, (*x.shape[:-1], p.b.shape[0]))
        return jnp.sum(y * jnp.broadcast_to(c.astype(jnp.float32), y.shape))

    p32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), (p, x))
    grads = jax.jit(jax.vmap(jax.grad(loss_one), (None, 0)))(p32, x32)
    want = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2, axis=tuple(range(1, g.ndim)))
                       for g in jax.tree.leaves(grads)))  # fmt: skip
    np.testing.assert_allclose(np.asarray(norms, np.float64), want, rtol=1e-5, atol=0)


# --- the shared compilation cache cannot fail a run --------------------------------------------


def test_compilation_cache_read_error_is_not_an_error():
    # conftest.py ignores exactly JAX's warning for a cache entry caught half-written by
    # a concurrent process (JAX compiles instead); any other warning is still an error.
    warnings.warn(
        "Error reading persistent compilation cache entry for 'jit_f': XlaRuntimeError: x",
        UserWarning,
        stacklevel=1,
    )
    with pytest.raises(UserWarning, match="some other warning"):
        warnings.warn("some other warning", UserWarning, stacklevel=1)
