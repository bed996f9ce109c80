"""The paper's application: the four-method comparison of Marković, Friston & Kiebel.

Everything here reproduces the paper's experiments with the library; none of it
is needed to sparsify a model:

* :mod:`~pyro_bmr.paper.methods` -- the four methods (``flat-map``, ``flat-ff``,
  ``tiered-ff``, ``bmr``) as one code path, :func:`~pyro_bmr.paper.methods.fit_method`;
* :mod:`~pyro_bmr.paper.networks` -- the network zoo: MLP, LeNet-300-100, LeNet-5,
  ViT, MLP-Mixer, and :func:`~pyro_bmr.paper.networks.build_network`;
* :mod:`~pyro_bmr.paper.data` -- the image data sets and seeded loaders;
* :mod:`~pyro_bmr.paper.metrics` -- accuracy, NLL, ECE, Brier score;
* :mod:`~pyro_bmr.paper.plots` -- the paper's figures (imports matplotlib; it is
  imported only when a figure is drawn);
* :mod:`~pyro_bmr.paper.experiments` -- the comparison as a function,
  :func:`~pyro_bmr.paper.experiments.run_comparison`, and its outputs;
* :mod:`~pyro_bmr.paper.cli` -- the ``pyro-bmr`` command (also
  ``python -m pyro_bmr.paper``).

Its dependencies beyond the library's (torchvision, matplotlib, scikit-learn) come
with the ``paper`` extra: ``pip install "pyro-bmr[paper]"``. This package imports
the library (:mod:`pyro_bmr`, :mod:`pyro_bmr.nn`, ...); the library never imports it.
"""

from .data import DATASETS, load_dataset, make_loaders
from .experiments import format_table, run_comparison, write_outputs
from .methods import METHODS, EpochRecord, fit_method, method_prior
from .networks import MLP, NETWORKS, LeNet5, LeNet300100, MLPMixer, ViT, build_network

__all__ = [
    "DATASETS",
    "METHODS",
    "MLP",
    "NETWORKS",
    "EpochRecord",
    "LeNet300100",
    "LeNet5",
    "MLPMixer",
    "ViT",
    "build_network",
    "fit_method",
    "format_table",
    "load_dataset",
    "make_loaders",
    "method_prior",
    "run_comparison",
    "write_outputs",
]
