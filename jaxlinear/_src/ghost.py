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
        ``b = max(1, BLOCK_ELEMENTS // per_example)`` examples in a ``lax.scan`` (one call
        when all fit), or of the largest divisor of ``n`` above ``b / 2`` where there is
        one (no remainder block).

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
    # A divisor of n over half the block: no remainder, so the blocks are views (with a
    # remainder XLA copies the leading q·block examples of every argument).
    block = next((b for b in range(block, block // 2, -1) if n % b == 0), block)
    q, m = divmod(n, block)

    def one(start, size):  # the block of `size` examples from `start`
        return f(*(lax.dynamic_slice_in_dim(a, start, size, ax)
                   for a, ax in zip(args, axes, strict=True)))  # fmt: skip

    # The loop slices the blocks out of `args` as they are (lax.map over `args` reshaped to
    # (blocks, block, ...) made XLA copy them into the loop: 12 MiB more on the bench CNN)
    _, outs = lax.scan(lambda _, i: (None, one(i * block, block)), None, jnp.arange(q))
    out = jax.tree.map(lambda a: a.reshape(q * block, *a.shape[2:]), outs)
    if m:
        rest = one(q * block, m)
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
    return out


def summed_in_blocks(f, args, axes, per_example: int):
    """``Σ_blocks f(block)``: ``f`` applied to blocks of examples (as ``in_blocks``) and its
    results (one array, the same shape for every block) added up in a ``lax.fori_loop``.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = lambda a: jnp.sum(a, axis=0)
      >>> summed_in_blocks(f, [jnp.arange(10.).reshape(5, 2)], [0], BLOCK_ELEMENTS // 2).tolist()
      [20.0, 25.0]
    """
    n = args[0].shape[axes[0]]
    block = max(1, BLOCK_ELEMENTS // max(1, per_example))
    if block >= n:
        return f(*args)
    q, m = divmod(n, block)

    def one(start, size):  # the block of `size` examples from `start`
        return f(*(lax.dynamic_slice_in_dim(a, start, size, ax)
                   for a, ax in zip(args, axes, strict=True)))  # fmt: skip

    total = lax.fori_loop(1, q, lambda i, t: t + one(i * block, block), one(0, block))
    return total + one(q * block, m) if m else total


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


def tied_gram_pays(gram_flops: int, per_example_flops: int) -> bool:
    """Whether a weight used by several calls takes the Gram over their rows
    (``tied_gram_sq_norms``) rather than the per-example sum of their ``w̄_{k,i}``: by
    multiply-adds per example (both run in blocks of examples, so neither grows with
    ``n·|w|``).

    Examples:
      >>> tied_gram_pays(136 * 256, 16 * 128 * 128)  # 16 steps of a 128×128 RNN weight
      True
    """
    return gram_flops <= per_example_flops


def tied_gram_sq_norms(parts):
    r"""``‖Σ_k A_kᵀ B_k‖_F²`` per example: the Gram over the calls' concatenated rows.

        ‖Σ_k A_kᵀ B_k‖² = Σ_{k,l} ⟨A_k A_lᵀ, B_k B_lᵀ⟩

    (a weight used by several calls: its per-example gradient is the sum over them, cross
    terms included). Calls whose factors are of the same kinds (dense or one-hot) are one
    block, their rows concatenated: at most three blocks, whatever the number of calls.

    Args:
      parts: ``[(A_k, B_k)]``, ``A_k: (n, T_k, a)``, ``B_k: (n, T_k, b)``; either may be
        integer ``(n, T_k)`` (not both): row ``t`` one-hot at ``A_k[:, t]`` (``-1``: a zero
        row), never formed: its Gram with itself is id equality, with a dense one a
        gather.

    Examples:
      >>> import jax.numpy as jnp
      >>> A, B = jnp.ones((1, 2, 3)), jnp.ones((1, 2, 1))  # AᵀB: 2 in each of 3 entries
      >>> ids = jnp.array([[0, 0]])  # onehot(ids)ᵀ B: 2 in entry 0
      >>> tied_gram_sq_norms([(A, B), (ids, B)]).tolist()  # ‖(4, 2, 2)‖²
      [24.0]
    """
    kinds = {}  # calls with factors of the same kinds: one block (their rows concatenated)
    for A, B in parts:
        kinds.setdefault((_ids(A), _ids(B)), []).append((A, B))
    parts = [tuple(jnp.concatenate(m, axis=1) for m in zip(*group, strict=True))
             for group in kinds.values()]  # fmt: skip
    total = 0
    for k, (A, B) in enumerate(parts):
        for l, (C, D) in enumerate(parts[: k + 1]):
            aa, bb = _rows_gram(A, C), _rows_gram(B, D)
            term = jnp.sum(aa * bb, axis=(1, 2))
            total = total + (term if k == l else 2 * term)
    return total


def _ids(M):
    return jnp.issubdtype(M.dtype, jnp.integer)


def _rows_gram(A, C):
    """``A_i C_iᵀ: (n, T_A, T_C)``, integer ``(n, T)`` operands read as one-hot rows."""
    a_ids, c_ids = _ids(A), _ids(C)
    if a_ids and c_ids:
        return (A[:, :, None] == C[:, None, :]) & (A[:, :, None] >= 0)  # (a mask: × the other)
    if c_ids:
        return jnp.swapaxes(_rows_gram(C, A), 1, 2)
    if a_ids:  # (A C ᵀ)[t, s] = C[s, A[t]]
        cols = jnp.broadcast_to(jnp.maximum(A, 0)[:, None, :], (*C.shape[:2], A.shape[1]))
        picked = jnp.take_along_axis(C, cols, axis=2)  # (n, T_C, T_A)
        return jnp.swapaxes(jnp.where(A[:, None, :] >= 0, picked, 0), 1, 2)
    return jnp.einsum("nta,nsa->nts", A, C)


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
