"""Fisher information matrices of JAX networks as lineax linear operators."""

from . import estimate as estimate
from ._ekfac import EKFACOperator as EKFACOperator
from ._evidence import PriorPrecisionResult as PriorPrecisionResult
from ._evidence import optimize_prior_precision as optimize_prior_precision
from ._functional import (
    create_empirical_fisher_mv as create_empirical_fisher_mv,
)
from ._functional import (
    create_empirical_fisher_mv_without_data as create_empirical_fisher_mv_without_data,
)
from ._functional import create_hessian_mv as create_hessian_mv
from ._functional import (
    create_hessian_mv_without_data as create_hessian_mv_without_data,
)
from ._functional import (
    create_MC_fisher_mv as create_MC_fisher_mv,
)
from ._functional import (
    create_MC_fisher_mv_without_data as create_MC_fisher_mv_without_data,
)
from ._hessian import HessianOperator as HessianOperator
from ._hessian import LinearisedHessianOperator as LinearisedHessianOperator
from ._kfac import KFACOperator as KFACOperator
from ._likelihoods import MSE as MSE
from ._likelihoods import AbstractLikelihood as AbstractLikelihood
from ._likelihoods import BinaryCrossEntropy as BinaryCrossEntropy
from ._likelihoods import CrossEntropy as CrossEntropy
from ._likelihoods import Gaussian as Gaussian
from ._likelihoods import HeteroscedasticGaussian as HeteroscedasticGaussian
from ._likelihoods import Likelihood as Likelihood
from ._likelihoods import has_sampler as has_sampler
from ._marglik import MarglikResult as MarglikResult
from ._marglik import marglik_training as marglik_training
from ._models import from_equinox as from_equinox
from ._models import from_flax_nnx as from_flax_nnx
from ._operators import AbstractCurvatureOperator as AbstractCurvatureOperator
from ._operators import EmpiricalFisherOperator as EmpiricalFisherOperator
from ._operators import GGNOperator as GGNOperator
from ._operators import LinearisedCurvatureOperator as LinearisedCurvatureOperator
from ._operators import MaterialisedCurvatureOperator as MaterialisedCurvatureOperator
from ._operators import MCFisherOperator as MCFisherOperator
from ._posterior import LaplacePosterior as LaplacePosterior
from ._posterior import probit as probit
from ._priors import PriorPrecision as PriorPrecision
from ._priors import scale as scale
from ._sharding import shard_data as shard_data
from ._streaming import StreamedOperator as StreamedOperator
from ._subset import last_layer as last_layer
from ._subset import subset as subset

__version__ = "0.1.0"
