"""Ready deterministic networks for image classification and a factory by name.

Every network is a plain ``torch.nn.Module`` mapping ``(N, C, H, W)`` images to
``(N, num_classes)`` logits; :class:`~pyro_bmr.nn.BayesianModule` makes it
Bayesian.
"""

import math
from collections.abc import Callable, Sequence

from torch import nn

from .layers import check_image_shape
from .timm_models import mlp_mixer, vit

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "LeNet",
    "LeNet5",
    "LeNet5Caffe",
    "LeNet300100",
    "NETWORKS",
    "build_network",
    "check_network_name",
]

#: Activations of :class:`MLP` and :class:`LeNet` by name (``swish`` is SiLU).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def _activation(name: str, network: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{network} activation {name!r} is unknown; choose one of {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _check_dropout(dropout: float, network: str) -> float:
    if not 0 <= dropout < 1:
        raise ValueError(f"{network} dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def _dense(widths: Sequence[int], num_classes: int, act: type[nn.Module], dropout: float):
    """Hidden dense layers, each followed by ``act`` and dropout, then the output layer."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-1], num_classes))
    return layers


class MLP(nn.Sequential):
    """Fully connected network on flattened inputs.

    :param input_shape: shape of one input, e.g. ``(C, H, W)``; it is flattened.
    :param int num_classes: number of classes.
    :param hidden: widths of the hidden layers.
    :param str activation: one of :data:`ACTIVATIONS` (the paper's MLP: ``swish``).
    :param float dropout: dropout after every hidden layer, in training mode only.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (128,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        widths = [math.prod(int(n) for n in input_shape), *(int(w) for w in hidden)]
        if min(widths) < 1 or num_classes < 1:
            raise ValueError(
                f"MLP widths must be positive, got input_shape {tuple(input_shape)}, "
                f"hidden {tuple(hidden)}, num_classes {num_classes}"
            )
        act = _activation(activation, "MLP")
        dropout = _check_dropout(dropout, "MLP")
        super().__init__(nn.Flatten(), *_dense(widths, num_classes, act, dropout))


class LeNet(nn.Sequential):
    """The LeNet of Marković, Friston & Kiebel (2023): unpadded 5x5 convolutions, each
    but the last followed by 2x2 average pooling, then dense layers; tanh throughout.

    On 32x32 images (28x28 MNIST padded by 2) the last convolution leaves 1x1 maps.
    The defaults are the FashionMNIST network (convolutions 6, 16, 120; dense 84);
    CIFAR's is ``conv=(18, 48, 360), dense=(256,)``.

    :param input_shape: image shape ``(C, H, W)``.
    :param int num_classes: number of classes.
    :param conv: output channels of the convolutions.
    :param dense: widths of the hidden dense layers.
    :param str activation: one of :data:`ACTIVATIONS`.
    :param float dropout: dropout after every hidden dense layer, in training mode only.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        conv: Sequence[int] = (6, 16, 120),
        dense: Sequence[int] = (84,),
        activation: str = "tanh",
        dropout: float = 0.0,
    ) -> None:
        channels, height, width = check_image_shape(input_shape, "LeNet")
        act = _activation(activation, "LeNet")
        dropout = _check_dropout(dropout, "LeNet")
        if not conv or min(conv) < 1 or (dense and min(dense) < 1):
            raise ValueError(f"LeNet widths must be positive, got conv {conv}, dense {dense}")
        layers: list[nn.Module] = []
        for i, out_channels in enumerate(conv):
            height, width = height - 4, width - 4
            if height < 1 or width < 1:
                raise ValueError(
                    f"LeNet: images of {input_shape[1]}x{input_shape[2]} are too small "
                    f"for {len(conv)} convolutions"
                )
            layers += [nn.Conv2d(channels, out_channels, kernel_size=5), act()]
            if i < len(conv) - 1:
                layers.append(nn.AvgPool2d(2))
                height, width = height // 2, width // 2
            channels = out_channels
        widths = [channels * height * width, *(int(w) for w in dense)]
        super().__init__(*layers, nn.Flatten(), *_dense(widths, num_classes, act, dropout))


class LeNet300100(MLP):
    """LeNet-300-100 (LeCun et al., 1998): an MLP with hidden widths 300 and 100."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__(input_shape, num_classes, hidden=(300, 100))


class LeNet5(nn.Sequential):
    """LeNet-5 with ReLU and max pooling.

    Two 5x5 convolutions (6 and 16 channels; the first padded by 2) each followed
    by 2x2 max pooling, then fully connected layers of 120 and 84 units.

    :param input_shape: image shape ``(C, H, W)``, at least 12x12.
    :param int num_classes: number of classes.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        channels, height, width = check_image_shape(input_shape, "LeNet5")
        out_h, out_w = (height // 2 - 4) // 2, (width // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ValueError(f"LeNet5 needs images of at least 12x12, got {height}x{width}")
        super().__init__(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * out_h * out_w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )


class LeNet5Caffe(nn.Sequential):
    """LeNet-5-Caffe, the network of the sparsity record (Molchanov et al. 2017):
    two 5x5 convolutions of 20 and 50 channels, unpadded, each followed by 2x2 max
    pooling, then fully connected layers of 500 units and the classes, with ReLU
    (431k weights on 28x28 MNIST: 800 features enter the first dense layer).

    :param input_shape: image shape ``(C, H, W)``, at least 16x16.
    :param int num_classes: number of classes.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        channels, height, width = check_image_shape(input_shape, "LeNet5Caffe")
        out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ValueError(f"LeNet5Caffe needs images of at least 16x16, got {height}x{width}")
        super().__init__(
            nn.Conv2d(channels, 20, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * out_h * out_w, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )


#: Network constructors by name, each called as ``build(input_shape, num_classes, **kw)``.
NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "lenet5": LeNet5,
    "lenet300100": LeNet300100,
    "lenet5-caffe": LeNet5Caffe,
    "vit": vit,
    "mixer": mlp_mixer,
}


def build_network(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs: object
) -> nn.Module:
    """Build a deterministic network by name.

    :param str name: one of :data:`NETWORKS`.
    :param input_shape: shape of one input image ``(C, H, W)``.
    :param int num_classes: number of classes.
    :param kwargs: passed to the network's constructor (e.g. ``hidden``,
        ``activation`` and ``dropout`` for ``mlp``, ``patch_size``/``dim``/``depth``
        for ``vit`` and ``mixer``).
    :raises ValueError: if ``name`` is not a known network.
    """
    check_network_name(name)
    return NETWORKS[name](input_shape, num_classes, **kwargs)


def check_network_name(name: str) -> None:
    """Raise a ``ValueError`` listing the choices unless ``name`` is in :data:`NETWORKS`."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
