r"""Ghost norms: ``‖X_iᵀ G_i‖_F`` per example without forming ``X_iᵀ G_i``.

Every op of the family whose weight gradient, example by example, is a matrix product
``w̄_i = X_iᵀ G_i`` — ``X_i: (T, d)`` example ``i``'s rows of the (reshaped, or unfolded)
layer input, ``G_i: (T, p)`` its rows of the output cotangent — has

    ‖X_iᵀ G_i‖²_F = ⟨X_i X_iᵀ, G_i G_iᵀ⟩

(the "Gram" form: two ``(T, T)`` matrices, ``T² (d + p)`` multiply-adds), and for ``T = 1``
the rank-one form ``‖x_i‖² ‖g_i‖²``. Which pays is decided per layer call from the shapes
(``gram_pays``); where neither does, the op's generic route forms each ``w̄_i``.

The dense layer reads ``x: (n, ..., d_in)`` as ``X_i: (T, d_in)`` with ``T`` the product
of the axes between; ``dot_general`` and ``einsum`` do the same after moving their
contracted axes last; a convolution's ``X_i`` is its input patches
(``lax.conv_general_dilated_patches``), ``T`` the number of output positions.
"""

from __future__ import annotations

import jax.numpy as jnp


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
