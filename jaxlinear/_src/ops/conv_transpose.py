r"""Transposed convolution ``y = conv_transpose(x, w)``: ``lax.conv_transpose`` with its rules.

``lax.conv_transpose`` is a *fractionally strided* convolution: the input dilated by the
strides (``strides − 1`` zeros between neighbours, i.e. ``lhs_dilation = strides``),
padded, and convolved with unit window strides. So it is ``conv_general_dilated`` with
derived arguments, and this module writes no formula of its own:

* the forward map is ``conv.forward`` on the derived ``ConvSpec``;
* ``x̄`` is ``conv.transpose_x``: a convolution of ``G`` with the flipped kernel, whose
  window strides are the transposed convolution's ``strides`` (the input dilation becomes
  the window stride): an ordinary strided convolution;
* ``w̄`` is ``conv.transpose_w``: the correlation of ``x`` with ``G``.

``transpose_kernel=True`` (TensorFlow's ``Conv2DTranspose`` convention) flips the kernel's
spatial axes and swaps its in/out feature axes. The swap is read into the dimension
numbers (``rhs_spec``'s ``O`` and ``I`` exchanged: a relabelling, no data moves); the flip
is a linear map ``F`` of ``w`` with ``F = Fᵀ = F⁻¹``, so the rules are the convolution's
composed with it: ``y = conv(x, F w)``, ``x̄ = conv_x̄(G, F w)``, ``w̄ = F conv_w̄(G, x)``.

Padding, as in ``lax``: ``"SAME"``/``"VALID"`` name the padding of the *forward*
convolution this one transposes (``"SAME"`` with stride ``s`` gives ``n·s`` outputs);
``(lo, hi)`` pairs are the padding of the dilated input itself, or, with
``use_consistent_padding=True``, of the forward convolution (PyTorch's convention: each
side padded by ``k_dilated − 1 − p``).
"""

from __future__ import annotations

import numpy as np
from jax import lax

from jaxlinear._src.bilinear import bilinear_op
from jaxlinear._src.ops import conv
from jaxlinear._src.ops._checks import out_dtype
from jaxlinear._src.params import Params
from jaxlinear._src.quant import resolve
from jaxlinear._src.validation import _dtype, canonical_precision, layer_inputs


def _flip(w, spec: conv.ConvSpec, flip_kernel: bool):
    """``F w``: ``w`` reversed along its spatial axes if ``flip_kernel`` (``F`` is its own
    transpose and inverse), else ``w``."""
    return lax.rev(w, spec.dimension_numbers.rhs_spec[2:]) if flip_kernel else w


def forward(x, w, *, spec, flip_kernel, precision=None, preferred_element_type=None):
    """``y = conv(x, F w)`` with ``spec``'s input dilation (the fractional strides)."""
    return conv.forward(
        x,
        _flip(w, spec, flip_kernel),
        spec=spec,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def transpose_x(g, w, x_aval, *, spec, flip_kernel, precision=None, preferred_element_type=None):
    """``x̄ = conv_x̄(G, F w)``: a convolution of ``G`` strided by ``strides``, shaped like ``x``."""
    return conv.transpose_x(
        g,
        _flip(w, spec, flip_kernel),
        x_aval,
        spec=spec,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def transpose_w(g, x, w_aval, *, spec, flip_kernel, precision=None, preferred_element_type=None):
    """``w̄ = F conv_w̄(G, x)``: the correlation of ``x`` with ``G``, shaped like ``w``."""
    dw = conv.transpose_w(
        g, x, w_aval, spec=spec, precision=precision, preferred_element_type=preferred_element_type
    )
    return _flip(dw, spec, flip_kernel)


def _per_example(x, g, w_aval, *, y_axis, preferred_element_type, spec, flip_kernel, precision):
    """The convolution's per-example rule (``conv._per_example``) on the flipped kernel: a
    flip permutes ``w̄_i``'s entries, so the norms are the convolution's; ``w̄_i`` flip back."""
    got = conv._per_example(
        x, g, w_aval, y_axis=y_axis, preferred_element_type=preferred_element_type,
        spec=spec, precision=precision,
    )  # fmt: skip
    if got is None or len(got) == 2 or not flip_kernel:
        return got
    route, sq, w_bars = got
    return route, sq, lax.rev(w_bars, tuple(1 + a for a in spec.dimension_numbers.rhs_spec[2:]))


def _per_example_sum(x, g, w_aval, *, preferred_element_type, spec, flip_kernel, precision):
    """``conv._per_example_sum`` on the flipped kernel, flipped back: ``B_wᵀ(g; x)``."""
    dw = conv._per_example_sum(
        x, g, w_aval, preferred_element_type=preferred_element_type, spec=spec,
        precision=precision,
    )  # fmt: skip
    return None if dw is None else _flip(dw, spec, flip_kernel)


# vmap: conv's rule (folds into feature/batch axes; the flip acts on the spatial axes only).
CONV_TRANSPOSE = bilinear_op(
    "conv_transpose",
    forward,
    transpose_x,
    transpose_w,
    batch=conv.batch,
    per_example=_per_example,
    per_example_sum=_per_example_sum,
    scale_axes=conv.scale_axes,  # the flip acts on spatial axes only
)


# --------------------------------------------------------------------------------------
# Validation and the derived convolution.

# `lax.conv_transpose`'s defaults: channels last (TensorFlow's convention), per rank.
_DEFAULT_DIMENSION_NUMBERS = {
    2: ("NC", "IO", "NC"),
    3: ("NHC", "HIO", "NHC"),
    4: ("NHWC", "HWIO", "NHWC"),
    5: ("NHWDC", "HWDIO", "NHWDC"),
}
# conv's checks name the lax arguments; here the input dilation is the user's `strides`.
_NAMES = {**conv._LAX_NAMES, "lhs_dilation": "strides"}


def transpose_padding(k: int, s: int, padding) -> tuple[int, int]:
    """``(lo, hi)`` padding of the dilated input for one spatial axis (``lax``'s rule).

    Args:
      k: the dilated kernel size ``(k − 1)·rhs_dilation + 1``.
      s: the stride.
      padding: ``"SAME"`` or ``"VALID"`` (of the forward convolution), or the forward
        convolution's ``(lo, hi)`` (``use_consistent_padding``).
    """
    if padding == "SAME":  # n·s outputs
        total = k + s - 2
        lo = k - 1 if s > k - 1 else -(-total // 2)
    elif padding == "VALID":  # (n − 1)·s + max(k, s) outputs
        total = k + s - 2 + max(k - s, 0)
        lo = k - 1
    else:
        lo, hi = (k - 1 - p for p in padding)
        total = lo + hi
    return lo, total - lo


def _prepare(
    fn,
    lhs,
    rhs,
    strides,
    padding,
    rhs_dilation,
    dimension_numbers,
    transpose_kernel,
    precision,
    preferred_element_type,
    use_consistent_padding,
):
    """Check every argument; return ``(lhs, rhs, params, out_dtype)`` for the op."""
    p, lhs = layer_inputs(Params(rhs), lhs)
    rhs = p.W
    x_shape = tuple(getattr(lhs, "shape", ()))
    w_shape = tuple(getattr(rhs, "shape", ()))
    _dtype(fn, "lhs", lhs), _dtype(fn, "rhs", rhs)
    if len(w_shape) != len(x_shape):
        raise ValueError(
            f"{fn}: `rhs` must have rank {len(x_shape)} like `lhs` (shape {x_shape}),"
            f" got shape {w_shape}"
        )
    if len(x_shape) < 2:
        raise ValueError(
            f"{fn}: `lhs` must have a batch and a feature axis (then the spatial axes),"
            f" got shape {x_shape}"
        )
    if dimension_numbers is None:
        if len(x_shape) not in _DEFAULT_DIMENSION_NUMBERS:
            raise ValueError(
                f"{fn}: no default `dimension_numbers` for operands of rank {len(x_shape)}"
                f" (`lhs` shape {x_shape}): lax's defaults cover ranks 2 to 5; pass"
                " dimension_numbers"
            )
        dimension_numbers = _DEFAULT_DIMENSION_NUMBERS[len(x_shape)]
    dn = conv._check_dimension_numbers(fn, dimension_numbers, x_shape, w_shape)
    n = len(x_shape) - 2
    strides = conv._check_window(fn, "strides", strides, n)
    rhs_dilation = conv._check_window(fn, "rhs_dilation", rhs_dilation, n, default=1)
    if not isinstance(transpose_kernel, (bool, np.bool_)):
        raise TypeError(f"{fn}: `transpose_kernel` must be a bool, got {transpose_kernel!r}")
    if not isinstance(use_consistent_padding, (bool, np.bool_)):
        raise TypeError(
            f"{fn}: `use_consistent_padding` must be a bool, got {use_consistent_padding!r}"
        )
    k = [conv._dilated(w_shape[d], r) for d, r in zip(dn.rhs_spec[2:], rhs_dilation, strict=True)]
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(
                f"{fn}: `padding` must be 'SAME', 'VALID' or {n} (lo, hi) int pairs (one per"
                f" spatial axis), got {padding!r}"
            )
        pads = tuple(transpose_padding(kd, s, padding) for kd, s in zip(k, strides, strict=True))
    else:
        pads = conv._check_padding(fn, padding, n)
        if use_consistent_padding:
            pads = tuple(transpose_padding(kd, 1, p) for kd, p in zip(k, pads, strict=True))
    lhs_spec, rhs_spec, out_spec = dn
    if transpose_kernel:  # the in/out feature swap is a relabelling of rhs's axes
        rhs_spec = (rhs_spec[1], rhs_spec[0], *rhs_spec[2:])
    spec = conv._conv_spec(
        fn,
        lhs,
        rhs,
        (1,) * n,
        pads,
        strides,  # the fractional strides: the input is dilated by them
        rhs_dilation,
        lax.ConvDimensionNumbers(tuple(lhs_spec), tuple(rhs_spec), tuple(out_spec)),
        1,
        1,
        names=_NAMES,
    )
    params = dict(
        spec=spec, flip_kernel=bool(transpose_kernel), precision=canonical_precision(precision)
    )
    return lhs, rhs, params, out_dtype(fn, preferred_element_type)


# --------------------------------------------------------------------------------------
# The lax drop-ins.


def conv_transpose(
    lhs,
    rhs,
    strides,
    padding,
    rhs_dilation=None,
    dimension_numbers=None,
    transpose_kernel=False,
    precision=None,
    preferred_element_type=None,
    use_consistent_padding=False,
    *,
    quant=None,
):
    r"""``lax.conv_transpose`` with its two transposes written out (``custom_vjp``).

    Same arguments and result as ``jax.lax.conv_transpose``: the input dilated by
    ``strides``, padded, and convolved with ``rhs`` (unit window strides). ``jax.grad``
    runs the convolution's own transposes: ``x̄`` is a convolution of ``G`` with the
    flipped kernel, strided by ``strides``; ``w̄`` the correlation of ``x`` with ``G``.
    Reverse mode only: for ``jvp``/``jacfwd``/``linear_transpose`` use
    ``dual_conv_transpose``.

        y = conv(dilate_s(x), F w),   x̄ = conv_s(G, flip(F w)ᵀ),   w̄ = F conv(dilate_s(x)ᵀ, Gᵀ)

    (``F``: the spatial flip if ``transpose_kernel``, else the identity.)

    Args:
      lhs: the input, rank ``n + 2``; by default channels last, e.g. ``(N, H, W, C)``.
      rhs: the kernel, rank ``n + 2``; by default ``(*kernel, I, O)`` with ``I = C``
        (``(*kernel, O, I)`` read swapped if ``transpose_kernel``).
      strides: ``n`` positive ints, the fractional strides (input dilation).
      padding: ``"SAME"`` or ``"VALID"`` (those of the forward convolution: ``"SAME"``
        gives ``n·s`` outputs per axis), or ``n`` ``(lo, hi)`` pairs: the padding of the
        dilated input (or, with ``use_consistent_padding``, of the forward convolution).
      rhs_dilation: kernel dilation, ``n`` positive ints (``None``: 1).
      dimension_numbers: as for ``lax.conv_general_dilated``; ``None`` is ``lax``'s
        channels-last default for the rank (``("NHWC", "HWIO", "NHWC")`` for 2-D).
      transpose_kernel: flip the kernel spatially and swap its in/out feature axes
        (TensorFlow's ``Conv2DTranspose``; the gradient of a ``conv`` with this kernel).
      precision: passed to every convolution (forward and both transposes).
      preferred_element_type: dtype of the result (accumulation happens in it).
      use_consistent_padding: read ``(lo, hi)`` pairs as the forward convolution's
        padding, as ``"SAME"``/``"VALID"`` always are (PyTorch's convention).
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see ``docs/guides/quantization.md``).

    Returns:
      The transposed convolution, laid out by ``dimension_numbers``'s output spec.

    Raises:
      ValueError: wrong ranks, malformed dimension numbers, strides, dilations or padding,
        channel counts that do not match.
      TypeError: non-floating operands, complex and real operands mixed, non-bool flags.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.array([[[1.], [2.]]]), jnp.array([[[1.]], [[10.]]])  # (N, W, C), (W, I, O)
      >>> jaxlinear.conv_transpose(x, w, (2,), "VALID")[..., 0].tolist()  # x[i]·reversed w
      [[10.0, 1.0, 20.0, 2.0]]
      >>> jaxlinear.conv_transpose(x, w, (2,), "VALID", transpose_kernel=True)[..., 0].tolist()
      [[1.0, 10.0, 2.0, 20.0]]
      >>> f = lambda x: jaxlinear.conv_transpose(x, w, (2,), "VALID").sum()
      >>> jax.grad(f)(x)[..., 0].tolist()
      [[11.0, 11.0]]
    """
    lhs, rhs, params, y_dtype = _prepare(
        "conv_transpose",
        lhs,
        rhs,
        strides,
        padding,
        rhs_dilation,
        dimension_numbers,
        transpose_kernel,
        precision,
        preferred_element_type,
        use_consistent_padding,
    )
    quant = resolve("conv_transpose", quant)
    return CONV_TRANSPOSE.custom_vjp(lhs, rhs, out_dtype=y_dtype, quant=quant, **params)


def dual_conv_transpose(
    lhs,
    rhs,
    strides,
    padding,
    rhs_dilation=None,
    dimension_numbers=None,
    transpose_kernel=False,
    precision=None,
    preferred_element_type=None,
    use_consistent_padding=False,
    *,
    quant=None,
):
    r"""``conv_transpose`` with an explicit JVP *and* explicit transposes (a primitive).

    Same arguments, result and validation as ``conv_transpose``. The JVP is
    ``conv_transpose(ẋ, w) + conv_transpose(x, ẇ)``, transposed by the same two rules,
    so every transform composes: ``jvp``, ``jacfwd``, ``hessian``, ``linear_transpose``
    in either operand, ``grad``, ``vmap``, ``jit``, ``shard_map``. A drop-in for
    ``lax.conv_transpose`` where Flax's ``nnx.ConvTranspose`` calls it.

    Args:
      lhs: as in ``conv_transpose``.
      rhs: as in ``conv_transpose``.
      strides: as in ``conv_transpose``.
      padding: as in ``conv_transpose``.
      rhs_dilation: as in ``conv_transpose``.
      dimension_numbers: as in ``conv_transpose``.
      transpose_kernel: as in ``conv_transpose``.
      precision: as in ``conv_transpose``.
      preferred_element_type: as in ``conv_transpose``.
      use_consistent_padding: as in ``conv_transpose``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> x, w = jnp.array([[[1.], [2.]]]), jnp.array([[[1.]], [[10.]]])
      >>> f = lambda w: jaxlinear.dual_conv_transpose(x, w, (2,), "VALID")
      >>> jax.jvp(f, (w,), (jnp.array([[[1.]], [[0.]]]),))[1][..., 0].tolist()
      [[0.0, 1.0, 0.0, 2.0]]
    """
    lhs, rhs, params, y_dtype = _prepare(
        "dual_conv_transpose",
        lhs,
        rhs,
        strides,
        padding,
        rhs_dilation,
        dimension_numbers,
        transpose_kernel,
        precision,
        preferred_element_type,
        use_consistent_padding,
    )
    quant = resolve("dual_conv_transpose", quant)
    return CONV_TRANSPOSE.dual(lhs, rhs, out_dtype=y_dtype, quant=quant, **params)
