"""``jaxlinear.linen``: a whole Flax linen model on explicit rules, in one call.

>>> import jax.numpy as jnp, flax.linen as nn, jaxlinear.linen
>>> model = jaxlinear.linen.explicit(nn.Sequential([nn.Dense(3), nn.LayerNorm()]))
>>> jaxlinear.linen.report(model, jnp.ones((1, 2))).explicit
('layers_0',)

``explicit(module, *, binding="custom_vjp")`` returns a linen module whose known layers
(``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``, ``ConvLocal``, ``ConvTranspose``,
``Embed`` and its ``attend``, ``OptimizedLSTMCell``, and so the projections of attention
and the matmuls of the RNN cells) run jaxlinear's ops at any depth, with exactly the
original's variables; ``report(module, *args)`` says what every submodule runs, listing
those left untouched; ``per_example_loss(module, loss, variables)`` gives
``(loss_fn, params)`` for ``per_example_grad_norms`` / ``clipped_grad``. Flax is an
optional dependency of jaxlinear: this module imports it, ``import jaxlinear`` does not.
"""

try:
    import flax.linen  # noqa: F401
except ImportError as error:  # pragma: no cover - tested by hiding flax.linen
    raise ImportError(
        "jaxlinear.linen needs Flax (linen), which is not installed:"
        " `pip install flax` (the rest of jaxlinear works without it)"
    ) from error

from jaxlinear._src.linen import BINDINGS as BINDINGS
from jaxlinear._src.linen import STATUSES as STATUSES
from jaxlinear._src.linen import Report as Report
from jaxlinear._src.linen import Row as Row
from jaxlinear._src.linen import explicit as explicit
from jaxlinear._src.linen import per_example_loss as per_example_loss
from jaxlinear._src.linen import report as report

__all__ = [
    "BINDINGS",
    "STATUSES",
    "Report",
    "Row",
    "explicit",
    "per_example_loss",
    "report",
]
