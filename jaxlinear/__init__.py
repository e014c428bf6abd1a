"""jaxlinear: the linear layer ``Y = X W + b`` with its transpose rules written out.

The whole public API is listed here. Adapters for other libraries are submodules that
import their library, so ``import jaxlinear`` never does: ``jaxlinear.nnx`` (Flax NNX),
``jaxlinear.linen`` (Flax linen), ``jaxlinear.equinox`` (Equinox).
"""

from jaxlinear._src.adjoint import AdjointTestResult as AdjointTestResult
from jaxlinear._src.adjoint import adjoint_test as adjoint_test
from jaxlinear._src.bilinear import BatchRule as BatchRule
from jaxlinear._src.bilinear import BilinearOp as BilinearOp
from jaxlinear._src.bilinear import bilinear_op as bilinear_op
from jaxlinear._src.convert import from_flax as from_flax
from jaxlinear._src.convert import from_torch as from_torch
from jaxlinear._src.convert import to_flax as to_flax
from jaxlinear._src.convert import to_torch as to_torch
from jaxlinear._src.dual import dual_linear as dual_linear
from jaxlinear._src.fsdp import Gather as Gather
from jaxlinear._src.fsdp import fsdp_gather as fsdp_gather
from jaxlinear._src.fsdp import fsdp_gather_tree as fsdp_gather_tree
from jaxlinear._src.jacobian import dense_jacobian as dense_jacobian
from jaxlinear._src.jacobian import jacobian_blocks as jacobian_blocks
from jaxlinear._src.linear import linear as linear
from jaxlinear._src.linear import mlp as mlp
from jaxlinear._src.linear import pullback as pullback
from jaxlinear._src.linear import pushforward as pushforward
from jaxlinear._src.ops.conv import conv as conv
from jaxlinear._src.ops.conv import conv_general_dilated as conv_general_dilated
from jaxlinear._src.ops.conv import dual_conv as dual_conv
from jaxlinear._src.ops.conv import dual_conv_general_dilated as dual_conv_general_dilated
from jaxlinear._src.ops.conv import init_conv as init_conv
from jaxlinear._src.ops.conv_transpose import conv_transpose as conv_transpose
from jaxlinear._src.ops.conv_transpose import dual_conv_transpose as dual_conv_transpose
from jaxlinear._src.ops.dot_general import dot_general as dot_general
from jaxlinear._src.ops.dot_general import dual_dot_general as dual_dot_general
from jaxlinear._src.ops.einsum import dual_einsum as dual_einsum
from jaxlinear._src.ops.einsum import einsum as einsum
from jaxlinear._src.ops.embed import dual_embed as dual_embed
from jaxlinear._src.ops.embed import embed as embed
from jaxlinear._src.params import SCHEMES as SCHEMES
from jaxlinear._src.params import Params as Params
from jaxlinear._src.params import init as init
from jaxlinear._src.params import init_mlp as init_mlp
from jaxlinear._src.per_example import PlanEstimate as PlanEstimate
from jaxlinear._src.per_example import Route as Route
from jaxlinear._src.per_example import RouteReport as RouteReport
from jaxlinear._src.per_example import clipped_grad as clipped_grad
from jaxlinear._src.per_example import per_example_grad_norms as per_example_grad_norms
from jaxlinear._src.per_example import per_example_routes as per_example_routes
from jaxlinear._src.quant import RECIPES as RECIPES
from jaxlinear._src.quant import Operand as Operand
from jaxlinear._src.quant import Product as Product
from jaxlinear._src.quant import Recipe as Recipe
from jaxlinear._src.sharded import column_parallel_linear as column_parallel_linear
from jaxlinear._src.sharded import data_parallel_linear as data_parallel_linear
from jaxlinear._src.sharded import fsdp_linear as fsdp_linear
from jaxlinear._src.sharded import row_parallel_linear as row_parallel_linear
from jaxlinear._src.sharded import tensor_parallel_mlp as tensor_parallel_mlp

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "AdjointTestResult",
    "BatchRule",
    "BilinearOp",
    "Gather",
    "Operand",
    "Params",
    "PlanEstimate",
    "Product",
    "RECIPES",
    "Recipe",
    "Route",
    "RouteReport",
    "adjoint_test",
    "bilinear_op",
    "clipped_grad",
    "column_parallel_linear",
    "conv",
    "conv_general_dilated",
    "conv_transpose",
    "data_parallel_linear",
    "dense_jacobian",
    "dot_general",
    "dual_conv",
    "dual_conv_general_dilated",
    "dual_conv_transpose",
    "dual_dot_general",
    "dual_einsum",
    "dual_embed",
    "dual_linear",
    "einsum",
    "embed",
    "from_flax",
    "from_torch",
    "fsdp_gather",
    "fsdp_gather_tree",
    "fsdp_linear",
    "init",
    "init_conv",
    "init_mlp",
    "jacobian_blocks",
    "linear",
    "mlp",
    "per_example_grad_norms",
    "per_example_routes",
    "pullback",
    "pushforward",
    "row_parallel_linear",
    "tensor_parallel_mlp",
    "to_flax",
    "to_torch",
]
