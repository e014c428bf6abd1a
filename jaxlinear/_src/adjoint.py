r"""The dot-product (adjoint) test: is a pullback the transpose of a pushforward?

A linear map ``J`` and its transpose satisfy, for every ``v`` in its domain and every
``u`` in its codomain,

    ⟨u, J v⟩ = ⟨Jᵀ u, v⟩,

with the pairing ``⟨a, b⟩ = Σ a·b`` summed over every entry of every leaf. Evaluating
both sides for random ``u`` and ``v`` is a cheap, sharp test of a hand-written pullback
against its pushforward: a wrong transpose (a missing ``ᵀ``, a wrong sum) gives a
residual of order one, a right one a residual of the order of the rounding error
(``~1e-16`` in float64, ``~1e-7`` in float32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import export


class AdjointTestResult(NamedTuple):
    """The two sides of ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩`` and their relative difference.

    Attributes:
      lhs: ``⟨u, J v⟩``, a scalar.
      rhs: ``⟨Jᵀ u, v⟩``, a scalar.
      residual: ``|lhs - rhs| / max(|lhs|, |rhs|)`` (``0`` when both are ``0``).
    """

    lhs: Any
    rhs: Any
    residual: Any


# jax.export serializes the pytrees a function takes and returns: by this name.
export.register_namedtuple_serialization(
    AdjointTestResult, serialized_name="jaxlinear.AdjointTestResult"
)


def _check_like(fn: str, name: str, value, like_name: str, like) -> None:
    """``value`` must be a pytree of floating arrays of ``like``'s structure and shapes."""
    value_def, like_def = jax.tree.structure(value), jax.tree.structure(like)
    if value_def != like_def:
        raise ValueError(
            f"{fn}: `{name}` has pytree structure {value_def} but `{like_name}` has structure"
            f" {like_def}; they must match"
        )
    paths = jax.tree_util.tree_leaves_with_path(value)
    for (path, a), b in zip(paths, jax.tree.leaves(like), strict=True):
        where = f"{name}{jax.tree_util.keystr(path)}"
        for label, leaf in ((where, a), (f"{like_name}{jax.tree_util.keystr(path)}", b)):
            dtype = getattr(leaf, "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
                got = type(leaf).__name__ if dtype is None else f"dtype {dtype}"
                raise TypeError(f"{fn}: `{label}` must be a floating array, got {got}")
        if a.shape != b.shape:
            raise ValueError(
                f"{fn}: `{where}` has shape {a.shape} but"
                f" `{like_name}{jax.tree_util.keystr(path)}` has shape {b.shape}; they must match"
            )


def _pairing(a, b):
    """``⟨a, b⟩ = Σ a·b`` over all leaves (bilinear: no complex conjugation)."""
    terms = [jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return sum(terms[1:], start=terms[0]) if terms else jnp.zeros(())


def adjoint_test(pushforward_fn: Callable, pullback_fn: Callable, v, u) -> AdjointTestResult:
    r"""Evaluate both sides of ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩`` for a linear map ``J``.

        residual = |⟨u, Jv⟩ − ⟨Jᵀu, v⟩| / max(|⟨u, Jv⟩|, |⟨Jᵀu, v⟩|)

    The pairing is bilinear (``Σ a·b``, no conjugation), matching JAX, whose pullbacks
    are transposes rather than Hermitian adjoints; so the test also holds for complex maps.

    Args:
      pushforward_fn: ``v -> J v``, linear in ``v``.
      pullback_fn: ``u -> Jᵀ u``, the claimed transpose; returns the structure of ``v``.
      v: a pytree of floating arrays in the domain of ``J`` (e.g. random normal).
      u: a pytree of floating arrays in the codomain of ``J``.

    Returns:
      ``AdjointTestResult(lhs, rhs, residual)``, scalars.

    Raises:
      TypeError: a function argument is not callable; a leaf is not a floating array.
      ValueError: ``pushforward_fn(v)`` does not have the structure and shapes of ``u``,
        or ``pullback_fn(u)`` not those of ``v``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> x = jnp.ones((3, 2))
      >>> v, u = jnp.arange(6.).reshape(3, 2), jnp.ones((3, 2))
      >>> t = jaxlinear.adjoint_test(
      ...     lambda dx: jaxlinear.pushforward(p, x, None, dx),
      ...     lambda g: jaxlinear.pullback(p, x, g)[1],
      ...     v, u)
      >>> float(t.lhs), float(t.rhs), float(t.residual)
      (36.0, 36.0, 0.0)
      >>> wrong = jaxlinear.adjoint_test(  # G W instead of G Wᵀ: caught
      ...     lambda dx: jaxlinear.pushforward(p, x, None, dx), lambda g: g @ p.W, v, u)
      >>> float(wrong.lhs), float(wrong.rhs), round(float(wrong.residual), 3)
      (36.0, 42.0, 0.143)
    """
    fn = "adjoint_test"
    for name, f in (("pushforward_fn", pushforward_fn), ("pullback_fn", pullback_fn)):
        if not callable(f):
            raise TypeError(f"{fn}: `{name}` must be callable, got {type(f).__name__}")
    _check_like(fn, "v", v, "v", v)
    _check_like(fn, "u", u, "u", u)
    Jv = pushforward_fn(v)  # codomain: structure and shapes of u
    _check_like(fn, "pushforward_fn(v)", Jv, "u", u)
    JTu = pullback_fn(u)  # domain: structure and shapes of v
    _check_like(fn, "pullback_fn(u)", JTu, "v", v)
    lhs, rhs = _pairing(u, Jv), _pairing(JTu, v)
    scale = jnp.maximum(jnp.abs(lhs), jnp.abs(rhs))
    residual = jnp.where(scale > 0, jnp.abs(lhs - rhs) / jnp.where(scale > 0, scale, 1), 0)
    return AdjointTestResult(lhs, rhs, residual)
