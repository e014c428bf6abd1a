"""The plan of per-example clipping (issue 22, items 6 and 8): the structural plan, or
``jax.vmap`` of ``jax.grad`` of the whole model where that is estimated cheaper.

Values are checked against JAX's own ``vmap(grad)`` of the single-example loss in float64;
the choice against ``PlanEstimate`` (flops and bytes counted on traced programs, no
timing), on cases where one plan is far cheaper whatever the calibration.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_per_example import assert_rel_close, reference, reference_clipped, reference_norms

import jaxlinear

rng = np.random.default_rng(6)


@pytest.fixture(autouse=True)
def _rank_promotion():
    with jax.numpy_rank_promotion("allow"):  # the models broadcast as users write them
        yield


def normal(*shape):
    return jnp.asarray(0.5 * rng.normal(size=shape))


# -- a user's op whose ghost rule forms (T, T) Grams however large T is --------------------


def _mm(x, w, *, preferred_element_type):  # (n, T, d) @ (d, p) -> (n, T, p)
    return jnp.einsum("ntd,dp->ntp", x, w, preferred_element_type=preferred_element_type)


def _mm_tx(g, w, x_aval, *, preferred_element_type):
    return jnp.einsum("ntp,dp->ntd", g, w, preferred_element_type=preferred_element_type)


def _mm_tw(g, x, w_aval, *, preferred_element_type):
    return jnp.einsum("ntd,ntp->dp", x, g, preferred_element_type=preferred_element_type)


def _always_gram(x, g, w_aval, *, y_axis, preferred_element_type):
    del w_aval, y_axis  # ‖X_iᵀ G_i‖² = ⟨X_i X_iᵀ, G_i G_iᵀ⟩: (n, T, T) each
    xx = jnp.einsum("ntd,nsd->nts", x, x, preferred_element_type=preferred_element_type)
    gg = jnp.einsum("ntp,nsp->nts", g, g, preferred_element_type=preferred_element_type)
    return "gram", jnp.sum(xx * gg, axis=(1, 2))


GRAM_MM = jaxlinear.bilinear_op("test_plan_gram_mm", _mm, _mm_tx, _mm_tw, per_example=_always_gram)


def gram_loss(w, x):  # x: (n, T, 2), w: (2, 2)
    return jnp.sum(jnp.sin(GRAM_MM.custom_vjp(x, w, None)), axis=(1, 2))


def mlp_loss(layers, x):
    return jnp.sum(jnp.sin(jaxlinear.mlp(layers, x)), axis=-1)


def seq_loss(p, x):  # a LayerNorm scale (per-example copy), a dense layer, a raw einsum
    h = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * p["scale"]
    h = jnp.tanh(jaxlinear.linear(p["dense"], h))
    return jnp.sum(jnp.sin(jnp.einsum("ntd,dp->ntp", h, p["W"])), axis=(1, 2))


def seq_case():
    p = {"scale": 1 + normal(4), "dense": jaxlinear.Params(normal(4, 5), normal(5)),
         "W": normal(5, 3)}  # fmt: skip
    return p, normal(4, 3, 4)


# -- the keyword --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda **kw: jaxlinear.clipped_grad(mlp_loss, *MLP, clip_norm=1.0, **kw),
        lambda **kw: jaxlinear.per_example_grad_norms(mlp_loss, *MLP, **kw),
        lambda **kw: jaxlinear.per_example_routes(mlp_loss, *MLP, **kw),
    ],
    ids=["clipped_grad", "per_example_grad_norms", "per_example_routes"],
)
def test_plan_keyword_is_checked(fn, request):
    name = request.node.callspec.id
    with pytest.raises(ValueError, match=rf"^{name}: `plan` must be one of \('auto',"
                       r" 'structural', 'vmap'\), got 'textbook'$"):  # fmt: skip
        fn(plan="textbook")


MLP = (jaxlinear.init_mlp(jax.random.key(0), [32, 64, 8], dtype=jnp.float64), normal(16, 32))


# -- values: each plan forced, against vmap(grad) ------------------------------------------


def test_each_plan_gives_the_clipped_sum_of_vmap_grad():
    """Structural and vmap(grad) forced, clip active for half the batch and inactive, in one
    jitted program traced once ("auto" runs one of them: its values are checked below)."""
    p, x = seq_case()
    per = reference(seq_loss, p, x)
    norms = reference_norms(per)
    clip, big = float(np.median(norms)), 10 * float(norms.max())
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, x):
        out = {}
        for plan in ("structural", "vmap"):

            def clipped(c, plan=plan):
                return jaxlinear.clipped_grad(seq_loss, p, x, clip_norm=c, plan=plan,
                                              fallback="raise")  # fmt: skip

            out[plan] = (clipped(clip), clipped(big)[0])
        return out, jaxlinear.per_example_grad_norms(seq_loss, p, x, plan="vmap")

    out, only_norms = step(p, x)
    step(p, x)
    assert_rel_close(only_norms, jnp.asarray(norms), 1e-10)
    expected = reference_clipped(per, clip)[0]
    for (grads, got_norms), unclipped in out.values():
        assert_rel_close(got_norms, jnp.asarray(norms), 1e-10)
        assert_rel_close(grads, expected, 1e-10)
        assert_rel_close(unclipped, jax.tree.map(lambda a: a.sum(0), per), 1e-10)


# -- the choice, and the report ------------------------------------------------------------


def test_auto_takes_vmap_grad_where_the_grams_dwarf_the_weight():
    """A user's op whose ghost rule forms ``(T, T)`` Grams for a ``(2, 2)`` weight: at
    ``T = 64`` its norms cost ``2nT²(d + p)`` flops against ``2nTdp`` for the per-example
    gradients, 64 times more; "auto" runs vmap(grad) (values as the reference)."""
    w, x = normal(2, 2), normal(2, 64, 2)
    report = jaxlinear.per_example_routes(gram_loss, w, x)
    assert report.plan == "vmap", str(report)
    assert [r.route for r in report] == ["gram"], str(report)  # the leaf's route, as before
    est = report.estimate
    assert est.cost("vmap") * 10 < est.cost("structural"), str(est)
    assert str(report).startswith("plan: vmap (auto: structural "), str(report)
    forced = jaxlinear.per_example_routes(gram_loss, w, x, plan="structural")
    assert (forced.plan, forced.why, forced.estimate) == ("structural", "plan='structural'", None)
    per = reference(gram_loss, w, x)
    clip = float(np.median(np.sqrt(np.sum(np.asarray(per) ** 2, axis=(1, 2)))))
    for plan in ("auto", "structural"):
        grads, norms = jax.jit(lambda w, x, plan=plan: jaxlinear.clipped_grad(
            gram_loss, w, x, clip_norm=clip, plan=plan))(w, x)  # fmt: skip
        expected, expected_norms = reference_clipped(per, clip)
        assert_rel_close(norms, jnp.asarray(expected_norms), 1e-10)
        assert_rel_close(grads, jnp.asarray(expected), 1e-10)
    # fallback="raise" asks for the structural plan: auto does not take vmap(grad) then.
    raising = jaxlinear.per_example_routes(gram_loss, w, x, fallback="raise")
    assert raising.plan == "structural" and "fallback='raise'" in raising.why, str(raising)


def test_auto_keeps_the_structural_plan_where_it_is_far_cheaper():
    """An MLP on rank-one inputs: the structural norms cost ``O(n(d + p))`` per layer, the
    textbook's per-example gradients ``n·d·p`` numbers."""
    report = jaxlinear.per_example_routes(mlp_loss, *MLP)
    assert report.plan == "structural", str(report)
    assert report.counts() == {"rank_one": 2, "bias": 2}, str(report)
    est = report.estimate
    assert est.cost("structural") * 10 < est.cost("vmap"), str(est)
    assert str(report).splitlines()[0] == f"plan: structural (auto: {est})"


def test_a_leaf_without_a_route_takes_vmap_grad_whatever_the_plan_asks():
    """``lax.cond`` hides the weight: structural and auto run vmap(grad) of the whole model
    (``fallback="vmap"``) or raise (``fallback="raise"``); ``plan="vmap"`` never raises."""
    w, x = normal(3, 2), normal(4, 3)

    def loss(w, x):
        return jax.lax.cond(True, lambda: jnp.sum(jnp.sin(x @ w), -1), lambda: x[:, 0])

    report = jaxlinear.per_example_routes(loss, w, x, plan="structural")
    assert report.plan == "vmap" and report.why == "1 leaf has no structural route", str(report)
    assert [r.route for r in report] == ["fallback"]
    report = jaxlinear.per_example_routes(loss, w, x, fallback="raise")
    assert report.plan == "none" and "fallback='raise'" in report.why, str(report)
    assert [r.route for r in report] == ["fallback"]
    meets = r"^clipped_grad: `params` is used where it meets the examples' data at `cond`"
    with pytest.raises(ValueError, match=meets):
        jaxlinear.clipped_grad(loss, w, x, clip_norm=1.0, fallback="raise")
    per = reference(loss, w, x)
    grads, norms = jax.jit(lambda w, x: jaxlinear.clipped_grad(
        loss, w, x, clip_norm=0.5, fallback="raise", plan="vmap"))(w, x)  # fmt: skip
    expected, expected_norms = reference_clipped(per, 0.5)
    assert_rel_close(norms, jnp.asarray(expected_norms), 1e-10)
    assert_rel_close(grads, jnp.asarray(expected), 1e-10)
