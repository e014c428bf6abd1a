"""Where the per-example driver sees the calls of the family's ops.

Every explicit-rule op (both bindings of every ``bilinear_op``, and ``embed``) runs its
call through ``call(rule, apply, x, w, b)``. Outside ``per_example_grad_norms`` /
``clipped_grad`` that is ``apply(x, w, b)`` and nothing else. While one of their passes
traces ``loss_fn``, the active recorder sees each call: its operands, and a ``rule``,
the op's per-example capability (see ``per_example.py`` for the protocol):

``rule.name``
    the op's name, for the route report.
``rule.example_axis(x, w)``
    where axis 0 of ``x`` (the examples) lands in ``y``, or ``None`` when the op
    contracts it or pairs it with an axis of ``w``.
``rule.sq_norms(x, g, w_aval, y_axis, dtype) -> (route, sq, w̄_i | None)``
    the per-example squared norms of ``w̄`` from the layer input ``x: (n, ...)`` and the
    output cotangent ``g`` (in ``y``'s layout, examples on ``y_axis``), and the per-example
    ``w̄_i: (n, *w.shape)`` where the route formed them.
``rule.per_example_w(x, g, w_aval, y_axis, dtype) -> w̄_i``
    every example's ``w̄_i: (n, *w.shape)`` (for a leaf used by several calls, whose
    per-example gradient is their sum).
``rule.factors(x, g, w_aval, y_axis, dtype) -> (A, B, a_axes, b_axes) | None``
    ``w̄_i = Σ_t A_i[t] ⊗ B_i[t]`` over ``w``'s axes ``a_axes`` and ``b_axes`` (``A`` may be
    integer rows ``(n, T)``: one-hot rows, ``-1`` none), for the Gram over several calls.
``rule.weight_grad(x, g, w_aval) -> w̄``
    the op's own transpose in ``w``: ``B_wᵀ(g; x)`` (``bilinear_op``'s ``per_example_sum``
    where the op has one).

This module imports nothing of jaxlinear, so every op module can use it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

# The active recorder (a per-example pass), or None. While an op's own code runs it is
# None again, so an op built from other ops is seen once, as itself.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("jaxlinear_taps", default=None)


def call(rule, apply: Callable, x, w, b=None):
    """``apply(x, w, b)``, seen by the active recorder if there is one.

    Args:
      rule: the op's per-example rule (the protocol above), bound to this call's
        static parameters.
      apply: the op itself, ``apply(x, w, b) -> y``.
      x, w, b: the operands as the op receives them (``b`` may be ``None``).
    """
    recorder = _ACTIVE.get()
    if recorder is None:
        return apply(x, w, b)
    token = _ACTIVE.set(None)
    try:
        return recorder.layer(rule, apply, x, w, b)
    finally:
        _ACTIVE.reset(token)


def recording(recorder, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``recorder`` seeing every op call made inside it."""
    token = _ACTIVE.set(recorder)
    try:
        return fn(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
