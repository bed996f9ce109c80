"""The Bayesian model reduction handler."""

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from pyro_bmr._masks import MaskError, check_mask
from pyro_bmr._scoring import Scoring
from pyro_bmr.posteriors import MeanFieldPosterior, mean_field_posterior
from pyro_bmr.poutine.prune_messenger import PruneMessenger
from pyro_bmr.report import ReductionReport, Sparsity, sparsity
from pyro_bmr.rules import PruningRule, ThresholdRule
from pyro_bmr.sites import GaussianSite, find_gaussian_sites

__all__ = ["BayesianModelReduction"]


class BayesianModelReduction:
    """Sparsify a Pyro model post hoc by Bayesian model reduction.

    Built from a fitted mean-field Gaussian guide (``AutoNormal``,
    ``AutoDiagonalNormal`` or a registered custom guide). :meth:`reduce` scores,
    in closed form (:func:`~pyro_bmr.delta_f`), the reduced model in which each
    element's Gaussian prior collapses to a point mass at zero, lets ``rule``
    decide, and accumulates the result in :attr:`masks`. It applies the masks
    through its own :class:`~pyro_bmr.poutine.PruneMessenger`: in ``bmr(model)`` a
    pruned element's prior is a point mass at 0, in ``bmr(guide)`` the element
    samples exactly 0, and either way it adds nothing to ``log p``, ``log q`` or
    the KL. Kept elements are untouched. ``with bmr:`` applies them to everything
    run inside.

    .. code-block:: python

        guide = AutoNormal(model)
        bmr = BayesianModelReduction(guide)
        svi = SVI(bmr(model), bmr(guide), Adam({"lr": 0.01}), Trace_ELBO())
        for epoch in range(num_epochs):
            for x, y in loader:
                svi.step(x, y)
            report = bmr.reduce(x, y)

    :param guide: a mean-field Gaussian guide of the model.
    :param PruningRule rule: decides which elements to prune; default
        :class:`~pyro_bmr.ThresholdRule` (prune where ΔF > 0).
    :param sites: names of the sites to reduce; ``None`` (default) reduces every
        site that can be, and lists the others in the report. Naming a site that
        cannot be reduced is an error.
    :param float reduced_loc: mean :math:`\\tilde m` of the reduced prior.
    :param float reduced_scale: scale :math:`\\tilde s` of the reduced prior used
        for scoring; 0 (default) is the point mass.
    :param bool update_posterior: after scoring with a soft reduced prior
        (``reduced_scale > 0``), overwrite the guide's loc and scale of kept
        elements with the reduced posterior.
    :param model: the model; defaults to ``guide.model``.
    """

    def __init__(
        self,
        guide: Callable,
        rule: PruningRule | None = None,
        *,
        sites: Iterable[str] | None = None,
        reduced_loc: float = 0.0,
        reduced_scale: float = 0.0,
        update_posterior: bool = False,
        model: Callable | None = None,
    ) -> None:
        if rule is None:
            rule = ThresholdRule()
        if not isinstance(rule, PruningRule):
            raise TypeError(f"rule must be a PruningRule, got {type(rule).__name__}")
        if not reduced_scale >= 0:
            raise ValueError(f"reduced_scale must be non-negative, got {reduced_scale}")
        if update_posterior and reduced_scale == 0:
            raise ValueError(
                "update_posterior needs a soft reduced prior (reduced_scale > 0): under the "
                "point mass the reduced posterior of a pruned element is exactly zero"
            )
        self.posterior: MeanFieldPosterior = mean_field_posterior(guide)
        self.guide = guide
        self.rule = rule
        self.requested_sites = None if sites is None else list(sites)
        self.reduced_loc = float(reduced_loc)
        self.reduced_scale = float(reduced_scale)
        self.update_posterior = bool(update_posterior)
        self._model = model
        self._masks: dict[str, torch.Tensor] = {}
        self._sites: dict[str, GaussianSite] | None = None
        self._skipped: dict[str, str] = {}
        self._pruner = PruneMessenger()

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` (the model or the guide) with the masks applied."""
        return self._pruner(fn)

    def __enter__(self) -> "BayesianModelReduction":
        self._pruner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        return self._pruner.__exit__(*exc)

    @property
    def model(self) -> Callable:
        return self._model if self._model is not None else self.posterior.model

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Site name → bool tensor of the site's shape, True = kept (read-only view;
        change masks with :meth:`set_mask` and :meth:`reset`)."""
        return MappingProxyType(self._masks)

    def _refresh(self) -> None:
        """Hand the masks to the pruner, on the model's sites and the guide's."""
        site_masks = dict(self._masks)
        site_masks.update(self.posterior.guide_masks(self._masks))
        self._pruner.masks = site_masks

    def sites(self, *args, **kwargs) -> dict[str, GaussianSite]:
        """The reducible sites, found by tracing the model with these arguments
        the first time and cached after."""
        if self._sites is None:
            self.posterior.prepare(*args, **kwargs)
            found, skipped = find_gaussian_sites(self.model, *args, **kwargs)
            covered = self.posterior.sites()
            for name in list(found):
                reason = "not in the guide" if name not in covered else covered[name]
                if reason is not None:
                    skipped[name] = reason
                    del found[name]
            if self.requested_sites is not None:
                for name in self.requested_sites:
                    if name not in found:
                        why = skipped.get(name)
                        if why is None:
                            raise ValueError(
                                f"unknown site {name!r}; the model's Gaussian sites are "
                                f"{sorted(found)}"
                            )
                        raise ValueError(f"site {name!r} cannot be reduced: {why}")
                skipped.update({n: "not requested" for n in found if n not in self.requested_sites})
                found = {n: found[n] for n in self.requested_sites}
            self._sites, self._skipped = found, skipped
        return self._sites

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of site ``name`` (True = kept).

        :raises MaskError: (a ``ValueError``) for an unknown site or a mask of the
            wrong shape or dtype.
        """
        if self._sites is None:
            raise MaskError("set_mask needs the sites: call reduce() or sites(*args) first")
        check_mask(name, mask, self._site(name).shape)
        loc, _ = self.posterior.loc_scale(name)
        self._masks[name] = mask.to(loc.device).clone()
        self._refresh()

    def reset(self, names: Iterable[str] | None = None) -> None:
        """Forget the masks of ``names`` (default: all), un-pruning their elements."""
        for name in list(self._masks) if names is None else names:
            self._masks.pop(name, None)
        self._refresh()

    def _site(self, name: str) -> GaussianSite:
        site = self._sites.get(name)
        if site is None:
            raise MaskError(f"unknown site {name!r}; reducible sites are {sorted(self._sites)}")
        return site

    def _scoring(self, work: int) -> Scoring:
        """What scores one reduction of ``work`` elements with the current settings."""
        return Scoring(
            self.posterior,
            self._masks,
            self.rule,
            reduced_loc=self.reduced_loc,
            reduced_scale=self.reduced_scale,
            update_posterior=self.update_posterior,
            work=work,
        )

    @torch.no_grad()
    def reduce(self, *args, **kwargs) -> ReductionReport:
        """Score every reducible site, apply the rule and update the masks.

        The model is traced once (on the first call) with ``*args, **kwargs`` to find
        its Gaussian sites; ΔF is computed for all of them on the parameters'
        device. Elements already pruned stay pruned.

        :returns: the :class:`~pyro_bmr.ReductionReport`.
        :raises ValueError: naming the site, for non-finite or non-positive guide
            scales or a reduced prior too wide for the posterior.
        """
        sites = self.sites(*args, **kwargs)
        work = sum(site.numel() for site in sites.values())
        # one host sync for every site's flags, and one more for the counts of a
        # rule whose threshold depends on ΔF (see pyro_bmr._scoring)
        scoring = self._scoring(work)
        storage = scoring.storage(sites)
        scored = [scoring.score(name, site, storage.get(name)) for name, site in sites.items()]
        if scored:
            flags = torch.stack([site.flags for site in scored]).cpu().tolist()
            for site, flag in zip(scored, flags):
                scoring.check(site, flag)
        pending = [site for site in scored if site.stats is None]
        for site in pending:
            scoring.decide(site)
        if pending:
            for site, stats in zip(pending, torch.stack([s.stats for s in pending]).cpu()):
                site.stats = stats

        report_df, newly, pruned, gained = {}, 0, 0, 0.0
        for site in scored:
            old_count, kept, newly_df = (float(x) for x in site.stats[:3])
            newly += int(old_count) - int(kept)
            pruned += site.numel - int(kept)
            gained += newly_df
            if not site.zeroed:
                zero = torch.zeros((), dtype=site.df.dtype, device=site.df.device)
                self.posterior.assign(site.name, site.pruned, zero, None)
            if self.update_posterior:
                self.posterior.assign(site.name, site.keep, site.post[0], site.post[1])
            self._masks[site.name] = site.keep
            report_df[site.name] = site.df.view(site.shape)
        self._refresh()
        return ReductionReport(
            delta_f=report_df,
            num_pruned=pruned,
            num_newly_pruned=newly,
            num_elements=work,
            total_delta_f=gained,
            skipped=dict(self._skipped),
        )

    def sparsity(self) -> Sparsity:
        """Fraction of elements pruned, per masked site and in total: the
        :func:`~pyro_bmr.report.sparsity` of :attr:`masks`."""
        return sparsity(self._masks)

    def state_dict(self) -> dict[str, Any]:
        """The masks, as plain tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {"masks": {name: mask.clone() for name, mask in self._masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict`.

        :raises MaskError: (a ``ValueError``) if a mask is not a bool tensor; shapes
            are checked where the sites are known, and otherwise at the site when the
            model runs.
        """
        masks = state.get("masks") if isinstance(state, Mapping) else None
        if not isinstance(masks, Mapping):
            raise ValueError("state must be a dict with a 'masks' entry, as state_dict() returns")
        loaded = {}
        for name, mask in masks.items():
            shape = None if self._sites is None else self._site(name).shape
            loaded[name] = check_mask(name, mask, shape).clone()
        self._masks = loaded
        self._refresh()
