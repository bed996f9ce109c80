"""Evaluation metrics for classifiers with a posterior predictive distribution.

Every metric takes class probabilities ``probs`` of shape ``(N, C)`` (rows on the
probability simplex, e.g. from :func:`posterior_predictive`) and integer class
labels ``targets`` of shape ``(N,)``, and returns a Python ``float``. Computation
happens on the inputs' device, in their dtype or float32 where that is wider
(so half-precision inputs do not lose the means' precision).

Sparsity is the library's to measure: :func:`pyro_bmr.report.sparsity` of a
``{site name: BoolTensor}`` dictionary of masks gives the pruned fractions and, as
``.compression``, the compression ratio.
"""

import math
import time

import torch

__all__ = [
    "EpochTimer",
    "accuracy",
    "brier_score",
    "expected_calibration_error",
    "negative_log_likelihood",
    "posterior_predictive",
]


def _check_classification(probs: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(probs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"probs and targets must be torch.Tensors, got {type(probs).__name__} "
            f"and {type(targets).__name__}"
        )
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be a floating point tensor, got {probs.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"targets must have shape (N,), got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class labels, got {targets.dtype}")
    num, num_classes = probs.shape
    if targets.shape[0] != num:
        raise ValueError(
            f"probs and targets disagree on the number of examples: "
            f"probs has {num} rows, targets has {targets.shape[0]}"
        )
    if num == 0 or num_classes == 0:
        raise ValueError(f"probs must be non-empty, got shape {tuple(probs.shape)}")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    # Catches logits or log-probabilities passed by mistake; the tolerance allows
    # for rounding in low-precision dtypes.
    tol = max(1e-3, 10 * torch.finfo(probs.dtype).eps)
    row_sums = probs.sum(-1)
    if probs.min() < 0 or (row_sums - 1).abs().max() > tol or not torch.isfinite(row_sums).all():
        raise ValueError(
            "probs must be probabilities: non-negative rows that sum to 1 "
            f"(row sums lie in [{float(row_sums.min()):.4g}, {float(row_sums.max()):.4g}]); "
            "pass softmax outputs, not logits"
        )


def _widen(probs: torch.Tensor) -> torch.Tensor:
    return probs.to(torch.promote_types(probs.dtype, torch.float32))


def posterior_predictive(prob_samples: torch.Tensor) -> torch.Tensor:
    """Average class probabilities over posterior samples.

    .. math::

        \\bar p(y = c \\mid x_n) = \\frac1S \\sum_{s=1}^S p(y = c \\mid x_n, w_s)

    :param torch.Tensor prob_samples: probabilities of shape ``(S, N, C)``, one
        ``(N, C)`` slice per posterior sample :math:`w_s`.
    :returns: posterior predictive probabilities of shape ``(N, C)``.
    :rtype: torch.Tensor
    """
    if not isinstance(prob_samples, torch.Tensor):
        raise TypeError(f"prob_samples must be a torch.Tensor, got {type(prob_samples).__name__}")
    if prob_samples.dim() != 3:
        raise ValueError(
            f"prob_samples must have shape (S, N, C), got {tuple(prob_samples.shape)}; "
            "add a leading sample dimension for a single sample"
        )
    if prob_samples.shape[0] == 0:
        raise ValueError("prob_samples must hold at least one sample (S >= 1)")
    return prob_samples.mean(0)


def accuracy(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose most probable class is the label.

    .. math:: \\mathrm{acc} = \\frac1N \\sum_n [\\arg\\max_c p_{nc} = y_n]

    Ties go to the lowest class index (:func:`torch.argmax`).

    :param torch.Tensor probs: class probabilities of shape ``(N, C)``.
    :param torch.Tensor targets: integer labels of shape ``(N,)``.
    :returns: accuracy in ``[0, 1]``.
    :rtype: float
    """
    _check_classification(probs, targets)
    return (probs.argmax(-1) == targets).sum().item() / targets.shape[0]


def negative_log_likelihood(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log probability of the labels.

    .. math:: \\mathrm{NLL} = -\\frac1N \\sum_n \\ln \\max(p_{n y_n}, \\epsilon)

    The floor :math:`\\epsilon` is the smallest normal number of the computation dtype
    (:attr:`torch.finfo.tiny`, about ``1.2e-38`` in float32). It changes only
    probabilities that are exactly zero or subnormal, so a confidently wrong
    prediction costs a large finite amount (about 87.3 nats in float32) rather
    than making the mean infinite.

    :param torch.Tensor probs: class probabilities of shape ``(N, C)``.
    :param torch.Tensor targets: integer labels of shape ``(N,)``.
    :returns: mean NLL in nats.
    :rtype: float
    """
    _check_classification(probs, targets)
    probs = _widen(probs)
    p_true = probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return -p_true.clamp_min(torch.finfo(probs.dtype).tiny).log().mean().item()


def expected_calibration_error(
    probs: torch.Tensor, targets: torch.Tensor, num_bins: int = 20
) -> float:
    """Expected calibration error with equal-mass bins.

    Predictions are sorted by confidence :math:`\\hat p_n = \\max_c p_{nc}` and split
    into ``num_bins`` consecutive bins of as equal size as possible (sizes differ by
    at most one; with fewer than ``num_bins`` examples the surplus bins are empty
    and contribute nothing). Then

    .. math::

        \\mathrm{ECE} = \\sum_b \\frac{n_b}{N}\\,
            \\bigl|\\mathrm{acc}_b - \\mathrm{conf}_b\\bigr|,

    where :math:`\\mathrm{acc}_b` is the accuracy and :math:`\\mathrm{conf}_b` the
    mean confidence of the :math:`n_b` predictions in bin :math:`b`. Equal
    confidences are ordered by example index, so the result is deterministic.

    :param torch.Tensor probs: class probabilities of shape ``(N, C)``.
    :param torch.Tensor targets: integer labels of shape ``(N,)``.
    :param int num_bins: number of bins, at least 1.
    :returns: ECE in ``[0, 1]``.
    :rtype: float
    """
    _check_classification(probs, targets)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    probs = _widen(probs)
    confidence, predicted = probs.max(-1)
    correct = (predicted == targets).to(probs.dtype)
    order = torch.sort(confidence, stable=True).indices
    total = probs.new_zeros(())
    for idx in torch.tensor_split(order, num_bins):
        if idx.numel() == 0:
            continue
        gap = (correct[idx].mean() - confidence[idx].mean()).abs()
        total = total + idx.numel() * gap
    return (total / probs.shape[0]).item()


def brier_score(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-class Brier score.

    .. math:: \\mathrm{BS} = \\frac1N \\sum_n \\sum_c (p_{nc} - [y_n = c])^2

    :param torch.Tensor probs: class probabilities of shape ``(N, C)``.
    :param torch.Tensor targets: integer labels of shape ``(N,)``.
    :returns: Brier score in ``[0, 2]``.
    :rtype: float
    """
    _check_classification(probs, targets)
    probs = _widen(probs)
    onehot = torch.nn.functional.one_hot(targets.long(), probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(-1).mean().item()


class EpochTimer:
    """Context manager that measures wall-clock seconds with :func:`time.perf_counter`.

    Example::

        with EpochTimer() as timer:
            train_one_epoch()
        history.append(timer.seconds)

    :param bool synchronize: wait for queued CUDA work on entry and exit, so that
        asynchronous kernels are charged to the block that launched them. Ignored
        when CUDA is unavailable.
    """

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self.seconds: float = math.nan
        self._start: float | None = None

    def _sync(self) -> None:
        if self.synchronize and torch.cuda.is_available():
            torch.cuda.synchronize()

    def __enter__(self) -> "EpochTimer":
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start
