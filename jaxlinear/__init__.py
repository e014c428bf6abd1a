"""jaxlinear: the linear layer ``Y = X W + b`` with its transpose rules written out.

The whole public API is listed here.
"""

from jaxlinear._src.adjoint import AdjointTestResult as AdjointTestResult
from jaxlinear._src.adjoint import adjoint_test as adjoint_test
from jaxlinear._src.dual import dual_linear as dual_linear
from jaxlinear._src.jacobian import dense_jacobian as dense_jacobian
from jaxlinear._src.jacobian import jacobian_blocks as jacobian_blocks
from jaxlinear._src.linear import linear as linear
from jaxlinear._src.linear import mlp as mlp
from jaxlinear._src.linear import pullback as pullback
from jaxlinear._src.linear import pushforward as pushforward
from jaxlinear._src.params import SCHEMES as SCHEMES
from jaxlinear._src.params import Params as Params
from jaxlinear._src.params import init as init
from jaxlinear._src.params import init_mlp as init_mlp
from jaxlinear._src.sharded import column_parallel_linear as column_parallel_linear
from jaxlinear._src.sharded import data_parallel_linear as data_parallel_linear
from jaxlinear._src.sharded import row_parallel_linear as row_parallel_linear
from jaxlinear._src.sharded import tensor_parallel_mlp as tensor_parallel_mlp

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "AdjointTestResult",
    "Params",
    "adjoint_test",
    "column_parallel_linear",
    "data_parallel_linear",
    "dense_jacobian",
    "dual_linear",
    "init",
    "init_mlp",
    "jacobian_blocks",
    "linear",
    "mlp",
    "pullback",
    "pushforward",
    "row_parallel_linear",
    "tensor_parallel_mlp",
]
