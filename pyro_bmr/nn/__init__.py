"""Bayesian neural networks for pyro_bmr: any ``torch.nn.Module`` made Bayesian.

* :mod:`~pyro_bmr.nn.priors` -- which prior: :class:`GaussianPrior`,
  :class:`LayerScalePrior`, :class:`HorseshoePrior`;
* :mod:`~pyro_bmr.nn.convert` -- how a network becomes Bayesian:
  :class:`BayesianModule`;
* :mod:`~pyro_bmr.nn.networks` -- ready deterministic networks and
  :func:`build_network`;
* :mod:`~pyro_bmr.nn.classifier` -- the likelihood (:class:`BayesianClassifier`)
  and posterior predictions;
* :mod:`~pyro_bmr.nn.methods` -- the paper's four methods, :func:`fit_method`.

This package imports the core library; the core never imports it.
"""

from .classifier import BayesianClassifier, posterior_means, predict_proba
from .convert import BayesianModule, Predicate, exclude_normalization, to_bayesian
from .methods import METHODS, EpochRecord, fit_method, method_prior
from .mixer import MLPMixer
from .networks import MLP, NETWORKS, LeNet5, LeNet300100, build_network
from .priors import GaussianPrior, HorseshoePrior, LayerScalePrior, Prior
from .vit import ViT

__all__ = [
    "METHODS",
    "MLP",
    "NETWORKS",
    "BayesianClassifier",
    "BayesianModule",
    "EpochRecord",
    "GaussianPrior",
    "HorseshoePrior",
    "LayerScalePrior",
    "LeNet300100",
    "LeNet5",
    "MLPMixer",
    "Predicate",
    "Prior",
    "ViT",
    "build_network",
    "exclude_normalization",
    "fit_method",
    "method_prior",
    "posterior_means",
    "predict_proba",
    "to_bayesian",
]
