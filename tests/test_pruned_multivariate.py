"""PrunedMultivariateNormal, and PruneMessenger at a multivariate Normal site."""

import pyro
import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from pyro_bmr import MaskError
from pyro_bmr.poutine import prune
from pyro_bmr.pruned_multivariate import PrunedMultivariateNormal

KEEP = torch.tensor([True, False, True, True, False])


def bases(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    tril = torch.linalg.cholesky(a @ a.T + 0.5 * torch.eye(5, dtype=torch.float64))
    factor = torch.randn(5, 2, generator=g, dtype=torch.float64)
    diag = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    return {
        "mvn": MultivariateNormal(loc, scale_tril=tril),
        "lowrank": LowRankMultivariateNormal(loc, factor, diag),
    }


@pytest.mark.parametrize("kind", ["mvn", "lowrank"])
def test_kept_elements_follow_their_marginal_and_pruned_ones_are_zero(kind):
    base = bases(requires_grad=True)[kind]
    pruned = PrunedMultivariateNormal(base, KEEP)
    draws = pruned.rsample((400,))
    assert draws.shape == (400, 5) and (draws[:, ~KEEP] == 0).all()
    assert (draws[:, KEEP] != 0).all()
    cov = base.covariance_matrix[KEEP][:, KEEP]
    marginal = MultivariateNormal(base.loc[KEEP], cov)
    torch.testing.assert_close(pruned.log_prob(draws), marginal.log_prob(draws[:, KEEP]))
    moved = draws.detach().clone()
    moved[0, 1] = 1e-3
    assert pruned.log_prob(moved)[0] == -float("inf") and pruned.log_prob(moved)[1] > -1e3
    torch.testing.assert_close(pruned.entropy(), marginal.entropy())
    torch.testing.assert_close(pruned.mean, torch.where(KEEP, base.mean, 0.0))
    # reparameterised: the kept locations get gradients, the pruned none
    (grad,) = torch.autograd.grad(draws.sum(), base.loc)
    assert (grad[KEEP] == 400).all() and (grad[~KEEP] == 0).all()


def test_expand_every_element_pruned_and_bad_arguments():
    base = bases()["mvn"]
    expanded = PrunedMultivariateNormal(base, KEEP).expand((3,))
    assert expanded.batch_shape == (3,) and expanded.sample().shape == (3, 5)
    assert (expanded.sample()[:, ~KEEP] == 0).all()
    nothing = PrunedMultivariateNormal(base, torch.zeros(5, dtype=torch.bool))
    assert (nothing.sample((2,)) == 0).all()
    assert torch.equal(nothing.log_prob(torch.zeros(2, 5, dtype=torch.float64)), torch.zeros(2))
    everything = PrunedMultivariateNormal(base, torch.ones(5, dtype=torch.bool))
    assert everything.marginal is base
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(5,\)"):
        PrunedMultivariateNormal(base, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="base must be a"):
        PrunedMultivariateNormal(torch.distributions.Normal(0.0, 1.0), KEEP)


def test_prune_messenger_masks_a_multivariate_site():
    base = bases()["lowrank"]

    def guide():
        return pyro.sample("z", base)

    trace = pyro.poutine.trace(prune(guide, {"z": KEEP})).get_trace()
    assert isinstance(trace.nodes["z"]["fn"], PrunedMultivariateNormal)
    assert (trace.nodes["z"]["value"][~KEEP] == 0).all()
    with pytest.raises(MaskError, match="does not fit site 'z'"):
        prune(guide, {"z": KEEP[:4]})()
