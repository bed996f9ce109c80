"""pyro_bmr: Bayesian sparsification of Pyro models by Bayesian model reduction.

The data path, one module per stage: trace the model and find its Gaussian sites
(:mod:`pyro_bmr.sites`), read the guide's mean-field posterior
(:mod:`pyro_bmr.posteriors`), score reduced models in closed form
(:mod:`pyro_bmr.delta_f`), decide (:mod:`pyro_bmr.rules`), keep masks and apply
them as an effect handler (:mod:`pyro_bmr.reduction`,
:mod:`pyro_bmr.prune_messenger`), and train with reductions between epochs
(:mod:`pyro_bmr.stochastic`). Faster guides for Bayesian layers live in
:mod:`pyro_bmr.guides` and :mod:`pyro_bmr.local_reparam`; :mod:`pyro_bmr.export`
turns a reduced network into a plain, smaller ``torch.nn.Module``.
"""

from pyro_bmr.delta_f import DeltaF, delta_f
from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.export import LinearChain, export, posterior_mean
from pyro_bmr.guides import MeanFieldGuide, make_guide
from pyro_bmr.local_reparam import LocalReparameterizationMessenger, local_reparameterization
from pyro_bmr.posteriors import MeanFieldPosterior, mean_field_posterior, register_posterior
from pyro_bmr.prune_messenger import PruneMessenger, prune
from pyro_bmr.reduction import BayesianModelReduction
from pyro_bmr.report import ReductionReport, Sparsity
from pyro_bmr.rules import PruningRule, SpikeAndSlabRule, ThresholdRule
from pyro_bmr.sites import GaussianSite, find_gaussian_sites
from pyro_bmr.stochastic import StochasticBMR

__version__ = "0.1.0"

__all__ = [
    "BayesianModelReduction",
    "DeltaF",
    "GaussianSite",
    "LinearChain",
    "LocalReparameterizationMessenger",
    "MeanFieldGuide",
    "MeanFieldPosterior",
    "PruneMessenger",
    "PrunedNormal",
    "PruningRule",
    "ReductionReport",
    "Sparsity",
    "SpikeAndSlabRule",
    "StochasticBMR",
    "ThresholdRule",
    "delta_f",
    "export",
    "find_gaussian_sites",
    "local_reparameterization",
    "make_guide",
    "mean_field_posterior",
    "posterior_mean",
    "prune",
    "register_posterior",
]
