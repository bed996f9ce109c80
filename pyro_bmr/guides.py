"""A lean mean-field Normal guide for Bayesian networks.

:class:`MeanFieldGuide` fits the same family as Pyro's
:class:`~pyro.infer.autoguide.AutoNormal` (an independent Normal per element, on
the unconstrained scale) but spends less time per step: all locations live in one
flat parameter and all scales in another, so there are two ``param`` statements
and two optimiser states instead of two per site; a real-valued site is one
``sample`` statement (``AutoNormal`` adds an auxiliary site and a ``Delta`` per
latent); and its distributions skip argument validation. Together with
:func:`~pyro_bmr.local_reparameterization`, which samples pre-activations instead
of weights and adds the weights' KL in closed form, one SVI step of a Bayesian
LeNet-300-100 costs about half what it costs with ``AutoNormal``
(``benchmarks/bench_guide.py``). :func:`make_guide` picks a guide by name.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import NamedTuple

import pyro
import torch
from pyro.distributions import Independent, Normal, TransformedDistribution, constraints
from pyro.infer.autoguide import AutoGuide, AutoNormal, init_to_feasible
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.autoguide.utils import helpful_support_errors
from pyro.nn import PyroParam
from pyro.ops.tensor_utils import periodic_repeat
from torch.distributions import biject_to, transform_to
from torch.distributions.transforms import ExpTransform

from pyro_bmr import _pyro_compat
from pyro_bmr.posteriors import MeanFieldPosterior, _assign, _parameter, register_posterior
from pyro_bmr.poutine.local_reparam_messenger import (
    LOCAL_REPARAMETERIZATION,
    local_reparameterization,
)
from pyro_bmr.sites import is_real_support

__all__ = ["GUIDES", "MeanFieldGuide", "MeanFieldGuidePosterior", "make_guide"]

#: The kinds of guide :func:`make_guide` builds.
GUIDES = ("auto", "mean-field", "local")


class _ExpPositive(constraints.Constraint):
    """Positive reals, mapped from the real line by ``exp`` alone. Pyro's
    ``positive`` maps through ``exp`` followed by an identity affine map, which
    costs two more passes over every scale, forward and backward, at each step;
    the unconstrained values (log-scales) are the same."""

    event_dim = 0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return value > 0

    def __repr__(self) -> str:
        return "ExpPositive()"


_exp_positive = _ExpPositive()
biject_to.register(_ExpPositive)(lambda constraint: ExpTransform())
transform_to.register(_ExpPositive)(lambda constraint: ExpTransform())


class _Site(NamedTuple):
    name: str
    start: int
    stop: int
    shape: torch.Size  # unconstrained, at full plate size
    event_dim: int  # unconstrained event dims
    transform: torch.distributions.Transform | None  # None on the real line
    plates: tuple[str, ...]
    support: constraints.Constraint


class MeanFieldGuide(AutoGuide):
    """A diagonal Normal guide over all latent sites of ``model``, with one flat
    location and one flat scale parameter.

    Each latent site ``name`` is drawn at a sample site of the same name from
    :math:`\\mathcal N(\\mu, \\sigma^2)` (pushed through ``biject_to(support)`` for
    a constrained site), so the guide works with any ELBO, with
    :class:`~pyro.infer.Predictive`, and with
    :class:`~pyro_bmr.BayesianModelReduction`, which reads and prunes it through
    :class:`MeanFieldGuidePosterior`. Sites inside plates are supported, with
    subsampling as in ``AutoNormal``.

    .. code-block:: python

        guide = MeanFieldGuide(model)
        bmr = BayesianModelReduction(guide)
        svi = SVI(bmr(model), bmr(guide), Adam({"lr": 1e-3}), Trace_ELBO())
        with local_reparameterization():  # optional: sample pre-activations
            svi.step(x, y)

    :param callable model: a Pyro model.
    :param callable init_loc_fn: per-site initialisation of the locations, as for
        ``AutoNormal`` (see :mod:`pyro.infer.autoguide.initialization`).
    :param float init_scale: initial standard deviation of every element.
    :param callable create_plates: optional function of the model's arguments
        returning plates to use (for data subsampling), as for ``AutoNormal``.
    :raises ValueError: for a non-positive ``init_scale``; when first run, for a
        model without latent sites or whose latent sites differ in dtype or device.
    """

    #: Constraint of the flat scale parameter: ``exp`` of an unconstrained vector.
    scale_constraint = _exp_positive

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: Callable = init_to_feasible,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
    ) -> None:
        if not isinstance(init_scale, (int, float)) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        self.init_loc_fn = init_loc_fn
        self._init_scale = float(init_scale)
        self._sites: list[_Site] = []
        model = InitMessenger(init_loc_fn)(model)
        super().__init__(model, create_plates=create_plates)

    def _setup_prototype(self, *args, **kwargs) -> None:
        # AutoGuide's hook for subclasses, called through _pyro_compat.setup_prototype
        super()._setup_prototype(*args, **kwargs)
        sites, inits, start, like = [], [], 0, None
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn, value = site["fn"], site["value"].detach()
            transform = biject_to(fn.support)
            with helpful_support_errors(site):
                init = transform.inv(value).detach()
            event_dim = fn.event_dim + init.dim() - value.dim()
            for frame in site["cond_indep_stack"]:
                full_size = frame.full_size or frame.size
                if full_size != frame.size:
                    init = periodic_repeat(init, full_size, frame.dim - event_dim).contiguous()
            if like is None:
                like = init
            elif (init.dtype, init.device) != (like.dtype, like.device):
                raise ValueError(
                    f"latent site {name!r} has dtype {init.dtype} on {init.device}, but earlier "
                    f"sites have {like.dtype} on {like.device}; MeanFieldGuide keeps all sites "
                    "in one flat parameter"
                )
            plates = tuple(f.name for f in site["cond_indep_stack"] if f.vectorized)
            real = is_real_support(fn.support)
            stop = start + init.numel()
            sites.append(
                _Site(
                    name,
                    start,
                    stop,
                    init.shape,
                    event_dim,
                    None if real else transform,
                    plates,
                    fn.support,
                )
            )
            inits.append(init.reshape(-1))
            start = stop
        if not sites:
            raise ValueError("MeanFieldGuide: the model has no latent sample sites")
        self._sites = sites
        self._by_name = {site.name: site for site in sites}
        self._sizes = [site.stop - site.start for site in sites]
        loc = torch.cat(inits)
        self.loc = PyroParam(loc, constraints.real)
        self.scale = PyroParam(torch.full_like(loc, self._init_scale), self.scale_constraint)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every latent site; returns ``{site name: value}``.

        .. note:: Call the guide (``guide(*args)``), not this method.
        """
        _pyro_compat.setup_prototype(self, *args, **kwargs)
        plates = _pyro_compat.autoguide_plates(self, *args, **kwargs)
        # One split per parameter: its backward is a single concatenation, where
        # slicing per site would allocate a full-size gradient for every site.
        locs = self.loc.split(self._sizes)
        scales = self.scale.split(self._sizes)
        result = {}
        for site, site_loc, site_scale in zip(self._sites, locs, scales):
            site_loc, site_scale = site_loc.view(site.shape), site_scale.view(site.shape)
            if not site.plates:
                fn = self._posterior(site, site_loc, site_scale)
                result[site.name] = pyro.sample(
                    site.name, fn, infer={LOCAL_REPARAMETERIZATION: True}
                )
                continue
            with ExitStack() as stack:
                for name in site.plates:
                    stack.enter_context(plates[name])
                site_loc = pyro.subsample(site_loc, event_dim=site.event_dim)
                site_scale = pyro.subsample(site_scale, event_dim=site.event_dim)
                fn = self._posterior(site, site_loc, site_scale)
                result[site.name] = pyro.sample(
                    site.name, fn, infer={LOCAL_REPARAMETERIZATION: True}
                )
        return result

    @staticmethod
    def _posterior(site: _Site, loc: torch.Tensor, scale: torch.Tensor):
        fn = Normal(loc, scale, validate_args=False)
        if site.event_dim:
            fn = Independent(fn, site.event_dim, validate_args=False)
        if site.transform is not None:
            fn = TransformedDistribution(fn, [site.transform.with_cache()], validate_args=False)
        return fn

    def _site(self, name: str) -> _Site:
        site = getattr(self, "_by_name", {}).get(name)
        if site is None:
            known = sorted(getattr(self, "_by_name", {}))
            raise ValueError(f"MeanFieldGuide has no site {name!r}; its sites are {known}")
        return site

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The posterior median of every latent site (its mean, for a real site),
        at full plate size."""
        _pyro_compat.setup_prototype(self, *args, **kwargs)
        loc = self.loc.detach()
        out = {}
        for site in self._sites:
            value = loc[site.start : site.stop].view(site.shape).clone()
            out[site.name] = value if site.transform is None else site.transform(value)
        return out


@register_posterior(MeanFieldGuide)
class MeanFieldGuidePosterior(MeanFieldPosterior):
    """:class:`MeanFieldGuide`: slices of the flat ``loc`` and ``scale``; each model
    site is drawn at the guide site of the same name."""

    def sites(self) -> dict[str, str | None]:
        return {
            site.name: None if site.transform is None else f"support {site.support} is constrained"
            for site in self.guide._sites
        }

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        site = self.guide._site(name)
        part = slice(site.start, site.stop)
        loc, scale = (self._constrained(attr, part).view(site.shape) for attr in ("loc", "scale"))
        return loc, scale

    def loc_log_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        site = self.guide._site(name)
        part = slice(site.start, site.stop)
        (loc, loc_constraint), (rho, constraint) = (
            _parameter(self.guide, attr) for attr in ("loc", "scale")
        )
        real_loc = isinstance(loc_constraint, type(constraints.real))
        if not (real_loc and isinstance(transform_to(constraint), ExpTransform)):
            return None
        return loc.detach()[part].view(site.shape), rho.detach()[part].view(site.shape)

    def _constrained(self, attr: str, part: slice) -> torch.Tensor:
        # the transform of the site's slice alone: reading the attribute would
        # transform the whole flat vector, for every site
        param, constraint = _parameter(self.guide, attr)
        with torch.no_grad():
            return transform_to(constraint)(param.detach()[part])

    def assign(self, name, where, loc, scale) -> None:
        site = self.guide._site(name)
        for attr, value in (("loc", loc), ("scale", scale)):
            if value is None:
                continue
            param, constraint = _parameter(self.guide, attr)
            _assign(param[site.start : site.stop].view(site.shape), constraint, where, value)

    def guide_masks(self, masks):
        return dict(masks)


def make_guide(
    model: Callable, kind: str = "auto", **kwargs
) -> tuple[AutoGuide, AbstractContextManager]:
    """A mean-field Normal guide of the chosen kind, and the context to train it in.

    * ``"auto"``: Pyro's :class:`~pyro.infer.autoguide.AutoNormal`;
    * ``"mean-field"``: :class:`MeanFieldGuide` (same family, less overhead);
    * ``"local"``: :class:`MeanFieldGuide` trained inside
      :func:`~pyro_bmr.local_reparameterization` (pre-activations sampled, KL in
      closed form) -- the fastest for networks of linear and convolution layers.

    All three work with :class:`~pyro_bmr.BayesianModelReduction`.

    .. code-block:: python

        guide, training = make_guide(model, "local", init_scale=0.01)
        svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
        with training:
            for x, y in loader:
                svi.step(x, y)

    The context can be entered again and again (keep it for the whole training);
    predict outside it.

    :param model: a Pyro model.
    :param str kind: one of :data:`GUIDES`.
    :param kwargs: passed to the guide (``init_loc_fn``, ``init_scale``, ...).
    :returns: ``(guide, training_context)``.
    :raises ValueError: for an unknown ``kind``.
    """
    if kind not in GUIDES:
        raise ValueError(f"unknown guide kind {kind!r}; choose one of {', '.join(GUIDES)}")
    if kind == "auto":
        return AutoNormal(model, **kwargs), nullcontext()
    guide = MeanFieldGuide(model, **kwargs)
    return guide, local_reparameterization() if kind == "local" else nullcontext()
