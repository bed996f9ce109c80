"""An effect handler that replaces pruned elements by a point mass at zero."""

from typing import Callable, Dict, Mapping, Optional, Union

import pyro
import torch
from pyro.distributions import Delta
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.sites import normal_params

__all__ = ["PruneMessenger", "prune"]


class PruneMessenger(Messenger):
    """Given masks for Gaussian sample sites, makes every masked-out element a
    point mass at zero: it samples exactly 0 and adds nothing to ``log_prob``.

    Only ``msg["fn"]`` of the named, unobserved sites changes, so the handler
    composes with ``trace``, ``replay``, ``condition``, ``block``, ``plate``,
    ``scale`` and :class:`~pyro.infer.Predictive`. Masks cover a site's full shape:
    inside a subsampled :class:`~pyro.plate` they are subsampled like the plate's
    parameters, and extra leading (particle) dimensions broadcast.

    :param dict masks: site name → bool tensor, True = kept.
    :raises ValueError: at a masked site whose distribution is not an elementwise
        Normal, or whose shape the mask does not fit.
    """

    def __init__(self, masks: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        super().__init__()
        masks = dict(masks or {})
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"mask for site {name!r} must be a bool tensor, got {mask!r}")
        self._site_masks: Dict[str, torch.Tensor] = masks

    def _pyro_sample(self, msg: Message) -> None:
        mask = self._site_masks.get(msg["name"])
        if mask is None or msg["is_observed"]:
            return
        fn = msg["fn"]
        if isinstance(getattr(fn, "base_dist", fn), Delta):
            return  # a guide's deterministic copy of a pruned auxiliary site
        params = normal_params(fn)
        if params is None:
            raise ValueError(
                f"site {msg['name']!r} has a pruning mask but its distribution "
                f"{type(fn).__name__} is not an elementwise Normal"
            )
        loc, scale, event_dim = params
        mask = self._fit(msg, mask.to(loc.device), event_dim)
        msg["fn"] = PrunedNormal(loc, scale, mask, event_dim)

    def _fit(self, msg: Message, mask: torch.Tensor, event_dim: int) -> torch.Tensor:
        if any(
            f.dim is not None and f.full_size is not None and f.full_size != f.size
            for f in msg["cond_indep_stack"]
        ):
            mask = pyro.subsample(mask, event_dim=event_dim)
        shape = msg["fn"].batch_shape + msg["fn"].event_shape
        try:
            fits = torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit site {msg['name']!r} "
                f"of shape {tuple(shape)}"
            )
        return mask


def prune(
    fn: Optional[Callable] = None, masks: Optional[Mapping[str, torch.Tensor]] = None
) -> Union[PruneMessenger, Callable]:
    """Functional form of :class:`PruneMessenger`: ``prune(model, masks)``.

    :param fn: a stochastic function (model or guide).
    :param dict masks: site name → bool tensor, True = kept.
    """
    messenger = PruneMessenger(masks)
    return messenger if fn is None else messenger(fn)
