"""A small vision transformer (Dosovitskiy et al., 2021) built from plain modules."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FeedForward, PatchEmbedding, check_image_shape, num_patches

__all__ = ["SelfAttention", "TransformerBlock", "ViT"]


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate linear maps, so each can be pruned.

    :param int dim: token width; must be divisible by ``heads``.
    :param int heads: number of attention heads.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"ViT dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: attention then feed-forward, residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer classifier with mean pooling over patch tokens.

    The defaults are small enough for a CPU; larger models (e.g. the paper's) are
    a matter of ``patch_size``, ``dim``, ``depth``, ``heads`` and ``mlp_dim``.

    :param input_shape: image shape ``(C, H, W)``.
    :param int num_classes: number of classes.
    :param int patch_size: side of a square patch; must divide ``H`` and ``W``.
    :param int dim: token width.
    :param int depth: number of transformer blocks.
    :param int heads: attention heads per block.
    :param int mlp_dim: hidden width of each block's feed-forward layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        patch_size: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 64,
    ) -> None:
        super().__init__()
        shape = check_image_shape(input_shape, "ViT")
        tokens = num_patches(shape, patch_size, "ViT")
        self.patch_embed = PatchEmbedding(shape[0], dim, patch_size)
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` images to ``(N, num_classes)`` logits."""
        tokens = self.patch_embed(x) + self.pos_embedding
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))
