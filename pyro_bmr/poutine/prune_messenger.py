"""An effect handler that replaces pruned elements by a point mass at zero."""

from collections.abc import Callable, Mapping
from types import MappingProxyType

import pyro
import torch
from pyro.distributions import Delta
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from pyro_bmr._masks import check_mask
from pyro_bmr.distributions import PrunedNormal, _Mask
from pyro_bmr.pruned_multivariate import PrunedMultivariateNormal
from pyro_bmr.sites import normal_params

__all__ = ["PruneMessenger", "prune"]


class PruneMessenger(Messenger):
    """Given masks for Gaussian sample sites, makes every masked-out element a
    point mass at zero: it samples exactly 0 and adds nothing to ``log_prob``.
    At a (low-rank) multivariate Normal site, such as the joint latent of
    ``AutoMultivariateNormal``, the kept elements follow their marginal
    (:class:`~pyro_bmr.pruned_multivariate.PrunedMultivariateNormal`).

    Only ``msg["fn"]`` of the named, unobserved sites changes, so the handler
    composes with ``trace``, ``replay``, ``condition``, ``block``, ``plate``,
    ``scale`` and :class:`~pyro.infer.Predictive`. Masks cover a site's full shape:
    inside a subsampled :class:`~pyro.plate` they are subsampled like the plate's
    parameters, and extra leading (particle) dimensions broadcast.

    :param dict masks: site name → bool tensor, True = kept.
    :raises MaskError: (a ``ValueError``) for a mask that is not a bool tensor, and
        at a masked site whose shape the mask does not fit.
    :raises ValueError: at a masked site whose distribution is not an elementwise
        Normal or a (low-rank) multivariate Normal.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        # what the distributions derive from each mask (0/1 floats, counts), made once
        # and reused by every step; keyed by the mask's identity and version, so an
        # in-place change of a mask makes a new entry
        self._derived: dict[tuple, _Mask] = {}
        self.masks = masks or {}

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Site name → bool tensor, True = kept (a read-only view; assign a new
        mapping to replace them all)."""
        return MappingProxyType(self._masks)

    @masks.setter
    def masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        masks = {name: check_mask(name, mask) for name, mask in dict(masks).items()}
        self._masks = masks
        live = {id(mask) for mask in masks.values()}
        for key in [k for k in self._derived if k[0] not in live]:
            del self._derived[key]

    def _pyro_sample(self, msg: Message) -> None:
        mask = self._masks.get(msg["name"])
        if mask is None or msg["is_observed"]:
            return
        fn = msg["fn"]
        if isinstance(getattr(fn, "base_dist", fn), Delta):
            return  # a guide's deterministic copy of a pruned auxiliary site
        if isinstance(fn, (MultivariateNormal, LowRankMultivariateNormal)):
            keep = check_mask(msg["name"], mask, fn.event_shape).to(fn.loc.device)
            msg["fn"] = PrunedMultivariateNormal(fn, keep)
            return
        params = normal_params(fn)
        if params is None:
            raise ValueError(
                f"site {msg['name']!r} has a pruning mask but its distribution "
                f"{type(fn).__name__} is not an elementwise Normal"
            )
        loc, scale, event_dim = params
        shape = fn.batch_shape + fn.event_shape
        derived = self._derive(mask.to(loc.device))
        if any(
            f.dim is not None and f.full_size is not None and f.full_size != f.size
            for f in msg["cond_indep_stack"]
        ):
            derived = _Mask(
                pyro.subsample(derived.keep, event_dim=event_dim),
                pyro.subsample(derived.as_float(loc.dtype), event_dim=event_dim),
            )
        check_mask(msg["name"], derived.keep, shape, broadcast=True)
        msg["fn"] = PrunedNormal._masked(loc, scale, derived, shape, event_dim)

    def _derive(self, mask: torch.Tensor) -> _Mask:
        key = (id(mask), mask._version)
        derived = self._derived.get(key)
        if derived is None or derived.keep is not mask:
            derived = self._derived[key] = _Mask(mask)
        return derived


def prune(
    fn: Callable | None = None, masks: Mapping[str, torch.Tensor] | None = None
) -> PruneMessenger | Callable:
    """Functional form of :class:`PruneMessenger`: ``prune(model, masks)``.

    :param fn: a stochastic function (model or guide).
    :param dict masks: site name → bool tensor, True = kept.
    """
    messenger = PruneMessenger(masks)
    return messenger if fn is None else messenger(fn)
