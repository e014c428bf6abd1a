"""Embedding: a lookup is a one-hot matmul; its pullback is a scatter-add, repeated ids sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from demos._common import Context, count_calls, matrix_figure
from jaxlinear._src.ops import embed as embed_module


def run(ctx: Context):
    # A table of V rows of width d, and 5 token ids; id 3 appears three times, id 1 never.
    V, d = 4, 3
    table = jnp.arange(V * d, dtype=jnp.float64).reshape(V, d) / 10
    ids = jnp.array([3, 0, 3, 2, 3])
    y = jaxlinear.embed(table, ids)  # (5, d): row t is table[ids[t]]

    # 1. The lookup is linear in the table: y = H · table with H the (5, V) one-hot matrix
    # of the ids (row t has a single 1, in column ids[t]). An independent reference:
    H = jax.nn.one_hot(ids, V, dtype=jnp.float64)
    ctx.close("embed(table, ids) = one_hot(ids) @ table", y, H @ table, tol=0)

    # 2. So its pullback is Hᵀ G: row v of the table's cotangent sums the rows of G whose id
    # is v. That is a scatter-add, zeros(V, d).at[ids].add(G): repeated ids sum, rows never
    # looked up get zero. Worked by hand for G = the row numbers 1..5 (every column):
    G = jnp.broadcast_to(jnp.arange(1.0, 6.0, dtype=jnp.float64)[:, None], (5, d))
    by_hand = np.zeros((V, d))
    for t, v in enumerate(np.asarray(ids)):
        by_hand[v] += np.asarray(G[t])  # row 3 gets 1 + 3 + 5 = 9, row 1 gets nothing
    with count_calls(embed_module, "scatter_add") as calls:
        _, pull = jax.vjp(lambda t: jaxlinear.embed(t, ids), table)
        (table_bar,) = pull(G)
    ctx.close("the pullback is the scatter-add, worked by hand (row 3: 1 + 3 + 5)",
              table_bar, by_hand, tol=0)  # fmt: skip
    ctx.close("... equal to Hᵀ G, the transpose of the one-hot matmul", table_bar, H.T @ G, tol=0)
    ctx.check("... and jaxlinear's scatter_add is what ran", len(calls) == 1)
    _, pull_ref = jax.vjp(lambda t: H @ t, table)  # JAX's AD of the one-hot matmul
    ctx.close("JAX's AD of one_hot(ids) @ table agrees", table_bar, pull_ref(G)[0], tol=0)

    # 3. The dual binding: forward mode is the lookup of the tangent (the map is linear), and
    # linear_transpose gives the same scatter-add.
    dtable = jnp.ones_like(table)
    _, dy = jax.jvp(lambda t: jaxlinear.dual_embed(t, ids), (table,), (dtable,))
    ctx.close("jvp of dual_embed is the lookup of the tangent table", dy, H @ dtable, tol=0)
    (transposed,) = jax.linear_transpose(lambda t: jaxlinear.dual_embed(t, ids), table)(G)
    ctx.close("linear_transpose of dual_embed is the same scatter-add", transposed, by_hand, tol=0)

    # 4. Ids outside [-V, V) read a row of zeros and receive no gradient (negative ids in
    # range count from the end, as in NumPy): the pair stays a transpose pair.
    odd = jnp.array([-1, V, -V - 1])  # -1 -> row V-1; V and -V-1 are out of range
    y_odd, pull_odd = jax.vjp(lambda t: jaxlinear.embed(t, odd), table)
    expected = np.stack([np.asarray(table[V - 1]), np.zeros(d), np.zeros(d)])
    ctx.close("id −1 reads the last row; out-of-range ids read zeros", y_odd, expected, tol=0)
    ctx.close("... and only the last row gets a gradient", pull_odd(jnp.ones((3, d)))[0],
              np.zeros((V, d)) + np.eye(V)[:, [V - 1]], tol=0)  # fmt: skip

    if ctx.plots:
        fig = matrix_figure(
            ctx,
            [
                [("one_hot(ids)", H), "·", ("table", table), "=", ("embed", y)],
                [("one_hot(ids)ᵀ", H.T), "·", ("G", G), "=", ("scatter-add", table_bar)],
            ],
            title=f"ids = {ids.tolist()}: a lookup is a one-hot matmul; its pullback sums rows",
        )
        ctx.save(fig, "embedding.png")
    return ctx.checks
