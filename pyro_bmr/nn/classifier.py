"""A Bayesian classifier and what is read off a fitted one.

:class:`BayesianClassifier` is the model: a Bayesian network whose logits
explain the labels through a categorical likelihood, scaled from the minibatch
to the whole data set. :func:`predict_proba` and :func:`posterior_means` run a
model against a guide; pass the reduced pair ``bmr(model), bmr(guide)`` of a
:class:`~pyro_bmr.BayesianModelReduction` to read the reduced posterior, in
which pruned elements are exactly zero.
"""

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .convert import BayesianModule, Predicate
from .priors import Prior

__all__ = ["BayesianClassifier", "posterior_means", "predict_proba"]


class BayesianClassifier(BayesianModule):
    """Categorical likelihood on top of a Bayesian network.

    ``forward(x, y)`` draws the network's parameters, computes logits and observes
    ``y`` at the site ``obs`` inside ``pyro.plate("data", dataset_size)`` with the
    batch as subsample, so the ELBO of a minibatch estimates that of the whole
    data set. Site names are those of :class:`BayesianModule` (``net.<param>``).

    :param torch.nn.Module module: a network mapping inputs to ``(N, C)`` logits.
    :param int dataset_size: number of training examples.
    :param Prior prior: the prior; defaults to ``GaussianPrior(1.0)``.
    :param predicate: chooses the parameters that become random (see
        :class:`BayesianModule`).
    """

    def __init__(
        self,
        module: nn.Module,
        dataset_size: int,
        prior: Prior | None = None,
        predicate: Predicate | None = None,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
        super().__init__(module, prior, predicate)
        self.dataset_size = dataset_size

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the labels' likelihood for a batch and return the logits.

        :param torch.Tensor x: a batch of inputs, ``(N, ...)``.
        :param torch.Tensor y: class labels ``(N,)``; sampled when ``None``.
        :returns: logits ``(N, C)``.
        :raises ValueError: if ``y`` does not have shape ``(N,)``.
        """
        if y is not None and y.shape != x.shape[:1]:
            raise ValueError(f"labels y must have shape {tuple(x.shape[:1])}, got {tuple(y.shape)}")
        logits = super().forward(x)
        batch = torch.arange(x.shape[0], device=x.device)
        with pyro.plate("data", size=self.dataset_size, subsample=batch):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def _posterior_runs(
    model: Callable[..., Any], guide: Callable[..., Any], num_samples: int, *args: Any
):
    """Yield ``(model_trace, return value)`` for ``num_samples`` draws from ``guide``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        yield model_trace, model_trace.nodes["_RETURN"]["value"]


@torch.no_grad()
def predict_proba(
    model: Callable[..., torch.Tensor],
    guide: Callable[..., Any],
    x: torch.Tensor,
    num_samples: int = 100,
) -> torch.Tensor:
    """Posterior-predictive class probabilities, averaged over guide samples.

    .. math::  p(y \\mid x) \\approx \\frac1S \\sum_{s=1}^S \\mathrm{softmax}\\,f(x; w_s),
               \\quad w_s \\sim q.

    :param model: a classifier returning logits, e.g. a :class:`BayesianClassifier`
        or its reduced form ``bmr(model)``.
    :param guide: the fitted guide, or its reduced form ``bmr(guide)``.
    :param torch.Tensor x: inputs ``(N, ...)`` on the model's device.
    :param int num_samples: number :math:`S` of guide samples.
    :returns: probabilities ``(N, C)``; rows sum to one.
    """
    total = None
    for _, logits in _posterior_runs(model, guide, num_samples, x):
        probs = logits.softmax(dim=-1)
        total = probs if total is None else total + probs
    return total / num_samples


@torch.no_grad()
def posterior_means(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    sites: Sequence[str],
    num_samples: int = 100,
) -> dict[str, torch.Tensor]:
    """Monte-Carlo posterior means of the values at the named model sites.

    With ``sites=model.random_sites()`` these are the network's effective
    parameters -- for a decentered prior the scale times the standardised weight,
    and, with a reduced model and guide, exactly zero where pruned.

    :param model: the model (or ``bmr(model)``).
    :param guide: the fitted guide (or ``bmr(guide)``).
    :param args: inputs for one model call, e.g. a small batch ``x``.
    :param sites: names of model sites to average.
    :param int num_samples: number of guide samples.
    :returns: the mean value at each site.
    :raises ValueError: if a site does not occur in the model's trace.
    """
    totals: dict[str, torch.Tensor] = {}
    for trace, _ in _posterior_runs(model, guide, num_samples, *args):
        for name in sites:
            if name not in trace.nodes:
                raise ValueError(f"site {name!r} does not occur in the model's trace")
            value = trace.nodes[name]["value"]
            totals[name] = value if name not in totals else totals[name] + value
    return {name: total / num_samples for name, total in totals.items()}
