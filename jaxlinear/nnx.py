"""``jaxlinear.nnx``: a whole Flax NNX model on explicit rules, in one call.

>>> import jaxlinear.nnx
>>> from flax import nnx
>>> model = jaxlinear.nnx.explicit(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
>>> jaxlinear.nnx.report(model).explicit
('',)

``explicit(model, *, binding="custom_vjp", copy=False)`` converts the model's linear
layers (``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``, ``ConvTranspose``, ``Embed``,
``MultiHeadAttention``'s projections, ``LoRA`` / ``LoRALinear``'s factors, the RNN cells'
``Linear`` s, and user subclasses of these that reach the parent's computation) and keeps
its ``nnx.state``; ``report(model)`` says
what every module runs, listing modules it leaves untouched; ``per_example_loss(model,
loss)`` gives ``(loss_fn, params)`` for ``per_example_grad_norms`` / ``clipped_grad``.
Flax is an optional dependency of jaxlinear: this module imports it, ``import jaxlinear``
does not.
"""

try:
    import flax.nnx  # noqa: F401
except ImportError as error:  # pragma: no cover - tested in a subprocess
    raise ImportError(
        "jaxlinear.nnx needs Flax (NNX, flax>=0.10), which is not installed:"
        " `pip install flax` (the rest of jaxlinear works without it)"
    ) from error

from jaxlinear._src.nnx import BINDINGS as BINDINGS
from jaxlinear._src.nnx import STATUSES as STATUSES
from jaxlinear._src.nnx import ConvTranspose as ConvTranspose
from jaxlinear._src.nnx import Embed as Embed
from jaxlinear._src.nnx import LoRA as LoRA
from jaxlinear._src.nnx import Report as Report
from jaxlinear._src.nnx import Row as Row
from jaxlinear._src.nnx import explicit as explicit
from jaxlinear._src.nnx import per_example_loss as per_example_loss
from jaxlinear._src.nnx import report as report

__all__ = [
    "BINDINGS",
    "STATUSES",
    "ConvTranspose",
    "Embed",
    "LoRA",
    "Report",
    "Row",
    "explicit",
    "per_example_loss",
    "report",
]
