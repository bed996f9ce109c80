"""Shape checks shared by the networks of the zoo."""

from collections.abc import Sequence

__all__ = ["check_image_shape", "check_patches"]


def check_image_shape(input_shape: Sequence[int], network: str) -> tuple[int, int, int]:
    """Validate an image shape ``(C, H, W)`` and return it as a tuple of ints.

    :raises ValueError: naming ``network`` if the shape is not three positive ints.
    """
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{network} expects input_shape (C, H, W), got {tuple(input_shape)}")
    return shape


def check_patches(image_size: tuple[int, int], patch_size: int, network: str) -> int:
    """Number of patches of side ``patch_size`` in an image of ``image_size``.

    :raises ValueError: naming ``network`` if the patch size does not divide H and W.
    """
    height, width = image_size
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"{network} patch_size {patch_size} must divide the image size {height}x{width}"
        )
    return (height // patch_size) * (width // patch_size)
