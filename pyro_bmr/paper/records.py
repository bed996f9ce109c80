"""What :func:`~pyro_bmr.paper.methods.fit_method` yields after every epoch."""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pyro.infer.autoguide import AutoDelta, AutoGuide

from pyro_bmr import BayesianModelReduction
from pyro_bmr.distributed import set_sampler_epoch
from pyro_bmr.horseshoe_reduction import HorseshoeReduction
from pyro_bmr.nn import BayesianClassifier, posterior_means, predict_proba
from pyro_bmr.report import Sparsity

__all__ = ["EpochRecord"]


class _OnDevice:
    """A re-iterable view of a loader whose tensors are moved to ``device``."""

    def __init__(self, loader: Iterable, device: torch.device | None) -> None:
        self.loader = loader
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        for batch in self.loader:
            yield tuple(
                t.to(self.device) if self.device is not None else t for t in _as_tuple(batch)
            )


class _Passes:
    """A re-iterable view of a loader that gives its sampler, if it has
    ``set_epoch`` (a ``DistributedSampler``), the number of each pass: its order
    would repeat at every pass otherwise."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.passes = 0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        set_sampler_epoch(self.loader, self.passes)
        self.passes += 1
        return iter(self.loader)


def _as_tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


@dataclass
class EpochRecord:
    """The state of one method after one epoch of training.

    ``model`` and ``guide`` are the live objects being trained and the guide's
    parameters live in Pyro's global param store: read a record (predict, take
    weight means) before the generator of :func:`fit_method` advances or another
    method starts.

    :ivar str method: the method's name.
    :ivar int epoch: the epoch just finished, counting from 1.
    :ivar float seconds: wall-clock seconds of the epoch's training (including, for
        ``bmr`` and ``bmr-rhs``, the reduction that starts it; excluding anything
        done with the record).
    :ivar float loss: mean over the epoch's steps of the minibatch ELBO loss,
        which is scaled to the data set size.
    :ivar BayesianClassifier model: the model.
    :ivar AutoGuide guide: its fitted guide.
    :ivar bmr: the reduction handler: a :class:`~pyro_bmr.BayesianModelReduction`
        (``bmr``) or a :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction`
        (``bmr-rhs``); ``None`` for the methods that do not prune.
    :ivar sparsity: pruned fractions of the model evaluated after this epoch, i.e.
        after the reductions of the earlier epochs (``bmr`` and ``bmr-rhs`` only;
        zero after the first epoch).
    :ivar int num_samples: default number of posterior samples for predictions.
    """

    method: str
    epoch: int
    seconds: float
    loss: float
    model: BayesianClassifier
    guide: AutoGuide
    bmr: BayesianModelReduction | HorseshoeReduction | None = None
    sparsity: Sparsity | None = None
    num_samples: int = 100

    def reduced(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """The model and guide to predict with: ``bmr(model), bmr(guide)`` for the
        methods that prune."""
        if self.bmr is None:
            return self.model, self.guide
        return self.bmr(self.model), self.bmr(self.guide)

    def _device(self) -> torch.device:
        return next(iter(self.model.buffers())).device

    def _samples(self, num_samples: int | None) -> int:
        # A point-mass guide gives the same prediction every time.
        if isinstance(self.guide, AutoDelta):
            return 1
        return self.num_samples if num_samples is None else num_samples

    def predict_proba(self, x: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Posterior-predictive class probabilities ``(N, C)`` for inputs ``x``.

        :param torch.Tensor x: inputs; moved to the model's device.
        :param int num_samples: guide samples (default :attr:`num_samples`; one for
            ``flat-map``, whose guide is a point mass).
        """
        model, guide = self.reduced()
        return predict_proba(model, guide, x.to(self._device()), self._samples(num_samples))

    def predict_loader(
        self, loader: Iterable, num_samples: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and targets over a loader of ``(x, y)`` batches.

        :returns: ``(probs, targets)`` of shapes ``(N, C)`` and ``(N,)``, concatenated
            over the batches, on the model's device.
        """
        probs, targets = [], []
        for x, y in _OnDevice(loader, self._device()):
            probs.append(self.predict_proba(x, num_samples))
            targets.append(y)
        return torch.cat(probs), torch.cat(targets)

    def weight_means(
        self, x: torch.Tensor, num_samples: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Posterior means of the network's parameters by site (zeros where pruned).

        :param torch.Tensor x: a batch of inputs for one model call (one example
            suffices).
        """
        model, guide = self.reduced()
        return posterior_means(
            model,
            guide,
            x.to(self._device()),
            sites=self.model.random_sites(),
            num_samples=self._samples(num_samples),
        )
