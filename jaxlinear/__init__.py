"""jaxlinear: the linear layer ``Y = X W + b`` with its transpose rules written out.

The whole public API is listed here.
"""

from jaxlinear._src.dual import dual_linear as dual_linear
from jaxlinear._src.linear import linear as linear
from jaxlinear._src.linear import mlp as mlp
from jaxlinear._src.linear import pullback as pullback
from jaxlinear._src.linear import pushforward as pushforward
from jaxlinear._src.params import SCHEMES as SCHEMES
from jaxlinear._src.params import Params as Params
from jaxlinear._src.params import init as init
from jaxlinear._src.params import init_mlp as init_mlp

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "Params",
    "dual_linear",
    "init",
    "init_mlp",
    "linear",
    "mlp",
    "pullback",
    "pushforward",
]
