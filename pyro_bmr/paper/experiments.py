"""The comparison of Marković, Friston & Kiebel (2023) as a function.

:func:`run_comparison` trains each of the paper's methods
(:data:`~pyro_bmr.paper.methods.METHODS`) on one image data set and evaluates it on the test
split after every ``eval_every`` epochs; :func:`write_outputs` writes
``results.json`` and the paper's four figures; :func:`format_table` gives the
final numbers as plain text. The ``pyro-bmr run`` command
(:mod:`pyro_bmr.paper.cli`) is a thin layer over these three, so a notebook can do
anything the command does::

    results, weights = run_comparison("digits", epochs=5)
    print(format_table(results))
    write_outputs(results, weights, "runs/digits")

Every method sees the same batches in the same order, and evaluation draws its
posterior samples from a forked random state, so a method's training does not
depend on which other methods ran, how often it was evaluated or with how many
samples. The same arguments give bit-identical numbers on a CPU (all but the
wall-clock ``seconds``).

In a ``torch.distributed`` process group of more than one process (``torchrun
--nproc-per-node N -m pyro_bmr run``), each process trains on its shard of every
global batch (see :func:`~pyro_bmr.paper.data.make_loader`), the gradients are
averaged across them (:mod:`pyro_bmr.distributed`), and every process evaluates the
whole test split with the same draws, so that all of them hold the same numbers;
only rank 0 shows progress (and, in the command, writes the outputs).
"""

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

import pyro_bmr
from pyro_bmr.compiled_elbo import BACKENDS
from pyro_bmr.compiled_elbo import ENV_VAR as ELBO_BACKEND_VAR
from pyro_bmr.distributed import local_batch_size, world
from pyro_bmr.report import sparsity

from .data import DEFAULT_DATA_DIR, DatasetSplits, load_dataset, make_loaders
from .methods import (
    EXTRA_METHODS,
    METHODS,
    PRUNING_METHODS,
    EpochRecord,
    _layer,
    fit_method,
    method_prior,
)
from .metrics import accuracy, expected_calibration_error, negative_log_likelihood
from .networks.zoo import check_network_name
from .preset import PRESETS, MethodSettings, Preset, _jsonable, paper_preset, rhs_settings

__all__ = [
    "CURVES",
    "DEFAULTS",
    "OUTPUT_FILES",
    "Comparison",
    "format_table",
    "resolve_device",
    "run_comparison",
    "write_outputs",
]

#: Defaults of :func:`run_comparison` and of ``pyro-bmr run``, tuned on ``digits``
#: with the MLP: all four methods train in under a minute on two CPU cores, and
#: ``bmr`` prunes about 60% of the weights at the accuracy of ``flat-ff``.
DEFAULTS: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "epochs": 15,
    "batch_size": 64,
    "lr": 3e-3,
    "samples": 20,
    "seed": 0,
    "eval_every": 1,
}

#: The curves recorded per method, each one value per evaluated epoch.
CURVES = (
    "epoch",
    "accuracy",
    "nll",
    "ece",
    "pruned_fraction",
    "pruned_hidden",
    "seconds",
)

#: The files :func:`write_outputs` writes.
OUTPUT_FILES = (
    "results.json",
    "metrics.png",
    "pruned_fraction.png",
    "weight_cdf.png",
    "first_layer.png",
)

# Posterior samples behind the weight means of the figures: they are drawn for a
# single input, so many are cheap, and few would blur the CDF near zero.
_WEIGHT_SAMPLES = 100
# Test examples per prediction batch.
_EVAL_BATCH_SIZE = 1000
# AutoNormal's starting scale under the quick preset.
_QUICK_INIT_SCALE = 1e-2


class Comparison(NamedTuple):
    """Result of :func:`run_comparison`; unpacks as ``results, weights``.

    :ivar dict results: the contents of ``results.json``:
        ``{"config": {...}, "methods": {method: {curve: [...]}}}`` with the curves
        of :data:`CURVES`.
    :ivar dict weights: ``{method: {layer: tensor}}``, the posterior means of
        every weight matrix (or convolution kernel) after the last epoch, zero
        where pruned, on the CPU. Layers are named by their site without the
        leading ``net.``.
    """

    results: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to train on: CUDA when available unless ``device`` says otherwise.

    :raises ValueError: if CUDA is asked for but not available.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but CUDA is not available")
    return device


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods is empty; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    for method in methods:
        if method not in METHODS + EXTRA_METHODS:
            choices = ", ".join(METHODS + EXTRA_METHODS)
            raise ValueError(f"unknown method {method!r}; choose from {choices}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must not repeat, got {', '.join(methods)}")
    return methods


def _layer_name(site: str) -> str:
    return site.removeprefix("net.")


def _evaluate(
    record: EpochRecord, test_loader: Any, samples: int, device: torch.device
) -> dict[str, float]:
    # A forked random state keeps evaluation from shifting the training's samples.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probs, targets = record.predict_loader(test_loader, samples)
    return {
        "accuracy": accuracy(probs, targets),
        "nll": negative_log_likelihood(probs, targets),
        "ece": expected_calibration_error(probs, targets),
        "pruned_fraction": 0.0 if record.sparsity is None else float(record.sparsity.total),
        "pruned_hidden": _pruned_hidden(record),
    }


def _pruned_hidden(record: EpochRecord) -> float:
    """Pruned fraction over the non-output layers (the paper's measure)."""
    if record.bmr is None:
        return 0.0
    sites = record.model.random_sites()
    output = _layer(sites[-1]) if sites else None
    masks = {name: m for name, m in record.bmr.masks.items() if _layer(name) != output}
    return float(sparsity(masks).total)


def _final_weights(record: EpochRecord, x: torch.Tensor, device: torch.device) -> dict:
    """Posterior means of the weight matrices and kernels, in network order."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        means = record.weight_means(x, num_samples=_WEIGHT_SAMPLES)
    return {
        _layer_name(site): value.detach().cpu()
        for site, value in means.items()
        if site.endswith("weight") and value.dim() >= 2
    }


def _warm_up() -> None:
    # torch.optim imports torch._dynamo when the first optimiser is built, which takes
    # seconds; without this the first method's first epoch would be charged for it.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _on_device(data: DatasetSplits, device: torch.device) -> DatasetSplits:
    def move(split: TensorDataset) -> TensorDataset:
        return TensorDataset(*(t.to(device) for t in split.tensors))

    return dataclasses.replace(data, train=move(data.train), test=move(data.test))


def run_comparison(
    dataset: str | DatasetSplits = DEFAULTS["dataset"],
    model: str = DEFAULTS["model"],
    methods: Sequence[str] = METHODS,
    *,
    preset: str = "quick",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    samples: int | None = None,
    seed: int = DEFAULTS["seed"],
    device: str | torch.device | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    hidden: Sequence[int] | None = None,
    eval_every: int = DEFAULTS["eval_every"],
    progress: bool = False,
    guide: str | None = None,
    optimizer: str | None = None,
    steps_per_epoch: int | None = None,
    warmup_steps: int | None = None,
    reduction: Mapping[str, Any] | None = None,
    backend: str | None = None,
    distributed: bool | None = None,
) -> Comparison:
    """Train and evaluate each method on one data set.

    Each method is trained by :func:`~pyro_bmr.paper.methods.fit_method` (which seeds every
    generator with ``seed``) on batches from
    :func:`~pyro_bmr.paper.data.make_loaders` with the same ``seed``. After every
    ``eval_every`` epochs, and after the last, the test split gives the accuracy,
    negative log likelihood (nats) and expected calibration error of the
    posterior predictive, and the pruned fraction over all random parameters and
    over the non-output layers (0 for methods that do not prune); ``seconds`` is
    the wall-clock training time of that epoch.

    ``preset`` chooses every setting left as ``None``: ``"quick"`` gives
    :data:`DEFAULTS` (Adam, the network's own initial weights, each method's prior
    of :func:`~pyro_bmr.paper.methods.method_prior`); ``"paper"`` gives the authors'
    configuration of :func:`~pyro_bmr.paper.preset.paper_preset` (per-method learning
    rates, priors, ELBOs and sample counts, the networks' sizes, padding, AdaBelief,
    500 steps per epoch, ``bmr``'s warm-up). An option given explicitly overrides
    the preset (``lr`` for every method). ``results["config"]`` records every
    setting used, per method where they differ.

    :param dataset: a name of :data:`~pyro_bmr.paper.data.DATASETS`, or splits already
        loaded by :func:`~pyro_bmr.paper.data.load_dataset` (then ``download``,
        ``train_size`` and ``test_size`` must be left out, and ``data_dir`` is only
        recorded in the configuration).
    :type dataset: str or ~pyro_bmr.paper.data.DatasetSplits
    :param str model: a network name of :data:`~pyro_bmr.paper.networks.NETWORKS`.
    :param methods: method names of :data:`~pyro_bmr.paper.methods.METHODS` or
        :data:`~pyro_bmr.paper.methods.EXTRA_METHODS` (``bmr-rhs``), run in this order.
    :param str preset: one of :data:`~pyro_bmr.paper.preset.PRESETS`.
    :param int epochs: training epochs per method.
    :param int batch_size: training batch size.
    :param float lr: learning rate of every method.
    :param int samples: posterior samples per evaluation (``flat-map`` always uses one).
    :param int seed: random seed.
    :param device: ``"cpu"``, ``"cuda"`` or a ``torch.device``; default CUDA when
        available.
    :param data_dir: directory of torchvision's files; default
        :data:`~pyro_bmr.paper.data.DEFAULT_DATA_DIR`.
    :param bool download: download missing torchvision files.
    :param train_size: use only the first ``train_size`` training examples.
    :param test_size: use only the first ``test_size`` test examples.
    :param hidden: hidden widths of the ``mlp``.
    :param int eval_every: epochs between evaluations.
    :param bool progress: show a progress bar per method (on stderr).
    :param str guide: mean-field guide of the Gaussian methods (see
        :func:`~pyro_bmr.paper.methods.fit_method`): ``"auto"``, ``"mean-field"`` or ``"local"``.
    :param str optimizer: ``"adam"`` or ``"adabelief"`` (see
        :func:`~pyro_bmr.paper.methods.fit_method`).
    :param int steps_per_epoch: optimisation steps per epoch (default: the preset's;
        one pass over the training split for ``quick``).
    :param int warmup_steps: the steps of ``bmr`` and ``bmr-rhs`` before their first
        reduction (default: the preset's; none for ``quick``).
    :param dict reduction: options of ``bmr-rhs``'s reduction over the authors' (see
        :func:`~pyro_bmr.paper.methods.rhs_reduction`), e.g. ``{"num_steps": 1000}``.
    :param str backend: how the ELBO's captured step runs (see
        :func:`~pyro_bmr.paper.methods.fit_method`); default ``"inductor"``.
    :param bool distributed: train data-parallel across the processes of the
        initialised process group, ``batch_size`` being the global batch (divided
        among them); default: where one of more than one process is initialised.
    :returns: the results and the final weight means.
    :rtype: Comparison
    :raises ValueError: for an unknown preset, data set, network or method, a setting
        the paper preset does not have, a non-positive count, or a batch size that
        does not divide among the processes.
    :raises ~pyro_bmr.paper.data.DatasetNotFoundError: if the data set's files are missing.
    """
    methods = _check_methods(methods)
    check_network_name(model)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    for name, value in [
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("samples", samples),
        ("eval_every", eval_every),
        ("steps_per_epoch", steps_per_epoch),
    ]:
        if value is not None:
            _positive_int(name, value)
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if reduction is not None:
        rhs_settings(**reduction)  # checked even where bmr-rhs does not run
    if hidden is not None:
        if model != "mlp":
            raise ValueError(f"hidden widths apply to the mlp only, not to model {model!r}")
        hidden = [_positive_int("hidden width", h) for h in hidden]
    name = dataset.name if isinstance(dataset, DatasetSplits) else str(dataset).lower()
    paper = paper_preset(name, model) if preset == "paper" else None
    device = resolve_device(device)
    batch_size = batch_size or (paper.batch_size if paper else DEFAULTS["batch_size"])
    if distributed and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    rank, processes = world() if distributed is not False else (0, 1)
    local_batch = local_batch_size(batch_size) if processes > 1 else batch_size

    if isinstance(dataset, DatasetSplits):
        if download or train_size is not None or test_size is not None:
            raise ValueError(
                "download, train_size and test_size apply when loading a data set by name, "
                "not to splits already loaded"
            )
        data = _on_device(dataset, device)
    else:
        data = load_dataset(
            dataset,
            data_dir,
            download,
            train_size=train_size,
            test_size=test_size,
            device=device,
        )
    if paper is not None and paper.pad:
        data = _padded(data, paper.pad)
    epochs = epochs or (paper.epochs if paper else DEFAULTS["epochs"])
    guide = guide or (paper.guide if paper else "auto")
    optimizer = optimizer or (paper.optimizer if paper else "adam")
    steps_per_epoch = steps_per_epoch or (paper.steps_per_epoch if paper else None)
    network_kwargs: dict[str, Any] = dict(paper.network_kwargs) if paper else {}
    if hidden is not None:
        network_kwargs["hidden"] = tuple(hidden)
    if warmup_steps is not None and (
        isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
    ):
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    settings = {
        m: _method_settings(m, paper, lr, samples, warmup_steps, network_kwargs, reduction)
        for m in methods
    }
    config = {
        "preset": preset,
        "dataset": data.name,
        "data_dir": None if data.name == "digits" else str(data_dir or DEFAULT_DATA_DIR),
        "model": model,
        "hidden": None if hidden is None else list(hidden),
        "network_kwargs": _jsonable(network_kwargs),
        "methods": methods,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size,
        # None where the preset sets them per method (see method_settings)
        "lr": float(lr) if lr is not None else None if paper else DEFAULTS["lr"],
        "samples": samples if samples is not None else None if paper else DEFAULTS["samples"],
        "seed": seed,
        "device": device.type,
        "processes": processes,
        "eval_every": eval_every,
        "guide": guide,
        "optimizer": optimizer,
        "backend": backend or os.environ.get(ELBO_BACKEND_VAR, "inductor"),
        "init_radius": paper.init_radius if paper else None,
        "init_scale": paper.init_scale if paper else _QUICK_INIT_SCALE,
        "pad": paper.pad if paper else 0,
        "rule": paper.rule if paper else "bmr_rule",
        "ece_bins": 20,
        "method_settings": {m: s.to_dict() for m, s in settings.items()},
        "train_size": len(data.train),
        "test_size": len(data.test),
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "versions": {
            "pyro_bmr": pyro_bmr.__version__,
            "pyro": pyro.__version__,
            "torch": torch.__version__,
        },
    }
    _warm_up()
    curves: dict[str, dict[str, list]] = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    one_input = data.train.tensors[0][:1]
    for method in methods:
        setting = settings[method]
        # A fresh loader per method: every method sees the same batches.
        train_loader, test_loader = make_loaders(
            data,
            local_batch,
            test_batch_size=_EVAL_BATCH_SIZE,
            seed=seed,
            num_replicas=processes,
            rank=rank,
        )
        curve = {key: [] for key in CURVES}
        records = fit_method(
            method,
            model,
            train_loader,
            num_classes=data.num_classes,
            num_epochs=epochs,
            lr=setting.lr,
            num_samples=setting.samples,
            seed=seed,
            device=device,
            network_kwargs=setting.network_kwargs,
            guide=guide,
            optimizer=optimizer,
            prior=setting.prior,
            init_loc_fn=setting.init_loc_fn() if paper else None,
            init_scale=paper.init_scale if paper else _QUICK_INIT_SCALE,
            steps_per_epoch=steps_per_epoch,
            warmup_steps=setting.warmup_steps,
            elbo=setting.elbo,
            reduction=setting.reduction or None,
            backend=backend,
            distributed=processes > 1,
        )
        bar = tqdm(
            total=epochs, desc=f"{method:>9}", unit="epoch", disable=not progress or rank != 0
        )
        with bar:
            for record in records:
                if record.epoch % eval_every == 0 or record.epoch == epochs:
                    scores = _evaluate(record, test_loader, setting.samples, device)
                    for key, value in [
                        ("epoch", record.epoch),
                        *scores.items(),
                        ("seconds", record.seconds),
                    ]:
                        curve[key].append(value)
                    bar.set_postfix(
                        acc=f"{scores['accuracy']:.4f}",
                        pruned=f"{scores['pruned_fraction']:.3f}",
                        refresh=False,
                    )
                if record.epoch == epochs:
                    weights[method] = _final_weights(record, one_input, device)
                bar.update()
        curves[method] = curve
    return Comparison({"config": config, "methods": curves}, weights)


def _method_settings(
    method: str,
    paper: Preset | None,
    lr: float | None,
    samples: int | None,
    warmup_steps: int | None,
    network_kwargs: dict[str, Any],
    reduction: Mapping[str, Any] | None = None,
) -> MethodSettings:
    """One method's settings: the preset's, with the explicit options over them."""
    if paper is None:
        base = MethodSettings(
            DEFAULTS["lr"],
            method_prior(method),
            samples=DEFAULTS["samples"],
            reduction=rhs_settings() if method == "bmr-rhs" else {},
        )
    else:
        base = paper.settings(method)
    return dataclasses.replace(
        base,
        lr=base.lr if lr is None else float(lr),
        # a point-mass guide predicts the same with any number of samples
        samples=1 if method == "flat-map" else base.samples if samples is None else samples,
        warmup_steps=base.warmup_steps
        if warmup_steps is None or method not in PRUNING_METHODS
        else warmup_steps,
        network_kwargs={**network_kwargs, **base.network_kwargs},
        reduction=rhs_settings(**{**base.reduction, **(reduction or {})})
        if method == "bmr-rhs"
        else {},
    )


def _padded(data: DatasetSplits, pad: int) -> DatasetSplits:
    """``data`` with ``pad`` zeros around every image, unless it already has the size."""
    height = data.input_shape[-1]
    if height >= 32:
        return data

    def grow(split: TensorDataset) -> TensorDataset:
        x, *rest = split.tensors
        return TensorDataset(torch.nn.functional.pad(x, (pad,) * 4), *rest)

    shape = (*data.input_shape[:-2], *(n + 2 * pad for n in data.input_shape[-2:]))
    return dataclasses.replace(
        data, train=grow(data.train), test=grow(data.test), input_shape=shape
    )


def _first_layer_image(
    weight: torch.Tensor, input_shape: Sequence[int]
) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """The first layer as ``(out, in)`` rows and the image shape of one row."""
    if weight.dim() > 2:  # a convolution kernel: one image per filter
        return weight.reshape(weight.shape[0], -1), tuple(weight.shape[1:])
    if math.prod(input_shape) == weight.shape[1]:
        return weight, tuple(input_shape)
    side = math.isqrt(weight.shape[1])
    return weight, (side, side) if side * side == weight.shape[1] else (1, weight.shape[1])


def write_outputs(
    results: Mapping[str, Any],
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
) -> dict[str, Path]:
    """Write ``results.json`` and the four figures into ``out_dir`` (created if needed).

    * ``results.json`` -- ``results`` as JSON;
    * ``metrics.png`` -- accuracy, ECE and NLL against epoch (the paper's Fig. 1);
    * ``pruned_fraction.png`` -- pruned fraction against epoch (Fig. 2);
    * ``weight_cdf.png`` -- per layer, the CDF of the absolute posterior means (Fig. 3);
    * ``first_layer.png`` -- the first layer's posterior means as images (Fig. 4),
      of ``bmr`` if it ran, else of the last method.

    :param results: the ``results`` of :func:`run_comparison`.
    :param weights: the ``weights`` of :func:`run_comparison`.
    :param out_dir: output directory.
    :returns: the written paths by file name (:data:`OUTPUT_FILES`).
    :raises ValueError: if ``results`` or ``weights`` hold no method.
    """
    # Imported here: matplotlib takes seconds to import, and only the figures need it.
    from .plots import plot_first_layer, plot_metrics, plot_pruned_fraction, plot_weight_cdf

    if not results.get("methods") or not weights:
        raise ValueError("results and weights must hold at least one method")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = results.get("config", {})
    title = f"{config.get('dataset', '?')}, {config.get('model', '?')}"
    paths = {name: out / name for name in OUTPUT_FILES}
    paths["results.json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_metrics(results["methods"], paths["metrics.png"], title=title)
    plot_pruned_fraction(results["methods"], paths["pruned_fraction.png"], title=title)
    plot_weight_cdf(weights, paths["weight_cdf.png"], title=title)
    method = "bmr" if "bmr" in weights else list(weights)[-1]
    layer, first = next(iter(weights[method].items()))
    rows, image_shape = _first_layer_image(first, config.get("input_shape", ()))
    zeros = float((rows == 0).double().mean())
    plot_first_layer(
        rows,
        paths["first_layer.png"],
        image_shape,
        title=f"{method}, {layer}: {rows.shape[0]} units, {zeros:.1%} of weights zero",
    )
    return paths


def format_table(results: Mapping[str, Any]) -> str:
    """The last evaluation of every method as a plain-text table.

    Columns: method, test accuracy, NLL (nats), ECE, pruned fraction over all random
    parameters and over the non-output layers (``hidden``, the paper's measure), and
    mean training seconds per epoch.
    """
    header = ("method", "accuracy", "NLL", "ECE", "pruned", "hidden", "s/epoch")
    rows = [header]
    for method, curve in results["methods"].items():
        seconds = curve["seconds"]
        rows.append(
            (
                method,
                f"{curve['accuracy'][-1]:.4f}",
                f"{curve['nll'][-1]:.4f}",
                f"{curve['ece'][-1]:.4f}",
                f"{curve['pruned_fraction'][-1]:.4f}",
                f"{curve['pruned_hidden'][-1]:.4f}",
                f"{sum(seconds) / len(seconds):.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        return "  ".join([first, *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])
