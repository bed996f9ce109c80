"""BMR-RHS: reduce a flat model by a regularised-horseshoe prior fitted post hoc.

The data path of :class:`~pyro_bmr.BayesianModelReduction` with another reduced
prior: trace the model and find its Gaussian sites, read the guide's mean-field
posterior, fit per layer the hyper-parameters of a regularised horseshoe to ΔF
(:mod:`pyro_bmr.horseshoe_fit`), and keep the result as a factor :math:`\\gamma`
per element of the prior scale, applied non-centred by
:class:`~pyro_bmr.poutine.PriorScaleMessenger`, and as masks, applied by the
:class:`~pyro_bmr.BayesianModelReduction` handler the reduction keeps.

The factors are applied as the authors' code applies them: the guide's variable
:math:`z` keeps its prior :math:`\\mathcal N(m, s^2)` and the model computes with
:math:`m + \\gamma (z - m)`. Every reduction scores :math:`z` against that prior,
fits a new factor and multiplies it into :math:`\\gamma`. A row that the data
do not need is shrunk at every reduction, until its factor is below the threshold.
"""

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch

from pyro_bmr._masks import MaskError, MaskView
from pyro_bmr.horseshoe_fit import (
    HorseshoeFit,
    HorseshoeModel,
    check_fit_options,
    check_hyperprior,
    fit_horseshoe,
    layer_of,
    standardised_delta_f,
    standardised_posterior,
)
from pyro_bmr.poutine.prior_scale_messenger import PriorScaleMessenger
from pyro_bmr.reduction import BayesianModelReduction
from pyro_bmr.report import ReductionReport, Sparsity
from pyro_bmr.sites import GaussianSite, read_priors

__all__ = ["HorseshoeReduction"]

_DEFAULTS: dict[str, Any] = {
    "global_scale": 1e-2,
    "slab": (2.0, 6.0),
    "threshold": 1e-6,
    "num_steps": 5000,
    "num_particles": 16,
    "lr": 1e-2,
    "num_samples": 1000,
    "update_posterior": True,
    "progress": False,
}


class HorseshoeReduction:
    """Bayesian model reduction with a regularised-horseshoe reduced prior (BMR-RHS).

    Built from a fitted mean-field Gaussian guide of a flat model (Gaussian priors
    :math:`\\mathcal N(m, s^2)`, e.g. :class:`~pyro_bmr.nn.LayerScalePrior`'s
    standardised sites). :meth:`reduce` standardises each element's posterior by
    its prior, fits per layer (``groups``) the hyper-parameters of a regularised
    horseshoe by maximising ΔF plus their log prior
    (:func:`~pyro_bmr.horseshoe_fit.fit_horseshoe`), and multiplies each row's
    factor :math:`\\gamma` by :math:`\\gamma_{\\mathrm{eff}} = \\mathbb
    E_q[1/\\gamma^2]^{-1/2}` (at most 1: a reduction never widens the prior). The
    factors persist and multiply over reductions, as in the authors' code; elements
    whose factor falls below ``threshold`` are pruned.

    It is an effect handler like :class:`~pyro_bmr.BayesianModelReduction`, and
    :class:`~pyro_bmr.StochasticBMR` takes it as ``bmr``: ``red(model)`` runs the
    model under the reduced prior :math:`\\mathcal N(m, (\\gamma s)^2)`, non-centred
    (:class:`~pyro_bmr.poutine.PriorScaleMessenger`), with pruned elements a point
    mass at zero; ``red(guide)`` (the guide object itself) draws pruned elements as
    exactly zero.

    .. code-block:: python

        red = HorseshoeReduction(guide, model=model, exclude=lambda site: site.startswith("out."))
        trainer = StochasticBMR(model, guide, Adam({"lr": 1e-2}), bmr=red)

    :param guide: a mean-field Gaussian guide of the model.
    :param model: the model; default ``guide.model``.
    :param groups: site name → layer key; default the site's name without its last
        dotted part. The sites of a layer with the same number of rows (first
        dimension) share one scale per row, so a bias shares its weight's rows.
    :param exclude: sites left alone (never rescaled or pruned; they get an all-kept
        mask, so that :meth:`sparsity` counts them): names, or a predicate. The
        authors leave the output layer alone.
    :param float global_scale: :math:`\\tau_0` of the global scale.
    :param slab: ``(α, β)`` of the slab precision's prior :math:`\\mathrm{Gamma}(α, β)`.
    :param float threshold: :math:`\\delta`; an element is pruned once its factor
        :math:`\\gamma` is below it (the authors' :math:`10^{-6}`).
    :param int num_steps: SVI steps of each fit.
    :param int num_particles: particles per SVI step.
    :param float lr: Adam's learning rate of the fit.
    :param int num_samples: guide draws behind :math:`\\mathbb E_q[1/\\gamma^2]`.
    :param bool update_posterior: set the guide of kept elements to the reduced
        posterior under the new prior, in the variable the model now scales by the
        new factor, so that the posterior of what the model computes with does not
        jump; else the guide is left as fitted (the authors' choice), and only the
        pruned elements' locations are set to zero.
    :param bool progress: show a progress bar of each fit.
    :raises ValueError: for an option out of range, naming it.
    """

    def __init__(
        self,
        guide: Callable,
        *,
        model: Callable | None = None,
        groups: Callable[[str], Hashable] | None = None,
        exclude: Iterable[str] | Callable[[str], bool] | None = None,
        global_scale: float = _DEFAULTS["global_scale"],
        slab: tuple[float, float] = _DEFAULTS["slab"],
        threshold: float = _DEFAULTS["threshold"],
        num_steps: int = _DEFAULTS["num_steps"],
        num_particles: int = _DEFAULTS["num_particles"],
        lr: float = _DEFAULTS["lr"],
        num_samples: int = _DEFAULTS["num_samples"],
        update_posterior: bool = _DEFAULTS["update_posterior"],
        progress: bool = _DEFAULTS["progress"],
    ) -> None:
        options = self.check_options(
            global_scale=global_scale,
            slab=slab,
            threshold=threshold,
            num_steps=num_steps,
            num_particles=num_particles,
            lr=lr,
            num_samples=num_samples,
            update_posterior=update_posterior,
            progress=progress,
        )
        if groups is not None and not callable(groups):
            raise TypeError(f"groups must map a site name to a layer key, got {groups!r}")
        if exclude is not None and not callable(exclude):
            exclude = frozenset(exclude)
        self.bmr = BayesianModelReduction(guide, model=model)
        self.guide = guide
        self.groups = layer_of if groups is None else groups
        self.exclude = exclude
        self.options = options
        self.last_fit: HorseshoeFit | None = None
        self._scales: dict[str, torch.Tensor] = {}
        self._scaler = PriorScaleMessenger()

    @staticmethod
    def check_options(**options: Any) -> dict[str, Any]:
        """The options of the constructor after ``exclude`` (``global_scale``,
        ``slab``, ``threshold``, ``num_steps``, ``num_particles``, ``lr``,
        ``num_samples``, ``update_posterior``, ``progress``), checked, with the
        defaults filled in: what a caller that builds the reduction later can check
        at once.

        :raises ValueError: for an unknown option or a value out of range, naming it.
        """
        unknown = sorted(set(options) - set(_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} of HorseshoeReduction; "
                f"choose from {', '.join(_DEFAULTS)}"
            )
        options = {**_DEFAULTS, **options}
        check_hyperprior(options["global_scale"], options["slab"])
        check_fit_options(
            **{k: options[k] for k in ("num_steps", "num_particles", "lr", "num_samples")}
        )
        threshold = options["threshold"]
        if not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
            raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
        options["slab"] = tuple(float(x) for x in options["slab"])
        return options

    @property
    def model(self) -> Callable:
        return self.bmr.model

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` reduced: the guide (the object given at construction) with the
        masks; anything else, such as the model, with the rescaled priors and the
        masks."""
        if fn is self.guide:
            return self.bmr(fn)
        return self.bmr(self._scaler(fn))

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Site name → bool tensor, True = kept (see :attr:`BayesianModelReduction.masks
        <pyro_bmr.BayesianModelReduction.masks>`)."""
        return self.bmr.masks

    @property
    def scales(self) -> Mapping[str, torch.Tensor]:
        """Site name → the factor :math:`\\gamma` of the prior scale, one value per
        row (broadcastable to the site), the product of the reductions' factors; a
        pruned row keeps the factor that pruned it (and runs as a point mass). A
        read-only view that hands out copies."""
        return MaskView(self._scales)

    def sparsity(self) -> Sparsity:
        """Fraction of elements pruned, per masked site and in total."""
        return self.bmr.sparsity()

    def sites(self, *args, **kwargs) -> dict[str, GaussianSite]:
        """The reducible sites (see :meth:`BayesianModelReduction.sites
        <pyro_bmr.BayesianModelReduction.sites>`), excluded ones included, with
        their priors read afresh where they are learned or computed."""
        sites = self.bmr.sites(*args, **kwargs)
        if any(site.dynamic for site in sites.values()):
            values = {name: self.bmr.posterior.loc_scale(name)[0] for name in sites}
            values = {n: v for n, v in values.items() if not sites[n].local}
            sites = read_priors(self.model, sites, values, *args, **kwargs)
        return sites

    def state_dict(self) -> dict[str, Any]:
        """The masks and the prior's factors :attr:`scales`, as plain tensors
        (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "masks": self.bmr.state_dict()["masks"],
            "scales": {name: scale.clone() for name, scale in self._scales.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: the masks (checked as
        :meth:`BayesianModelReduction.load_state_dict
        <pyro_bmr.BayesianModelReduction.load_state_dict>` checks them) and the
        factors, placed on the masks' device (where the masks cannot be checked yet,
        they wait for the model's arguments, and the factors stay where they were
        loaded).

        :raises ValueError: naming the site, for a mask that does not fit or a factor
            that is not a non-negative, finite floating-point tensor; nothing is
            changed then.
        """
        scales = state.get("scales") if isinstance(state, Mapping) else None
        if not isinstance(scales, Mapping):
            raise ValueError(
                "state must be a dict with 'masks' and 'scales', as state_dict() returns"
            )
        checked = PriorScaleMessenger(scales).scales  # checks each factor, naming its site
        self.bmr.load_state_dict({"masks": state["masks"]})
        try:
            devices = {name: mask.device for name, mask in self.bmr.masks.items()}
        except MaskError:  # the masks wait for the model's arguments: so do the devices
            devices = {}
        self._scales = {
            name: factor.to(devices.get(name, factor.device), copy=True)
            for name, factor in checked.items()
        }
        self._refresh()

    def _excluded(self, name: str) -> bool:
        if self.exclude is None:
            return False
        return self.exclude(name) if callable(self.exclude) else name in self.exclude

    def reduce(self, *args, **kwargs) -> ReductionReport:
        """Fit the horseshoe to the current posterior, rescale the priors and prune.

        The model is traced with ``*args, **kwargs`` to find its Gaussian sites.
        Elements already pruned stay pruned and add nothing to the fit. Bad input
        raises before anything is changed.

        :returns: the :class:`~pyro_bmr.ReductionReport`: ``delta_f`` is the ΔF of
            each element under its new reduced prior (0 where pruned before, and on
            excluded sites), ``total_delta_f`` their sum.
        :raises ValueError: naming the site, for NaN or infinite guide locations or
            non-positive guide scales; if every site is excluded.
        """
        sites = self.sites(*args, **kwargs)
        reduced = {name: site for name, site in sites.items() if not self._excluded(name)}
        if not reduced:
            raise ValueError(
                f"every reducible site is excluded ({', '.join(sites) or 'none found'}): "
                "nothing to reduce"
            )
        masks = dict(self.bmr.masks)
        standard = {name: self._standardised(name, site, masks) for name, site in reduced.items()}
        model = HorseshoeModel(
            {name: (z[0], z[1]) for name, z in standard.items()},
            self.groups,
            global_scale=self.options["global_scale"],
            slab=self.options["slab"],
        )
        fit_options = ("num_steps", "num_particles", "lr", "num_samples", "progress")
        fit = fit_horseshoe(model, **{k: self.options[k] for k in fit_options})
        if self.options["update_posterior"]:
            for name in reduced:  # before anything is written
                self.bmr.posterior.check_assign(name, scale=True)

        report_df, newly, pruned, gained, total = {}, 0, 0, 0.0, 0
        with torch.no_grad():
            for name, (z_loc, z_scale, keep, m, s) in standard.items():
                factor = fit.scales[name]
                g = factor.square()
                df = torch.where(keep, standardised_delta_f(z_loc, z_scale, g), 0.0)
                old = self._scale(name, z_loc)
                # a row pruned before keeps its factor: the fit saw no evidence there
                live = keep.reshape(factor.shape[:1] + (-1,)).any(-1).reshape(factor.shape)
                new_scale = torch.where(live, old * factor, old)
                above = (new_scale >= self.options["threshold"]) & (new_scale > 0)
                kept = keep & above.expand(keep.shape)
                if self.options["update_posterior"]:
                    # the reduced posterior of z under N(0, g), in z / factor, the
                    # variable the model scales by the new factor
                    z_loc, z_scale = standardised_posterior(z_loc, z_scale, g)
                    per = torch.where(factor > 0, factor, 1.0)
                    self.bmr.posterior.assign(
                        name, kept, m + s * z_loc / per, (s * z_scale / per).expand(keep.shape)
                    )
                zero = torch.zeros((), dtype=z_loc.dtype, device=z_loc.device)
                self.bmr.posterior.assign(name, keep & ~kept, zero, None)
                self.bmr.set_mask(name, kept)
                self._scales[name] = new_scale
                newly += int((keep & ~kept).sum())
                pruned += int((~kept).sum())
                total += kept.numel()
                gained += float(df.sum())
                report_df[name] = df
            for name, site in sites.items():
                if name not in reduced:
                    if name not in masks:
                        self.bmr.set_mask(name, torch.ones(site.shape, dtype=torch.bool))
                    pruned += int((~self.bmr.masks[name]).sum())
                    total += site.numel()
            self._refresh()
        self.last_fit = fit
        return ReductionReport(
            delta_f=report_df,
            num_pruned=pruned,
            num_newly_pruned=newly,
            num_elements=total,
            total_delta_f=gained,
            skipped={name: "excluded" for name in sites if name not in reduced},
        )

    def _scale(self, name: str, like: torch.Tensor) -> torch.Tensor:
        scale = self._scales.get(name)
        return torch.ones((), dtype=like.dtype, device=like.device) if scale is None else scale

    @torch.no_grad()
    def _standardised(self, name: str, site: GaussianSite, masks: dict) -> tuple:
        """``(z_loc, z_scale, keep, m, s)``: the posterior of the standardised
        elements :math:`(z - m)/s` of a site with prior :math:`\\mathcal N(m, s^2)`,
        pruned elements as :math:`(0, 1)`."""
        mu, sigma = self.bmr.posterior.loc_scale(name)
        if not bool(torch.isfinite(mu).all()):
            raise ValueError(f"site {name!r}: the guide's locations are not all finite")
        if not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
            raise ValueError(f"site {name!r}: the guide's scales are not all positive and finite")
        keep = masks.get(name)
        if keep is None:
            keep = torch.ones(mu.shape, dtype=torch.bool, device=mu.device)
        m = site.prior_loc.to(mu)
        s = site.prior_scale.to(mu)
        z_loc = torch.where(keep, (mu - m) / s, 0.0)
        z_scale = torch.where(keep, sigma / s, 1.0)
        return z_loc, z_scale, keep, m, s.expand(mu.shape)

    def _refresh(self) -> None:
        """Hand the factors to the scaling handler."""
        self._scaler.scales = self._scales
