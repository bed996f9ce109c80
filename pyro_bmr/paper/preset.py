"""The authors' configuration as a preset: ``pyro-bmr run --preset paper``.

:func:`paper_preset` gives, for a data set and one of the paper's four networks,
every setting of the authors' code (``dimarkov/bmr4pml``, the 50-epoch settings of
October 2023; ``PAPER.md`` lists them point by point):

* schedule: batch 120, 50 epochs of 500 steps, one particle; ``bmr`` warms up for
  500 steps, then every epoch is train → evaluate → prune, with no pruning after
  the last epoch;
* optimiser: AdaBelief, learning rate 1e-3 (``flat-map``), 5e-3 (``flat-ff``,
  ``tiered-ff``), 1e-2 (``bmr``);
* initialisation (NumPyro's defaults): mean-field guide locations uniform in
  (−2, 2) on the unconstrained (standardised) sites, scales 0.1; the point-mass
  guide of ``flat-map`` at the median of 15 prior draws;
* priors: :class:`~pyro_bmr.nn.LayerScalePrior` with :math:`c^{-2} \\sim
  \\mathrm{Gamma}(2, 2)` per layer and :math:`c` divided by 10 on every layer but the
  output layer for ``flat-map``, ``flat-ff`` and ``bmr`` (the same model, so
  ``flat-ff`` against ``bmr`` isolates pruning);
  :class:`~pyro_bmr.nn.LayerHorseshoePrior` (:math:`\\tau_0 = 10^{-2}`, slab
  :math:`c^{-2} \\sim \\mathrm{Gamma}(2, 6)`) for ``tiered-ff``;
* ``flat-map``: a point-mass guide on ``TraceMeanField_ELBO``, dropout 0.2 in
  training; one prediction sample; the others 100;
* ``bmr``'s rule: :func:`~pyro_bmr.paper.methods.bmr_rule` (spike and slab, 4
  iterations, one sparsity per layer, the output layer never pruned);
* beyond the paper's four (:attr:`Preset.extra_methods`): ``bmr-rhs`` takes
  ``bmr``'s model, prior, learning rate and warm-up, and reduces by
  :func:`~pyro_bmr.paper.methods.rhs_reduction` with the authors' settings of
  ``prune_regularised_horseshoe``;
* networks: MLP 4 × 500 swish; LeNet tanh with average pooling (convolutions 6,
  16, 120 and dense 84 on FashionMNIST and MNIST; 18, 48, 360 and 256 on CIFAR);
  ViT patch 4, width 256, depth 6, 8 heads, MLP ratio 2; MLP-Mixer patch 4, width
  256, 6 blocks, token hidden 512, channel hidden 256 (the transformers built by
  timm); 28×28 images padded to 32×32 for all but the MLP;
* metrics: ECE over 20 equal-mass bins; the pruned fraction over the non-output
  layers.

MNIST takes FashionMNIST's settings. Every setting can be overridden by the options
of :func:`~pyro_bmr.paper.experiments.run_comparison` and ``pyro-bmr run``.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyro.infer.autoguide.initialization import init_to_median, init_to_uniform

from pyro_bmr.horseshoe_reduction import HorseshoeReduction
from pyro_bmr.nn import LayerHorseshoePrior, LayerScalePrior, Prior

from .methods import EXTRA_METHODS, METHODS

__all__ = [
    "INITS",
    "PAPER_DATASETS",
    "PAPER_NETWORKS",
    "PRESETS",
    "MethodSettings",
    "Preset",
    "paper_preset",
    "rhs_settings",
]

#: The presets of :func:`~pyro_bmr.paper.experiments.run_comparison`: ``quick`` (the
#: defaults, tuned to train in minutes on a CPU) and ``paper`` (the authors').
PRESETS = ("quick", "paper")

#: The data sets the paper preset knows (MNIST takes FashionMNIST's settings).
PAPER_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")

#: The paper's networks, by their names in :data:`~pyro_bmr.paper.networks.NETWORKS`.
PAPER_NETWORKS = ("mlp", "lenet", "vit", "mixer")

#: The guides' starting points in the authors' code, NumPyro's defaults: the mean-field
#: guides start uniform in (-2, 2) on the unconstrained scale, the point-mass guide at
#: the median of 15 prior draws.
INITS: dict[str, Callable[[], Callable[[dict], Any]]] = {
    "uniform": lambda: init_to_uniform(radius=2.0),
    "median": lambda: init_to_median(num_samples=15),
}


@dataclass(frozen=True)
class MethodSettings:
    """What the paper preset sets for one method.

    :ivar float lr: learning rate.
    :ivar Prior prior: the prior of the network's parameters.
    :ivar int samples: posterior samples per prediction.
    :ivar str elbo: ``"trace"`` or ``"mean-field"`` (see
        :func:`~pyro_bmr.paper.methods.fit_method`).
    :ivar int warmup_steps: steps before the first reduction (``bmr``).
    :ivar dict network_kwargs: network arguments of this method (dropout).
    :ivar str init: where the guide's locations start, a name of :data:`INITS`.
    :ivar dict reduction: options of ``bmr-rhs``'s
        :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction` (empty for the
        other methods).
    """

    lr: float
    prior: Prior
    samples: int = 100
    elbo: str = "trace"
    warmup_steps: int = 0
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str = "uniform"
    reduction: dict[str, Any] = field(default_factory=dict)

    def init_loc_fn(self) -> Callable[[dict], Any]:
        """The Pyro initialisation function of :attr:`init`."""
        return INITS[self.init]()

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the prior as its ``repr``)."""
        return {
            "lr": self.lr,
            "prior": repr(self.prior),
            "samples": self.samples,
            "elbo": self.elbo,
            "warmup_steps": self.warmup_steps,
            "network_kwargs": _jsonable(self.network_kwargs),
            "init": self.init,
            **({"reduction": _jsonable(self.reduction)} if self.reduction else {}),
        }


@dataclass(frozen=True)
class Preset:
    """A full configuration of the comparison (see :func:`paper_preset`).

    :ivar str dataset: the data set.
    :ivar str model: the network's name.
    :ivar dict network_kwargs: arguments of the network shared by every method.
    :ivar int pad: zeros added on each side of the images.
    :ivar int batch_size: training batch size.
    :ivar int epochs: epochs.
    :ivar int steps_per_epoch: optimisation steps per epoch.
    :ivar str optimizer: optimiser name.
    :ivar float init_radius: mean-field guide locations start uniform in ``(-r, r)``
        (each method's :attr:`MethodSettings.init` says where its guide starts).
    :ivar float init_scale: guide scales start here.
    :ivar str guide: mean-field guide of the Gaussian methods.
    :ivar dict methods: :class:`MethodSettings` per method.
    :ivar str rule: ``bmr``'s pruning rule, in words.
    :ivar int ece_bins: equal-mass bins of the ECE.
    :ivar dict extra_methods: :class:`MethodSettings` of the methods beyond the
        paper's four (:data:`~pyro_bmr.paper.methods.EXTRA_METHODS`).
    """

    dataset: str
    model: str
    network_kwargs: dict[str, Any]
    pad: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    optimizer: str
    init_radius: float
    init_scale: float
    guide: str
    methods: dict[str, MethodSettings]
    rule: str
    ece_bins: int = 20
    extra_methods: dict[str, MethodSettings] = field(default_factory=dict)

    def settings(self, method: str) -> MethodSettings:
        """The :class:`MethodSettings` of ``method``, one of the paper's four or an
        extra one."""
        return self.methods[method] if method in self.methods else self.extra_methods[method]

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready values, for ``results.json``."""
        return {
            "dataset": self.dataset,
            "model": self.model,
            "network_kwargs": _jsonable(self.network_kwargs),
            "pad": self.pad,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer": self.optimizer,
            "init_radius": self.init_radius,
            "init_scale": self.init_scale,
            "guide": self.guide,
            "methods": {name: s.to_dict() for name, s in self.methods.items()},
            "extra_methods": {name: s.to_dict() for name, s in self.extra_methods.items()},
            "rule": self.rule,
            "ece_bins": self.ece_bins,
            "pruned_fraction": "over the non-output layers",
        }


def rhs_settings(**overrides: Any) -> dict[str, Any]:
    """``bmr-rhs``'s reduction options as recorded: the authors' (those of
    :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction`) with ``overrides``,
    checked, the progress bar left out.

    :raises ValueError: for an unknown option or a value out of range.
    """
    options = HorseshoeReduction.check_options(**overrides)
    return {name: value for name, value in options.items() if name != "progress"}


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _network_kwargs(dataset: str, model: str) -> dict[str, Any]:
    cifar = dataset.startswith("cifar")
    if model == "mlp":
        return {"hidden": (500,) * 4, "activation": "swish"}
    if model == "lenet":
        if cifar:
            return {"conv": (18, 48, 360), "dense": (256,), "activation": "tanh"}
        return {"conv": (6, 16, 120), "dense": (84,), "activation": "tanh"}
    if model == "vit":
        return {"patch_size": 4, "dim": 256, "depth": 6, "heads": 8, "mlp_ratio": 2.0}
    return {"patch_size": 4, "dim": 256, "depth": 6, "token_ratio": 2.0, "channel_ratio": 1.0}


def paper_preset(dataset: str, model: str) -> Preset:
    """The authors' configuration for ``model`` on ``dataset`` (module docstring).

    :param str dataset: one of :data:`PAPER_DATASETS`.
    :param str model: one of :data:`PAPER_NETWORKS`.
    :raises ValueError: for a data set or network the paper does not have, naming it
        and the choices.
    """
    if dataset not in PAPER_DATASETS:
        raise ValueError(
            f"the paper preset has no settings for dataset {dataset!r}; "
            f"choose one of {', '.join(PAPER_DATASETS)}"
        )
    if model not in PAPER_NETWORKS:
        raise ValueError(
            f"the paper preset has no network {model!r}; choose one of {', '.join(PAPER_NETWORKS)}"
        )
    flat = LayerScalePrior(concentration=2.0, rate=2.0, hidden_scale=0.1)
    # The authors' MLP-Mixer has no dropout; their other networks drop 0.2 for Flat-MAP.
    dropout = {} if model == "mixer" else {"dropout": 0.2}
    methods = {
        "flat-map": MethodSettings(
            1e-3, flat, samples=1, elbo="mean-field", network_kwargs=dropout, init="median"
        ),
        "flat-ff": MethodSettings(5e-3, flat),
        "tiered-ff": MethodSettings(5e-3, LayerHorseshoePrior(1e-2, 2.0, 6.0)),
        "bmr": MethodSettings(1e-2, flat, warmup_steps=500),
    }
    assert tuple(methods) == METHODS
    extra_methods = {
        "bmr-rhs": MethodSettings(1e-2, flat, warmup_steps=500, reduction=rhs_settings()),
    }
    assert tuple(extra_methods) == EXTRA_METHODS
    return Preset(
        dataset=dataset,
        model=model,
        network_kwargs=_network_kwargs(dataset, model),
        pad=2 if model != "mlp" and not dataset.startswith("cifar") else 0,
        batch_size=120,
        epochs=50,
        steps_per_epoch=500,
        optimizer="adabelief",
        init_radius=2.0,
        init_scale=0.1,
        guide="auto",
        methods=methods,
        extra_methods=extra_methods,
        rule="spike-and-slab, Beta(1, 1), 4 iterations, one sparsity per layer, "
        "output layer never pruned (bmr_rule)",
    )
