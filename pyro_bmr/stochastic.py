"""Stochastic BMR: variational epochs interleaved with Bayesian model reduction."""

import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from pyro.optim import PyroOptim
from tqdm.auto import tqdm

from pyro_bmr import _checkpoint, _pyro_compat
from pyro_bmr._checkpoint import CheckpointError
from pyro_bmr.compiled_elbo import CompiledTrace_ELBO
from pyro_bmr.distributed import (
    DataParallelOptimizer,
    mean_over_ranks,
    set_sampler_epoch,
    synchronize_reduction,
    world,
)
from pyro_bmr.reduction import BayesianModelReduction
from pyro_bmr.report import ReductionReport
from pyro_bmr.rules import PruningRule

__all__ = ["CheckpointError", "StochasticBMR"]

Batch = tuple | list | dict[str, Any] | torch.Tensor


def _split(batch: Batch) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


class StochasticBMR:
    """The training scheme of Marković, Friston & Kiebel (2024): fit the model by
    SVI for ``reduce_every`` epochs, prune by :meth:`BayesianModelReduction.reduce`,
    and repeat, so that pruned weights stay exactly zero in the model and the guide
    for the rest of training.

    Any Pyro ELBO works (``Trace_ELBO``, ``TraceMeanField_ELBO``, ``TraceGraph_ELBO``,
    ``RenyiELBO``, ``JitTrace_ELBO``, ...); the default,
    :class:`~pyro_bmr.compiled_elbo.CompiledTrace_ELBO`, is ``Trace_ELBO`` with its
    step captured and compiled once per model structure (and again after every
    reduction), falling back to the plain ELBO where that fails; its replays do not
    run the model's Python, so give a model with per-step side effects in Python
    (counters, annealing schedules kept in globals) ``loss=Trace_ELBO()`` (see
    :doc:`/howto/objectives`). Any Pyro optimiser works, and through it any
    ``torch.optim`` optimiser (``pyro.optim.PyroOptim(torch.optim.SGD, {"lr":
    1e-2})``). Prefer torch's fused Adam (``pyro.optim.Adam({"lr": 1e-3, "fused":
    True})``): the default one slows down on the exactly-zero gradients of pruned
    elements (see :doc:`/howto/gpu`).

    In a ``torch.distributed`` process group of more than one process (started by
    ``torchrun``), it trains data-parallel (see :doc:`/howto/distributed`): the
    optimiser becomes a :class:`~pyro_bmr.distributed.DataParallelOptimizer`, which
    averages each step's gradients across the ranks, every rank reduces and then
    takes rank 0's masks and parameters (:func:`~pyro_bmr.distributed.synchronize_reduction`),
    and only rank 0 shows progress and writes checkpoints. Every rank must build the
    same model and guide with the same seed and pass its own shard of the data.

    :meth:`save_checkpoint` and :meth:`load_checkpoint` (or ``fit(...,
    checkpoint=path)``, after every epoch) save and resume a run: parameters,
    optimiser state, masks, epochs, history and random generators.

    :param model: a Pyro model with Gaussian priors.
    :param guide: its mean-field Gaussian guide (e.g. ``AutoNormal(model)``).
    :param optim: a Pyro optimiser (:class:`~pyro.optim.PyroOptim`).
    :param loss: the ELBO; default
        :class:`~pyro_bmr.compiled_elbo.CompiledTrace_ELBO`.
    :param PruningRule rule: the rule of a new handler (default threshold at 0).
    :param BayesianModelReduction bmr: an existing handler to use instead.
    :param int reduce_every: epochs between reductions.
    :param bool distributed: train data-parallel across the processes of the default
        process group; default: where one of more than one process is initialised.
        (For another group, pass ``optim`` as a
        :class:`~pyro_bmr.distributed.DataParallelOptimizer` of it.)
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: PyroOptim,
        loss: ELBO | None = None,
        *,
        rule: PruningRule | None = None,
        bmr: BayesianModelReduction | None = None,
        reduce_every: int = 1,
        distributed: bool | None = None,
    ) -> None:
        if bmr is not None and rule is not None:
            raise ValueError("pass either rule or bmr, not both (bmr carries its own rule)")
        if int(reduce_every) < 1:
            raise ValueError(
                f"reduce_every must be a positive number of epochs, got {reduce_every}"
            )
        loss = CompiledTrace_ELBO() if loss is None else loss
        if not isinstance(loss, ELBO):
            raise TypeError(f"loss must be a Pyro ELBO, got {type(loss).__name__}")
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                "optim must be a Pyro optimiser, e.g. pyro.optim.Adam({'lr': 1e-3}) or "
                f"pyro.optim.PyroOptim(torch.optim.SGD, {{'lr': 1e-2}}), got {optim!r}"
            )
        optim = _data_parallel(optim, distributed)
        self.bmr = bmr if bmr is not None else BayesianModelReduction(guide, rule, model=model)
        self.model, self.guide, self.loss = model, guide, loss
        self.reduce_every = int(reduce_every)
        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        #: whether the run is data-parallel (the optimiser averages across ranks)
        self.distributed = isinstance(optim, DataParallelOptimizer)
        self._group = optim.group if self.distributed else None
        self._svi = SVI(self.bmr(model), self.bmr(guide), optim, loss)
        self._resume: tuple[Path, dict[str, Any]] | None = None  # loaded, not yet applied
        self._cuda_rng: torch.Tensor | None = None  # likewise

    @property
    def optim(self) -> PyroOptim:
        """The optimiser the steps take (a
        :class:`~pyro_bmr.distributed.DataParallelOptimizer` in a data-parallel run)."""
        return self._svi.optim

    def step(self, *args, **kwargs) -> float:
        """One gradient step on the reduced model; returns the loss (this rank's, in a
        data-parallel run)."""
        if self._resume is not None:
            self._finish_resume(args, kwargs)
        return float(self._svi.step(*args, **kwargs))

    def reduce(self, *args, **kwargs) -> ReductionReport:
        """Prune by BMR now (see :meth:`BayesianModelReduction.reduce`), leaving the
        random generators as they were; in a data-parallel run every rank must call
        it, and ends with rank 0's masks and parameters."""
        if self._resume is not None:
            self._finish_resume(args, kwargs)
        # the reduction draws nothing from the training's generators (finding the sites
        # traces the model, a fitted horseshoe runs SVI), so that the training's draws
        # do not depend on when the handler was built: a resumed run's is new
        with _checkpoint.generators_kept():
            report = self.bmr.reduce(*args, **kwargs)
        if self.distributed:
            synchronize_reduction(self.bmr, group=self._group)
        _pyro_compat.forget_compiled(self.loss)
        return report

    def fit(
        self,
        data: Iterable[Batch] | Callable[[], Batch],
        num_epochs: int = 1,
        *,
        steps_per_epoch: int | None = None,
        progress: bool = True,
        callback: Callable[[int, "StochasticBMR"], Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> list[dict[str, Any]]:
        """Train for ``num_epochs`` epochs, reducing every ``reduce_every`` epochs.

        :param data: an iterable of batches re-read every epoch (a ``DataLoader``),
            or a callable returning one batch. A tuple batch is passed as
            ``model(*batch)``, a dict as ``model(**batch)``, anything else as
            ``model(batch)``.
            A sampler with ``set_epoch`` (``DistributedSampler``) is given each epoch's
            number first (:func:`~pyro_bmr.distributed.set_sampler_epoch`), so the
            order of the data is the same in a resumed run.
        :param int num_epochs: number of epochs.
        :param int steps_per_epoch: steps per epoch; required when ``data`` is a
            callable, and caps the epoch otherwise.
        :param bool progress: show a progress bar with loss and sparsity (on rank 0).
        :param callback: called as ``callback(epoch, self)`` after each epoch.
        :param checkpoint: a file to :meth:`save_checkpoint` to after every epoch,
            before ``callback`` (replaced atomically; rank 0 writes it).
        :returns: :attr:`history`, one record per reduction: ``epoch``, ``loss`` (mean
            over the epoch, and over the ranks), ``pruned_fraction`` (per site),
            ``total_pruned_fraction``, ``num_pruned`` and ``total_delta_f``.
        """
        if int(num_epochs) < 0:
            raise ValueError(f"num_epochs must be non-negative, got {num_epochs}")
        from_callable = callable(data) and not hasattr(data, "__iter__")
        if from_callable and steps_per_epoch is None:
            raise ValueError("steps_per_epoch is required when data is a callable")
        if from_callable and inspect.signature(data).parameters:
            raise TypeError("a data callable must take no arguments and return one batch")
        total = steps_per_epoch
        if total is None and hasattr(data, "__len__"):
            total = len(data)
        bar = tqdm(
            total=None if total is None else total * int(num_epochs),
            disable=not progress or world(self._group)[0] != 0,
            unit="step",
            dynamic_ncols=True,
        )
        first_epoch = self.epochs_done
        with bar:
            for epoch in range(first_epoch, first_epoch + int(num_epochs)):
                losses, batch = [], None
                if not from_callable:
                    set_sampler_epoch(data, epoch)
                batches = _calls(data, steps_per_epoch) if from_callable else data
                for i, batch in enumerate(batches):
                    if steps_per_epoch is not None and i >= steps_per_epoch:
                        break
                    args, kwargs = _split(batch)
                    losses.append(self.step(*args, **kwargs))
                    bar.update()
                    if len(losses) % 10 == 1:
                        bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4g}", refresh=False)
                if batch is None:
                    raise ValueError(f"data yielded no batch in epoch {epoch}")
                if (epoch + 1) % self.reduce_every == 0:
                    args, kwargs = _split(batch)
                    report = self.reduce(*args, **kwargs)
                    sparsity = self.bmr.sparsity()
                    loss = sum(losses) / len(losses)
                    if self.distributed:
                        loss = mean_over_ranks(loss, self._group)
                    self.history.append(
                        {
                            "epoch": epoch,
                            "loss": loss,
                            "pruned_fraction": sparsity.per_site,
                            "total_pruned_fraction": sparsity.total,
                            "num_pruned": report.num_pruned,
                            "total_delta_f": report.total_delta_f,
                        }
                    )
                    bar.set_postfix(
                        epoch=epoch, loss=f"{loss:.4g}", pruned=f"{100 * sparsity.total:.1f}%"
                    )
                self.epochs_done = epoch + 1
                if checkpoint is not None:
                    self.save_checkpoint(checkpoint)
                if callback is not None:
                    callback(epoch, self)
        return self.history

    def save_checkpoint(self, path: str | os.PathLike) -> Path | None:
        """Save the run to ``path``, atomically (a temporary file renamed over it).

        The file holds Pyro's param store (unconstrained values by name), the
        optimiser's state (``get_state``), the handler's ``state_dict`` (the masks),
        :attr:`epochs_done`, :attr:`history`, and the random generators (torch's on
        the CPU and on the parameters' CUDA device, Python's, NumPy's): tensors and
        plain values only, so ``torch.load(path, weights_only=True)`` reads it. In a
        data-parallel run only rank 0 writes (every rank holds the same state).

        :returns: the path written, or ``None`` on the other ranks.
        """
        if world(self._group)[0] != 0:
            return None
        state = {
            "format": _checkpoint.FORMAT,
            "version": _checkpoint.VERSION,
            "epochs_done": self.epochs_done,
            "history": self.history,
            "reduce_every": self.reduce_every,
            "world_size": world(self._group)[1],
            "params": _checkpoint.store_state(),
            "optim": self.optim.get_state(),
            "bmr": self.bmr.state_dict(),
            "rng": _checkpoint.rng_state(_checkpoint.rng_device()),
        }
        return _checkpoint.write(state, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume the run saved by :meth:`save_checkpoint`, with any number of
        processes: then :meth:`fit` goes on from epoch :attr:`epochs_done`.

        Call it on a trainer built like the one that saved (same model, guide,
        optimiser and rule), on every rank. :attr:`epochs_done`, :attr:`history` and
        the random generators (torch's CUDA one on the parameters' device, else the
        current device) are restored at once; the parameters, the optimiser's state
        and the masks as soon as the guide's parameters exist: at once if they do,
        else at the first :meth:`step` or :meth:`reduce`, which first runs the guide
        and the model once to create them, without moving the generators, so that
        the draws (and a shuffling ``DataLoader``'s order) continue as in the saved
        run.

        :raises FileNotFoundError: if there is no file at ``path``.
        :raises CheckpointError: (a ``ValueError``) naming the file, for one that is
            not a checkpoint, or whose parameters or masks do not fit the model.
        """
        state = _checkpoint.read(path)
        self.epochs_done = state["epochs_done"]
        self.history = list(state["history"])
        self._resume = (Path(path), state)
        if not _checkpoint.missing_from_store(state["params"]):
            self._restore()
        # at once: a data loader draws its order from them before the first step
        device = _checkpoint.rng_device()
        _checkpoint.set_rng_state(state["rng"], device)
        # CUDA unused so far: its generator waits for the parameters' device
        self._cuda_rng = state["rng"].get("cuda") if device is None else None

    def _finish_resume(self, args: tuple, kwargs: dict) -> None:
        """Create the parameters by running the guide and the model once, without
        moving the random generators restored by :meth:`load_checkpoint`, then
        restore the rest."""
        with _checkpoint.generators_kept(), poutine.block():
            trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
            poutine.replay(self.model, trace=trace)(*args, **kwargs)
        device = _checkpoint.rng_device()
        if self._cuda_rng is not None and device is not None:
            torch.cuda.set_rng_state(self._cuda_rng, device)
        self._cuda_rng = None
        self._restore()

    def _restore(self) -> None:
        path, state = self._resume
        self._resume = None
        _checkpoint.load_store(state["params"], path)
        try:
            self.bmr.load_state_dict(state["bmr"])
        except ValueError as error:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: its masks do not fit the model: {error}"
            ) from error
        optim = self.optim
        # new torch optimisers, built with the saved state when each parameter is seen
        optim.optim_objs.clear()
        optim.grad_clip.clear()
        optim.set_state(state["optim"])


def _data_parallel(optim: PyroOptim, distributed: bool | None) -> PyroOptim:
    """``optim``, wrapped to average the gradients across ranks where asked."""
    if isinstance(optim, DataParallelOptimizer):
        if distributed is False:
            raise ValueError("distributed=False, but optim is a DataParallelOptimizer")
        return optim
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not initialised:
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: start "
            "the processes with torchrun and call pyro_bmr.distributed.init_from_environment() "
            "(or torch.distributed.init_process_group) first"
        )
    if distributed is None:
        distributed = world()[1] > 1
    return DataParallelOptimizer(optim) if distributed else optim


def _calls(make_batch: Callable[[], Batch], steps: int) -> Iterable[Batch]:
    for _ in range(steps):
        yield make_batch()
