"""Under ``vmap``, both bindings of every op lower to the contractions JAX's AD lowers to.

``grad`` of a loss of ``vmap(op)`` (one and two levels, over ``x`` with ``w`` shared, and
over both), lowered to XLA's HLO: the multiset of its contractions and gathers/scatters,
each as ``(opcode, result size, operand sizes)``, equals that of JAX's AD of the plain
``lax`` op. A binding that ran its backward pass per example would show each weight
cotangent as a batched product of size ``n × |w|`` (then summed): a different multiset
(this is what the custom_vjp binding did before it was bound through a primitive).
Counts and sizes only, no times, so the test cannot flake; the HLO before XLA's passes,
so it pays no compile."""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import pytest

import jaxlinear
from tests.family_cases import CASES

N = 3  # the size of each vmapped axis

_OPS = ("dot", "convolution", "gather", "scatter")
_INSTR = re.compile(r"= \w+\[([\d,]*)\]\S* (" + "|".join(_OPS) + r")\(([^)]*)\)")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _size(dims: str) -> int:
    return math.prod(int(d) for d in dims.split(",") if d)


def contractions(fn, *args) -> collections.Counter:
    """``(opcode, result size, sorted operand sizes)`` of every dot, convolution, gather and
    scatter in the HLO of ``jax.jit(fn)`` (sizes, not shapes: reshapes do not count)."""
    text = jax.jit(fn).lower(*args).as_text(dialect="hlo")
    found = collections.Counter()
    for out, op, operands in _INSTR.findall(text):
        found[(op, _size(out), tuple(sorted(_size(s) for s in _SHAPE.findall(operands))))] += 1
    return found


# A bilinear op of the user's own (``y = x @ w`` on the last axis of ``x``), with a batch
# hook for a batched ``x`` only: the builder's generic machinery, not an op of ours.
def _mm(x, w, *, preferred_element_type):
    return jnp.matmul(x, w, preferred_element_type=preferred_element_type)


def _mm_tx(g, w, x_aval, *, preferred_element_type):
    return jnp.matmul(g, w.T, preferred_element_type=preferred_element_type)


def _mm_tw(g, x, w_aval, *, preferred_element_type):
    lead = tuple(range(x.ndim - 1))
    return jnp.tensordot(x, g, (lead, lead), preferred_element_type=preferred_element_type)


def _mm_batch(x_ndim, w_ndim, x_batched, w_batched, *, axis_size):
    return jaxlinear.BatchRule({}, 0) if not w_batched else None


USER_OP = jaxlinear.bilinear_op("test_vmap_cost_mm", _mm, _mm_tx, _mm_tw, batch=_mm_batch)

_BY_NAME = {c.name: c for c in CASES}
OPS = {  # name: (custom_vjp, dual, reference, x shape, w shape, make_x); one case per op
    "dense": (
        lambda x, w: jaxlinear.linear(jaxlinear.Params(w, w[0]), x),
        lambda x, w: jaxlinear.dual_linear(jaxlinear.Params(w, w[0]), x),
        lambda x, w: x @ w + w[:1],  # (2, 3) + (1, 3)
        (2, 3),
        (3, 3),
        None,
    ),
    "user_op": (USER_OP.custom_vjp, USER_OP.dual, lambda x, w: x @ w, (2, 3), (3, 3), None),
}
for _name in (
    "dot_general_batched",
    "einsum_projection",
    "conv2d_nhwc_s2_same",
    "conv_transpose1d_tk",
    "embed",
):
    _c = _BY_NAME[_name]
    OPS[_name] = (_c.custom_vjp, _c.dual, _c.reference, _c.x_shape, _c.w_shape, _c.make_x)

# (vmap levels, whether w is batched too); the user op's hook declines a batched w.
PATTERNS = [(1, False), (2, False), (1, True)]


def _loss(f, levels, w_batched):
    g = f
    for _ in range(levels):
        g = jax.vmap(g, (0, 0 if w_batched else None))
    return lambda x, w: jnp.sum(jnp.sin(g(x, w)))


@pytest.mark.parametrize("name", sorted(OPS))
def test_grad_of_vmap_has_jax_ad_contractions(name):
    custom_vjp, dual, reference, x_shape, w_shape, make_x = OPS[name]
    key = jax.random.key(0)
    for levels, w_batched in PATTERNS:
        if name == "user_op" and w_batched:
            continue
        x_full = (N,) * levels + x_shape
        x = make_x(key, x_full) if make_x else jax.random.normal(key, x_full)
        w = jax.random.normal(key, (N,) * (levels if w_batched else 0) + w_shape)
        argnums = (1,) if make_x else (0, 1)  # integer ids are not differentiated
        want = contractions(jax.grad(_loss(reference, levels, w_batched), argnums), x, w)
        assert want, "no contraction found in the HLO: the parser no longer matches it"
        for binding, f in (("custom_vjp", custom_vjp), ("dual", dual)):
            got = contractions(jax.grad(_loss(f, levels, w_batched), argnums), x, w)
            assert got == want, (
                binding,
                levels,
                w_batched,
                sorted(got.items()),
                sorted(want.items()),
            )
