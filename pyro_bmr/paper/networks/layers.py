"""Building blocks shared by the patch-based networks (ViT and MLP-Mixer)."""

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FeedForward", "PatchEmbedding", "check_image_shape", "num_patches"]


def check_image_shape(input_shape: Sequence[int], network: str) -> tuple[int, int, int]:
    """Validate an image shape ``(C, H, W)`` and return it as a tuple of ints.

    :raises ValueError: naming ``network`` if the shape is not three positive ints.
    """
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{network} expects input_shape (C, H, W), got {tuple(input_shape)}")
    return shape


class PatchEmbedding(nn.Module):
    """Cut an image into non-overlapping square patches and embed each linearly.

    :param int in_channels: image channels ``C``.
    :param int dim: embedding width.
    :param int patch_size: side of a patch; must divide the image height and width.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_patches, dim)`` tokens."""
        return self.proj(x).flatten(2).transpose(1, 2)


class FeedForward(nn.Sequential):
    """Two linear layers with a GELU between: ``dim -> hidden -> dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def num_patches(input_shape: tuple[int, int, int], patch_size: int, network: str) -> int:
    """Number of patches of side ``patch_size`` in an image of ``input_shape``.

    :raises ValueError: naming ``network`` if the patch size does not divide H and W.
    """
    _, height, width = input_shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"{network} patch_size {patch_size} must divide the image size {height}x{width}"
        )
    return (height // patch_size) * (width // patch_size)
