"""The posterior of Pyro's :class:`~pyro.infer.autoguide.AutoGuideList`.

:class:`AutoGuideListPosterior` reads the list part by part: each part is read by
the posterior :func:`~pyro_bmr.posteriors.mean_field_posterior` gives it, and the
sites of parts that are no mean-field Gaussian (``AutoDelta``,
``AutoMultivariateNormal``, ...) are listed with the reason.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.infer import autoguide

from pyro_bmr import _pyro_compat
from pyro_bmr.guide_function_posterior import GuideFunctionPosterior, _quietly
from pyro_bmr.posteriors import MeanFieldPosterior, mean_field_posterior, register_posterior

__all__ = ["AutoGuideListPosterior"]


# -- AutoGuideList ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One part of an ``AutoGuideList`` and how it is read."""

    guide: autoguide.AutoGuide
    label: str
    posterior: MeanFieldPosterior | None  # None: not a mean-field Gaussian
    reason: str | None  # why not, for each of its sites

    def sites(self) -> dict[str, str | None] | None:
        """The part's sites and reasons; ``None`` where it has not been set up."""
        if isinstance(self.posterior, GuideFunctionPosterior):
            return self.posterior.sites() if self.posterior.traced else None
        trace = getattr(self.guide, "prototype_trace", None)
        if trace is None:
            return None
        if self.posterior is not None:
            return self.posterior.sites()
        return {name: self.reason for name, _ in trace.iter_stochastic_nodes()}


def _make_part(index: int, guide: autoguide.AutoGuide) -> _Part:
    label = f"{type(guide).__name__} (part {index} of the AutoGuideList)"
    target = guide
    if isinstance(guide, autoguide.AutoCallable):
        target = _pyro_compat.autocallable_guide(guide)
    if isinstance(
        guide, (autoguide.AutoMultivariateNormal, autoguide.AutoLowRankMultivariateNormal)
    ):
        reason = (
            f"drawn by {label}, a Gaussian with correlations: BMR reduces such a guide as a "
            f"whole, BayesianModelReduction({type(guide).__name__}(model)), not as a part"
        )
        return _Part(guide, label, None, reason)
    try:
        return _Part(guide, label, mean_field_posterior(target), None)
    except TypeError as exc:
        if isinstance(guide, autoguide.AutoDelta):
            reason = f"drawn by {label}, a point mass: BMR needs a Gaussian posterior"
        else:
            reason = f"drawn by {label}, whose posterior BMR cannot read: {exc}"
        return _Part(guide, label, None, reason)


@register_posterior(autoguide.AutoGuideList)
class AutoGuideListPosterior(MeanFieldPosterior):
    """:class:`~pyro.infer.autoguide.AutoGuideList`: each site is read and written by
    the posterior of the part that draws it.

    .. code-block:: python

        guide = AutoGuideList(model)
        guide.append(AutoNormal(poutine.block(model, hide=["sigma"])))
        guide.append(AutoDelta(poutine.block(model, expose=["sigma"])))
        bmr = BayesianModelReduction(guide)  # reduces the sites AutoNormal draws

    A part's sites are reducible where :func:`~pyro_bmr.posteriors.mean_field_posterior`
    reads that part (``AutoNormal``, ``AutoDiagonalNormal``, registered types, and a
    guide function appended as such); the sites of other parts (``AutoDelta``,
    ``AutoMultivariateNormal``, ...) are listed by :meth:`sites` with the reason.
    """

    def __init__(self, guide: autoguide.AutoGuideList) -> None:
        super().__init__(guide)
        self._cache: dict[int, _Part] = {}
        self._owners: dict[str, _Part] | None = None  # as of the last prepare

    @property
    def model(self) -> Callable:
        """The list's own model (its parts hold blocked copies of it)."""
        return self.guide.model

    def _parts(self) -> list[_Part]:
        parts = []
        for index, guide in enumerate(self.guide):
            part = self._cache.get(id(guide))
            if part is None or part.guide is not guide:
                part = self._cache[id(guide)] = _make_part(index, guide)
            parts.append(part)
        return parts

    def prepare(self, *args, **kwargs) -> None:
        """Set up the list and each part as their first call would (a no-op once they
        are), and trace the guide functions among the parts."""
        with _quietly():
            _pyro_compat.setup_prototype(self.guide, *args, **kwargs)
            for part in self._parts():
                if part.posterior is not None:
                    part.posterior.prepare(*args, **kwargs)
                else:
                    _pyro_compat.setup_prototype(part.guide, *args, **kwargs)
        self._owners = self._survey()[1]

    def _survey(self) -> tuple[dict[str, str | None], dict[str, _Part], bool]:
        """Every model site's reason, the mean-field part of each reducible site, and
        whether some part has not been set up yet."""
        claims: dict[str, list[tuple[_Part, str | None]]] = {}
        unknown = False
        for part in self._parts():
            found = part.sites()
            if found is None:
                unknown = True
                continue
            for name, reason in found.items():
                claims.setdefault(name, []).append((part, reason))
        trace = self.guide.prototype_trace
        names = list(claims) if trace is None else [n for n, _ in trace.iter_stochastic_nodes()]
        sites: dict[str, str | None] = {}
        owners: dict[str, _Part] = {}
        for name in names:
            found = claims.get(name, [])
            if not found:
                sites[name] = "not drawn by any part of the AutoGuideList"
            elif len(found) > 1:
                labels = ", ".join(part.label for part, _ in found)
                sites[name] = f"drawn by more than one part of the AutoGuideList: {labels}"
            else:
                part, sites[name] = found[0]
                if sites[name] is None:
                    owners[name] = part
        return sites, owners, unknown

    def sites(self) -> dict[str, str | None]:
        if self.guide.prototype_trace is None:
            raise ValueError(
                "the AutoGuideList has not been set up: call prepare(*args, **kwargs) with "
                "the model's arguments first"
            )
        return self._survey()[0]

    def _owner(self, name: str) -> MeanFieldPosterior:
        owners = self._owners if self._owners is not None else self._survey()[1]
        part = owners.get(name)
        if part is None:
            reason = self._survey()[0].get(name, "the model has no such latent site")
            raise ValueError(f"site {name!r} of the AutoGuideList cannot be reduced: {reason}")
        return part.posterior

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._owner(name).loc_scale(name)

    def loc_log_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._owner(name).loc_log_scale(name)

    def check_assign(self, name: str, *, scale: bool) -> None:
        self._owner(name).check_assign(name, scale=scale)

    def assign(self, name, where, loc, scale) -> None:
        self._owner(name).assign(name, where, loc, scale)

    def guide_masks(self, masks):
        if not masks:
            return {}
        owners, unknown = self._owners, False
        if owners is None:
            _, owners, unknown = self._survey()
        per_part: dict[int, tuple[_Part, dict]] = {}
        for name, mask in masks.items():
            part = owners.get(name)
            if part is None and unknown:
                raise ValueError(
                    f"which part of the AutoGuideList draws site {name!r} is not known before "
                    "the guide has run: call reduce() or sites() with the model's arguments "
                    "(or run the guide once) before setting masks"
                )
            if part is None:
                reason = self._survey()[0].get(name) or "no part draws it"
                raise ValueError(
                    f"site {name!r} has a mask, but the AutoGuideList cannot prune it: {reason}"
                )
            per_part.setdefault(id(part), (part, {}))[1][name] = mask
        out: dict[str, torch.Tensor] = {}
        for part, part_masks in per_part.values():
            out.update(part.posterior.guide_masks(part_masks))
        return out
