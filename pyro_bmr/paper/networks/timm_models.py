"""The paper's transformers, built by timm (``timm.models``) rather than by hand.

timm's ``VisionTransformer`` and ``MlpMixer`` take the authors' patch size, width,
depth, heads and MLP ratios as arguments, are well tested and widely used, and are
plain ``torch.nn`` modules that :func:`~pyro_bmr.nn.to_bayesian` converts like any
other: every parameter (LayerNorms, the class token and the position embedding
included) becomes random. timm is imported when a network is built, so importing
the zoo stays cheap.
"""

from collections.abc import Sequence

from torch import nn

from .layers import check_image_shape, check_patches

__all__ = ["mlp_mixer", "vit"]


def vit(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    patch_size: int = 4,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> nn.Module:
    """A vision transformer (Dosovitskiy et al., 2021): timm's ``VisionTransformer``
    with a class token, pre-norm blocks, GELU and a linear head on the class token.

    The defaults are small enough for a CPU; the paper's is ``patch_size=4, dim=256,
    depth=6, heads=8, mlp_ratio=2`` on 32x32 images.

    :param input_shape: image shape ``(C, H, W)``.
    :param int num_classes: number of classes.
    :param int patch_size: side of a square patch; must divide ``H`` and ``W``.
    :param int dim: token width; divisible by ``heads``.
    :param int depth: number of transformer blocks.
    :param int heads: attention heads per block.
    :param float mlp_ratio: hidden width of the blocks' MLPs over ``dim``.
    :param float dropout: dropout after the position embedding, in the blocks and
        before the head (``drop_rate`` of timm), active in training mode only.
    :raises ValueError: for a bad shape, a patch size that does not divide the
        image, or a width not divisible by ``heads``.
    """
    from timm.models.vision_transformer import VisionTransformer

    channels, height, width = check_image_shape(input_shape, "ViT")
    check_patches((height, width), patch_size, "ViT")
    if heads < 1 or dim % heads:
        raise ValueError(f"ViT dim {dim} must be divisible by heads {heads}")
    return VisionTransformer(
        img_size=(height, width),
        patch_size=patch_size,
        in_chans=channels,
        num_classes=num_classes,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        drop_rate=dropout,
        pos_drop_rate=dropout,
        proj_drop_rate=dropout,
        class_token=True,
        global_pool="token",
    )


def mlp_mixer(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    patch_size: int = 4,
    dim: int = 32,
    depth: int = 2,
    token_ratio: float = 2.0,
    channel_ratio: float = 1.0,
) -> nn.Module:
    """An MLP-Mixer (Tolstikhin et al., 2021): timm's ``MlpMixer``, GELU, mean
    pooling over patches.

    The hidden widths are ``token_ratio * dim`` for token mixing and
    ``channel_ratio * dim`` for channel mixing; the paper's is ``patch_size=4,
    dim=256, depth=6, token_ratio=2, channel_ratio=1`` (hidden 512 and 256) on
    32x32 images.

    :param input_shape: image shape ``(C, H, W)``.
    :param int num_classes: number of classes.
    :param int patch_size: side of a square patch; must divide ``H`` and ``W``.
    :param int dim: token width.
    :param int depth: number of mixer blocks.
    :param float token_ratio: token-mixing hidden width over ``dim``.
    :param float channel_ratio: channel-mixing hidden width over ``dim``.
    :raises ValueError: for a bad shape or a patch size that does not divide the image.
    """
    from timm.models.mlp_mixer import MlpMixer

    channels, height, width = check_image_shape(input_shape, "MLPMixer")
    check_patches((height, width), patch_size, "MLPMixer")
    return MlpMixer(
        num_classes=num_classes,
        img_size=(height, width),
        in_chans=channels,
        patch_size=patch_size,
        num_blocks=depth,
        embed_dim=dim,
        mlp_ratio=(token_ratio, channel_ratio),
    )
