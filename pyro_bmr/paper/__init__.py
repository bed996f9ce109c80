"""The paper's application: the four-method comparison of Marković, Friston & Kiebel.

Everything here reproduces the paper's experiments with the library; none of it
is needed to sparsify a model:

* :mod:`~pyro_bmr.paper.methods` -- the four methods (``flat-map``, ``flat-ff``,
  ``tiered-ff``, ``bmr``) as one code path, :func:`~pyro_bmr.paper.methods.fit_method`;
* :mod:`~pyro_bmr.paper.networks` -- the network zoo: MLP, the paper's LeNet,
  LeNet-300-100, LeNet-5, LeNet-5-Caffe, ViT and MLP-Mixer (built by timm), and
  :func:`~pyro_bmr.paper.networks.build_network`;
* :mod:`~pyro_bmr.paper.preset` -- the authors' configuration,
  :func:`~pyro_bmr.paper.preset.paper_preset` (``pyro-bmr run --preset paper``);
* :mod:`~pyro_bmr.paper.data` -- the image data sets and seeded loaders;
* :mod:`~pyro_bmr.paper.metrics` -- accuracy, NLL, ECE, Brier score;
* :mod:`~pyro_bmr.paper.plots` -- the paper's figures (imports matplotlib; it is
  imported only when a figure is drawn);
* :mod:`~pyro_bmr.paper.experiments` -- the comparison as a function,
  :func:`~pyro_bmr.paper.experiments.run_comparison`, and its outputs;
* :mod:`~pyro_bmr.paper.cli` -- the ``pyro-bmr`` command (also
  ``python -m pyro_bmr.paper``).

Its dependencies beyond the library's (torchvision, timm, matplotlib, scikit-learn,
pytorch-optimizer) come
with the ``paper`` extra: ``pip install "pyro-bmr[paper]"``. This package imports
the library (:mod:`pyro_bmr`, :mod:`pyro_bmr.nn`, ...); the library never imports it.
"""

from .data import DATASETS, load_dataset, make_loaders
from .experiments import format_table, run_comparison, write_outputs
from .methods import METHODS, EpochRecord, fit_method, method_prior
from .networks import MLP, NETWORKS, LeNet, LeNet5, LeNet300100, build_network, mlp_mixer, vit
from .preset import PRESETS, paper_preset

__all__ = [
    "DATASETS",
    "METHODS",
    "MLP",
    "NETWORKS",
    "EpochRecord",
    "LeNet",
    "LeNet300100",
    "LeNet5",
    "PRESETS",
    "build_network",
    "fit_method",
    "format_table",
    "load_dataset",
    "make_loaders",
    "method_prior",
    "mlp_mixer",
    "paper_preset",
    "run_comparison",
    "vit",
    "write_outputs",
]
