"""The four methods of Marković, Friston & Kiebel (2023) as one code path.

* ``flat-map`` -- :class:`~pyro_bmr.nn.GaussianPrior` (scale 1) and an
  ``AutoDelta`` guide (MAP);
* ``flat-ff`` -- :class:`~pyro_bmr.nn.GaussianPrior` (scale 1) and an
  ``AutoNormal`` guide;
* ``tiered-ff`` -- :class:`~pyro_bmr.nn.HorseshoePrior` (regularised
  horseshoe) and ``AutoNormal`` over every latent site;
* ``bmr`` -- :class:`~pyro_bmr.nn.LayerScalePrior` (precision
  :math:`c^{-2} \\sim \\mathrm{Gamma}(2, 2)` per layer) and ``AutoNormal``,
  trained by :class:`~pyro_bmr.StochasticBMR` and reduced between epochs by
  :func:`bmr_rule`: the authors' spike-and-slab rule, with one sparsity per layer
  (its weight and bias together), 4 fixed-point iterations, and the output layer
  never pruned.

Beyond the paper's four, :data:`EXTRA_METHODS` holds ``bmr-rhs``: the model, prior
and training of ``bmr``, reduced between epochs by a regularised horseshoe fitted
post hoc (:class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction`, the authors'
``prune_regularised_horseshoe``), the output layer left alone.

No method but ``bmr`` and ``bmr-rhs`` prunes. Every epoch is train → evaluate →
prune, in the authors' order: a record is yielded after an epoch's training, and ``bmr`` prunes
when the next epoch starts, so every record describes a model re-fitted after its
last pruning, and there is no pruning after the last epoch.

:func:`fit_method` trains one method and yields an :class:`EpochRecord` after
every epoch. Metrics are left to :mod:`pyro_bmr.paper.metrics`; a record gives what
they need through :meth:`EpochRecord.predict_proba` and
:meth:`EpochRecord.predict_loader`.
"""

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import pyro
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDelta
from pyro.optim import Adam, PyroOptim
from tqdm.auto import tqdm

from pyro_bmr import PruningRule, SpikeAndSlabRule, StochasticBMR
from pyro_bmr.compiled_elbo import BACKENDS, CompiledTrace_ELBO, CompiledTraceMeanField_ELBO
from pyro_bmr.distributed import DataParallelOptimizer, mean_over_ranks, world
from pyro_bmr.guides import GUIDES, make_guide
from pyro_bmr.horseshoe_reduction import HorseshoeReduction
from pyro_bmr.nn import (
    BayesianClassifier,
    GaussianPrior,
    HorseshoePrior,
    LayerScalePrior,
    Predicate,
    Prior,
)

from .networks import build_network
from .networks.zoo import check_network_name
from .records import EpochRecord, _as_tuple, _OnDevice, _Passes

__all__ = [
    "ELBOS",
    "EXTRA_METHODS",
    "METHODS",
    "OPTIMIZERS",
    "EpochRecord",
    "bmr_rule",
    "fit_method",
    "method_prior",
    "rhs_reduction",
]

#: Names of the methods, in the order of the paper's comparison.
METHODS = ("flat-map", "flat-ff", "tiered-ff", "bmr")

#: Methods beyond the paper's four, which :func:`fit_method` and the comparison
#: run when asked: ``bmr-rhs``, BMR with a regularised-horseshoe reduced prior.
EXTRA_METHODS = ("bmr-rhs",)

#: The methods that prune between epochs.
PRUNING_METHODS = ("bmr", "bmr-rhs")

#: The optimisers :func:`fit_method` can train with.
OPTIMIZERS = ("adam", "adabelief")

#: The ELBOs :func:`fit_method` can train on: ``Trace_ELBO`` and ``TraceMeanField_ELBO``.
ELBOS = ("trace", "mean-field")


def _check_method(method: str) -> None:
    if method not in METHODS + EXTRA_METHODS:
        choices = ", ".join(METHODS + EXTRA_METHODS)
        raise ValueError(f"unknown method {method!r}; choose one of {choices}")


def method_prior(method: str) -> Prior:
    """The prior a method puts on the network's parameters (``bmr-rhs``: that of ``bmr``).

    :raises ValueError: if ``method`` is not in :data:`METHODS` or :data:`EXTRA_METHODS`.
    """
    _check_method(method)
    if method == "tiered-ff":
        return HorseshoePrior()
    if method in PRUNING_METHODS:
        return LayerScalePrior(concentration=2.0, rate=2.0)
    return GaussianPrior(scale=1.0)


def _layer(site: str) -> str:
    """The layer a parameter site belongs to: its name without the parameter."""
    return site.rsplit(".", 1)[0] if "." in site else site


def bmr_rule(model: BayesianClassifier) -> SpikeAndSlabRule:
    """The spike-and-slab rule of the authors' code for ``model``: one sparsity
    (:math:`\\zeta`) per layer, the layer's weight and bias together; 4 fixed-point
    iterations of a :math:`\\mathrm{Beta}(1, 1)` prior; the output layer (the last
    layer with random parameters) never pruned."""
    sites = model.random_sites()
    output = _layer(sites[-1]) if sites else None
    return SpikeAndSlabRule(
        num_iterations=4,
        groups=_layer,
        exclude=lambda site: _layer(site) == output,
    )


def rhs_reduction(
    model: BayesianClassifier, guide: Callable[..., Any], **options: Any
) -> HorseshoeReduction:
    """The reduction of ``bmr-rhs`` for ``model``: a
    :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction` of ``guide`` with one
    horseshoe per layer (its weight and bias sharing the rows), the output layer
    (the last layer with random parameters) left alone, and ``options`` over the
    authors' settings (:math:`\\tau_0 = 10^{-2}`, slab :math:`\\mathrm{Gamma}(2, 6)`,
    :math:`\\delta = 10^{-6}`, 5000 steps of 16 particles, learning rate
    :math:`10^{-2}`, 1000 draws)."""
    sites = model.random_sites()
    output = _layer(sites[-1]) if sites else None
    return HorseshoeReduction(
        guide,
        model=model,
        groups=_layer,
        exclude=lambda site: _layer(site) == output,
        **options,
    )


def _dataset_size(loader: Iterable, dataset_size: int | None) -> int:
    if dataset_size is not None:
        return dataset_size
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError("train_loader has no sized .dataset; pass dataset_size")
    return len(dataset)


def _input_shape(loader: Iterable, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError(
            "train_loader has no .dataset to read the input shape from; pass input_shape"
        )
    return tuple(_as_tuple(dataset[0])[0].shape)


def fit_method(
    method: str,
    network: str,
    train_loader: Iterable,
    *,
    num_classes: int,
    num_epochs: int,
    lr: float = 1e-3,
    num_samples: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    input_shape: Sequence[int] | None = None,
    dataset_size: int | None = None,
    network_kwargs: dict[str, Any] | None = None,
    predicate: Predicate | None = None,
    init_scale: float = 1e-2,
    progress: bool = False,
    guide: str = "auto",
    rule: Callable[[BayesianClassifier], PruningRule] | None = None,
    optimizer: str = "adam",
    prior: Prior | None = None,
    init_loc_fn: Callable[[dict], torch.Tensor] | None = None,
    steps_per_epoch: int | None = None,
    warmup_steps: int = 0,
    elbo: str = "trace",
    reduction: Mapping[str, Any] | None = None,
    backend: str | None = None,
    distributed: bool | None = None,
) -> Iterator[EpochRecord]:
    """Train one method and yield a record after every epoch.

    Clears Pyro's param store and seeds every generator with ``seed`` first, so the
    same arguments give bit-identical results on a CPU. The network is built with
    :func:`~pyro_bmr.paper.networks.build_network`, made Bayesian under
    :func:`method_prior` and fitted with Adam (fused, on CPU and CUDA) on the ELBO
    (``Trace_ELBO``, its step captured and compiled:
    :class:`~pyro_bmr.compiled_elbo.CompiledTrace_ELBO`); ``bmr`` trains through :class:`~pyro_bmr.StochasticBMR` with
    :func:`bmr_rule`, reducing at the start of every epoch after the first (so each
    record is of a model re-fitted after its last pruning); ``bmr-rhs`` the same way
    with :func:`rhs_reduction`.

    :param str method: one of :data:`METHODS` or :data:`EXTRA_METHODS`.
    :param str network: a network name for :func:`build_network`.
    :param train_loader: re-iterable batches ``(x, y)`` (a ``DataLoader``).
    :param int num_classes: number of classes.
    :param int num_epochs: number of epochs.
    :param float lr: Adam learning rate.
    :param int num_samples: default posterior samples of the records' predictions.
    :param int seed: random seed.
    :param device: where to train; batches are moved there. ``None`` keeps the
        network where it is built and the batches where they are.
    :param input_shape: shape of one input; default read from ``train_loader.dataset[0]``.
    :param int dataset_size: default ``len(train_loader.dataset)``.
    :param dict network_kwargs: extra arguments for the network's constructor.
    :param predicate: chooses the parameters that become random (default all).
    :param float init_scale: initial posterior standard deviation of ``AutoNormal``.
    :param bool progress: show a progress bar.
    :param str guide: the mean-field guide of the Gaussian methods, one of
        :data:`~pyro_bmr.guides.GUIDES`: ``"auto"`` (Pyro's ``AutoNormal``),
        ``"mean-field"`` (:class:`~pyro_bmr.guides.MeanFieldGuide`) or ``"local"``
        (the same with local reparameterisation). ``flat-map`` always uses
        ``AutoDelta``.
    :param rule: for ``bmr``, a function of the model returning the pruning rule;
        default :func:`bmr_rule`.
    :param str optimizer: ``"adam"`` (torch's fused Adam) or ``"adabelief"`` (the
        authors' optimiser, from ``pytorch-optimizer``, with Optax's defaults:
        betas 0.9 and 0.999, eps 1e-16, no rectification or weight decay).
    :param prior: the prior of the network's parameters (default
        :func:`method_prior`).
    :param init_loc_fn: where the guide's locations start, a Pyro initialisation
        function (the authors' mean-field guides use ``init_to_uniform(radius=2)``,
        their point-mass guide ``init_to_median(num_samples=15)``); default: the
        network's own initial weights and the priors' starting hyper-parameters.
    :param steps_per_epoch: optimisation steps per epoch, cycling through
        ``train_loader`` as needed (the authors' epochs are 500 steps on every data
        set); default one pass over the loader.
    :param int warmup_steps: ``bmr`` and ``bmr-rhs`` only: steps trained before the
        first reduction,
        which then starts the first epoch (the authors' warm-up); 0 trains the first
        epoch unreduced.
    :param str elbo: ``"trace"`` (Pyro's ``Trace_ELBO``) or ``"mean-field"``
        (``TraceMeanField_ELBO``, analytic KL terms where they exist; the authors'
        choice for Flat-MAP).
    :param str backend: how the ELBO's captured step runs, one of
        :data:`~pyro_bmr.compiled_elbo.BACKENDS` (``"eager"``: Pyro's plain ELBO);
        default from :data:`~pyro_bmr.compiled_elbo.ENV_VAR`, else ``"inductor"``.
    :param dict reduction: ``bmr-rhs`` only: options of its
        :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction` over the authors'
        (see :func:`rhs_reduction`), e.g. ``{"num_steps": 1000}``.
    :param bool distributed: train data-parallel across the processes of the
        initialised ``torch.distributed`` group (see :mod:`pyro_bmr.distributed`):
        every process calls this with the same arguments but its own shard of the
        data as ``train_loader`` (``make_loaders(..., num_replicas=, rank=)``; a
        sampler with ``set_epoch`` is given each pass's number), the gradients are
        averaged across them, the reductions made the same, a record's ``loss`` is
        the mean over them, and only rank 0 shows progress. Default: where a group
        of more than one process is initialised.
    :returns: a generator of :class:`EpochRecord` s; the param store is cleared and
        training starts when it is first advanced.
    :raises ValueError: at once, for an unknown method, network, guide, optimiser
        ELBO or backend, a negative count, warm-up asked of a method that does not prune,
        reduction options asked of another method than ``bmr-rhs`` or out of range,
        sizes that cannot be read from the loader, or ``distributed=True`` without a
        process group.
    """
    _check_method(method)
    check_network_name(network)
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; choose one of {', '.join(GUIDES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if elbo not in ELBOS:
        raise ValueError(f"unknown elbo {elbo!r}; choose one of {', '.join(ELBOS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _count("num_epochs", num_epochs)
    _count("warmup_steps", warmup_steps)
    if steps_per_epoch is not None and _count("steps_per_epoch", steps_per_epoch) == 0:
        raise ValueError("steps_per_epoch must be positive, got 0")
    if warmup_steps and method not in PRUNING_METHODS:
        raise ValueError(f"warmup_steps applies to bmr and bmr-rhs only, not to {method!r}")
    if reduction is not None and method != "bmr-rhs":
        raise ValueError(f"reduction options apply to bmr-rhs only, not to {method!r}")
    reduction = HorseshoeReduction.check_options(**(reduction or {}))
    if distributed and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group "
            "(pyro_bmr.distributed.init_from_environment() under torchrun)"
        )
    if init_loc_fn is not None and not callable(init_loc_fn):
        raise ValueError(f"init_loc_fn must be a Pyro initialisation function, got {init_loc_fn!r}")
    size = _dataset_size(train_loader, dataset_size)
    shape = _input_shape(train_loader, input_shape)
    return _epochs(
        method,
        network,
        train_loader,
        num_classes=num_classes,
        num_epochs=num_epochs,
        lr=lr,
        num_samples=num_samples,
        seed=seed,
        device=device,
        input_shape=shape,
        dataset_size=size,
        network_kwargs=network_kwargs,
        predicate=predicate,
        init_scale=init_scale,
        progress=progress,
        guide_kind=guide,
        rule=bmr_rule if rule is None else rule,
        optimizer=optimizer,
        prior=method_prior(method) if prior is None else prior,
        init_loc_fn=init_loc_fn,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps,
        elbo=elbo,
        reduction=reduction,
        backend=backend,
        distributed=world()[1] > 1 if distributed is None else bool(distributed),
    )


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _steps(loader: Iterable, count: int | None) -> Iterator[tuple]:
    """One epoch's batches: a pass over ``loader``, or ``count`` batches cycling it."""
    if count is None:
        yield from loader
        return
    done = 0
    while done < count:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            done += 1
            if done == count:
                return
        if empty:
            return


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _adam(lr: float, device: str | torch.device | None) -> Adam:
    """Adam, fused where torch has the kernel: besides being faster, it does not slow
    down on the exactly-zero gradients of pruned elements, where the for-loop Adam's
    square root is many times slower on CPU (``benchmarks/bench_handler.py``)."""
    where = torch.device(device) if device is not None else torch.get_default_device()
    return Adam({"lr": lr, "fused": True} if where.type in ("cpu", "cuda") else {"lr": lr})


def _adabelief(lr: float) -> PyroOptim:
    """AdaBelief (Zhuang et al. 2020), the authors' optimiser, with Optax's defaults."""
    from pytorch_optimizer import AdaBelief

    return PyroOptim(AdaBelief, {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-16})


def _epochs(
    method: str,
    network: str,
    train_loader: Iterable,
    *,
    num_classes: int,
    num_epochs: int,
    lr: float,
    num_samples: int,
    seed: int,
    device: str | torch.device | None,
    input_shape: tuple[int, ...],
    dataset_size: int,
    network_kwargs: dict[str, Any] | None,
    predicate: Predicate | None,
    init_scale: float,
    progress: bool,
    guide_kind: str,
    rule: Callable[[BayesianClassifier], PruningRule],
    optimizer: str,
    prior: Prior,
    init_loc_fn: Callable[[dict], torch.Tensor] | None,
    steps_per_epoch: int | None,
    warmup_steps: int,
    elbo: str,
    reduction: dict[str, Any],
    backend: str | None,
    distributed: bool,
) -> Iterator[EpochRecord]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    net = build_network(network, input_shape, num_classes, **(network_kwargs or {}))
    model = BayesianClassifier(net, dataset_size, prior, predicate)
    if device is not None:
        model = model.to(device)
    loader = _OnDevice(_Passes(train_loader), None if device is None else torch.device(device))
    init_loc_fn = model.init_loc_fn if init_loc_fn is None else init_loc_fn
    if method == "flat-map":
        guide, training = AutoDelta(model, init_loc_fn=init_loc_fn), nullcontext()
    else:
        guide, training = make_guide(
            model, guide_kind, init_loc_fn=init_loc_fn, init_scale=init_scale
        )
    optim = _adam(lr, device) if optimizer == "adam" else _adabelief(lr)
    if distributed:
        optim = DataParallelOptimizer(optim)
    elbo_class = CompiledTrace_ELBO if elbo == "trace" else CompiledTraceMeanField_ELBO
    loss_fn = elbo_class(backend=backend)
    if method == "bmr":
        trainer = StochasticBMR(
            model, guide, optim, loss_fn, rule=rule(model), distributed=distributed
        )
        step = trainer.step
    elif method == "bmr-rhs":
        bmr = rhs_reduction(model, guide, **reduction)
        trainer = StochasticBMR(model, guide, optim, loss_fn, bmr=bmr, distributed=distributed)
        step = trainer.step
    else:
        step = SVI(model, guide, optim, loss_fn).step

    batch = None
    warmup = warmup_steps
    for epoch in range(1, num_epochs + 1):
        start = time.perf_counter()
        model.train()  # dropout, where a network has it, in training only
        with training:
            if warmup:
                for batch in _steps(loader, warmup):
                    step(*batch)
                warmup = 0
            if method in PRUNING_METHODS and batch is not None:
                trainer.reduce(*batch)  # prune what the last epoch's record was evaluated on
            losses = []
            batches = _steps(loader, steps_per_epoch)
            for batch in tqdm(
                batches,
                total=steps_per_epoch or _length(loader),
                disable=not progress or world()[0] != 0,
                desc=f"{method} epoch {epoch}",
            ):
                losses.append(step(*batch))
            if not losses:
                raise ValueError("train_loader yielded no batch")
            loss = sum(losses) / len(losses)
            if distributed:
                loss = mean_over_ranks(loss)
        model.eval()
        seconds = time.perf_counter() - start
        bmr = trainer.bmr if method in PRUNING_METHODS else None
        yield EpochRecord(
            method=method,
            epoch=epoch,
            seconds=seconds,
            loss=float(loss),
            model=model,
            guide=guide,
            bmr=bmr,
            sparsity=None if bmr is None else bmr.sparsity(),
            num_samples=num_samples,
        )
