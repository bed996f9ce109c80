"""Priors that make the parameters of a converted network random.

A :class:`Prior` answers one question: given one layer of a network (a module
and the parameters of it that were chosen to become random), which
:class:`~pyro.nn.module.PyroSample` replaces each parameter, and which
hyper-parameter sites does that need? The converter
(:class:`~pyro_bmr.nn.convert.BayesianModule`) walks the network and calls the
prior once per layer, in the style of TyXe's ``priors.py``.

Two Gaussian priors live here:

* :class:`GaussianPrior` -- every element :math:`w \\sim \\mathcal N(0, s^2)`;
* :class:`LayerScalePrior` -- per layer a precision
  :math:`c^{-2} \\sim \\mathrm{Gamma}(2, 2)` and :math:`w \\sim \\mathcal N(0, c^2)`,
  written non-centred as :math:`w = c\\,z`, :math:`z \\sim \\mathcal N(0, 1)` (the
  prior that BMR reduces, and the *Flat* models of Marković, Friston & Kiebel, 2023).

The hierarchical shrinkage priors (regularised horseshoes, the *Tiered* model) are
in :mod:`pyro_bmr.nn.horseshoe`.

The distributions are built lazily, at sampling time, from a zero-dimensional
buffer ``_prior_anchor`` that the converter registers on every layer, so that
they follow the layer's device and dtype after ``.to(...)``. They are small
callable objects rather than lambdas so that a Bayesian network can be deep
copied and pickled.
"""

import abc
from collections.abc import Mapping

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample

from pyro_bmr import _pyro_compat

__all__ = ["Prior", "GaussianPrior", "LayerScalePrior", "ANCHOR"]

#: Name of the zero-dimensional buffer from which priors take device and dtype.
ANCHOR = "_prior_anchor"


class Prior(abc.ABC):
    """Base class: turns the chosen parameters of one layer into ``PyroSample`` s.

    Subclasses implement :meth:`apply_`; priors with network-wide
    hyper-parameters also override :meth:`setup_`.

    :cvar bool decentered: whether the parameter sites are to be sampled
        through :class:`~pyro.infer.reparam.LocScaleReparam` with
        ``centered=0``, i.e. as standardised ``<site>_decentered`` sites with a
        fixed :math:`\\mathcal N(0, 1)` prior. The converter applies the
        reparameterisation itself.
    """

    decentered: bool = False

    def setup_(self, root: PyroModule) -> dict[str, float]:
        """Attach network-wide hyper-parameter sites to ``root``.

        :param PyroModule root: the Bayesian network; it carries the anchor buffer.
        :returns: the attribute names of the added sites mapped to the constrained
            value at which a guide should start.
        """
        return {}

    @abc.abstractmethod
    def apply_(
        self,
        module: PyroModule,
        params: Mapping[str, torch.Tensor],
        *,
        root: PyroModule,
        first: bool,
        last: bool,
    ) -> dict[str, float]:
        """Replace each parameter in ``params`` by a ``PyroSample`` on ``module``.

        :param PyroModule module: the layer; it carries the anchor buffer.
        :param params: the layer's chosen parameters by attribute name (still set
            on ``module`` when this is called).
        :param PyroModule root: the module passed to :meth:`setup_`.
        :param bool first: whether this is the network's first layer with a
            weight matrix (``weight`` of dimension two or more).
        :param bool last: whether this is the network's last layer with random
            parameters (its output layer).
        :returns: the attribute names of the added hyper-parameter sites mapped to
            their starting values.
        """


def _rows(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape of a per-row (first-dimension) scale and the shape it broadcasts as."""
    rows = tuple(param.shape[:1])
    return rows, rows + (1,) * max(param.dim() - 1, 0)


def _set_sample(module: PyroModule, name: str, prior: object) -> None:
    """Add a new ``PyroSample`` attribute, refusing to shadow an existing one."""
    if name in _pyro_compat.random_attributes(module) or name in dir(module):
        raise ValueError(
            f"cannot add prior site {name!r} to {type(module).__name__}: "
            "the module already has an attribute of that name"
        )
    setattr(module, name, PyroSample(prior))


class _Normal:
    """:math:`\\mathcal N(0, s^2)` of a fixed shape."""

    def __init__(self, shape: torch.Size, scale: float) -> None:
        self.shape = shape
        self.scale = scale

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        return dist.Normal(zero, zero + self.scale).expand(self.shape).to_event(len(self.shape))


class GaussianPrior(Prior):
    """Independent :math:`w \\sim \\mathcal N(0, s^2)` on every chosen element.

    :param float scale: the prior standard deviation :math:`s`.
    """

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"GaussianPrior scale must be positive, got {scale!r}")
        self.scale = float(scale)

    def apply_(self, module, params, *, root, first, last):
        for name, param in params.items():
            setattr(module, name, PyroSample(_Normal(param.shape, self.scale)))
        return {}

    def __repr__(self) -> str:
        return f"GaussianPrior(scale={self.scale})"


class _Gamma:
    def __init__(self, concentration: float, rate: float) -> None:
        self.concentration = concentration
        self.rate = rate

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        return dist.Gamma(zero + self.concentration, zero + self.rate)


class _PrecisionNormal:
    """:math:`\\mathcal N(0, c^2)` with :math:`c^{-2}` read from another site."""

    def __init__(self, shape: torch.Size, precision: str, factor: float = 1.0) -> None:
        self.shape = shape
        self.precision = precision
        self.factor = factor

    def __call__(self, module: PyroModule) -> dist.TorchDistribution:
        zero = getattr(module, ANCHOR)
        scale = getattr(module, self.precision).rsqrt()
        if self.factor != 1.0:
            scale = self.factor * scale
        return dist.Normal(zero, scale).expand(self.shape).to_event(len(self.shape))


class LayerScalePrior(Prior):
    """Gaussian prior with a learned scale per layer.

    Each layer gets a site ``<layer>.prior_precision`` with
    :math:`c^{-2} \\sim \\mathrm{Gamma}(\\alpha, \\beta)` shared by all its chosen
    parameters, and each element :math:`w \\sim \\mathcal N(0, c^2)`. The
    parameter sites are decentered (:attr:`decentered` is ``True``): the network
    samples :math:`z \\sim \\mathcal N(0, 1)` at ``<site>_decentered`` and uses
    :math:`w = c z`, so Bayesian model reduction scores :math:`z` against a fixed
    standard normal prior.

    :param float concentration: :math:`\\alpha` of the Gamma prior on the precision.
    :param float rate: :math:`\\beta` of the Gamma prior on the precision.
    :param float init_precision: the precision at which guides start.
    :param float hidden_scale: a factor on :math:`c` in every layer but the output
        layer (the authors' code divides those by 10: ``hidden_scale=0.1``).
    """

    decentered = True
    site = "prior_precision"

    def __init__(
        self,
        concentration: float = 2.0,
        rate: float = 2.0,
        init_precision: float = 1.0,
        hidden_scale: float = 1.0,
    ) -> None:
        for name, value in [
            ("concentration", concentration),
            ("rate", rate),
            ("init_precision", init_precision),
            ("hidden_scale", hidden_scale),
        ]:
            if not value > 0:
                raise ValueError(f"LayerScalePrior {name} must be positive, got {value!r}")
        self.concentration = float(concentration)
        self.rate = float(rate)
        self.init_precision = float(init_precision)
        self.hidden_scale = float(hidden_scale)

    def apply_(self, module, params, *, root, first, last):
        _set_sample(module, self.site, _Gamma(self.concentration, self.rate))
        factor = 1.0 if last else self.hidden_scale
        for name, param in params.items():
            setattr(module, name, PyroSample(_PrecisionNormal(param.shape, self.site, factor)))
        return {self.site: self.init_precision}

    def __repr__(self) -> str:
        extra = "" if self.hidden_scale == 1.0 else f", hidden_scale={self.hidden_scale}"
        return f"LayerScalePrior(concentration={self.concentration}, rate={self.rate}{extra})"
