"""Pruning masks: the checks every entry point applies, and their float form (private)."""

from collections.abc import Iterator, Mapping

import torch

__all__ = ["MaskError", "MaskView", "check_mask", "float_mask"]


class MaskError(ValueError):
    """A pruning mask that is not a bool tensor, or does not fit its site."""


def check_mask(
    name: str, mask: object, shape: torch.Size | None = None, *, broadcast: bool = False
) -> torch.Tensor:
    """``mask`` if it is a bool tensor that fits site ``name`` of ``shape``: of that
    shape, or with ``broadcast`` (a site drawn with extra particle dimensions)
    broadcastable to it; ``shape=None`` checks the type only.

    :raises MaskError: naming the site.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise MaskError(f"mask for site {name!r} must be a bool tensor (True = kept), got {got}")
    if shape is not None:
        try:
            fits = (torch.broadcast_shapes(mask.shape, shape) if broadcast else mask.shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise MaskError(
                f"mask of shape {tuple(mask.shape)} does not fit site {name!r} "
                f"of shape {tuple(shape)}"
            )
    return mask


def float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 floats (through ``uint8``, which converts several times
    faster than ``bool`` on CPU)."""
    return mask.view(torch.uint8).to(dtype)


class MaskView(Mapping):
    """A read-only mapping of masks that hands out copies, so that no caller can
    change a mask behind its owner's back."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self._masks = masks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name].clone()

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"MaskView({', '.join(self._masks)})"
