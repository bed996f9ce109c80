"""The paper's network zoo: plain deterministic networks for image classification.

Every network is a ``torch.nn.Module`` mapping ``(N, C, H, W)`` images to
``(N, num_classes)`` logits; :class:`pyro_bmr.nn.BayesianModule` makes it Bayesian.

* :mod:`~pyro_bmr.paper.networks.zoo` -- :class:`MLP`, :class:`LeNet300100`,
  :class:`LeNet5`, :class:`LeNet5Caffe`, :data:`NETWORKS` and :func:`build_network`;
* :mod:`~pyro_bmr.paper.networks.vit` -- a small vision transformer, :class:`ViT`;
* :mod:`~pyro_bmr.paper.networks.mixer` -- a small MLP-Mixer, :class:`MLPMixer`;
* :mod:`~pyro_bmr.paper.networks.layers` -- the blocks the last two share.
"""

from .mixer import MLPMixer
from .vit import ViT
from .zoo import MLP, NETWORKS, LeNet5, LeNet5Caffe, LeNet300100, build_network

__all__ = [
    "MLP",
    "NETWORKS",
    "LeNet300100",
    "LeNet5",
    "LeNet5Caffe",
    "MLPMixer",
    "ViT",
    "build_network",
]
