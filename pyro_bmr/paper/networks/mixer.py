"""A small MLP-Mixer (Tolstikhin et al., 2021) built from plain modules."""

from collections.abc import Sequence

import torch
from torch import nn

from .layers import FeedForward, PatchEmbedding, check_image_shape, num_patches

__all__ = ["MixerBlock", "MLPMixer"]


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing within each patch, residual.

    :param int tokens: number of patches.
    :param int dim: token width.
    :param int token_dim: hidden width of the token-mixing feed-forward layer.
    :param int channel_dim: hidden width of the channel-mixing feed-forward layer.
    """

    def __init__(self, tokens: int, dim: int, token_dim: int, channel_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = FeedForward(tokens, token_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = FeedForward(dim, channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer classifier with mean pooling over patches.

    :param input_shape: image shape ``(C, H, W)``.
    :param int num_classes: number of classes.
    :param int patch_size: side of a square patch; must divide ``H`` and ``W``.
    :param int dim: token width.
    :param int depth: number of mixer blocks.
    :param int token_dim: hidden width of the token-mixing layers.
    :param int channel_dim: hidden width of the channel-mixing layers.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        patch_size: int = 4,
        dim: int = 32,
        depth: int = 2,
        token_dim: int = 32,
        channel_dim: int = 64,
    ) -> None:
        super().__init__()
        shape = check_image_shape(input_shape, "MLPMixer")
        tokens = num_patches(shape, patch_size, "MLPMixer")
        self.patch_embed = PatchEmbedding(shape[0], dim, patch_size)
        self.blocks = nn.Sequential(
            *(MixerBlock(tokens, dim, token_dim, channel_dim) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        return self.head(self.norm(self.blocks(self.patch_embed(x))).mean(dim=1))
