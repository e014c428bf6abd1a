"""Mutation audit: apply each mutant to a copy of the repository, run the tests that should
kill it, print mutant → killed / survived.

    python tools/mutate.py                 # every mutant (a few minutes on 2 cores)
    python tools/mutate.py policy einsum   # the mutants whose name contains a word
    python tools/mutate.py --list

The working tree is never modified: the files git knows of (tracked, and untracked but
not ignored) are copied to a temporary directory, and each mutant is applied there, its
tests run (``pytest -n 0 -x``, with that copy first on ``PYTHONPATH``), and the file put
back. A mutant is one exact source snippet and its replacement: a minimal change that
alters results. If the snippet is not found exactly once (the code moved or changed), the
mutant is reported "not applied", not an error: update its snippet. First the selected
tests run once unmutated ("baseline"): a mutant only counts as killed by tests that pass
without it.

Exit status: 0 if every applied mutant was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest arguments selecting the tests that should kill it
    why: str = ""


# The unchanged lines of bilinear.contract() between its two roundings.
_CONTRACT_MIDDLE = """
    def call(a, b):
        return fn(a, b, *aval, preferred_element_type=acc, **params)

    if jnp.dtype(acc) == jnp.dtype(cd) or not jnp.issubdtype(cd, jnp.floating):
        return call(a, b)
    info = jnp.finfo(cd)

    def widen(a):  # reduce_precision: XLA may drop a float32 -> 16-bit -> float32 round trip
"""

MUTANTS = [
    # --- the four that no test killed (issue 16) ---------------------------------------
    Mutant(
        "einsum_lone_sum_at_front",
        "jaxlinear/_src/ops/einsum.py",
        "missing = tuple(i for i, c in enumerate(out) if c not in have)",
        "missing = tuple(range(sum(c not in have for c in out)))",
        ("tests/test_family.py", "-k", "einsum_lone_sum"),
        "letters summed out of one operand alone broadcast back at the front",
    ),
    Mutant(
        "push_jvp_roles_swapped",
        "jaxlinear/_src/bilinear.py",
        "None if dw is None else x_dot,\n                None if dx is None else w_dot,",
        "None if dx is None else x_dot,\n                None if dw is None else w_dot,",
        ("tests/test_weak_spots.py", "-k", "second_order"),
        "_push_jvp: the swapped-roles term with the dx/dw conditions exchanged",
    ),
    Mutant(
        "policy_accumulates_narrow",
        "jaxlinear/_src/bilinear.py",
        "return cd, jnp.promote_types(acc, out), out",
        "return cd, acc, out",
        ("tests/test_weak_spots.py", "-k", "wider_out_dtype"),
        "out_dtype wider than the operands: accumulated in the compute dtype",
    ),
    Mutant(
        "per_example_norms_in_param_dtype",
        "jaxlinear/_src/per_example.py",
        "dtype = jnp.result_type(*(a.dtype for a in leaves), jnp.float32)",
        "dtype = jnp.result_type(*(a.dtype for a in leaves))",
        ("tests/test_weak_spots.py", "-k", "per_example"),
        "per-example norms summed in bfloat16 for bfloat16 params",
    ),
    # --- more: transposes, bias, batching, precision, the einsum parser ------------------
    Mutant(
        "dot_general_transpose_w_batch_unswapped",
        "jaxlinear/_src/ops/dot_general.py",
        "swapped = ((w_contract, x_contract), (w_batch, x_batch))",
        "swapped = ((w_contract, x_contract), (x_batch, w_batch))",
        ("tests/test_family.py", "-k", "dot_general_batched and vjp"),
        "w̄ of dot_general pairs the batch axes the wrong way round",
    ),
    Mutant(
        "conv_transpose_x_kernel_not_flipped",
        "jaxlinear/_src/ops/conv.py",
        "w = lax.rev(w, sdims)  # spatially flipped kernel",
        "w = w  # spatially flipped kernel",
        ("tests/test_family.py", "-k", "conv2d and vjp"),
        "x̄ of a convolution with the kernel not flipped",
    ),
    Mutant(
        "embed_scatter_set_not_add",
        "jaxlinear/_src/ops/embed.py",
        "rows = rows.at[ids].add(",
        "rows = rows.at[ids].set(",
        ("tests/test_family.py", "-k", "embed and vjp"),
        "repeated ids: the table's cotangent keeps one row instead of the sum",
    ),
    Mutant(
        "bias_summed_over_last_axis",
        "jaxlinear/_src/bilinear.py",
        "lead = tuple(range(g.ndim - 1))",
        "lead = tuple(range(1, g.ndim))",
        ("tests/test_conv.py", "-k", "layer_matches_reference"),
        "b̄ summed over the wrong axes (square shapes: no shape error)",
    ),
    Mutant(
        "einsum_vmap_axis_at_end",
        "jaxlinear/_src/ops/einsum.py",
        'return {"subscripts": (xs, ws, new + ys)}, 0',
        'return {"subscripts": (xs, ws, ys + new)}, 0',
        ("tests/test_family.py", "-k", "vmap and einsum"),
        "vmap of dual_einsum: the batch letter put last in y but reported at axis 0",
    ),
    Mutant(
        "bf16_accumulates_in_bf16",
        "jaxlinear/_src/bilinear.py",
        "if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:",
        "if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 2:",
        ("tests/test_family.py", "-k", "bf16"),
        "16-bit operands accumulated in 16 bits",
    ),
    Mutant(
        "einsum_implicit_output_unsorted",
        "jaxlinear/_src/ops/einsum.py",
        'out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))',
        'out = ell + "".join(c for c in dict.fromkeys(letters) if letters.count(c) == 1)',
        ("tests/test_family.py", "-k", "every_form"),
        "implicit output in order of appearance instead of sorted",
    ),
    Mutant(
        "einsum_broadcast_renames_wrong_operand",
        "jaxlinear/_src/ops/einsum.py",
        "        if nx == 1:\n            xs = xs.replace(c, fresh())",
        "        if nw == 1:\n            xs = xs.replace(c, fresh())",
        ("tests/test_family.py", "-k", "every_form or einsum_ellipsis"),
        "size-1 broadcast: the fresh letter given to the operand of size n",
    ),
    # --- per-example rules (issue 17) ----------------------------------------------------
    Mutant(
        "ghost_rank_one_drops_g",
        "jaxlinear/_src/ghost.py",
        "jnp.sum(X[:, 0] ** 2, axis=-1) * jnp.sum(G[:, 0] ** 2, axis=-1)",
        "jnp.sum(X[:, 0] ** 2, axis=-1)",
        ("tests/test_per_example.py", "-k", "2d"),
        "rank-one norm without ‖g_i‖²",
    ),
    Mutant(
        "embed_gram_counts_out_of_range_ids",
        "jaxlinear/_src/ops/embed.py",
        "same = (row[:, :, None] == row[:, None, :]) & inside[:, :, None] & inside[:, None, :]",
        "same = row[:, :, None] == row[:, None, :]",
        ("tests/test_per_example_family.py", "-k", "embed and gram"),
        "embed's ghost norm counts ids that send no gradient",
    ),
    Mutant(
        "clipped_bias_unscaled",
        "jaxlinear/_src/per_example.py",
        "d = _weighted_sum(w_bars[id(e)], factors)",
        "d = jnp.sum(w_bars[id(e)], axis=0)",
        ("tests/test_per_example.py", "-k", "2d"),
        "the clipped bias gradient without the clipping factors",
    ),
    Mutant(
        "conv_ghost_groups_unsplit",
        "jaxlinear/_src/ops/conv.py",
        "U, G = U.transpose(0, 3, 1, 2, 4), G.transpose(0, 2, 1, 3)",
        "U, G = U, G",
        ("tests/test_per_example_family.py", "-k", "conv and groups"),
        "conv's per-example rule mixes the feature groups",
    ),
    # --- per-example rules off the usual path (issue 24) -----------------------------------
    Mutant(
        "einsum_ghost_g_read_in_y_order",
        "jaxlinear/_src/ops/einsum.py",
        'G = jnp.einsum(f"{ys}->{e}{T}{p}", g).reshape(n, X.shape[1], -1)',
        "G = g.reshape(n, X.shape[1], -1)",
        ("tests/test_per_example_layouts.py", "-k", "einsum"),
        "einsum's ghost rule reads g as if y were (examples, T letters, p letters)",
    ),
    Mutant(
        "dot_general_ghost_with_batch_axes",
        "jaxlinear/_src/ops/dot_general.py",
        "if xb:  # batch axes pair x with w",
        "if False:  # batch axes pair x with w",
        ("tests/test_per_example_layouts.py", "-k", "one_and_two_shared"),
        "dot_general's ghost rule used with batch axes shared with the weight",
    ),
    Mutant(
        "per_example_leaf_used_elsewhere_structural",
        "jaxlinear/_src/per_example.py",
        # The driver has two guards for this (the leaf's one use on the way to the op, and
        # as many chain steps and meetings as the entries account for); either alone
        # catches it, so the mutant drops both.
        "    if sum(len(e.path) for e in entries) != len(chain_nodes)"
        " or len(entries) != len(meets):"
        "\n        return None\n    return entries\n\n\n"
        "def _simple_entry(prog, j, s, path, taps_at):"
        '\n    """One branch of ``_simple_entries``, from slot ``s`` reached by ``path``."""'
        "\n    path = list(path)\n    while True:\n        users = prog.users.get(s, ())\n",
        "    return entries\n\n\n"
        "def _simple_entry(prog, j, s, path, taps_at):"
        '\n    """One branch of ``_simple_entries``, from slot ``s`` reached by ``path``."""'
        "\n    path = list(path)\n    while True:\n        users = prog.users.get(s, ())[:1]\n",
        ("tests/test_per_example_layouts.py", "-k", "regulariser"),
        "a weight also used outside its op (a regulariser) counted as structural",
    ),
    Mutant(
        "per_example_broadcast_copy_unclipped",
        "jaxlinear/_src/per_example.py",
        "        d = _weighted_sum(w_i.astype(dtype), factors)\n"
        "        grads[j] = d.astype(leaves[j].dtype)",
        "        d = jnp.sum(w_i.astype(dtype), axis=0)\n"
        "        grads[j] = d.astype(leaves[j].dtype)",
        ("tests/test_per_example_layouts.py", "-k", "regulariser"),
        "a leaf on the per-example-copy route (a bias after the op, also in a regulariser):"
        " its clipped gradient without the clipping factors",
    ),
    Mutant(
        # (The driver's own bias rows now only see an op's bias on y's last axis; a bias
        # added after the op on another axis takes the per-example copy, evaluated here.)
        "per_example_copy_result_axis_not_moved",
        "jaxlinear/_src/per_example.py",
        "res.append(jnp.moveaxis(o, 0, ax).reshape(prog.avals[s].shape))",
        "res.append(o.reshape(prog.avals[s].shape))",
        ("tests/test_per_example_models.py", "-k", "plain_models and time_major"),
        "per-example copy (a bias after the op, examples not on y's axis 0): each example's"
        " result put back as if the examples were on axis 0",
    ),
    Mutant(
        "per_example_scaled_on_axis_0",
        "jaxlinear/_src/per_example.py",
        "shape[y_axis] = factors.shape[0]",
        "shape[0] = factors.shape[0]",
        ("tests/test_per_example_layouts.py", "-k", "einsum"),
        "clipping factors applied along axis 0 of g, not the examples' axis",
    ),
    Mutant(
        "per_example_example_axis_unchecked",
        "jaxlinear/_src/program.py",
        '            return list(p["permutation"]).index(ax)',
        "            return ax",
        ("tests/test_per_example_layouts.py", "-k", "time_major"),
        "examples' axis kept through a transpose: a time-major input with T = n read as examples",
    ),
    Mutant(
        "embed_rank_one_counts_out_of_range_ids",
        "jaxlinear/_src/ops/embed.py",
        "jnp.where(inside[:, 0], jnp.sum(g[:, 0] ** 2, axis=-1), 0)",
        "jnp.sum(g[:, 0] ** 2, axis=-1)",
        ("tests/test_per_example_layouts.py", "-k", "embed"),
        "one id per example: an out-of-range id's cotangent counted in the norm",
    ),
    Mutant(
        "embed_gram_negative_ids_not_wrapped",
        "jaxlinear/_src/ops/embed.py",
        "row = jnp.where(ids < 0, ids + V, ids)",
        "row = ids",
        ("tests/test_per_example_layouts.py", "-k", "embed"),
        "embed's Gram rule: a negative id and its positive twin not seen as one row",
    ),
    Mutant(
        "conv_ghost_channels_first_not_moved",
        "jaxlinear/_src/ops/conv.py",
        "G = jnp.transpose(g, (out_spec[0], *out_spec[2:], out_spec[1])).reshape(k, r.T, groups,"
        " r.p)",
        "G = g.reshape(k, r.T, groups, r.p)",
        ("tests/test_per_example_layouts.py", "-k", "conv_every_layout"),
        "conv's per-example rule reads a channels-first y as channels-last",
    ),
    Mutant(
        "conv_per_example_groups_not_interleaved",
        "jaxlinear/_src/ops/conv.py",
        "w_bars = jnp.moveaxis(w_bars, len(lead), -2)  # (..., *kernel, c, groups, p)",
        "w_bars = w_bars  # (..., *kernel, c, groups, p)",
        ("tests/test_per_example_layouts.py", "-k", "conv_every_layout"),
        "conv's per-example w̄_i with feature groups laid out in the wrong order",
    ),
    Mutant(
        "conv_transpose_per_example_not_flipped_back",
        "jaxlinear/_src/ops/conv_transpose.py",
        "return route, sq, lax.rev(w_bars, tuple(1 + a for a in spec.dimension_numbers."
        "rhs_spec[2:]))",
        "return route, sq, w_bars",
        ("tests/test_per_example_layouts.py", "-k", "conv_transpose"),
        "conv_transpose(transpose_kernel=True): clipped w̄ from unflipped per-example w̄_i",
    ),
    # --- adapters and converters, option by option (issue 24) ---------------------------
    Mutant(
        "nnx_conv_transpose_circular_wrap_other_side",
        "jaxlinear/_src/nnx.py",
        "total_pad = [((d + 1) // 2, d // 2) for d in size_diffs]",
        "total_pad = [(d // 2, (d + 1) // 2) for d in size_diffs]",
        ("tests/test_adapter_options.py", "-k", "circular_masked_and_valid"),
        "CIRCULAR without transpose_kernel: an uneven wrap split the other way",
    ),
    Mutant(
        "nnx_conv_transpose_mask_ignored",
        "jaxlinear/_src/nnx.py",
        "            kernel *= self.mask",
        "            kernel = kernel",
        ("tests/test_adapter_options.py", "-k", "circular_masked_and_valid"),
        "a masked nnx.ConvTranspose runs the whole kernel",
    ),
    Mutant(
        "conv_transpose_valid_padding_short",
        "jaxlinear/_src/ops/conv_transpose.py",
        "total = k + s - 2 + max(k - s, 0)",
        "total = k + s - 2",
        ("tests/test_adapter_options.py", "-k", "circular_masked_and_valid"),
        "VALID conv_transpose where the dilated kernel is larger than the stride",
    ),
    Mutant(
        "nnx_subclass_replaced",
        "jaxlinear/_src/nnx.py",
        '    return base, adapt.replaced_by(kind, base, _METHODS.get(base, ("__call__",)))',
        "    return base, None",
        ("tests/test_adapter_options.py", "-k", "nnx_subclasses"),
        "a subclass of nnx.Embed / ConvTranspose swapped to jaxlinear's class (its __call__ lost)",
    ),
    Mutant(
        "equinox_conv_transpose_dilation_dropped",
        "jaxlinear/_src/equinox.py",
        "        lhs_dilation=self.stride,\n        rhs_dilation=self.dilation,",
        "        lhs_dilation=self.stride,\n        rhs_dilation=None,",
        ("tests/test_adapter_options.py", "-k", "equinox_conv_transpose_dilated"),
        "Equinox ConvTranspose with dilation > 1 runs an undilated kernel",
    ),
    Mutant(
        "equinox_reflect_padding_as_zeros",
        "jaxlinear/_src/equinox.py",
        'if self.padding_mode != "ZEROS":',
        'if self.padding_mode not in ("ZEROS", "REFLECT"):',
        ("tests/test_adapter_options.py", "-k", "equinox_conv_and"),
        "Equinox Conv padding_mode='REFLECT' padded with zeros",
    ),
    Mutant(
        "equinox_subclass_converted",
        "jaxlinear/_src/equinox.py",
        '    return base, adapt.replaced_by(cls, base, ("__call__",))',
        "    return base, None",
        ("tests/test_adapter_options.py", "-k", "equinox_subclasses"),
        "subclasses of Equinox layers taken for the layer itself",
    ),
    Mutant(
        "equinox_embedding_negative_ids_clamped",
        "jaxlinear/_src/equinox.py",
        "    x = jnp.where(x < 0, x + self.num_embeddings, x)\n",
        "",
        ("tests/test_adapter_options.py", "-k", "equinox_embedding"),
        "Equinox Embedding: a negative id reads row 0 instead of wrapping (weight[-1])",
    ),
    Mutant(
        "equinox_embedding_out_of_range_reads_zeros",
        "jaxlinear/_src/equinox.py",
        'return _op(self, "embed")(self.weight, x, mode="clip")',
        'return _op(self, "embed")(self.weight, x)',
        ("tests/test_adapter_options.py", "-k", "equinox_embedding"),
        "Equinox Embedding: an out-of-range id reads zeros (Equinox clamps: the bug fixed here)",
    ),
    Mutant(
        "from_torch_bf16_comes_back_float32",
        "jaxlinear/_src/convert.py",
        "return jnp.asarray(np.asarray(a.float()), jnp.bfloat16)",
        "return jnp.asarray(np.asarray(a.float()))",
        ("tests/test_interop.py", "-k", "torch_dtypes"),
        "a bfloat16 PyTorch tensor read as float32",
    ),
    Mutant(
        "from_torch_f16_widened",
        "jaxlinear/_src/convert.py",
        "    return jnp.asarray(a)\n",
        "    return jnp.asarray(a, jnp.promote_types(a.dtype, jnp.float32))\n",
        ("tests/test_interop.py", "-k", "torch_dtypes"),
        "a float16 PyTorch tensor widened to float32",
    ),
    # --- issue 24 follow-up: the modules merged since (quant, fsdp, linen/adapt, contract) --
    Mutant(
        "quant_scale_over_kept_axes",
        "jaxlinear/_src/quant.py",
        "axes = tuple(i for i in range(np.ndim(a)) if i not in keep)",
        "axes = tuple(i for i in range(np.ndim(a)) if i in keep)",
        ("tests/test_quant.py", "-k", "quantize_matches"),
        "a per-axis scale reduced over the kept axes instead of the others (wrong axis)",
    ),
    Mutant(
        "quant_e4m3_e5m2_swapped",
        "jaxlinear/_src/quant.py",
        '"e4m3": jnp.dtype(jnp.float8_e4m3fn),\n    "e5m2": jnp.dtype(jnp.float8_e5m2),',
        '"e4m3": jnp.dtype(jnp.float8_e5m2),\n    "e5m2": jnp.dtype(jnp.float8_e4m3fn),',
        ("tests/test_quant.py", "-k", "quantize_matches"),
        "the two fp8 formats swapped (e4m3 operands stored as e5m2 and back)",
    ),
    Mutant(
        "quant_int8_truncates",
        "jaxlinear/_src/quant.py",
        "        v = jnp.round(v)  # half to even",
        "        v = v  # half to even",
        ("tests/test_quant.py", "-k", "quantize_matches"),
        "int8: a / s truncated toward zero by the cast instead of rounded to nearest",
    ),
    Mutant(
        "contract_rounding_dropped",
        "jaxlinear/_src/bilinear.py",
        # Two roundings in a row on CPU (the cast to the compute dtype, then
        # reduce_precision after widening): either alone hides the other's loss, so the
        # mutant drops both (the snippet spans the lines between them, unchanged).
        "    a, b = a.astype(cd), b.astype(cd)\n" + _CONTRACT_MIDDLE
        + "        return lax.reduce_precision(a.astype(acc), info.nexp, info.nmant)",
        "    a, b = a, b\n" + _CONTRACT_MIDDLE + "        return a.astype(acc)",
        ("tests/test_linear.py", "-k", "mixed_precision_forward"),
        "contract(): operands not rounded to the compute dtype (e.g. bfloat16) before the product",
    ),
    Mutant(
        "fsdp_scatter_as_slice",
        "jaxlinear/_src/fsdp.py",
        "return lax.psum_scatter(w_bar, self.axis, scatter_dimension=self.dim, tiled=True)",
        "return lax.dynamic_slice_in_dim(w_bar, lax.axis_index(self.axis)"
        " * (w_bar.shape[self.dim] // lax.axis_size(self.axis)),"
        " w_bar.shape[self.dim] // lax.axis_size(self.axis), self.dim)",
        ("tests/test_sharded.py", "-k", "eight_simulated"),
        "FSDP: the shard's gradient sliced from this device's w̄, not summed over the devices",
    ),
    Mutant(
        "adapt_subclass_rule_any_parent_call",
        "jaxlinear/_src/adapt.py",
        'return method in names and ("super" in names or base.__name__ in names)',
        'return "super" in names or base.__name__ in names',
        ("tests/test_adapt.py", "-k", "subclass_rule"),
        "subclass rule: an override calling another parent method (super().__call__ in attend)"
        " taken as reaching its own",
    ),
    Mutant(
        "adapt_subclass_rule_own_class_only",
        "jaxlinear/_src/adapt.py",
        "        for klass in cls.__mro__:\n            if klass is base",
        "        for klass in cls.__mro__[:1]:\n            if klass is base",
        ("tests/test_adapt.py", "-k", "subclass_rule"),
        "subclass rule: only the class's own overrides read, not those it inherits",
    ),
    Mutant(
        "nnx_embed_attend_not_checked",
        "jaxlinear/_src/nnx.py",
        '_METHODS = {nnx.Embed: ("__call__", "attend")}',
        '_METHODS = {nnx.Embed: ("__call__",)}',
        ("tests/test_adapter_options.py", "-k", "nnx_subclasses"),
        "a subclass of nnx.Embed replacing attend converted (its attend lost)",
    ),
    Mutant(
        "linen_attend_contracts_wrong_axis",
        "jaxlinear/_src/linen.py",
        "return dot_general(query, embedding, (((query.ndim - 1,), (1,)), ((), ())))",
        "return dot_general(query, embedding, (((query.ndim - 1,), (0,)), ((), ())))",
        ("tests/test_linen.py", "-k", "trains_like_the_original and lm"),
        "linen Embed.attend contracts the query with the table's vocabulary axis",
    ),

    Mutant(
        "formulas_dW_rows_misaligned",
        "jaxlinear/_src/formulas.py",
        "return _dot(_rows(x), _rows(g), _FIRST_FIRST, precision, preferred_element_type,"
        " W_sharding)",
        "return _dot(_rows(x)[::-1], _rows(g), _FIRST_FIRST, precision, preferred_element_type,"
        " W_sharding)",
        ("tests/test_linear.py",),
        "dW = Xᵀ G with X's rows paired with other rows of G",
    ),
    Mutant(
        "jacobian_columns_read_as_rows",
        "jaxlinear/_src/jacobian.py",
        "return jnp.moveaxis(columns.reshape(n_in, n_out), 0, 1).reshape(*out_shape, *in_shape)",
        "return columns.reshape(n_in, n_out).reshape(*out_shape, *in_shape)",
        ("tests/test_jacobian.py",),
        "the pushforward's columns J e_j laid out as rows: Jᵀ where J is square",
    ),
    Mutant(
        "plan_estimate_not_exported",
        "jaxlinear/__init__.py",
        '    "PlanEstimate",\n',
        "",
        ("tests/test_docs_pages.py",),
        "PlanEstimate left out of jaxlinear.__all__ (and so of the API reference)",
    ),
    # --- issue 22, third round: custom rules, copies on rows, tied Grams, plan, patches ---
    Mutant(
        "program_inlines_custom_rules",
        "jaxlinear/_src/program.py",
        "sub = None if kept or eqn.primitive.name in _RULED else callee(eqn)",
        "sub = None if kept else callee(eqn)",
        ("tests/test_per_example_models.py", "-k", "plain_models and custom_rules"),
        "custom_jvp/custom_vjp calls inlined: relu's slope at 0 and an STE's rule lost",
    ),
    Mutant(
        "copies_on_the_wrong_rows",
        "jaxlinear/_src/per_example.py",
        "v = jnp.moveaxis(v, 0, out_ax).reshape(",
        "v = jnp.moveaxis(v[::-1], 0, out_ax).reshape(",
        ("tests/test_per_example_models.py", "-k", "plain_models and norms"),
        "an elementwise meeting lays copy i on row n-1-i",
    ),
    Mutant(
        "clipped_sum_scales_neither",
        "jaxlinear/_src/per_example.py",
        "d = _weight_grad(call, _example_scaled(x, factors, 0), g)",
        "d = _weight_grad(call, x, g)",
        ("tests/test_per_example.py", "-k", "3d_gram_widening"),
        "the clipped sum through x's rows forgets the clip factors",
    ),
    Mutant(
        "tied_gram_drops_cross_terms",
        "jaxlinear/_src/ghost.py",
        "total = total + (term if k == l else 2 * term)",
        "total = total + (term if k == l else 0 * term)",
        ("tests/test_per_example_models.py", "-k", "tied_leaves"),
        "a tied leaf's Gram without the cross-call terms",
    ),
    Mutant(
        "auto_plan_inverted",
        "jaxlinear/_src/per_example.py",
        'pick = "vmap" if estimate.cost("vmap") < estimate.cost("structural") else "structural"',
        'pick = "vmap" if estimate.cost("vmap") > estimate.cost("structural") else "structural"',
        ("tests/test_per_example_plan.py",),
        "plan='auto' takes the plan its estimate calls dearer",
    ),
    Mutant(
        "conv_patches_offsets_undilated",
        "jaxlinear/_src/ops/conv.py",
        "start = [j * r for j, r in zip(offset, spec.rhs_dilation, strict=True)]",
        "start = list(offset)",
        ("tests/test_per_example_family.py", "-k", "conv_patches_every_spatial_argument"),
        "conv patches read at undilated kernel offsets",
    ),
    Mutant(
        "per_example_scan_steps_overwrite",
        "jaxlinear/_src/per_example.py",
        "grads[e.leaf] = d if grads[e.leaf] is None else grads[e.leaf] + d",
        "grads[e.leaf] = d",
        ("tests/test_per_example_models.py", "-k", "plain_models and scan"),
        "scan-stacked weights: each step's entry overwrites the previous steps' clipped w̄",
    ),
    Mutant(
        "per_example_textbook_scales_up",
        "jaxlinear/_src/per_example.py",
        "    factors = C / jnp.maximum(norms, C)\n    grads = [_weighted_sum(",
        "    factors = C / norms\n    grads = [_weighted_sum(",
        ("tests/test_per_example.py", "-k", "other_uses and cond"),
        "whole-model vmap(grad) plan: examples with a norm under C scaled up to C",
    ),

    # --- this round's changed modules: export registration, the dense recipe rules ---
    Mutant(
        "params_not_exportable",
        "jaxlinear/_src/params.py",
        'export.register_namedtuple_serialization(Params, serialized_name="jaxlinear.Params")',
        "pass",
        ("tests/test_export.py", "-k", "training_step"),
        "Params not registered with jax.export: an exported training step cannot serialize",
    ),
    Mutant(
        "adjoint_result_not_exportable",
        "jaxlinear/_src/adjoint.py",
        "export.register_namedtuple_serialization(\n    AdjointTestResult,",
        "(lambda *a, **k: None)(\n    AdjointTestResult,",
        ("tests/test_export.py", "-k", "adjoint"),
        "AdjointTestResult not registered with jax.export",
    ),
    Mutant(
        "linear_scale_axes_rows_dropped",
        "jaxlinear/_src/linear.py",
        "rows = tuple((i, i) for i in range(a_ndim - 1))  # x's (or g's) leading axes",
        "rows = ()  # x's (or g's) leading axes",
        ("tests/test_quant.py", "-k", "products_match_reference and dense"),
        "dense: x's (and g's) per-row scales collapsed to one scale per tensor",
    ),
    Mutant(
        "dual_linear_drops_quant",
        "jaxlinear/_src/dual.py",
        "compute_dtype=compute_dtype, quant=quant)",
        "compute_dtype=compute_dtype)",
        ("tests/test_quant.py", "-k", "dual_binding_follows_the_recipe and dense"),
        "dual_linear ignores its recipe (full precision silently)",
    ),
]


def _copy_tree(dst: Path) -> None:
    """The files git knows of (tracked, untracked not ignored), as they are on disk now."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():  # a deleted but still tracked file is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _pytest(copy: Path, args, timeout):
    """Run pytest in ``copy``; ``(return code or None on timeout, seconds, output tail)``."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the copy's conftest makes its own
    cmd = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-x", "-q", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, ""
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-2000:]


def _merged(selections):
    """The baseline's pytest runs: selections ``(file, "-k", expr)`` of one file merged
    into one run, ``-k "(expr1) or (expr2)"`` (every pytest start imports jax: seconds)."""
    runs, by_file = [], {}
    for tests in selections:
        if len(tests) == 3 and tests[1] == "-k":
            by_file.setdefault(tests[0], []).append(tests[2])
        else:
            runs.append(tests)
    for path, exprs in by_file.items():
        runs.append((path, "-k", " or ".join(f"({e})" for e in exprs)))
    return runs


def _verdict(rc):
    # pytest: 0 all passed, 1 some failed, 2 interrupted (e.g. a collection error), 5 none.
    return {0: "SURVIVED", 1: "killed", 2: "killed (error)", 5: "no tests"}.get(
        rc, "timeout" if rc is None else f"error (rc {rc})"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only mutants whose name contains one")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    opts = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not opts.words or any(w in m.name for w in opts.words)]
    if opts.list:
        for m in mutants:
            print(f"{m.name:42} {m.file}: {m.why}\n{'':42} tests: {' '.join(m.tests)}")
        return 0

    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="jaxlinear-mutate-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        if not opts.no_baseline:
            selections = list(dict.fromkeys(m.tests for m in mutants))
            runs = _merged(selections)
            for tests in runs:
                rc, secs, out = _pytest(copy, tests, opts.timeout)
                if rc != 0:
                    print(f"baseline FAILED ({' '.join(tests)}): {_verdict(rc)}\n{out}")
                    return 2
            print(f"baseline: the {len(selections)} selections pass unmutated"
                  f" ({len(runs)} pytest runs)", file=sys.stderr)  # fmt: skip
        for m in mutants:
            path = copy / m.file
            text = path.read_text() if path.is_file() else ""
            count = text.count(m.original)
            if count != 1:
                why = "file not found" if not path.is_file() else f"snippet found {count} times"
                rows.append((m.name, f"not applied ({why})", 0.0))
                ok = False
                continue
            path.write_text(text.replace(m.original, m.replacement))
            try:
                rc, secs, out = _pytest(copy, m.tests, opts.timeout)
            finally:
                path.write_text(text)
            rows.append((m.name, _verdict(rc), secs))
            ok &= rc not in (0, 5, None)
            if opts.verbose:
                print(out)
            print(f"  {m.name}: {rows[-1][1]} ({secs:.0f} s)", file=sys.stderr)

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'mutant':{width}} | {'result':28} | {'seconds':>7} |")
    print(f"|{'-' * (width + 2)}|{'-' * 30}|{'-' * 9}|")
    for name, result, secs in rows:
        print(f"| {name:{width}} | {result:28} | {secs:7.1f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
