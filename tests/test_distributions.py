import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pyro_bmr import PrunedNormal


def _pruned(event_dim=1):
    loc = torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3]])
    scale = torch.tensor([[1.0, 0.5, 2.0], [0.3, 0.3, 0.3]])
    keep = torch.tensor([True, False, True])
    return PrunedNormal(loc, scale, keep, event_dim), loc, scale, keep


def test_shapes_and_samples_are_exact_zeros_where_pruned():
    d, _, _, keep = _pruned()
    assert d.batch_shape == (2,) and d.event_shape == (3,)
    x = d.rsample(torch.Size([5]))
    assert x.shape == (5, 2, 3)
    assert (x[..., ~keep] == 0).all() and (x[..., keep] != 0).all()
    assert d.expand(torch.Size([4, 2])).batch_shape == (4, 2)


def test_log_prob_counts_only_kept_elements():
    d, loc, scale, keep = _pruned()
    x = d.sample()
    expected = Normal(loc, scale).log_prob(x)[..., keep].sum(-1)
    assert torch.allclose(d.log_prob(x), expected)
    off = x.clone()
    off[..., 1] = 0.3
    assert (d.log_prob(off) == -float("inf")).all()


def test_rsample_gradient_is_zero_for_pruned_locs():
    loc = torch.zeros(3, requires_grad=True)
    d = PrunedNormal(loc, torch.ones(3), torch.tensor([True, False, True]))
    d.rsample().sum().backward()
    assert loc.grad.tolist() == [1.0, 0.0, 1.0]


def test_mean_variance_entropy_and_kl():
    d, loc, scale, keep = _pruned()
    assert torch.equal(d.mean[..., ~keep], torch.zeros(2, 1))
    assert torch.equal(d.variance[..., keep], scale[..., keep] ** 2)
    h = Normal(loc, scale).entropy()[..., keep].sum(-1)
    assert torch.allclose(d.entropy(), h)
    p = PrunedNormal(torch.zeros(2, 3), torch.ones(2, 3), keep, 1)
    kl = kl_divergence(d, p)
    expected = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0))[..., keep].sum(-1)
    assert kl.shape == (2,) and torch.allclose(kl, expected)
    other = PrunedNormal(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3, dtype=torch.bool), 1)
    assert torch.isinf(kl_divergence(d, other)).all()


def test_bad_mask_dtype_or_event_dim_is_rejected():
    with pytest.raises(ValueError, match="bool"):
        PrunedNormal(torch.zeros(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="event_dim"):
        PrunedNormal(torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.bool), 2)
