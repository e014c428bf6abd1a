"""The family of explicit-rule ops, each case of ``tests/family_cases.py`` through every check.

The reference is always JAX's own AD of the plain ``lax``/``jnp`` op in float64; the
operands are square-ish (equal sizes), so a transpose that mixes up axes gives wrong
numbers, not a shape error. Also: hypothesis over ``dot_general`` dimension numbers,
the trace-time errors of ``dot_general``/``einsum``, and the builder itself.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jaxlinear
from tests.family_cases import CASES, Case
from tests.helpers import assert_trees_close, eqns, run_on_simulated_devices, saved_residuals

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = ("custom_vjp", "dual")


@pytest.fixture(params=CASES, ids=str)
def case(request) -> Case:
    return request.param


def _normal(seed, tree):
    """Standard normal arrays shaped like ``tree``'s leaves (NumPy: no compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


def _operands(case: Case, seed=0):
    x_like = jax.ShapeDtypeStruct(case.x_shape, jnp.float64)
    w_like = jax.ShapeDtypeStruct(case.w_shape, jnp.float64)
    x, w = _normal(seed, (x_like, w_like))
    if case.make_x:
        x = case.make_x(jax.random.key(seed), case.x_shape)
    return x, w


def _diff(case: Case, f, x, w):
    """``f`` as a function of its differentiable operands, and those operands."""
    if case.differentiable_x:
        return f, (x, w)
    return (lambda w: f(x, w)), (w,)


def _loss(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)))


# Each check below builds the quantities for our op and for the reference in ONE jitted
# function (one compile per case and check, instead of one per eager operation).


def _same(fn, *args):
    """Run ``fn(f, *args)`` for ours (a dict of bindings) and the reference, under one jit."""
    ours, ref = jax.jit(fn)(*args)
    assert_trees_close(ours, ref)


# --- values and reverse mode, both bindings -----------------------------------------------


def test_values_vjp_and_jit_grad(case):
    x, w = _operands(case)
    g = _normal(1, jax.eval_shape(case.reference, x, w))

    def reverse(f, x, w):
        f, primals = _diff(case, f, x, w)
        y, pull = jax.vjp(f, *primals)
        return y, pull(g), jax.grad(_loss(f), tuple(range(len(primals))))(*primals)

    def both(x, w):
        ours = [reverse(getattr(case, b), x, w) for b in BINDINGS]
        return ours, [reverse(case.reference, x, w)] * len(BINDINGS)

    _same(both, x, w)


def test_custom_vjp_saves_exactly_x_and_w(case):
    x, w = _operands(case)
    res = saved_residuals(case.custom_vjp, x, w)
    assert len(res) == 2 and all("from the argument" in r for r in res), res


# --- forward mode and higher order: the dual binding ---------------------------------------


def test_forward_mode_and_higher_order(case):
    # jvp, jacfwd, linear_transpose in each operand, forward-over-reverse (Hessian-vector
    # product; custom_vjp too: JAX differentiates its bwd), reverse-over-forward.
    x, w = _operands(case)
    _, primals = _diff(case, case.dual, x, w)
    argnums = tuple(range(len(primals)))
    t = _normal(2, primals)
    g = _normal(3, jax.eval_shape(case.reference, x, w))

    def forward_mode(f, fwd_over_rev_f, x, w):
        f_, primals = _diff(case, f, x, w)
        transposes = [jax.linear_transpose(lambda w: f(x, w), w)(g)]
        if case.differentiable_x:
            transposes.append(jax.linear_transpose(lambda x: f(x, w), x)(g))
        f2, _ = _diff(case, fwd_over_rev_f, x, w)
        return (
            jax.jvp(f_, primals, t),
            jax.jacfwd(f_, argnums)(*primals),
            transposes,
            jax.jvp(jax.grad(_loss(f2), argnums), primals, t),
            jax.jvp(jax.grad(_loss(f_), argnums), primals, t),
            jax.grad(lambda *p: jnp.sum(jnp.sin(jax.jvp(f_, p, t)[1])), argnums)(*primals),
        )

    def both(x, w):
        ours = forward_mode(case.dual, case.custom_vjp, x, w)
        return ours, forward_mode(case.reference, case.reference, x, w)

    _same(both, x, w)


# --- vmap -----------------------------------------------------------------------------------


def test_vmap(case):
    x, w = _operands(case)
    x2, w2 = _operands(case, seed=7)
    xs, ws = jnp.stack([x, x2]), jnp.stack([w, w2])
    argnums = (0, 1) if case.differentiable_x else (1,)

    def batched(f, x, w, xs, ws, every_layout=True):
        layouts = [((None, 0), (x, ws))]
        if every_layout and (case.differentiable_x or case.make_x is not None):
            layouts += [((0, None), (xs, w)), ((0, 0), (xs, ws))]
        out = [jax.vmap(f, axes)(*a) for axes, a in layouts]
        # ... and reverse mode through the batched rules: in w with w batched, and (the
        # dual binding) in each operand with both batched, where every fold is used.
        out.append(jax.grad(_loss(jax.vmap(f, (None, 0))), 1)(x, ws))
        if every_layout:
            out.append(jax.grad(_loss(jax.vmap(f, layouts[-1][0])), argnums)(*layouts[-1][1]))
            # forward mode with the tangents batched and the primals not
            f_, primals = _diff(case, f, x, w)
            out.append(jax.vmap(lambda *t: jax.jvp(f_, primals, t)[1])(*(xs, ws)[-len(primals) :]))
        return out

    def both(*a):
        # The dual binding's batching rule in every layout; custom_vjp (batched by JAX
        # itself, through its fwd and bwd) in one.
        ours = [batched(case.dual, *a), batched(case.custom_vjp, *a, every_layout=False)]
        return ours, [batched(case.reference, *a), batched(case.reference, *a, False)]

    _same(both, x, w, xs, ws)


RAW = {"conv_general_dilated", "dot_general", "gather"}  # the formulas' lax ops


def _primitives(f, *args):
    return {e.primitive.name for e in eqns(jax.make_jaxpr(f)(*args))}


def test_vmap_binds_the_explicit_rules(case, monkeypatch):
    # Under vmap the dual binding binds the family's primitives again (the batching rule
    # folds the vmapped axis into the op), so no lax op of the formulas appears outside
    # them, forward or in forward mode, and grad of vmap runs the op's own pullback
    # (counted), in every layout. (Were vmap to fall back to the formulas, the jaxprs would
    # hold the batched lax op and grad would run JAX's transposes of it, never ours.)
    # Trace only: nothing is compiled.
    x, w = _operands(case)
    xs, ws = jnp.stack([x, x]), jnp.stack([w, w])
    prim = f"jaxlinear_{case.op.name if case.op else 'embed'}"
    push = f"{prim}_pushforward" if case.op else prim  # embed's JVP binds itself
    pulled = []
    if case.op is not None:
        pullback = case.op._pullback_fn

        def counted(*a, **k):
            pulled.append(1)
            return pullback(*a, **k)

        monkeypatch.setattr(case.op, "_pullback_fn", counted)
    layouts = [((None, 0), (x, ws))]
    if case.differentiable_x or case.make_x is not None:
        layouts += [((0, None), (xs, w)), ((0, 0), (xs, ws))]
    for axes, operands in layouts:
        f, primals = _diff(case, jax.vmap(case.dual, axes), *operands)
        tangents = _normal(1, primals)
        names = _primitives(f, *primals)
        assert prim in names and not RAW & names, (axes, names)
        names = _primitives(lambda *p, f=f, t=tangents: jax.jvp(f, p, t), *primals)
        assert {prim, push} <= names and not RAW & names, (axes, names)
        pulled.clear()
        assert prim in _primitives(jax.grad(_loss(f)), *primals), axes
        assert case.op is None or pulled, axes  # the op's own pullback ran
    # Forward mode with the tangents batched and the primals not (jacfwd does this).
    f, primals = _diff(case, case.dual, x, w)
    names = _primitives(jax.jacfwd(f, argnums=len(primals) - 1), *primals)
    assert push in names and not RAW & names, names


# --- the dot-product test, and the explicit rule is what runs ---------------------------------


def test_adjoint_test_in_each_operand(case):
    x, w = _operands(case)
    u = _normal(6, jax.eval_shape(case.reference, x, w))
    names = ("x", "w") if case.differentiable_x else ("w",)

    def residuals(x, w):
        out = []
        for name in names:
            primal = x if name == "x" else w

            def bind(f, name=name, x=x, w=w):
                return (lambda a: f(a, w)) if name == "x" else (lambda a: f(x, a))

            def vjp_pullback(u, bind=bind, primal=primal):
                return jax.vjp(bind(case.custom_vjp), primal)[1](u)[0]

            def transpose_pullback(u, bind=bind, primal=primal):
                return jax.linear_transpose(bind(case.dual), primal)(u)[0]

            v = _normal(8, primal)
            for pull in (vjp_pullback, transpose_pullback):
                out.append(jaxlinear.adjoint_test(bind(case.dual), pull, v, u).residual)
        return jnp.stack(out)

    assert np.all(jax.jit(residuals)(x, w) < 1e-13)


def test_the_explicit_rule_runs(case, monkeypatch):
    if case.op is None:
        pytest.skip("no BilinearOp given for this case")
    x, w = _operands(case)
    calls = []
    for name in ("transpose_x", "transpose_w"):
        original = getattr(case.op, name)

        def doubled(*a, _original=original, _name=name, **k):  # a deliberately wrong rule
            calls.append(_name)
            return 2 * _original(*a, **k)

        monkeypatch.setattr(case.op, name, doubled)
    _, primals = _diff(case, case.reference, x, w)
    argnums = tuple(range(len(primals)))

    def grads(x, w):  # traced once: the wrappers run at trace time
        out = []
        for f in (case.reference, case.custom_vjp, case.dual):
            f, primals = _diff(case, f, x, w)
            out.append(jax.grad(_loss(f), argnums)(*primals))
        return out

    expected, *ours = jax.jit(grads)(x, w)
    for got in ours:
        assert_trees_close(got, jax.tree.map(lambda a: 2 * a, expected))
    assert sorted(calls) == 2 * ["transpose_w"] + (2 * ["transpose_x"] if len(argnums) == 2 else [])
    # Forward mode binds the op's own pushforward primitive (no JAX rule for the lax op).
    jvp_jaxpr = jax.make_jaxpr(lambda x, w: jax.jvp(case.dual, (x, w), (x, w)))(x, w)
    names = {e.primitive.name for e in eqns(jvp_jaxpr)}
    assert f"jaxlinear_{case.op.name}_pushforward" in names, names


# --- bfloat16 within the rounding bound -------------------------------------------------------
# Operands exact in bfloat16 (so casting them costs nothing): each product is exact in
# float32, the K-term sums cost at most γ_K·A (A = the op applied to |x|, |w|, i.e.
# Σ|x||w|; γ_K = K u₃₂/(1 − K u₃₂), K ≤ x.size·w.size terms), and one final rounding to
# bfloat16 costs u·|y| (u = 2⁻⁸): |Y − y| ≤ u|y| + (1 + u)·γ_K·A, as for `linear`. The
# cotangents likewise, with A the transpose of |g| against |w| (or |x|).

U_BF16 = 2.0**-8


def _gamma(k):
    return k * 2.0**-24 / (1 - k * 2.0**-24)


def test_bf16_within_rounding_bound(case):
    if not case.bf16:
        pytest.skip("case opts out of the bfloat16 test")
    x, w = _operands(case)
    x = x if case.make_x else x.astype(jnp.bfloat16)
    wb = w.astype(jnp.bfloat16)
    g = _normal(9, jax.eval_shape(case.reference, x, wb)).astype(jnp.bfloat16)
    k = x.size * w.size
    bound_gamma = (1 + U_BF16) * _gamma(k)

    @jax.jit
    def compute(x, wb, g):
        f64 = lambda a: a if case.make_x and a is x else a.astype(jnp.float64)  # noqa: E731
        x64, w64, g64 = f64(x), f64(wb), f64(g)
        y_ref, pull_ref = jax.vjp(case.reference, x64, w64)
        A, pull_abs = jax.vjp(case.reference, jnp.abs(x64), jnp.abs(w64))
        ours = []
        for binding in BINDINGS:
            y, pull = jax.vjp(getattr(case, binding), x, wb)
            ours.append((y, pull(g)))
        return ours, (y_ref, pull_ref(g64)), (A, pull_abs(jnp.abs(g64)))

    ours, (y_ref, grads_ref), (A, grads_abs) = compute(x, wb, g)
    for binding, (y, grads) in zip(BINDINGS, ours, strict=True):
        assert y.dtype == jnp.bfloat16
        err = np.abs(np.asarray(y, np.float64) - y_ref)
        assert np.all(err <= U_BF16 * np.abs(y_ref) + bound_gamma * A), binding
        for i in (0, 1) if case.differentiable_x else (1,):
            assert grads[i].dtype == jnp.bfloat16
            err = np.abs(np.asarray(grads[i], np.float64) - grads_ref[i])
            bound = U_BF16 * np.abs(grads_ref[i]) + bound_gamma * grads_abs[i]
            assert np.all(err <= bound), (binding, i)


# --- grad inside shard_map with a replicated kernel (3 simulated devices, subprocess) --------


def test_grad_inside_shard_map():
    out = run_on_simulated_devices("family_sharded_checks.py", 3)
    assert "all family sharded checks passed" in out and "[PASS]" in out, out


# --- hypothesis: dot_general over dimension numbers ---------------------------------------


@st.composite
def dot_general_configs(draw):
    """Shapes and dimension numbers: batch, contracting and kept axes at random positions."""
    n_batch, n_contract = draw(st.integers(0, 1)), draw(st.integers(0, 2))
    n_x_kept, n_w_kept = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    size = st.integers(1, 3)
    batch = [draw(size) for _ in range(n_batch)]
    contract = [draw(size) for _ in range(n_contract)]
    x_roles = batch + contract + [draw(size) for _ in range(n_x_kept)]
    w_roles = batch + contract + [draw(size) for _ in range(n_w_kept)]
    # role i of x sits at axis x_at[i]; w's contracting roles are paired in a drawn order
    x_at = draw(st.permutations(range(len(x_roles))))
    w_at = draw(st.permutations(range(len(w_roles))))
    order = draw(st.permutations(range(n_contract)))
    x_shape, w_shape = [0] * len(x_roles), [0] * len(w_roles)
    for i, s in enumerate(x_roles):
        x_shape[x_at[i]] = s
    for i, s in enumerate(w_roles):
        w_shape[w_at[i]] = s
    xc = tuple(x_at[n_batch + j] for j in order)
    wc = tuple(w_at[n_batch + j] for j in order)
    xb = tuple(x_at[j] for j in range(n_batch))
    wb = tuple(w_at[j] for j in range(n_batch))
    return tuple(x_shape), tuple(w_shape), ((xc, wc), (xb, wb))


@settings(max_examples=6, derandomize=True, deadline=None)
@given(dot_general_configs())
def test_dot_general_any_dimension_numbers(config):
    x_shape, w_shape, dims = config
    x, w = _normal(0, (np.zeros(x_shape), np.zeros(w_shape)))

    def ref(x, w):
        return lax.dot_general(x, w, dims)

    def dual(x, w):
        return jaxlinear.dual_dot_general(x, w, dims)

    g = _normal(1, jax.eval_shape(ref, x, w))

    def both(x, w):
        y, pull = jax.vjp(lambda x, w: jaxlinear.dot_general(x, w, dims), x, w)
        y_ref, pull_ref = jax.vjp(ref, x, w)
        ours = (y, pull(g), jax.jvp(dual, (x, w), (w, x) if x_shape == w_shape else (x, w)))
        ours += (jax.linear_transpose(lambda w: dual(x, w), w)(g),)
        ref_t = (x, w) if x_shape != w_shape else (w, x)
        return ours, (y_ref, pull_ref(g), jax.jvp(ref, (x, w), ref_t), pull_ref(g)[1:])

    _same(both, x, w)


# --- trace-time errors ---------------------------------------------------------------------

_X, _W = jnp.ones((2, 3)), jnp.ones((3, 4))
_DN = (((1,), (0,)), ((), ()))

DOT_GENERAL_ERRORS = [
    ("sizes", (_X, jnp.ones((2, 4)), _DN), ValueError,
     r"dot_general: contracting dimension sizes differ: `lhs` axis 1 has size 3"),
    ("batch sizes", (jnp.ones((2, 3)), jnp.ones((5, 3)), (((1,), (1,)), ((0,), (0,)))),
     ValueError, r"dot_general: batch dimension sizes differ"),
    ("malformed", (_X, _W, ((1,), (0,))), ValueError,
     r"dot_general: `dimension_numbers` must be \(\(lhs_contracting"),
    ("out of range", (_X, _W, (((2,), (0,)), ((), ()))), ValueError,
     r"dot_general: `dimension_numbers` names lhs contracting dimension\(s\) \[2\], out of range"),
    ("repeated", (jnp.ones((3, 3)), jnp.ones((3, 3)), (((0, 0), (0, 1)), ((), ()))), ValueError,
     r"dot_general: `dimension_numbers` repeats a lhs dimension"),
    ("unpaired", (_X, _W, (((1,), (0, 1)), ((), ()))), ValueError,
     r"dot_general: `dimension_numbers` has 1 lhs but 2 rhs contracting"),
    ("int dtype", (jnp.ones((2, 3), jnp.int32), _W, _DN), TypeError,
     r"dot_general: `lhs` has dtype int32; expected a floating"),
    ("not an array", ([[1.0, 2.0, 3.0]], _W, _DN), TypeError,
     r"dot_general: `lhs` must be an array, got list"),
]  # fmt: skip


@pytest.mark.parametrize("name, args, error, match", DOT_GENERAL_ERRORS, ids=lambda a: str(a))
def test_dot_general_errors(name, args, error, match):
    del name
    with pytest.raises(error, match=match):
        jaxlinear.dot_general(*args)
    with pytest.raises(error, match="dual_" + match):
        jaxlinear.dual_dot_general(*args)


def test_out_sharding_other_than_none_is_refused():
    with pytest.raises(NotImplementedError, match="dot_general: `out_sharding` must be None"):
        jaxlinear.dot_general(_X, _W, _DN, out_sharding=object())
    with pytest.raises(NotImplementedError, match="einsum: `out_sharding` must be None"):
        jaxlinear.einsum("ab,bc->ac", _X, _W, out_sharding=object())


EINSUM_ERRORS = [
    ("ab,bc->ac", (_X, jnp.ones((4, 4))), ValueError,
     r"einsum: letter 'b' has size 3 in `x` \(shape \(2, 3\)\) but 4 in `w`"),
    ("ab,bc,cd->ad", (_X, _W, _W), ValueError,
     r'einsum: expected exactly two operands .* here y1 = jaxlinear\.\w*einsum\("ab,bc->ac",'
     r' operands\[0\], operands\[1\]\); y2 = jaxlinear\.\w*einsum\("ac,cd->ad", y1,'
     r' operands\[2\]\)'),
    ("ab,bc,cd->ad", (_X, _W), ValueError, r"einsum: `subscripts` 'ab,bc,cd->ad' names 3"),
    ("abc,bc->a", (_X, _W), ValueError, r"einsum: `subscripts` 'abc,bc->a' gives `x` 3 axes"),
    ("ab,bc->az", (_X, _W), ValueError, r"einsum: .*output letter\(s\) \['z'\] appear in no"),
    ("ii,ij->j", (jnp.ones((3, 3)), _W), ValueError,
     r"einsum: .* repeats \['i'\] in the x term 'ii', a diagonal or trace"),
    ("ab,bc->aa", (_X, _W), ValueError, r"einsum: .* repeats \['a'\] in the output term"),
    ("a...b...,bc->ac", (_X, _W), ValueError, r"einsum: .* more than one ellipsis .* x term"),
    ("...ab,b...->a...", (jnp.ones((5, 2, 3)), jnp.ones((3, 6))), ValueError,
     r"einsum: an axis of '...' has size 5 in `x` \(shape \(5, 2, 3\)\) but 6 in `w`"),
    ("...abc,bc->a", (_X, _W), ValueError, r"einsum: .* gives `x` at least 3 axes"),
    ("a1,bc->ac", (_X, _W), ValueError, r"einsum: .* has non-letter\(s\) \['1'\] in the x term"),
    ("a.b,bc->ac", (_X, _W), ValueError, r"einsum: .* has non-letter\(s\) \['.'\] in the x"),
    (3, (_X, _W), TypeError, r"einsum: `subscripts` must be a string"),
]  # fmt: skip


@pytest.mark.parametrize("subscripts, operands, error, match", EINSUM_ERRORS, ids=str)
def test_einsum_errors(subscripts, operands, error, match):
    with pytest.raises(error, match=match):
        jaxlinear.einsum(subscripts, *operands)
    with pytest.raises(error, match="dual_" + match):
        jaxlinear.dual_einsum(subscripts, *operands)


# Every two-operand form jnp.einsum takes, besides the cases of family_cases.py (which run
# every check): implicit output (the letters appearing once, sorted, uppercase first;
# '...' first), '...' summed away (no '...' in the output), '...' of rank 0, a scalar
# output, size-1 axes broadcast (a named letter or in '...', in either operand), a letter
# summed out of `w` alone at a middle axis. Values, vjp in both bindings and jvp, against
# jnp.einsum's AD.
EINSUM_FORMS = [
    ("abc,cde", (2, 3, 3), (3, 2, 2)),
    ("cb,ba", (2, 3), (3, 2)),
    ("ab,bC", (2, 3), (3, 2)),
    ("...ab,b...", (2, 1, 3), (3, 2)),
    ("...ab,b...->a", (2, 1, 3), (3, 2)),
    ("a...b,b->...", (2, 3), (3,)),
    ("ab,bc->a...c", (2, 3), (3, 2)),
    ("...a,...a->...", (2, 3), (3,)),
    ("ab,bc->ac", (2, 1), (3, 2)),
    ("ab,ab->ab", (2, 3), (1, 3)),
    ("ab,bcd->ad", (2, 3), (3, 2, 2)),
]  # fmt: skip


def test_einsum_every_form():
    data = []
    for i, (subscripts, x_shape, w_shape) in enumerate(EINSUM_FORMS):
        x, w = _normal(i, (np.zeros(x_shape), np.zeros(w_shape)))
        y = jax.eval_shape(functools.partial(jnp.einsum, subscripts), x, w)
        data.append((x, w, *_normal(100 + i, (y, x, w))))  # x, w, g, ẋ, ẇ

    def transforms(einsum, dual_einsum, data):
        out = []
        for (subscripts, *_), (x, w, g, tx, tw) in zip(EINSUM_FORMS, data, strict=True):
            for bind in (einsum, dual_einsum):
                y, pull = jax.vjp(functools.partial(bind, subscripts), x, w)
                out.append((y, pull(g)))
            out.append(jax.jvp(functools.partial(dual_einsum, subscripts), (x, w), (tx, tw)))
        return out

    def both(data):
        ours = transforms(jaxlinear.einsum, jaxlinear.dual_einsum, data)
        return ours, transforms(jnp.einsum, jnp.einsum, data)

    _same(both, data)


def test_einsum_preferred_element_type():
    y = jaxlinear.einsum("ab,bc->ac", _X.astype(jnp.bfloat16), _W.astype(jnp.bfloat16),
                         preferred_element_type=jnp.float32)  # fmt: skip
    assert y.dtype == jnp.float32


# --- the builder itself -----------------------------------------------------------------------


def test_builder_refuses_unhashable_params_and_reserved_names():
    op = jaxlinear.bilinear_op(
        "scaled_matmul",
        lambda x, w, *, s, preferred_element_type: s * x @ w,
        lambda g, w, xa, *, s, preferred_element_type: s * g @ w.T,
        lambda g, x, wa, *, s, preferred_element_type: s * x.T @ g,
    )
    x = jnp.ones((2, 2))
    with pytest.raises(TypeError, match=r"scaled_matmul: parameter `s` must be hashable"):
        op.custom_vjp(x, x, s=[2.0])
    with pytest.raises(TypeError, match=r"scaled_matmul: `preferred_element_type` is set by"):
        op.dual(x, x, s=2.0, preferred_element_type=jnp.float32)
    with pytest.raises(ValueError, match=r"scaled_matmul: `residuals` must be 'exact'"):
        op.custom_vjp(x, x, s=2.0, residuals="half")
    with pytest.raises(ValueError, match=r"bilinear, not linear"):
        jax.linear_transpose(lambda x, w: op.dual(x, w, s=2.0), x, x)(x)


def test_builder_bias_and_compute_dtype_policy():
    # A user-defined op with a bias and bfloat16 compute: one rounding, gradients in the
    # primals' dtypes, b̄ = Σ g over every axis but the last.
    op = jaxlinear.bilinear_op(
        "plain_matmul",
        lambda x, w, *, preferred_element_type: jnp.matmul(
            x, w, preferred_element_type=preferred_element_type
        ),
        lambda g, w, xa, *, preferred_element_type: jnp.matmul(
            g, w.T, preferred_element_type=preferred_element_type
        ),
        lambda g, x, wa, *, preferred_element_type: jnp.matmul(
            x.T, g, preferred_element_type=preferred_element_type
        ),
    )
    x, w = _operands(Case("m", None, None, None, (3, 3), (3, 3)))
    b = jnp.arange(3.0)
    for bind in (op.custom_vjp, op.dual):
        y, pull = jax.vjp(functools.partial(bind, compute_dtype=jnp.bfloat16), x, w, b)
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        y_policy = jnp.matmul(xb, wb, preferred_element_type=jnp.float32) + b[None, :]
        y_policy = y_policy.astype(y.dtype)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(y, y_policy)
        dx, dw, db = pull(jnp.ones_like(y))
        assert (dx.dtype, dw.dtype, db.dtype) == (x.dtype, w.dtype, b.dtype)
        np.testing.assert_array_equal(db, np.full(3, 3.0))

