"""Checks shared by the model-adapter tests (linen, NNX, Equinox): no jaxlinear code here.

- ``jaxlinear_primitives(f, *args)``: the jaxlinear primitives a traced program binds,
  sub-programs (``scan``, ``remat``, ``pjit``, ``custom_vjp``) included, each counted once
  where it appears in the program (a scanned body counts once).
- ``draw``: a Flax-style initializer drawing with NumPy (seeded by the shape), float64.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _count(jaxpr, counter):
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name.startswith("jaxlinear_"):
            counter[name.removeprefix("jaxlinear_")] += 1
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                _count(sub, counter)


def jaxlinear_primitives(f, *args) -> dict[str, int]:
    """``{op name: count}`` of the jaxlinear primitives in ``jax.make_jaxpr(f)(*args)``."""
    counter: collections.Counter = collections.Counter()
    _count(jax.make_jaxpr(f)(*args).jaxpr, counter)
    return dict(counter)


def draw(key, shape, dtype=jnp.float64):
    """A Flax initializer drawing with NumPy, seeded by the shape: nothing to compile."""
    del key
    shape = tuple(shape)
    scale = 1 / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    return jnp.asarray(np.random.default_rng(list(shape)).standard_normal(shape) * scale, dtype)
