"""The family's ops as test cases: one ``Case`` per op configuration, shared by every test.

``tests/test_family.py`` runs each case through the same checks, against JAX's own AD of
the plain ``lax``/``jnp`` op in float64: values, vjp in both operands, jvp, jacfwd,
linear_transpose in each operand, forward-over-reverse, grad-of-jvp, vmap, jit, the
adjoint (dot-product) test in each operand, "the explicit rule ran", bfloat16 within the
rounding bound, and (``tests/family_sharded_checks.py``, 3 simulated devices) grad inside
``shard_map`` with a replicated kernel.

How to add a case (e.g. for a new op ``conv_general_dilated``): append to ``CASES``::

    CASES.append(Case(
        name="conv2d_stride2",                      # the pytest id
        custom_vjp=lambda x, w: jaxlinear.conv_general_dilated(x, w, (2, 2), "SAME"),
        dual=lambda x, w: jaxlinear.dual_conv_general_dilated(x, w, (2, 2), "SAME"),
        reference=lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME"),
        x_shape=(3, 5, 5, 3),                       # keep every size tiny
        w_shape=(3, 3, 3, 3),
        op=conv_module.CONV,                        # its BilinearOp: "the rule ran" test
        shard_axis=0,                               # see Case.shard_axis; None: skip
    ))

``custom_vjp``/``dual``/``reference`` take ``(x, w)`` arrays and return ``y``; bind every
static argument in the lambda. Prefer square shapes (equal sizes), so that a transpose
that mixes up axes gives wrong numbers rather than a shape error. Cases are plain data:
this module imports no test machinery and is cheap to import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jax import lax

import jaxlinear
from jaxlinear._src.ops import dot_general as dot_general_module
from jaxlinear._src.ops import einsum as einsum_module


@dataclasses.dataclass(frozen=True)
class Case:
    """One op configuration.

    Attributes:
      name: the pytest id.
      custom_vjp: ``(x, w) -> y`` through the op's ``custom_vjp`` binding.
      dual: ``(x, w) -> y`` through the op's dual (primitive) binding.
      reference: ``(x, w) -> y``: the plain ``lax``/``jnp`` op (no jaxlinear code).
      x_shape, w_shape: operand shapes (tiny).
      op: the op's ``BilinearOp``; the "explicit rule ran" test wraps its
        ``transpose_x``/``transpose_w``. ``None`` skips that test.
      shard_axis: an axis of ``x`` of size 3 that maps to an axis of ``y`` and is not
        shared with ``w`` (a batch/row axis): the sharded check splits ``x`` along it
        over 3 devices with ``w`` replicated. ``None`` skips the sharded check (each
        sharded case costs a few seconds: set it on one case per op).
      make_x: ``(key, shape) -> x`` for non-float inputs (e.g. integer ids);
        ``None``: standard normal float64.
      differentiable_x: ``False`` when ``x`` is not differentiable (integer ids): the
        x-derivative checks are skipped.
      bf16: include in the bfloat16 rounding-bound test (the policy is the builder's,
        shared by every op: one case per op is enough).
    """

    name: str
    custom_vjp: Callable
    dual: Callable
    reference: Callable
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    op: Any = None
    shard_axis: int | None = None
    make_x: Callable | None = None
    differentiable_x: bool = True
    bf16: bool = True

    def __str__(self):
        return self.name


def _dot_general_case(name, dims, x_shape, w_shape, shard_axis=None, bf16=False):
    return Case(
        name=name,
        custom_vjp=lambda x, w: jaxlinear.dot_general(x, w, dims),
        dual=lambda x, w: jaxlinear.dual_dot_general(x, w, dims),
        reference=lambda x, w: lax.dot_general(x, w, dims),
        x_shape=x_shape,
        w_shape=w_shape,
        op=dot_general_module.DOT_GENERAL,
        shard_axis=shard_axis,
        bf16=bf16,
    )


def _einsum_case(name, subscripts, x_shape, w_shape, shard_axis=None, bf16=False):
    return Case(
        name=name,
        custom_vjp=lambda x, w: jaxlinear.einsum(subscripts, x, w),
        dual=lambda x, w: jaxlinear.dual_einsum(subscripts, x, w),
        reference=lambda x, w: jnp.einsum(subscripts, x, w),
        x_shape=x_shape,
        w_shape=w_shape,
        op=einsum_module.EINSUM,
        shard_axis=shard_axis,
        bf16=bf16,
    )


CASES: list[Case] = [
    # batch axis 0 with w's axis 1; x's axis 2 contracted with w's axis 0; all sizes 3.
    _dot_general_case(
        "dot_general_batched", (((2,), (0,)), ((0,), (1,))), (3, 3, 3), (3, 3, 3), 1, True
    ),
    # Two contracted axes, in swapped order; x's axis 0 kept (the sharded axis).
    _dot_general_case(
        "dot_general_two_contract", (((1, 2), (2, 0)), ((), ())), (3, 2, 4), (4, 3, 2)
    ),
    # The attention projection and the attention scores (batch letters b, h).
    _einsum_case("einsum_projection", "btd,dhk->bthk", (3, 3, 3), (3, 3, 3), 0, True),
    _einsum_case("einsum_scores", "bqhd,bkhd->bhqk", (2, 3, 2, 3), (2, 3, 2, 3)),
    # 'a' is summed out of x alone: its transpose is a broadcast.
    _einsum_case("einsum_lone_sum", "abc,cd->bd", (2, 3, 3), (3, 3)),
]


# --- conv_general_dilated and embed (part B) ------------------------------------------------
import jax  # noqa: E402

from jaxlinear._src.ops import conv as conv_module  # noqa: E402


def _conv_case(name, x_shape, w_shape, shard_axis=None, bf16=False, **kw):
    return Case(
        name=name,
        custom_vjp=lambda x, w: jaxlinear.conv_general_dilated(x, w, **kw),
        dual=lambda x, w: jaxlinear.dual_conv_general_dilated(x, w, **kw),
        reference=lambda x, w: lax.conv_general_dilated(x, w, **kw),
        x_shape=x_shape,
        w_shape=w_shape,
        op=conv_module.CONV,
        shard_axis=shard_axis,
        bf16=bf16,  # the policy is the builder's: one conv case checks it
    )


def _embed_ids(key, shape):
    return jax.random.randint(key, shape, 0, 3)  # ids into a 3-row table: repeats certain


CASES += [
    # 2-D, channels last, stride 2, "SAME"; the batch axis is the sharded one.
    _conv_case("conv2d_nhwc_s2_same", (3, 4, 4, 3), (3, 3, 3, 3), 0, True, window_strides=(2, 2),
               padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
    # 1-D, channels first, asymmetric padding, input and kernel dilation, 3 feature groups.
    _conv_case("conv1d_dilated_groups", (2, 3, 5), (3, 1, 3), window_strides=(2,),
               padding=((2, 0),), lhs_dilation=(2,), rhs_dilation=(2,), feature_group_count=3),
    # batch groups (what w̄ of a grouped conv is), scrambled layout.
    _conv_case("conv1d_batch_groups", (3, 4, 3), (3, 3, 3), window_strides=(1,),
               padding="VALID", dimension_numbers=("CWN", "IWO", "NWC"), batch_group_count=3),
    # Embedding: x = integer ids (not differentiable), w = the (V, d) table; linear in w only.
    Case(
        name="embed",
        custom_vjp=lambda ids, table: jaxlinear.embed(table, ids),
        dual=lambda ids, table: jaxlinear.dual_embed(table, ids),
        reference=lambda ids, table: table[ids],
        x_shape=(3, 3),
        w_shape=(3, 3),
        make_x=_embed_ids,
        differentiable_x=False,
    ),
]  # fmt: skip


# --- conv_transpose -------------------------------------------------------------------------
from jaxlinear._src.ops import conv_transpose as conv_transpose_module  # noqa: E402


def _conv_transpose_case(name, x_shape, w_shape, **kw):
    return Case(
        name=name,
        custom_vjp=lambda x, w: jaxlinear.conv_transpose(x, w, **kw),
        dual=lambda x, w: jaxlinear.dual_conv_transpose(x, w, **kw),
        reference=lambda x, w: lax.conv_transpose(x, w, **kw),
        x_shape=x_shape,
        w_shape=w_shape,
        op=conv_transpose_module.CONV_TRANSPOSE,
        bf16=False,  # the policy is the builder's: a conv case checks it
    )


CASES += [
    # Channels last (lax's default), stride 2, explicit (lo, hi) padding of the dilated input,
    # kernel dilation, TensorFlow's flipped kernel. 1-D: cheap to compile; more
    # configurations (2-D, "SAME"/"VALID") in tests/test_conv_transpose.py.
    _conv_transpose_case("conv_transpose1d_tk", (2, 3, 3), (2, 3, 3), strides=(2,),
                         padding=((1, 2),), rhs_dilation=(2,), transpose_kernel=True),
]  # fmt: skip
