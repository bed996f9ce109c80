"""The Bayesian model reduction handler."""

import functools
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from pyro_bmr import _pyro_compat
from pyro_bmr._caller import warn
from pyro_bmr._masks import MaskError, MaskView, check_mask
from pyro_bmr._scoring import Scoring
from pyro_bmr.correlated_posteriors import CorrelatedPosterior
from pyro_bmr.groups import UnitCount, UnitGroup, unit_counts
from pyro_bmr.posteriors import MeanFieldPosterior, mean_field_posterior
from pyro_bmr.poutine.prune_messenger import PruneMessenger
from pyro_bmr.report import ReductionReport, Sparsity, sparsity
from pyro_bmr.rules import PruningRule, ThresholdRule
from pyro_bmr.sites import (
    GaussianSite,
    arguments_signature,
    check_same_structure,
    find_gaussian_sites,
    read_priors,
)

__all__ = ["BayesianModelReduction"]


class BayesianModelReduction:
    """Sparsify a Pyro model post hoc by Bayesian model reduction.

    Built from a fitted Gaussian guide (``AutoNormal``, ``AutoDiagonalNormal``,
    ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal`` or a registered
    custom guide). :meth:`reduce` scores,
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

    :param guide: a Gaussian guide of the model. With correlations, each element is
        scored from its marginal (exact), and the set pruned from the joint
        (``ReductionReport.joint_delta_f``).
    :param PruningRule rule: decides which elements to prune; default
        :class:`~pyro_bmr.ThresholdRule` (prune where ΔF > 0).
    :param sites: names of the sites to reduce; ``None`` (default) reduces every
        global site that can be, and lists the others in the report. Naming a site
        that cannot be reduced is an error.
    :param bool local_latents: also reduce local latents (sites inside a subsampled
        plate, or a plate that holds observed data), which are left alone by default:
        pruning is a statement about the model's parameters, not about single data
        points.
    :param float reduced_loc: mean :math:`\\tilde m` of the reduced prior; 0 under
        the point mass, since pruned elements are fixed at zero.
    :param float reduced_scale: scale :math:`\\tilde s` of the reduced prior used
        for scoring; 0 (default) is the point mass.
    :param bool update_posterior: after scoring with a soft reduced prior
        (``reduced_scale > 0``), overwrite the guide's loc and scale of kept
        elements with the reduced posterior. A guide with correlations takes the
        point mass too: its joint posterior becomes the reduced model's.
    :param joint: ``"greedy"``, for a guide with correlations, where the ΔF of a set
        is not the sum of its elements': the rule's proposal is improved by dropping
        and adding elements, in the order of their own ΔF, against the joint ΔF
        (:func:`~pyro_bmr.joint_selection.select_greedily`; :math:`O(n^3)` for
        :math:`n` elements). Needs ``reduced_scale=0``. ``None``: the rule decides.
    :param groups: :class:`~pyro_bmr.groups.UnitGroup` s (neurons, channels, heads;
        :func:`pyro_bmr.nn.unit_groups` derives them from a network): after the
        elements, ``rule`` decides on each group's units by their ΔF, a unit pruned
        whole, and the inputs that a dead unit fed pruned with it (see
        :mod:`pyro_bmr.groups`). List them from input to output. A unit's ΔF is
        the sum of its elements' under a mean-field guide, and that of pruning them
        together under a correlated one. Needs the point mass at zero
        (``reduced_loc=0``, ``reduced_scale=0``, ``joint=None``).
    :param bool prune_elements: with ``groups``, also prune single elements of the
        sites the groups touch (default); ``False`` prunes them by units only.
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
        local_latents: bool = False,
        joint: str | None = None,
        groups: Iterable[UnitGroup] | None = None,
        prune_elements: bool = True,
        model: Callable | None = None,
    ) -> None:
        if rule is None:
            rule = ThresholdRule()
        if not isinstance(rule, PruningRule):
            raise TypeError(f"rule must be a PruningRule, got {type(rule).__name__}")
        if not reduced_scale >= 0:
            raise ValueError(f"reduced_scale must be non-negative, got {reduced_scale}")
        if reduced_scale == 0 and reduced_loc != 0:
            # the masks pin a pruned element at zero: it would be scored at one value
            # and run at another
            raise ValueError(
                f"reduced_loc={reduced_loc} with the point mass (reduced_scale=0) scores the "
                f"model with each pruned element fixed at {reduced_loc}, but pruning fixes it "
                "at 0: use reduced_loc=0, a soft reduced prior (reduced_scale > 0), or "
                "pyro_bmr.delta_f for the scores alone"
            )
        self.posterior: MeanFieldPosterior = mean_field_posterior(guide)
        correlated = isinstance(self.posterior, CorrelatedPosterior)
        if update_posterior and reduced_scale == 0 and not correlated:
            raise ValueError(
                "update_posterior needs a soft reduced prior (reduced_scale > 0): under the "
                "point mass the reduced posterior of a pruned element is exactly zero"
            )
        if joint not in (None, "greedy"):
            raise ValueError(f"joint must be None or 'greedy', got {joint!r}")
        if joint is not None and (not correlated or reduced_scale != 0):
            raise ValueError(
                f"joint={joint!r} chooses a set to prune to the point mass (reduced_scale=0, "
                f"here {reduced_scale}) under a guide with correlations (AutoMultivariateNormal, "
                f"AutoLowRankMultivariateNormal, here {type(guide).__name__}): under a "
                "mean-field guide the ΔF of a set is the sum of its elements'"
            )
        self.groups: tuple[UnitGroup, ...] = () if groups is None else tuple(groups)
        for group in self.groups:
            if not isinstance(group, UnitGroup):
                raise TypeError(f"groups must be UnitGroup s, got {type(group).__name__}")
        if self.groups and (joint is not None or reduced_scale != 0):
            # a unit held at a non-zero value still feeds the next layer: its readers
            # would be pruned as if it were dead (the point mass away from zero is
            # refused above)
            raise ValueError(
                f"groups prune units to the point mass at zero (reduced_loc=0, here "
                f"{reduced_loc}; reduced_scale=0, here {reduced_scale}) as the rule decides "
                f"(joint=None, here {joint!r})"
            )
        self.prune_elements = bool(prune_elements)
        self.guide = guide
        self.rule = rule
        self.requested_sites = None if sites is None else list(sites)
        self.reduced_loc = float(reduced_loc)
        self.reduced_scale = float(reduced_scale)
        self.update_posterior = bool(update_posterior)
        self.local_latents = bool(local_latents)
        self.joint = joint
        self._model = model
        self._masks: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] | None = None  # loaded, not yet validated
        self._sites: dict[str, GaussianSite] | None = None
        self._skipped: dict[str, str] = {}
        self._signature: tuple | None = None  # of the arguments the sites were found with
        self._reductions = 0
        self._pruner = PruneMessenger()
        self._jit_functions: weakref.WeakSet = weakref.WeakSet()

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` (the model or the guide) with the masks applied."""
        pruned = self._pruner(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if self._pending is not None:
                self._validate_pending(*args, **kwargs)
            if torch.jit.is_tracing():
                # a JIT ELBO bakes the masks into its compiled graph: it must compile
                # again once they change
                self._jit_functions.update(_pyro_compat.jit_functions_compiling())
            self._jit_functions.update(_pyro_compat.captures_under_way())  # likewise
            return pruned(*args, **kwargs)

        return run

    def __enter__(self) -> "BayesianModelReduction":
        if self._pending is not None:
            self._validate_pending()
        self._pruner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        return self._pruner.__exit__(*exc)

    @property
    def model(self) -> Callable:
        return self._model if self._model is not None else self.posterior.model

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Site name → bool tensor of the site's shape, True = kept. A read-only view
        that hands out copies: change masks with :meth:`set_mask` and :meth:`reset`."""
        self._require_validated("masks")
        return MaskView(self._masks)

    def _refresh(self) -> None:
        """Hand the masks to the pruner, on the model's sites and the guide's, and make
        any JIT ELBO that baked the old ones compile again."""
        site_masks = dict(self._masks)
        site_masks.update(self.posterior.guide_masks(self._masks))
        self._pruner.masks = site_masks
        for compiled in list(self._jit_functions):
            _pyro_compat.forget_compiled_function(compiled)
        self._jit_functions = weakref.WeakSet()

    def _require_validated(self, what: str) -> None:
        if self._pending is not None:
            raise MaskError(
                f"{what}: the masks loaded by load_state_dict are checked against the model's "
                "sites at their first use; call sites(*args) (or reduce, or run bmr(model)) "
                "with the model's arguments first"
            )

    def sites(self, *args, **kwargs) -> dict[str, GaussianSite]:
        """The reducible sites, found by tracing the model with these arguments the
        first time, and again when arguments of other shapes come (a model whose
        structure changed is an error).

        :raises StructureError: (a ``ValueError``) naming a site whose shape differs
            from when the sites were found.
        """
        signature = arguments_signature(args, kwargs)
        if self._sites is None or ((args or kwargs) and signature != self._signature):
            self.posterior.prepare(*args, **kwargs)
            found, skipped = self._find(*args, **kwargs)
            if self._sites is not None:
                check_same_structure(self._sites, found)
            self._sites, self._skipped, self._signature = found, skipped, signature
        if self._pending is not None:
            self._validate_pending()
        return self._sites

    def _find(self, *args, **kwargs) -> tuple[dict[str, GaussianSite], dict[str, str]]:
        found, skipped = find_gaussian_sites(self.model, *args, **kwargs)
        covered = self.posterior.sites()
        for name in list(found):
            reason = "not in the guide" if name not in covered else covered[name]
            if reason is None and found[name].local and not self.local_latents:
                reason = "a local latent (in a data plate); local_latents=True reduces it"
            if reason is not None:
                skipped[name] = reason
                del found[name]
        if self.requested_sites is not None:
            for name in self.requested_sites:
                if name not in found:
                    why = skipped.get(name)
                    if why is None:
                        raise ValueError(
                            f"unknown site {name!r}; the model's Gaussian sites are {sorted(found)}"
                        )
                    raise ValueError(f"site {name!r} cannot be reduced: {why}")
            skipped.update({n: "not requested" for n in found if n not in self.requested_sites})
            found = {n: found[n] for n in self.requested_sites}
        return found, skipped

    def _current_sites(self, *args, **kwargs) -> dict[str, GaussianSite]:
        """:meth:`sites`, with every prior read afresh where it may have changed
        (learned, or computed from the arguments)."""
        cached = self._sites is not None and (
            not (args or kwargs) or arguments_signature(args, kwargs) == self._signature
        )
        if cached:  # a guide written by hand is traced again: its scales may be computed
            self.posterior.prepare(*args, **kwargs)
        sites = self.sites(*args, **kwargs)
        if cached and any(site.dynamic for site in sites.values()):
            if not (args or kwargs) and self._signature != arguments_signature((), {}):
                dynamic = sorted(name for name, site in sites.items() if site.dynamic)
                raise ValueError(
                    f"the priors of sites {dynamic} are learned or computed, and reduce() "
                    "reads them afresh by running the model: pass it the model's arguments, "
                    "as when the sites were found"
                )
            values = {name: self.posterior.loc_scale(name)[0] for name in sites}
            values = {n: v for n, v in values.items() if not sites[n].local}
            sites = self._sites = read_priors(self.model, sites, values, *args, **kwargs)
        return sites

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
        if names is None:
            self._pending = None
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
        rule = self.rule
        if not self.prune_elements:
            rule = rule.excluding(site for group in self.groups for site in group.sites)
        return Scoring(
            self.posterior,
            self._masks,
            rule,
            reduced_loc=self.reduced_loc,
            reduced_scale=self.reduced_scale,
            update_posterior=self.update_posterior,
            work=work,
            joint=self.joint,
        )

    @torch.no_grad()
    def reduce(self, *args, **kwargs) -> ReductionReport:
        """Score every reducible site, apply the rule and update the masks.

        The model is traced with ``*args, **kwargs`` to find its Gaussian sites on the
        first call (see :meth:`sites`), and again at every call where a prior is
        learned or computed from the arguments, so that ΔF is scored against the
        prior the model runs with now. ΔF is computed for all sites on the
        parameters' device. Elements already pruned stay pruned. Bad input raises
        before anything is changed.

        :returns: the :class:`~pyro_bmr.ReductionReport`.
        :raises ValueError: naming the site, for NaN or infinite guide locations,
            non-finite or non-positive guide scales, a reduced prior too wide for the
            posterior, a model whose structure changed, or no arguments where a
            prior learned or computed is to be read afresh by running the model.
        """
        sites = self._current_sites(*args, **kwargs)
        if self.update_posterior and not isinstance(self.posterior, CorrelatedPosterior):
            for name in sites:  # before anything is written
                self.posterior.check_assign(name, scale=True)
        if self._reductions == 0:
            self._warn_if_untrained(sites)
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
        scoring.decide(pending)
        if pending:
            for site, stats in zip(pending, torch.stack([s.stats for s in pending]).cpu()):
                site.stats = stats
        if self.groups:  # before the joint set is scored, which then includes the units
            scoring.prune_units(self.groups, self.rule, scored, sites)
        joint = scoring.decide_jointly(scored, sites)  # None for a mean-field guide

        report_df, newly, pruned, gained = {}, 0, 0, 0.0
        for site in scored:
            old_count, kept, newly_df = (float(x) for x in site.stats[:3])
            newly += int(old_count) - int(kept)
            pruned += site.numel - int(kept)
            gained += newly_df
            if not site.zeroed:
                zero = torch.zeros((), dtype=site.df.dtype, device=site.df.device)
                self.posterior.assign(site.name, site.pruned, zero, None)
            if self.update_posterior and joint is None:
                self.posterior.assign(site.name, site.keep, site.post[0], site.post[1])
            self._masks[site.name] = site.keep
            report_df[site.name] = site.df.view(site.shape)
        if joint is not None and joint.posterior is not None:
            self.posterior.assign_joint(joint.kept, joint.posterior)
        self._refresh()
        self._reductions += 1
        return ReductionReport(
            delta_f=report_df,
            num_pruned=pruned,
            num_newly_pruned=newly,
            num_elements=work,
            total_delta_f=gained,
            skipped=dict(self._skipped),
            joint_delta_f=None if joint is None else float(joint.delta_f),
            units=self.units(),
        )

    def units(self) -> dict[str, UnitCount]:
        """Units kept per group (see ``groups``), under the current masks."""
        self._require_validated("units")
        return unit_counts(self.groups, self._masks)

    def _warn_if_untrained(self, sites: dict[str, GaussianSite]) -> None:
        """Warn where every scale of every site still has one value, as a guide has
        before it is fitted: reducing it would prune by its initialisation."""
        scales = [self.posterior.loc_scale(name)[1] for name in sites]
        scales = [s.reshape(-1) for s in scales if s.numel()]
        if sum(s.numel() for s in scales) < 2:
            return
        ends = torch.stack([torch.stack([s.amin(), s.amax()]).to(torch.float64) for s in scales])
        low, high = ends.aminmax()
        if bool(low == high):
            warn(
                f"every guide scale of the sites {sorted(sites)} is {float(low):.4g}: the guide "
                "looks unfitted, and reduce() would prune by its initialisation; fit it first",
            )

    def sparsity(self) -> Sparsity:
        """Fraction of elements pruned, per masked site and in total: the
        :func:`~pyro_bmr.report.sparsity` of :attr:`masks`."""
        self._require_validated("sparsity")
        return sparsity(self._masks)

    def state_dict(self) -> dict[str, Any]:
        """The masks, as plain tensors (loadable with ``torch.load(weights_only=True)``)."""
        masks = self._masks if self._pending is None else self._pending
        return {"masks": {name: mask.clone() for name, mask in masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict`.

        Masks are checked against the sites, all or nothing: at once where the sites
        are known (after :meth:`sites` or :meth:`reduce`) or the guide can tell
        them, else when the handler is first used with the model's arguments
        (:meth:`sites`, :meth:`reduce`, or a run of ``bmr(model)`` or ``bmr(guide)``);
        until then they are not applied.

        :raises MaskError: (a ``ValueError``) naming the site, for a mask that is not
            a bool tensor, a site the model does not have, or a shape that does not
            fit; the handler's masks are then left as they were.
        """
        masks = state.get("masks") if isinstance(state, Mapping) else None
        if not isinstance(masks, Mapping):
            raise ValueError("state must be a dict with a 'masks' entry, as state_dict() returns")
        loaded = {name: check_mask(name, mask).clone() for name, mask in masks.items()}
        shapes = self._known_shapes()
        if shapes is None:
            self._pending = loaded
            return
        self._install(loaded, shapes)

    def _known_shapes(self) -> dict[str, torch.Size] | None:
        """Site name → shape of the reducible sites, from the sites if found, else
        from a guide that has its parameters; ``None`` if neither can tell."""
        if self._sites is not None:
            return {name: site.shape for name, site in self._sites.items()}
        if not _pyro_compat.is_prepared(self.posterior.guide):
            return None
        return {
            name: self.posterior.loc_scale(name)[0].shape
            for name, reason in self.posterior.sites().items()
            if reason is None
        }

    def _install(self, masks: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> None:
        """Check every mask against ``shapes`` and, if all fit, make them the masks."""
        for name, mask in masks.items():
            if name not in shapes:
                raise MaskError(f"unknown site {name!r}; reducible sites are {sorted(shapes)}")
            check_mask(name, mask, shapes[name])
        device = {name: self.posterior.loc_scale(name)[0].device for name in masks}
        self._masks = {name: mask.to(device[name]) for name, mask in masks.items()}
        self._pending = None
        self._refresh()

    def _validate_pending(self, *args, **kwargs) -> None:
        pending, self._pending = self._pending, None
        try:
            if self._sites is None and (args or kwargs):
                self.sites(*args, **kwargs)
            shapes = self._known_shapes()
        except BaseException:
            self._pending = pending
            raise
        if shapes is None:  # too early to tell: the masks wait
            self._pending = pending
            raise MaskError(
                "the masks loaded by load_state_dict cannot be checked yet: the guide has "
                "no parameters; run the guide once, or call sites(*args), first"
            )
        self._install(pending, shapes)  # all or nothing: a mask that does not fit drops them
