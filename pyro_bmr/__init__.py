"""pyro_bmr: Bayesian sparsification of Pyro models by Bayesian model reduction.

The data path, one module per stage: trace the model and find its Gaussian sites
(:mod:`pyro_bmr.sites`), read the guide's mean-field posterior
(:mod:`pyro_bmr.posteriors`), score reduced models in closed form
(:mod:`pyro_bmr.free_energy`), decide (:mod:`pyro_bmr.rules`; whole units by
:mod:`pyro_bmr.groups`), keep the masks
(:mod:`pyro_bmr.reduction`) and apply them with an effect handler
(:mod:`pyro_bmr.poutine`), and train with reductions between epochs
(:mod:`pyro_bmr.stochastic`), on an ELBO whose step is captured and compiled
(:mod:`pyro_bmr.compiled_elbo`). :mod:`pyro_bmr.guides` holds a lean mean-field guide
for Bayesian networks, :mod:`pyro_bmr.nn` makes any ``torch.nn.Module`` Bayesian,
and :mod:`pyro_bmr.deterministic` turns a reduced network into a plain, smaller
``torch.nn.Module``, removing the units it no longer uses
(:mod:`pyro_bmr.unit_removal`).

The paper's comparison (its four methods, networks, data, metrics, figures and
the ``pyro-bmr`` command) is an application of the library, in
:mod:`pyro_bmr.paper`; nothing here imports it.
"""

from pyro_bmr import poutine
from pyro_bmr._masks import MaskError
from pyro_bmr.compiled_elbo import CompiledTrace_ELBO, CompiledTraceMeanField_ELBO
from pyro_bmr.deterministic import export, guide_means
from pyro_bmr.free_energy import DeltaF, delta_f
from pyro_bmr.guides import MeanFieldGuide, make_guide
from pyro_bmr.posteriors import MeanFieldPosterior, register_posterior
from pyro_bmr.reduction import BayesianModelReduction
from pyro_bmr.report import ReductionReport, Sparsity
from pyro_bmr.rules import PruningRule, SpikeAndSlabRule, ThresholdRule
from pyro_bmr.sites import GaussianSite, find_gaussian_sites
from pyro_bmr.stochastic import StochasticBMR
from pyro_bmr.unit_removal import shrink

__version__ = "0.1.0"

__all__ = [
    "BayesianModelReduction",
    "CompiledTraceMeanField_ELBO",
    "CompiledTrace_ELBO",
    "DeltaF",
    "GaussianSite",
    "MaskError",
    "MeanFieldGuide",
    "MeanFieldPosterior",
    "PruningRule",
    "ReductionReport",
    "Sparsity",
    "SpikeAndSlabRule",
    "StochasticBMR",
    "ThresholdRule",
    "delta_f",
    "export",
    "find_gaussian_sites",
    "guide_means",
    "make_guide",
    "poutine",
    "register_posterior",
    "shrink",
]
