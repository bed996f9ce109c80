import math

import pytest
import torch

from pyro_bmr import Sparsity
from pyro_bmr.report import sparsity

MASKS = {
    "a": torch.tensor([True, False, False, True]),
    "b": torch.tensor([[True, True, True], [True, True, False]]),
}


def test_sparsity():
    summary = sparsity(MASKS)
    assert isinstance(summary, Sparsity)
    assert summary.per_site == {"a": 0.5, "b": pytest.approx(1 / 6)}
    assert summary.num_pruned == 3
    assert summary.num_elements == 10
    assert summary.total == pytest.approx(0.3)


def test_compression():
    assert sparsity(MASKS).compression == pytest.approx(10 / 7)
    assert sparsity({"a": torch.ones(5, dtype=torch.bool)}).compression == 1.0
    assert sparsity({"a": torch.zeros(5, dtype=torch.bool)}).compression == math.inf


def test_sparsity_of_no_masks_is_zero():
    summary = sparsity({})
    assert summary == Sparsity()
    assert (summary.per_site, summary.total, summary.num_pruned, summary.num_elements) == (
        {},
        0.0,
        0,
        0,
    )
    assert summary.compression == 1.0


def test_sparsity_rejects_bad_masks():
    with pytest.raises(TypeError, match="'w'.*bool tensor"):
        sparsity({"w": torch.ones(3)})
    with pytest.raises(ValueError, match="'w' has no elements"):
        sparsity({"w": torch.ones(0, dtype=torch.bool)})
