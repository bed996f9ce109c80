"""pyro_bmr.correlated_posteriors: Pyro's guides with correlations, read through Pyro's own
``get_posterior`` as the oracle, and the JointGaussian they hand out."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal

from pyro_bmr.correlated_posteriors import (
    AutoLowRankMultivariateNormalPosterior,
    AutoMultivariateNormalPosterior,
    JointGaussian,
)
from pyro_bmr.posteriors import mean_field_posterior

GUIDES = {
    "mvn": (AutoMultivariateNormal, AutoMultivariateNormalPosterior),
    "lowrank": (AutoLowRankMultivariateNormal, AutoLowRankMultivariateNormalPosterior),
}


def model():
    """Sites on the real line around a constrained one: the slices must skip it."""
    pyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    pyro.sample("b", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))


def fitted(kind):
    """A guide with random parameters (as after fitting), and its posterior."""
    guide_type, _ = GUIDES[kind]
    guide = guide_type(model) if kind == "mvn" else guide_type(model, rank=3)
    guide()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in guide.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=g))
    return guide, mean_field_posterior(guide)


@pytest.mark.parametrize("kind", GUIDES)
def test_marginals_and_joint_are_pyro_s_posterior(kind):
    guide, posterior = fitted(kind)
    assert type(posterior) is GUIDES[kind][1]
    sites = posterior.sites()
    assert sites["a"] is None and sites["b"] is None and "is constrained" in sites["sigma"]
    assert {n: (p.start, p.stop, tuple(s)) for n, (p, s) in posterior.layout().items()} == {
        "a": (0, 2, (2,)),
        "sigma": (2, 3, ()),
        "b": (3, 9, (2, 3)),
    }
    q = guide.get_posterior()
    joint = posterior.joint()
    torch.testing.assert_close(joint.covariance(), q.covariance_matrix.detach())
    loc, scale = posterior.loc_scale("b")
    torch.testing.assert_close(loc, q.loc.detach()[3:].view(2, 3))
    torch.testing.assert_close(scale, q.variance.detach()[3:].sqrt().view(2, 3))
    with pytest.raises(ValueError, match="no latent site 'c'"):
        posterior.loc_scale("c")


@pytest.mark.parametrize("kind", GUIDES)
def test_assign_joint_writes_through_pyro_s_parameterisation(kind):
    guide, posterior = fitted(kind)
    before = guide.get_posterior().variance.detach()
    kept = torch.tensor([True, False, True, True, False, True, True, False, True])
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g)
    cov = a @ a.T / 6 + 0.2 * torch.eye(6)
    loc = torch.randn(6, generator=g)
    if kind == "mvn":
        reduced = JointGaussian(loc, scale_tril=torch.linalg.cholesky(cov))
    else:
        cov_factor = torch.randn(6, 3, generator=g)
        reduced = JointGaussian(loc, cov_factor=cov_factor, cov_diag=torch.full((6,), 0.3))
        cov = cov_factor @ cov_factor.T + 0.3 * torch.eye(6)
    posterior.assign_joint(kept, reduced)
    q = guide.get_posterior()
    torch.testing.assert_close(q.loc.detach()[kept], loc)
    assert (q.loc.detach()[~kept] == 0).all()
    joint = q.covariance_matrix.detach()
    torch.testing.assert_close(joint[kept][:, kept], cov)
    assert (joint[kept][:, ~kept] == 0).all()
    # a pruned element keeps a proper (masked) distribution of its own
    assert (q.variance.detach()[~kept] > 0).all()
    if kind == "mvn":
        torch.testing.assert_close(q.variance.detach()[~kept], guide.scale.detach()[~kept] ** 2)
    torch.testing.assert_close(posterior.joint().covariance(), joint)
    assert not torch.equal(before, q.variance.detach())


@pytest.mark.parametrize("kind", GUIDES)
def test_assign_writes_locations_only(kind):
    guide, posterior = fitted(kind)
    old = guide.loc.detach().clone()
    where = torch.tensor([[True, False, False], [False, False, True]])
    posterior.assign("b", where, torch.tensor(0.0), None)
    new = guide.loc.detach()
    assert (new[3:].view(2, 3)[where] == 0).all()
    assert torch.equal(new[3:].view(2, 3)[~where], old[3:].view(2, 3)[~where])
    assert torch.equal(new[:3], old[:3])
    with pytest.raises(ValueError, match="site 'b'.*joint posterior"):
        posterior.assign("b", where, torch.tensor(0.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="update_posterior=True"):
        posterior.check_assign("a", scale=True)
    posterior.check_assign("a", scale=False)


def test_guide_masks_cover_the_joint_latent():
    guide, posterior = fitted("mvn")
    assert posterior.guide_masks({}) == {}
    mask = torch.tensor([[True, False, True], [False, True, True]])
    masks = posterior.guide_masks({"b": mask})
    expected = torch.cat([torch.ones(3, dtype=torch.bool), mask.reshape(-1)])
    assert list(masks) == ["_AutoMultivariateNormal_latent"]
    assert torch.equal(masks["_AutoMultivariateNormal_latent"], expected)


@pytest.mark.parametrize("form", ["tril", "tril, block zero", "lowrank"])
def test_restrict_is_the_marginal(form):
    g = torch.Generator().manual_seed(2)
    loc = torch.randn(7, generator=g, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, False, True])
    if form == "lowrank":
        factor = torch.randn(7, 2, generator=g, dtype=torch.float64)
        joint = JointGaussian(loc, cov_factor=factor, cov_diag=torch.rand(7, generator=g) + 0.1)
    else:
        a = torch.randn(7, 7, generator=g, dtype=torch.float64)
        tril = torch.linalg.cholesky(a @ a.T + torch.eye(7, dtype=torch.float64))
        if form == "tril, block zero":  # the kept rows independent of the others
            tril = tril * (keep[:, None] == keep[None, :])
        joint = JointGaussian(loc, scale_tril=tril)
    marginal = joint.restrict(keep)
    torch.testing.assert_close(marginal.loc, loc[keep])
    torch.testing.assert_close(marginal.covariance(), joint.covariance()[keep][:, keep])
    torch.testing.assert_close(marginal.marginal_scale(), joint.marginal_scale()[keep])
    if not marginal.low_rank:
        assert torch.equal(marginal.scale_tril, marginal.scale_tril.tril())
    assert joint.restrict(torch.ones(7, dtype=torch.bool)) is joint
