import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pyro_bmr.distributions import PrunedNormal


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


def _reference_log_prob(loc, scale, keep, x, event_dim):
    lp = torch.where(keep, Normal(loc, scale).log_prob(x), torch.zeros(()))
    off = ~keep & (x != 0)
    lp = torch.where(off, torch.full((), -float("inf")), lp)
    return lp.sum(tuple(range(-event_dim, 0))) if event_dim else lp


@pytest.mark.parametrize(
    "keep_shape", [(4, 5), (5,), (3, 4, 5), (3, 1, 1)], ids=["event", "row", "batch", "per-batch"]
)
def test_log_prob_with_batch_dims_matches_the_masked_normal(keep_shape):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(3, 4, 5, generator=g)
    scale = torch.rand(4, 5, generator=g) + 0.1
    keep = torch.rand(keep_shape, generator=g) < 0.5
    d = PrunedNormal(loc, scale, keep, event_dim=2)
    x = d.rsample(torch.Size([2]))
    expected = _reference_log_prob(loc, scale, keep, x, 2)
    assert d.log_prob(x).shape == (2, 3)
    assert torch.allclose(d.log_prob(x), expected)
    fresh = x.clone()  # not the draw: checked element by element
    assert torch.allclose(d.log_prob(fresh), expected)
    fresh[..., 1:3, :] = 0.25  # off the spike wherever a pruned element is there
    off = _reference_log_prob(loc, scale, keep, fresh, 2)
    assert torch.isinf(off).any()
    assert torch.equal(torch.isinf(d.log_prob(fresh)), torch.isinf(off))
    assert torch.allclose(d.log_prob(fresh), off)


def test_a_draw_changed_in_place_is_checked_again():
    keep = torch.tensor([True, False, True, False])
    d = PrunedNormal(torch.zeros(4), torch.ones(4), keep, event_dim=1)
    x = d.rsample()
    view = x.expand(4)  # as Delta passes a guide's draw on to the model
    expected = Normal(0.0, 1.0).log_prob(x)[keep].sum()
    assert torch.allclose(d.log_prob(view), expected)
    other = PrunedNormal(torch.zeros(4), torch.ones(4), keep, event_dim=1)
    assert torch.allclose(other.log_prob(x), expected)
    x[1] = 0.5
    assert d.log_prob(x) == -float("inf")
    assert d.log_prob(view) == -float("inf")


def test_gradients_of_sample_and_log_prob_vanish_where_pruned():
    loc = torch.randn(6, requires_grad=True)
    scale = (torch.rand(6) + 0.5).requires_grad_()
    keep = torch.tensor([True, False, True, True, False, False])
    d = PrunedNormal(loc, scale, keep, event_dim=1)
    x = d.rsample()
    assert torch.equal(x[~keep], torch.zeros(3))
    (d.log_prob(x) + x.pow(2).sum()).backward()
    assert torch.equal(loc.grad[~keep], torch.zeros(3))
    assert torch.equal(scale.grad[~keep], torch.zeros(3))
    assert (loc.grad[keep] != 0).all()


def test_elementwise_log_prob_without_event_dims():
    keep = torch.tensor([True, False, True])
    d = PrunedNormal(torch.zeros(3), torch.ones(3), keep)
    x = torch.tensor([0.3, 0.0, -1.0])
    lp = d.log_prob(x)
    assert torch.allclose(lp[keep], Normal(0.0, 1.0).log_prob(x[keep]))
    assert lp[1] == 0.0
    assert d.log_prob(torch.tensor([0.3, 0.1, -1.0]))[1] == -float("inf")
