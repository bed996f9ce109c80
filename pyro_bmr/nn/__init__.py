"""Bayesian neural networks for pyro_bmr: any ``torch.nn.Module`` made Bayesian.

* :mod:`~pyro_bmr.nn.priors` -- which prior: :class:`GaussianPrior`,
  :class:`LayerScalePrior`;
* :mod:`~pyro_bmr.nn.horseshoe` -- regularised horseshoes: :class:`HorseshoePrior`,
  :class:`LayerHorseshoePrior`;
* :mod:`~pyro_bmr.nn.convert` -- how a network becomes Bayesian:
  :func:`to_bayesian`, :class:`BayesianModule`;
* :mod:`~pyro_bmr.nn.classifier` -- the likelihood (:class:`BayesianClassifier`)
  and posterior predictions;
* :mod:`~pyro_bmr.nn.units` -- the units (neurons, channels, heads) of a network,
  for structured reduction: :func:`unit_groups`.

Ready networks and the paper's four methods are the application's
(:mod:`pyro_bmr.paper.networks`, :mod:`pyro_bmr.paper.methods`); this package
never imports them.
"""

from .classifier import BayesianClassifier, posterior_means, predict_proba
from .convert import BayesianModule, Predicate, exclude_normalization, to_bayesian
from .horseshoe import HorseshoePrior, LayerHorseshoePrior
from .priors import GaussianPrior, LayerScalePrior, Prior
from .units import unit_groups

__all__ = [
    "BayesianClassifier",
    "BayesianModule",
    "GaussianPrior",
    "HorseshoePrior",
    "LayerHorseshoePrior",
    "LayerScalePrior",
    "Predicate",
    "Prior",
    "exclude_normalization",
    "posterior_means",
    "predict_proba",
    "to_bayesian",
    "unit_groups",
]
