"""The paper's network zoo: deterministic networks for image classification.

Every network is a ``torch.nn.Module`` mapping ``(N, C, H, W)`` images to
``(N, num_classes)`` logits; :class:`pyro_bmr.nn.BayesianModule` makes it Bayesian.

* :mod:`~pyro_bmr.paper.networks.zoo` -- :class:`MLP`, :class:`LeNet` (the paper's),
  :class:`LeNet300100`, :class:`LeNet5`, :class:`LeNet5Caffe` (the sparsity record's),
  :data:`NETWORKS` and :func:`build_network`;
* :mod:`~pyro_bmr.paper.networks.timm_models` -- the paper's transformers as timm
  builds them: :func:`vit` and :func:`mlp_mixer`;
* :mod:`~pyro_bmr.paper.networks.layers` -- shape checks.
"""

from .timm_models import mlp_mixer, vit
from .zoo import MLP, NETWORKS, LeNet, LeNet5, LeNet5Caffe, LeNet300100, build_network

__all__ = [
    "MLP",
    "NETWORKS",
    "LeNet",
    "LeNet300100",
    "LeNet5",
    "LeNet5Caffe",
    "build_network",
    "mlp_mixer",
    "vit",
]
