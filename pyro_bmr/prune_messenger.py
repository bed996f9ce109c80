"""An effect handler that replaces pruned elements by a point mass at zero."""

from typing import Callable, Dict, Mapping, Optional, Union

import pyro
import torch
from pyro.distributions import Delta
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

from pyro_bmr.distributions import PrunedNormal, _Mask
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
        # what the distributions derive from each mask (0/1 floats, counts), made once
        # and reused by every step; keyed by the mask's identity and version, so an
        # in-place change of a mask makes a new entry
        self._masks_info: Dict[tuple, _Mask] = {}

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
        shape = fn.batch_shape + fn.event_shape
        info = self._mask_info(mask.to(loc.device))
        if any(
            f.dim is not None and f.full_size is not None and f.full_size != f.size
            for f in msg["cond_indep_stack"]
        ):
            info = _Mask(
                pyro.subsample(info.keep, event_dim=event_dim),
                pyro.subsample(info.as_float(loc.dtype), event_dim=event_dim),
            )
        self._check_fits(msg["name"], info.keep, shape)
        msg["fn"] = PrunedNormal._masked(loc, scale, info, shape, event_dim)

    def _mask_info(self, mask: torch.Tensor) -> _Mask:
        key = (id(mask), mask._version)
        info = self._masks_info.get(key)
        if info is None or info.keep is not mask:
            info = self._masks_info[key] = _Mask(mask)
        return info

    def _float_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._mask_info(mask).as_float(dtype)

    def _forget_float_masks(self) -> None:
        """Drop what was cached for masks no longer in use."""
        live = {id(mask) for mask in self._site_masks.values()}
        for key in [k for k in self._masks_info if k[0] not in live]:
            del self._masks_info[key]

    @staticmethod
    def _check_fits(name: str, mask: torch.Tensor, shape: torch.Size) -> None:
        try:
            fits = torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit site {name!r} "
                f"of shape {tuple(shape)}"
            )


def prune(
    fn: Optional[Callable] = None, masks: Optional[Mapping[str, torch.Tensor]] = None
) -> Union[PruneMessenger, Callable]:
    """Functional form of :class:`PruneMessenger`: ``prune(model, masks)``.

    :param fn: a stochastic function (model or guide).
    :param dict masks: site name → bool tensor, True = kept.
    """
    messenger = PruneMessenger(masks)
    return messenger if fn is None else messenger(fn)
