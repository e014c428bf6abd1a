r"""``dual_linear``: ``Y = X W + b`` with an explicit JVP *and* an explicit transpose.

Mechanism: the dense instance ``AFFINE`` of the rule builder
(``jaxlinear._src.bilinear.bilinear_op``), whose ``dual`` binding is two
``jax.extend.core.Primitive``\ s:

``affine_p(x, W[, b])`` (``"jaxlinear_affine"``)
    the forward map ``formulas.forward``. JVP rule: bind ``pushforward_p`` on the
    tangents. Transpose rule (for ``jax.linear_transpose`` of ``x -> dual_linear(p, x)``
    or of ``p -> dual_linear(p, x)``): ``formulas.pullback``.
``pushforward_p(x, W, dx?, dW?, db?)`` (``"jaxlinear_affine_pushforward"``)
    the tangent map ``formulas.pushforward``, linear in ``(dx, dW, db)``. Transpose
    rule: ``formulas.pullback``; this is what ``grad``/``vjp`` run, since JAX's
    reverse mode is linearize-then-transpose. Its own JVP rule (for Hessians and
    forward-over-reverse) binds ``pushforward_p`` twice, using the identity
    ``dX Ẇ + Ẋ dW = pushforward(x=dX, W=dW; dx=Ẋ, dW=Ẇ)``.

So the forward-mode rule is ``pushforward`` and the reverse-mode rule is
``pullback``, the same functions ``linear`` uses, and every transform composes.
"""

from __future__ import annotations

from jaxlinear._src.linear import AFFINE, _prepare
from jaxlinear._src.quant import resolve
from jaxlinear._src.validation import layer_inputs

# The dense instance of the rule builder (jaxlinear._src.bilinear) and its primitives.
affine_p = AFFINE.primitive  # "jaxlinear_affine"
pushforward_p = AFFINE.pushforward_primitive  # "jaxlinear_affine_pushforward"


def dual_linear(params, x, *, precision=None, compute_dtype=None, quant=None):
    r"""The affine layer ``Y = X W + b`` with explicit forward- *and* reverse-mode rules.

    Same contract, validation and dtype policy as ``linear``; the JVP rule is
    ``pushforward`` and the transpose rule is ``pullback``. Unlike ``linear`` (a
    ``custom_vjp``), it supports every JAX transform: ``jvp``, ``linearize``,
    ``jacfwd``, ``hessian``, forward-over-reverse and reverse-over-forward,
    ``linear_transpose``, as well as ``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jit``,
    ``checkpoint`` and ``lax.scan``.

    Args:
      params: ``Params(W, b)`` or ``{"W": W, "b": b}``; ``W: (d_in, d_out)``,
        ``b: (d_out,)``, ``(1, d_out)`` or ``None``.
      x: ``(..., d_in)``.
      precision: passed to every matmul (forward, JVP and transpose).
      compute_dtype: e.g. ``jnp.bfloat16``: matmuls in this dtype, float32 accumulation.
      quant: ``None`` (default), a recipe name (``"fp8_hybrid"``, ``"fp8_rowwise"``,
        ``"int8"``) or a ``jaxlinear.Recipe``: the forward product and both transposes in
        low precision with dynamic scales (see ``docs/guides/quantization.md``).

    Returns:
      ``Y: (..., d_out)``, in ``compute_dtype`` if given, else ``jnp.result_type(x, W, b)``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlinear
      >>> p = jaxlinear.Params(jnp.array([[2., 1.], [-1., 3.]]), jnp.array([0.5, -2.]))
      >>> x = jnp.array([1., 1.])
      >>> jax.jvp(lambda x: jaxlinear.dual_linear(p, x), (x,), (jnp.array([1., 0.]),))[1].tolist()
      [2.0, 1.0]
    """
    params, x = layer_inputs(params, x)  # NumPy/weakly typed -> the arrays JAX computes on
    layout, precision, compute_dtype = _prepare("dual_linear", params, x, precision, compute_dtype)
    W, b = layout.unpack(params)
    quant = resolve("dual_linear", quant)
    return AFFINE.dual(x, W, b, precision=precision, compute_dtype=compute_dtype, quant=quant)
