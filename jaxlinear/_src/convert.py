r"""Parameters across libraries: PyTorch state dicts and Flax kernels to ``Params`` and back.

jaxlinear's dense ``W`` is ``(d_in, d_out)`` and its conv ``W`` is
``(*kernel, C_in/groups, C_out)``, both as in Flax; PyTorch (and Equinox) store
``weight`` as ``(out, in)`` and ``(C_out, C_in/groups, *kernel)``. The converters work on
arrays and dicts only: they import neither PyTorch nor Flax (a ``torch.Tensor`` is read
through NumPy, an ``nnx.Variable`` through its ``get_value()``).

Accepted directly by ``linear``, ``dual_linear``, ``conv``, ... (no conversion needed):
``Params(W, b)``, ``{"W": W, "b": b}``, Flax's ``{"kernel": W, "bias": b}`` and a tuple
``(W, b)``; gradients come back in the structure given.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxlinear._src.params import Params, layout_of


def _array(fn: str, name: str, a):
    """``a`` (a jax/NumPy array, a ``torch.Tensor``, an NNX ``Variable``) as a ``jax.Array``."""
    if hasattr(a, "get_value"):  # an nnx.Variable (Param)
        a = a.get_value()
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch.Tensor, maybe requiring grad
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: through float32, exact
            return jnp.asarray(np.asarray(a.float()), jnp.bfloat16)
        a = a.numpy()
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{fn}: `{name}` must be an array, got {type(a).__name__}")
    return jnp.asarray(a)


def _entries(fn: str, tree, w_key: str, b_key: str, prefix: str, what: str):
    """``(weight, bias)`` read from a mapping, with an optional ``prefix.`` on the keys."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{fn}: expected {what} (a mapping), got {type(tree).__name__}")
    prefix = prefix.removesuffix(".")  # PyTorch's own spelling "fc2." too
    keys = [f"{prefix}.{k}" if prefix else k for k in (w_key, b_key)]
    if keys[0] not in tree:
        near = sorted(str(k) for k in tree)[:8]
        found = sorted(str(k)[: -len(w_key) - 1] for k in tree if str(k).endswith(f".{w_key}"))
        hint = f"; pass `prefix=`, one of {found}" if found else ""
        raise KeyError(f"{fn}: {what} has no {keys[0]!r}{hint}; its keys start {near}")
    return _array(fn, keys[0], tree[keys[0]]), tree.get(keys[1])


def from_torch(state_dict, prefix: str = "") -> Params:
    r"""A PyTorch ``nn.Linear`` / ``nn.Conv{1,2,3}d`` state dict as jaxlinear ``Params``.

    | PyTorch ``weight`` | jaxlinear ``W`` | use with |
    |---|---|---|
    | ``(out, in)`` | ``weight.T``: ``(in, out)`` | ``linear``, ``dual_linear`` |
    | ``(O, I/groups, *kernel)`` | ``(*kernel, I/groups, O)`` | ``conv``, ``dual_conv`` |

    ``bias`` ``(out,)`` is kept (Equinox's conv bias ``(O, 1, ..., 1)`` is flattened to
    ``(O,)``, so ``{"weight": layer.weight, "bias": layer.bias}`` of an Equinox layer
    converts too). Tensors are read through NumPy (no ``torch`` import here), on the CPU;
    the arrays come back as ``jax.Array`` in the dtype JAX computes them in.

    Args:
      state_dict: a mapping with ``weight`` and optional ``bias`` (tensors or arrays),
        e.g. ``layer.state_dict()``.
      prefix: read ``f"{prefix}.weight"`` / ``f"{prefix}.bias"`` from a whole model's state
        dict, e.g. ``prefix="fc1"`` or ``"fc1."``; without it, a whole model's state dict
        is refused with the prefixes it holds.

    Returns:
      ``Params(W, b)`` (``b`` is ``None`` without a bias).

    Raises:
      TypeError, KeyError: not a mapping, no ``weight``, a ``weight`` that is not 2-D to 5-D.

    Examples:
      >>> import numpy as np, jaxlinear
      >>> sd = {"weight": np.ones((3, 2)), "bias": np.zeros(3)}  # nn.Linear(2, 3)
      >>> jaxlinear.from_torch(sd).W.shape
      (2, 3)
      >>> jaxlinear.from_torch({"weight": np.ones((8, 4, 3, 3))}).W.shape  # Conv2d(4, 8, 3)
      (3, 3, 4, 8)
    """
    fn = "from_torch"
    weight, bias = _entries(fn, state_dict, "weight", "bias", prefix, "`state_dict`")
    if weight.ndim == 2:  # (out, in) -> (in, out)
        W = weight.T
    elif 3 <= weight.ndim <= 5:  # (O, I, *kernel) -> (*kernel, I, O)
        W = jnp.transpose(weight, (*range(2, weight.ndim), 1, 0))
    else:
        raise TypeError(
            f"{fn}: `weight` has shape {tuple(weight.shape)}; expected (out, in) for a Linear"
            " or (C_out, C_in/groups, *kernel) for a Conv1d/2d/3d"
        )
    if bias is not None:
        bias = _array(fn, "bias", bias)
        bias = bias.reshape(-1) if bias.ndim > 1 else bias  # Equinox conv: (O, 1, 1) -> (O,)
    return Params(W, bias)


def to_torch(params) -> dict:
    r"""jaxlinear params as a PyTorch state dict ``{"weight": ..., "bias": ...}`` of NumPy arrays.

    The inverse of ``from_torch``: ``W (in, out)`` becomes ``weight (out, in)``, a conv
    ``W (*kernel, I/groups, O)`` becomes ``(O, I/groups, *kernel)``. Load it with
    ``layer.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``. The
    arrays are fresh (writable) NumPy copies.

    Args:
      params: ``Params(W, b)``, ``{"W", "b"}``, ``{"kernel", "bias"}`` or ``(W, b)``.

    Returns:
      ``{"weight": np.ndarray, "bias": np.ndarray}`` (no ``"bias"`` if ``b`` is ``None``).

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> sd = jaxlinear.to_torch(jaxlinear.Params(jnp.ones((2, 3)), jnp.zeros(3)))
      >>> sd["weight"].shape, sd["bias"].shape
      ((3, 2), (3,))
    """
    W, b = _read_params("to_torch", params)
    W = np.array(W)
    if W.ndim == 2:
        weight = W.T.copy()
    elif 3 <= W.ndim <= 5:
        n = W.ndim
        weight = np.ascontiguousarray(np.transpose(W, (n - 1, n - 2, *range(n - 2))))
    else:
        raise TypeError(
            f"to_torch: `W` has shape {W.shape}; expected (d_in, d_out) or a conv's"
            " (*kernel, C_in/groups, C_out)"
        )
    return {"weight": weight} if b is None else {"weight": weight, "bias": np.array(b)}


def from_flax(tree) -> Params:
    r"""Flax parameters as jaxlinear ``Params``: the same layout, only the names change.

    Flax's ``kernel`` is ``(d_in, d_out)`` (``nnx.Linear``, ``linen.Dense``) or
    ``(*kernel, C_in/groups, C_out)`` (``Conv``), exactly jaxlinear's ``W``. A plain
    ``{"kernel", "bias"}`` dict is accepted by the layers directly; this converts what they
    do not take: an NNX state (``nnx.state(layer)``, whose values are ``nnx.Param``
    Variables) or any other mapping with those keys.

    Args:
      tree: a mapping with ``kernel`` and optional ``bias`` (arrays or NNX Variables).

    Returns:
      ``Params(W=kernel, b=bias)``.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> jaxlinear.from_flax({"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}).W.shape
      (2, 3)
    """
    kernel, bias = _entries("from_flax", tree, "kernel", "bias", "", "`tree`")
    return Params(kernel, None if bias is None else _array("from_flax", "bias", bias))


def to_flax(params) -> dict:
    r"""jaxlinear params as Flax's ``{"kernel": W, "bias": b}`` (no ``"bias"`` if ``b`` is None).

    For an NNX layer: ``nnx.update(layer, jaxlinear.to_flax(params))``; for Linen, put the
    dict under the layer's name in ``{"params": ...}``.

    Args:
      params: ``Params``, ``{"W", "b"}``, a tuple ``(W, b)`` or Flax's own dict.

    Examples:
      >>> import jax.numpy as jnp, jaxlinear
      >>> sorted(jaxlinear.to_flax(jaxlinear.Params(jnp.ones((2, 3)), jnp.zeros(3))))
      ['bias', 'kernel']
    """
    W, b = _read_params("to_flax", params)
    return {"kernel": W} if b is None else {"kernel": W, "bias": b}


def _read_params(fn: str, params):
    """``(W, b)`` of any params structure the layers accept; ``b`` as stored."""
    return layout_of(fn, params).raw(params)
