"""Stochastic BMR: variational epochs interleaved with Bayesian model reduction."""

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.infer import ELBO, SVI
from pyro.optim import PyroOptim
from tqdm.auto import tqdm

from pyro_bmr import _pyro_compat
from pyro_bmr.compiled_elbo import CompiledTrace_ELBO
from pyro_bmr.reduction import BayesianModelReduction
from pyro_bmr.report import ReductionReport
from pyro_bmr.rules import PruningRule

__all__ = ["StochasticBMR"]

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

    :param model: a Pyro model with Gaussian priors.
    :param guide: its mean-field Gaussian guide (e.g. ``AutoNormal(model)``).
    :param optim: a Pyro optimiser (:class:`~pyro.optim.PyroOptim`).
    :param loss: the ELBO; default
        :class:`~pyro_bmr.compiled_elbo.CompiledTrace_ELBO`.
    :param PruningRule rule: the rule of a new handler (default threshold at 0).
    :param BayesianModelReduction bmr: an existing handler to use instead.
    :param int reduce_every: epochs between reductions.
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
        self.bmr = bmr if bmr is not None else BayesianModelReduction(guide, rule, model=model)
        self.model, self.guide, self.loss = model, guide, loss
        self.reduce_every = int(reduce_every)
        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self._svi = SVI(self.bmr(model), self.bmr(guide), optim, loss)

    def step(self, *args, **kwargs) -> float:
        """One gradient step on the reduced model; returns the loss."""
        return float(self._svi.step(*args, **kwargs))

    def reduce(self, *args, **kwargs) -> ReductionReport:
        """Prune by BMR now (see :meth:`BayesianModelReduction.reduce`)."""
        report = self.bmr.reduce(*args, **kwargs)
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
    ) -> list[dict[str, Any]]:
        """Train for ``num_epochs`` epochs, reducing every ``reduce_every`` epochs.

        :param data: an iterable of batches re-read every epoch (a ``DataLoader``),
            or a callable returning one batch. A tuple batch is passed as
            ``model(*batch)``, a dict as ``model(**batch)``, anything else as
            ``model(batch)``.
        :param int num_epochs: number of epochs.
        :param int steps_per_epoch: steps per epoch; required when ``data`` is a
            callable, and caps the epoch otherwise.
        :param bool progress: show a progress bar with loss and sparsity.
        :param callback: called as ``callback(epoch, self)`` after each epoch.
        :returns: :attr:`history`, one record per reduction: ``epoch``, ``loss`` (mean
            over the epoch), ``pruned_fraction`` (per site), ``total_pruned_fraction``,
            ``num_pruned`` and ``total_delta_f``.
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
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
        )
        first_epoch = self.epochs_done
        with bar:
            for epoch in range(first_epoch, first_epoch + int(num_epochs)):
                losses, batch = [], None
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
                    self.history.append(
                        {
                            "epoch": epoch,
                            "loss": sum(losses) / len(losses),
                            "pruned_fraction": sparsity.per_site,
                            "total_pruned_fraction": sparsity.total,
                            "num_pruned": report.num_pruned,
                            "total_delta_f": report.total_delta_f,
                        }
                    )
                    bar.set_postfix(
                        epoch=epoch,
                        loss=f"{sum(losses) / len(losses):.4g}",
                        pruned=f"{100 * sparsity.total:.1f}%",
                    )
                self.epochs_done = epoch + 1
                if callback is not None:
                    callback(epoch, self)
        return self.history


def _calls(make_batch: Callable[[], Batch], steps: int) -> Iterable[Batch]:
    for _ in range(steps):
        yield make_batch()
