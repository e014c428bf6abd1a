r"""Ghost norms: ``‖X_iᵀ G_i‖_F`` per example without forming ``X_iᵀ G_i``.

Every op of the family whose weight gradient, example by example, is a matrix product
``w̄_i = X_iᵀ G_i`` — ``X_i: (T, d)`` example ``i``'s rows of the (reshaped, or unfolded)
layer input, ``G_i: (T, p)`` its rows of the output cotangent — has

    ‖X_iᵀ G_i‖²_F = ⟨X_i X_iᵀ, G_i G_iᵀ⟩

(the "Gram" form: two ``(T, T)`` matrices, ``T² (d + p)`` multiply-adds), and for ``T = 1``
the rank-one form ``‖x_i‖² ‖g_i‖²``. Which pays is decided per layer call from the shapes
(``gram_pays``); where neither does, the op's generic route forms each ``w̄_i``. The
matmul-type ops weigh memory too (``matmul_route``): forming ``w̄_i`` and keeping them for
the clipped sum costs the fewest flops, so it comes first wherever ``keeps`` allows it.

The dense layer reads ``x: (n, ..., d_in)`` as ``X_i: (T, d_in)`` with ``T`` the product
of the axes between; ``dot_general`` and ``einsum`` do the same after moving their
contracted axes last; a convolution's ``X_i`` is its input patches
(``lax.conv_general_dilated_patches``), ``T`` the number of output positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BLOCK_ELEMENTS = 2**19
"""Where a route forms per-example buffers (``w̄_i``, a convolution's patches), it forms them
for a block of examples at a time, at most this many elements (2 MiB in float32): the norms'
memory stays bounded in ``n`` (and on CPU small blocks were faster, too)."""


def keeps(n: int, w_size: int, held: int) -> bool:
    """Whether a route keeps its ``w̄_i`` for the clipped sum ``Σ_i c_i w̄_i``: when their
    ``n·|w|`` elements are at most ``held`` (``x``'s and ``g``'s, which the clipped sum
    holds until the clip factors are known anyway). Else the sum is the op's own transpose
    ``B_wᵀ(c ⊙ g; x)``: no ``n·|w|`` buffer, one more weight-gradient pass.

    Examples:
      >>> keeps(128, 3 * 3 * 32 * 64, 128 * (32 * 32 * 32 + 16 * 16 * 64))  # 2.4M ≤ 6.3M
      True
      >>> keeps(128, 3 * 3 * 64 * 64, 128 * 2 * 16 * 16 * 64)  # 4.7M > 4.2M
      False
    """
    return n * w_size <= held


def in_blocks(f, args, axes, per_example: int):
    """``f(*args)``, ``f`` applied to blocks of examples.

    Args:
      f: takes ``args`` with fewer examples (each still on its axis in ``axes``) -> arrays
        (a pytree) with those examples on axis 0.
      args: arrays holding the ``n`` examples on ``axes``.
      axes: each array's examples' axis.
      per_example: elements ``f`` forms per example: blocks of
        ``max(1, BLOCK_ELEMENTS // per_example)`` examples under ``lax.map`` (one call when
        all fit).

    Examples:
      >>> import jax.numpy as jnp
      >>> f = lambda a: jnp.sum(a, axis=1) * jnp.arange(a.shape[0])  # 0, 3, ... in a block
      >>> in_blocks(f, [jnp.ones((5, 3))], [0], BLOCK_ELEMENTS // 2).tolist()  # blocks of 2
      [0.0, 3.0, 0.0, 3.0, 0.0]
    """
    n = args[0].shape[axes[0]]
    block = max(1, BLOCK_ELEMENTS // max(1, per_example))
    if block >= n:
        return f(*args)
    q, m = divmod(n, block)
    moved = [jnp.moveaxis(a, ax, 0) for a, ax in zip(args, axes, strict=True)]

    def one(blocks):  # a block: (block, ...) back to each array's layout
        return f(*(jnp.moveaxis(b, 0, ax) for b, ax in zip(blocks, axes, strict=True)))

    head = [a[: q * block].reshape(q, block, *a.shape[1:]) for a in moved]
    out = jax.tree.map(lambda a: a.reshape(q * block, *a.shape[2:]), lax.map(one, head))
    if m:
        rest = one([a[q * block :] for a in moved])
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
    return out


def gram_pays(T: int, d: int, p: int) -> bool:
    """fastDP's rule (Bu et al., mixed ghost clipping): the Gram form when ``2 T² ≤ p d``.

    ``2 T²`` is the size of one example's two Gram matrices, ``p d`` that of its weight
    gradient ``w̄_i``: the rule keeps the smaller buffer per example.

    Examples:
      >>> gram_pays(64, 512, 512), gram_pays(1024, 27, 32)
      (True, False)
    """
    return 2 * T * T <= p * d


def matmul_sq_norms(X, G):
    r"""``(route, ‖X_iᵀ G_i‖_F² (n,))``, or ``None`` where forming ``w̄_i`` pays better.

    Args:
      X: ``(n, T, d)``, example ``i``'s rows ``X[i]``.
      G: ``(n, T, p)``, in the same dtype.

    Returns:
      ``("rank_one", ‖x_i‖² ‖g_i‖²)`` for ``T = 1``; ``("gram", ⟨X_i X_iᵀ, G_i G_iᵀ⟩)``
      when ``gram_pays(T, d, p)``; else ``None``.
    """
    _, T, d = X.shape
    p = G.shape[-1]
    if T == 1:
        return "rank_one", jnp.sum(X[:, 0] ** 2, axis=-1) * jnp.sum(G[:, 0] ** 2, axis=-1)
    if not gram_pays(T, d, p):
        return None
    xx = jnp.einsum("ntd,nsd->nts", X, X)  # (n, T, T)
    gg = jnp.einsum("ntp,nsp->nts", G, G)  # (n, T, T)
    return "gram", jnp.sum(xx * gg, axis=(1, 2))


def matmul_route(X, G, w_size: int | None = None):
    r"""The matmul-type ops' route (dense, ``dot_general``, ``einsum``): ``(route, ‖w̄_i‖²)``
    from ``matmul_sq_norms``, or ``None`` for the op's generic route (``w̄_i`` formed).

    Cheapest first where the memory allows: ``T = 1``, rank one; then, where
    ``keeps(n, |w|, |X| + |G|)``, ``None``: the generic route forms ``w̄_i`` (``n T d p``
    multiply-adds, the weight gradient's own count) and keeps them, so the clipped sum is
    ``Σ_i c_i w̄_i`` (``n d p``) and neither the Gram's ``n T² (d + p)`` nor a second weight
    gradient ``B_wᵀ(c ⊙ g; x)`` is paid, for an ``n·|w|`` buffer no larger than the ``x``
    and ``g`` it replaces; else the Gram where ``gram_pays``, else ``None`` (``w̄_i`` formed
    in blocks, not kept). For ``|w| = d p`` the memory condition ``d p ≤ T (d + p)`` is also
    ``T d p ≤ T² (d + p)``: forming ``w̄_i`` costs no more than the Gram even for the norms
    alone.

    Args:
      X: ``(n, T, d)``, example ``i``'s rows ``X[i]``.
      G: ``(n, T, p)``, in the same dtype.
      w_size: ``|w|`` where it is not ``d p`` (an einsum's ``w`` with letters of its own).

    Examples:
      >>> import jax.numpy as jnp
      >>> X, G = jnp.ones((32, 64, 128)), jnp.ones((32, 64, 512))
      >>> matmul_route(X, G[..., :128]) is None  # 32·128·128 ≤ 32·64·(128 + 128)
      True
      >>> matmul_route(X, G)[0]  # 32·128·512 > 32·64·(128 + 512): the Gram
      'gram'
    """
    n, T, d = X.shape
    p = G.shape[-1]
    if T > 1 and keeps(n, d * p if w_size is None else w_size, X.size + G.size):
        return None
    return matmul_sq_norms(X, G)
