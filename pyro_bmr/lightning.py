"""Stochastic BMR in a PyTorch Lightning training loop.

Lightning trains a Pyro model through an ``ELBOModule`` (``Trace_ELBO()(model,
guide)``, as in Pyro's ``examples/svi_lightning.py``); :class:`BMRCallback` adds the
reductions of :class:`~pyro_bmr.StochasticBMR`: it runs the trainer's batches under
the handler, so that the module's ELBO sees the reduced model and guide, and prunes
at the end of every ``reduce_every``-th training epoch.

.. code-block:: python

    bmr = BayesianModelReduction(guide, SpikeAndSlabRule())
    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[BMRCallback(bmr)])
    trainer.fit(training_plan, train_dataloaders=loader)

Needs the ``lightning`` extra (``pip install "pyro-bmr[lightning]"``); nothing else
in ``pyro_bmr`` imports this module.
"""

from typing import Any

import lightning.pytorch as pl
from pyro.infer.elbo import ELBOModule

from pyro_bmr import _checkpoint, _pyro_compat
from pyro_bmr.distributed import is_distributed, synchronize_reduction
from pyro_bmr.report import ReductionReport
from pyro_bmr.stochastic import _split

__all__ = ["BMRCallback"]


class BMRCallback(pl.Callback):
    """Reduce by BMR at the end of every ``reduce_every``-th training epoch.

    The reduction is :meth:`BayesianModelReduction.reduce
    <pyro_bmr.BayesianModelReduction.reduce>` with the arguments of the epoch's last
    training batch (a tuple batch as ``model(*batch)``, a dict as ``model(**batch)``),
    run without moving the random generators. Then every JIT or captured ELBO of the
    module's ``ELBOModule`` s forgets its compiled graphs (they baked in the old
    masks), and under a data-parallel strategy every rank takes rank 0's masks and
    the module's parameters (:func:`~pyro_bmr.distributed.synchronize_reduction`).
    ``pruned_fraction`` is logged, and :attr:`history` keeps one record per
    reduction, as :class:`~pyro_bmr.StochasticBMR`'s. Lightning validates before an
    epoch ends, so each epoch is train → validate → prune, the authors' order. The
    masks and the history are the callback's state in Lightning's checkpoints.

    :param bmr: the handler (:class:`~pyro_bmr.BayesianModelReduction`, or a
        :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction`), built on the
        module's guide.
    :param int reduce_every: training epochs between reductions.
    :param bool apply_masks: run every training, validation, test and prediction
        batch inside ``with bmr:``, so that the module computes with the reduced
        model; ``False`` if the module applies the handler itself.
    :raises ValueError: for a ``reduce_every`` below 1.
    """

    def __init__(self, bmr: Any, reduce_every: int = 1, *, apply_masks: bool = True) -> None:
        super().__init__()
        if isinstance(reduce_every, bool) or int(reduce_every) != reduce_every or reduce_every < 1:
            raise ValueError(
                f"reduce_every must be a positive number of epochs, got {reduce_every!r}"
            )
        self.bmr = bmr
        self.reduce_every = int(reduce_every)
        self.apply_masks = bool(apply_masks)
        #: one record per reduction: ``epoch``, ``pruned_fraction`` (per site),
        #: ``total_pruned_fraction``, ``num_pruned`` and ``total_delta_f``
        self.history: list[dict[str, Any]] = []
        self._batch: Any = None
        self._entered = False

    # -- the masks around each batch ---------------------------------------------------

    def _enter(self) -> None:
        if self.apply_masks and not self._entered:
            self.bmr.__enter__()
            self._entered = True

    def _exit(self) -> None:
        if self._entered:
            self._entered = False
            self.bmr.__exit__(None, None, None)

    def on_train_batch_start(self, *_: Any, **__: Any) -> None:
        self._enter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._exit()
        self._batch = batch  # the arguments of the reduction at the epoch's end

    def _after_batch(self, *_: Any, **__: Any) -> None:
        self._exit()

    # validation, tests and predictions run the reduced model too
    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = on_train_batch_start
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _after_batch

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._exit()

    # -- the reduction -----------------------------------------------------------------

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.reduce_every or self._batch is None:
            return
        report = self.reduce(pl_module, self._batch)
        sparsity = self.bmr.sparsity()
        self.history.append(
            {
                "epoch": epoch,
                "pruned_fraction": sparsity.per_site,
                "total_pruned_fraction": sparsity.total,
                "num_pruned": report.num_pruned,
                "total_delta_f": report.total_delta_f,
            }
        )
        pl_module.log("pruned_fraction", sparsity.total, rank_zero_only=True)

    def reduce(self, pl_module: pl.LightningModule, batch: Any) -> ReductionReport:
        """Reduce now, with the model's arguments in ``batch``, as at an epoch's end."""
        args, kwargs = _split(batch)
        with _checkpoint.generators_kept():
            report = self.bmr.reduce(*args, **kwargs)
        if is_distributed():
            synchronize_reduction(self.bmr, parameters=pl_module.named_parameters())
        for module in pl_module.modules():
            if isinstance(module, ELBOModule):
                _pyro_compat.forget_compiled(module.elbo)
                if callable(getattr(module.elbo, "forget", None)):  # a captured ELBO
                    module.elbo.forget()
        return report

    # -- Lightning's checkpoints -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"bmr": self.bmr.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bmr.load_state_dict(state_dict["bmr"])
        self.history = list(state_dict["history"])
