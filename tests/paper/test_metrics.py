import math
import time

import pytest
import torch

from pyro_bmr.paper.metrics import (
    EpochTimer,
    accuracy,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    posterior_predictive,
)

# Four examples, two classes. Confidences 0.9, 0.6, 0.7, 0.55; predictions 0, 0, 1, 1;
# correct: yes, no, yes, no.
PROBS = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]]
TARGETS = [0, 1, 1, 0]


@pytest.fixture
def example():
    return torch.tensor(PROBS, dtype=torch.float64), torch.tensor(TARGETS)


def test_accuracy(example):
    assert accuracy(*example) == 0.5


def test_negative_log_likelihood(example):
    expected = -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.45)) / 4
    assert negative_log_likelihood(*example) == pytest.approx(expected, rel=1e-14)


def test_negative_log_likelihood_of_zero_probability_is_finite():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    nll = negative_log_likelihood(probs, torch.tensor([1, 0]))
    expected = (-math.log(torch.finfo(torch.float64).tiny) - math.log(0.5)) / 2
    assert nll == pytest.approx(expected, rel=1e-14)


def test_brier_score(example):
    # sum_c (p_c - onehot_c)^2 per example: 0.02, 0.72, 0.18, 0.605
    assert brier_score(*example) == pytest.approx((0.02 + 0.72 + 0.18 + 0.605) / 4, rel=1e-14)


def test_ece_two_equal_mass_bins(example):
    # Sorted by confidence: 0.55 (wrong), 0.6 (wrong) | 0.7 (right), 0.9 (right).
    # Bin 1: acc 0, conf 0.575; bin 2: acc 1, conf 0.8.
    expected = 0.5 * 0.575 + 0.5 * 0.2
    assert expected_calibration_error(*example, num_bins=2) == pytest.approx(expected, rel=1e-14)


def test_ece_one_bin_is_overall_gap(example):
    mean_conf = (0.9 + 0.6 + 0.7 + 0.55) / 4
    assert expected_calibration_error(*example, num_bins=1) == pytest.approx(
        abs(0.5 - mean_conf), rel=1e-14
    )


def test_ece_unequal_bins():
    # Five examples in two bins of sizes 3 and 2. Sorted confidences:
    # 0.55 (wrong), 0.6 (wrong), 0.7 (right) | 0.8 (right), 0.9 (right).
    probs = torch.tensor(PROBS + [[0.2, 0.8]], dtype=torch.float64)
    targets = torch.tensor(TARGETS + [1])
    expected = 3 / 5 * abs(1 / 3 - (0.55 + 0.6 + 0.7) / 3) + 2 / 5 * abs(1 - 0.85)
    assert expected_calibration_error(probs, targets, num_bins=2) == pytest.approx(
        expected, rel=1e-14
    )


def test_ece_more_bins_than_examples_skips_empty_bins(example):
    # One example per non-empty bin: mean of |correct - confidence|.
    expected = (0.1 + 0.6 + 0.3 + 0.55) / 4
    assert expected_calibration_error(*example, num_bins=20) == pytest.approx(expected, rel=1e-14)


def test_ece_is_zero_for_confident_correct_predictions():
    probs = torch.eye(3, dtype=torch.float64)
    assert expected_calibration_error(probs, torch.arange(3), num_bins=2) == 0.0


def test_posterior_predictive_averages_samples():
    samples = torch.tensor([[[1.0, 0.0], [0.2, 0.8]], [[0.5, 0.5], [0.4, 0.6]]])
    expected = torch.tensor([[0.75, 0.25], [0.3, 0.7]])
    torch.testing.assert_close(posterior_predictive(samples), expected)


def test_nll_of_posterior_predictive_averages_probabilities_not_logs():
    samples = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    nll = negative_log_likelihood(posterior_predictive(samples), torch.tensor([1]))
    assert nll == pytest.approx(math.log(2.0), rel=1e-14)


def test_posterior_predictive_rejects_missing_sample_dim():
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        posterior_predictive(torch.full((4, 2), 0.5))


@pytest.mark.parametrize(
    "metric", [accuracy, negative_log_likelihood, expected_calibration_error, brier_score]
)
def test_metrics_reject_bad_input(metric, example):
    probs, targets = example
    with pytest.raises(ValueError, match="4 rows, targets has 3"):
        metric(probs, targets[:3])
    with pytest.raises(ValueError, match="not logits"):
        metric(torch.log(probs), targets)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        metric(probs, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        metric(probs[0], targets)
    with pytest.raises(TypeError, match="integer"):
        metric(probs, targets.double())


def test_ece_rejects_bad_num_bins(example):
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(*example, num_bins=0)


def test_metrics_follow_float32_input(example):
    probs, targets = example
    assert accuracy(probs.float(), targets) == 0.5
    assert brier_score(probs.float(), targets) == pytest.approx(0.38125, rel=1e-6)


def test_metrics_of_bfloat16_input_keep_full_precision():
    # 1000 examples with 981 correct: a bfloat16 mean would round 0.981 to 0.98047.
    probs = torch.tensor([[0.75, 0.25]], dtype=torch.bfloat16).expand(1000, 2)
    targets = (torch.arange(1000) >= 981).long()
    assert accuracy(probs, targets) == 0.981
    assert brier_score(probs, targets) == pytest.approx(
        0.981 * 2 * 0.25**2 + 0.019 * 2 * 0.75**2, rel=1e-6
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda(example):
    probs, targets = (t.cuda() for t in example)
    assert accuracy(probs, targets) == 0.5
    assert expected_calibration_error(probs, targets, num_bins=2) == pytest.approx(0.3875)
    assert brier_score(probs, targets) == pytest.approx(0.38125)
    assert posterior_predictive(probs.unsqueeze(0)).device == probs.device


def test_epoch_timer_measures_elapsed_seconds():
    with EpochTimer() as timer:
        time.sleep(0.02)
    assert 0.02 <= timer.seconds < 1.0
