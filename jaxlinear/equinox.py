"""``jaxlinear.equinox``: an Equinox model on explicit rules, in one call.

``explicit(model, *, binding="custom_vjp")`` swaps each Equinox layer jaxlinear knows
(``Linear``, ``Conv``, ``ConvTranspose``, ``Embedding``, ``MultiheadAttention``'s
projections) for a subclass of its own class running jaxlinear's op, with the same fields;
``report(model)`` says what every module runs, listing modules it leaves untouched.
Equinox is an optional dependency of jaxlinear: this module imports it, ``import
jaxlinear`` does not. The implementation is in ``jaxlinear/_src/equinox.py``.
"""

try:
    import equinox  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by a test that hides the module
    raise ImportError(
        "jaxlinear.equinox needs Equinox, which is not installed: pip install equinox"
    ) from e

from jaxlinear._src.equinox import BINDINGS as BINDINGS
from jaxlinear._src.equinox import Report as Report
from jaxlinear._src.equinox import Row as Row
from jaxlinear._src.equinox import explicit as explicit
from jaxlinear._src.equinox import report as report

__all__ = ["BINDINGS", "Report", "Row", "explicit", "report"]
