"""Parameter pytrees, their layouts, and initialization schemes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import export


class Params(NamedTuple):
    """Parameters of ``Y = X W + b``.

    Attributes:
      W: ``(d_in, d_out)`` weight, laid out as in the math (and Flax); PyTorch and
        Equinox store ``(d_out, d_in)``: convert with ``W = weight.T``.
      b: ``(d_out,)`` bias, or the row vector ``(1, d_out)``, or ``None`` (no bias).

    The layers also take ``{"W": W, "b": b}``, Flax's ``{"kernel": W, "bias": b}`` (the
    same layout) and a tuple ``(W, b)``, and return gradients in the structure given;
    ``from_torch`` / ``from_flax`` convert PyTorch state dicts and NNX states.
    """

    W: Any
    b: Any = None


# jax.export serializes the pytrees a function takes and returns: by this name.
export.register_namedtuple_serialization(Params, serialized_name="jaxlinear.Params")


class Layout(NamedTuple):
    """Static (hashable) description of how a params pytree holds ``W`` and ``b``.

    ``unpack`` gives ``(W, b)`` with ``b`` flattened to ``(d_out,)``; ``pack`` rebuilds
    the user's structure, so gradients come back in the structure given.
    """

    kind: str  # "params" (the NamedTuple), "dict" {"W", "b"}, "flax" {"kernel", "bias"}, "tuple"
    bias: str  # "none", "vector" (d_out,) or "row" (1, d_out)
    b_key: bool  # whether the structure has a slot for b (a "b"/"bias" key, a 2-tuple)

    def raw(self, params):
        """``(W, b)`` as stored (``b`` not reshaped; ``None`` if absent)."""
        return _read(self.kind, params)

    def unpack(self, params):
        W, b = _read(self.kind, params)
        if b is not None and self.bias == "row":
            b = b.reshape(b.shape[-1])  # (1, d_out) -> (d_out,)
        return W, b

    def pack(self, W, b):
        if b is not None:
            if self.bias == "none":
                b = None
            elif self.bias == "row":
                b = b.reshape(1, b.shape[-1])  # (d_out,) -> (1, d_out)
        if self.kind == "params":
            return Params(W, b)
        if self.kind == "tuple":
            return (W, b) if self.b_key else (W,)
        w_key, b_key = _KEYS[self.kind]
        return {w_key: W, b_key: b} if self.b_key else {w_key: W}


_KEYS = {"dict": ("W", "b"), "flax": ("kernel", "bias")}


def _read(kind, params):
    """``(W, b)`` of a params pytree of a known ``kind``."""
    if kind == "params":
        return params.W, params.b
    if kind == "tuple":
        return params[0], (params[1] if len(params) == 2 else None)
    w_key, b_key = _KEYS[kind]
    return params[w_key], params.get(b_key)


def _shape_of(a) -> tuple:
    return tuple(getattr(a, "shape", ()))


def _refuse(fn: str, params) -> None:
    """Raise for params in another library's layout, naming the conversion."""
    from collections.abc import Mapping

    if isinstance(params, Mapping) and "weight" in params:
        shape = _shape_of(params["weight"])
        layout = "(out, in)" if len(shape) == 2 else "(C_out, C_in/groups, *kernel)"
        raise TypeError(
            f"{fn}: `params` looks like a PyTorch state dict (`weight` of shape {shape} is"
            f" {layout}; jaxlinear's `W` is (d_in, d_out), a conv's (*kernel, C_in/groups,"
            " C_out)); convert with jaxlinear.from_torch(state_dict)"
        )
    if isinstance(params, Mapping) and "kernel" in params and not isinstance(params, dict):
        raise TypeError(
            f"{fn}: `params` looks like a Flax NNX state ({type(params).__name__} with"
            " `kernel`); convert with jaxlinear.from_flax(nnx.state(layer))"
        )
    if isinstance(params, dict) and "kernel" in params:
        extra = sorted(set(params) - {"kernel", "bias"}, key=str)
        variable = [k for k in ("kernel", "bias") if hasattr(params.get(k), "get_value")]
        if extra or variable:
            what = f"extra keys {extra}" if extra else f"Flax Variables in {variable}"
            raise TypeError(
                f"{fn}: `params` looks like Flax parameters but has {what}; pass"
                " {'kernel': ..., 'bias': ...} of arrays, or convert with jaxlinear.from_flax"
            )
    if hasattr(params, "weight") and not isinstance(params, (Mapping, tuple)):
        raise TypeError(
            f"{fn}: `params` is a {type(params).__name__} layer, not its parameters (its"
            " `weight` is (out, in)); for an Equinox model use jaxlinear.equinox.explicit(model),"
            " for a PyTorch layer jaxlinear.from_torch(layer.state_dict())"
        )
    if isinstance(params, list):
        raise TypeError(
            f"{fn}: `params` is a list of {len(params)} items; pass Params(W, b) or a tuple"
            " (W, b) (a list of layers goes to jaxlinear.mlp)"
        )


def layout_of(fn: str, params) -> Layout:
    """The layout of ``params``; raises ``TypeError`` naming ``fn`` if it is not one.

    Accepted: ``Params(W, b)``, ``{"W": W, "b": b}``, Flax's ``{"kernel": W, "bias": b}``
    (the same layout) and a tuple ``(W, b)`` or ``(W,)``. Other libraries' layouts are
    refused with the conversion to use (``from_torch``, ``from_flax``).
    """
    _refuse(fn, params)
    expected = (
        "Params(W, b), a dict {'W': W, 'b': b}, Flax's {'kernel': W, 'bias': b} or a tuple (W, b)"
    )
    if isinstance(params, Params):
        kind, b_key = "params", True
    elif isinstance(params, tuple):
        if len(params) not in (1, 2):
            raise TypeError(
                f"{fn}: `params` is a tuple of {len(params)} items; expected (W, b) or (W,)"
            )
        kind, b_key = "tuple", len(params) == 2
    elif isinstance(params, dict):
        kind = "flax" if "kernel" in params else "dict"
        w_key, b_name = _KEYS[kind]
        extra = sorted(set(params) - {w_key, b_name}, key=str)
        if w_key not in params or extra:
            raise TypeError(
                f"{fn}: `params` must be {expected}; got a dict with keys {sorted(params, key=str)}"
            )
        b_key = b_name in params
    else:
        raise TypeError(f"{fn}: `params` must be {expected}; got {type(params).__name__}")
    W, b = _read(kind, params)
    if W is None:
        raise TypeError(f"{fn}: `params` has no `W` (it is None)")
    if b is None:
        bias = "none"
    else:
        bias = "row" if getattr(b, "ndim", None) == 2 else "vector"
    return Layout(kind, bias, b_key)


# name -> (jax.nn.initializers factory, variance of W's entries, stated for the docs)
_SCHEMES: dict[str, tuple[Callable, str]] = {
    "lecun_normal": (jax.nn.initializers.lecun_normal, "1/d_in (truncated normal)"),
    "lecun_uniform": (jax.nn.initializers.lecun_uniform, "1/d_in"),
    "he_normal": (jax.nn.initializers.he_normal, "2/d_in (truncated normal)"),
    "he_uniform": (jax.nn.initializers.he_uniform, "2/d_in"),
    "glorot_normal": (jax.nn.initializers.glorot_normal, "2/(d_in+d_out) (truncated normal)"),
    "glorot_uniform": (jax.nn.initializers.glorot_uniform, "2/(d_in+d_out)"),
}
_SCHEMES["xavier_normal"] = _SCHEMES["glorot_normal"]
_SCHEMES["xavier_uniform"] = _SCHEMES["glorot_uniform"]
SCHEMES = tuple(_SCHEMES)


def as_key(fn: str, key) -> jax.Array:
    """``key`` as a PRNG key: an integer seed ``s`` becomes ``jax.random.key(s)``.

    Accepts a typed key (``jax.random.key``), a raw ``uint32[2]`` key
    (``jax.random.PRNGKey``), or an integer seed (a Python or NumPy int, or a 0-d integer
    array); anything else raises ``TypeError`` naming ``fn`` and suggesting ``jax.random.key(0)``.
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if isinstance(key, bool) or (dtype is not None and jnp.dtype(dtype) == jnp.bool_):
        pass  # refused below: a boolean is no seed
    elif isinstance(key, int) or (
        dtype is not None and jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(key) == 0
    ):
        return jax.random.key(key)
    elif dtype is not None and jnp.dtype(dtype) == jnp.uint32 and jnp.shape(key) == (2,):
        return key  # a raw key from jax.random.PRNGKey
    shape = f" of shape {tuple(jnp.shape(key))} and dtype {dtype}" if dtype is not None else ""
    raise TypeError(
        f"{fn}: `key` must be a PRNG key such as jax.random.key(0) or an integer seed,"
        f" got {type(key).__name__}{shape}"
    )


def _check_size(fn: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value!r}")


def init(
    key: jax.Array,
    d_in: int,
    d_out: int,
    *,
    bias: bool = True,
    scheme: str | Callable = "lecun_normal",
    dtype=jnp.float32,
) -> Params:
    r"""Initialize one layer: ``W: (d_in, d_out)`` from ``scheme``, ``b: (d_out,)`` zeros.

    Schemes (variance of each entry of ``W``; the normal ones are truncated at two
    standard deviations and rescaled so the variance is exact, as in
    ``jax.nn.initializers``):

    | scheme | variance |
    |---|---|
    | ``"lecun_normal"`` (default), ``"lecun_uniform"`` | ``1 / d_in`` |
    | ``"he_normal"``, ``"he_uniform"`` | ``2 / d_in`` |
    | ``"glorot_normal"`` = ``"xavier_normal"`` | ``2 / (d_in + d_out)`` |
    | ``"glorot_uniform"`` = ``"xavier_uniform"`` | ``2 / (d_in + d_out)`` |

    Args:
      key: a PRNG key (``jax.random.key(0)``), or an integer seed, used as
        ``jax.random.key(seed)``.
      d_in: input width (rows of ``W``).
      d_out: output width (columns of ``W``).
      bias: whether to create ``b`` (zeros ``(d_out,)``) or set it to ``None``.
      scheme: one of the names above, or a ``jax.nn.initializers`` initializer
        ``f(key, shape, dtype)``.
      dtype: dtype of ``W`` and ``b``.

    Returns:
      ``Params(W, b)``.

    Examples:
      >>> import jax, jaxlinear
      >>> p = jaxlinear.init(jax.random.key(0), 3, 2)
      >>> p.W.shape, p.b.shape
      ((3, 2), (2,))
    """
    key = as_key("init", key)
    _check_size("init", "d_in", d_in)
    _check_size("init", "d_out", d_out)
    if callable(scheme):
        initializer = scheme
    elif scheme in _SCHEMES:
        initializer = _SCHEMES[scheme][0]()
    else:
        raise ValueError(f"init: `scheme` must be one of {SCHEMES} or a callable, got {scheme!r}")
    W = initializer(key, (d_in, d_out), dtype)  # (d_in, d_out)
    b = jnp.zeros((d_out,), dtype) if bias else None  # (d_out,)
    return Params(W, b)


def init_mlp(
    key: jax.Array,
    sizes: Sequence[int],
    *,
    bias: bool = True,
    scheme: str | Callable = "lecun_normal",
    dtype=jnp.float32,
) -> list[Params]:
    """Initialize an MLP: ``sizes = [d_0, d_1, ..., d_L]`` gives ``L`` layers ``d_i -> d_{i+1}``.

    Each layer is ``init(k_i, d_i, d_{i+1}, bias=bias, scheme=scheme, dtype=dtype)``, with
    ``k_i`` split from ``key`` (a PRNG key, or an integer seed used as ``jax.random.key(seed)``).

    Args:
      key: a PRNG key (``jax.random.key(0)``), or an integer seed.
      sizes: the widths ``[d_0, ..., d_L]``, at least two.
      bias: whether each layer gets ``b: (d_{i+1},)`` (zeros) or ``None``.
      scheme: a name in ``jaxlinear.SCHEMES`` or an initializer ``f(key, shape, dtype)``,
        as in ``init``.
      dtype: dtype of every ``W`` and ``b``.

    Returns:
      A list of ``L`` ``Params``; layer ``i`` has ``W: (d_i, d_{i+1})``.

    Examples:
      >>> import jax, jaxlinear
      >>> [p.W.shape for p in jaxlinear.init_mlp(jax.random.key(0), [4, 8, 1])]
      [(4, 8), (8, 1)]
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"init_mlp: `sizes` needs at least 2 entries (d_in, d_out), got {sizes}")
    keys = jax.random.split(as_key("init_mlp", key), len(sizes) - 1)
    return [
        init(k, d_in, d_out, bias=bias, scheme=scheme, dtype=dtype)
        for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]
