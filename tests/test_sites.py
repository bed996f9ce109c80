"""Finding the reducible sites: the prior read is the one the model runs with."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam

from pyro_bmr.sites import StructureError, find_gaussian_sites, read_priors

from .models import subsampled_model


def _discrete_where():
    z = pyro.sample("z", dist.Bernoulli(0.5))
    scale = torch.where(z > 0, torch.tensor(10.0), torch.tensor(0.01))
    pyro.sample("w", dist.Normal(0.0, scale).expand([3]).to_event(1))


def _through_item():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("w", dist.Normal(0.0, abs(z.item()) + 0.01).expand([3]).to_event(1))


def _through_detach():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("w", dist.Normal(0.0, z.detach().exp()).expand([3]).to_event(1))


def _through_comparison():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    scale = 10.0 if bool(z > 0) else 0.01
    pyro.sample("w", dist.Normal(0.0, scale).expand([3]).to_event(1))


@pytest.mark.parametrize(
    "model", [_discrete_where, _through_item, _through_detach, _through_comparison]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_prior_that_depends_on_a_latent_by_any_path_is_skipped(model, seed):
    pyro.set_rng_seed(seed)
    sites, skipped = find_gaussian_sites(model)
    assert "w" not in sites
    assert "depend on other latent variables" in skipped["w"]


def test_a_standardised_site_is_not_taken_for_a_dependent_one():
    def model():
        tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
        with poutine.reparam(config={"w": LocScaleReparam(centered=0.0)}):
            pyro.sample("w", dist.Normal(0.0, tau).expand([4]).to_event(1))

    sites, skipped = find_gaussian_sites(model)
    assert "w_decentered" in sites and "w_decentered" not in skipped


def test_a_tempered_prior_is_read_as_the_prior_the_elbo_fits():
    def model():
        with poutine.scale(scale=0.01):
            pyro.sample("w", dist.Normal(1.0, 2.0).expand([3]).to_event(1))

    sites, _ = find_gaussian_sites(model)
    # β ln N(w; m, s²) = ln N(w; m, s²/β) + const
    assert torch.allclose(sites["w"].prior_scale, torch.tensor(2.0 / 0.01**0.5))
    assert (sites["w"].prior_loc == 1.0).all()


def test_plate_subsampling_is_not_taken_for_tempering():
    sites, _ = find_gaussian_sites(subsampled_model, torch.randn(200, 3), torch.randn(200))
    assert (sites["z"].prior_scale == 0.1).all() and (sites["w"].prior_scale == 1.0).all()


@pytest.mark.parametrize("scale", [float("inf"), torch.tensor([1.0, float("inf"), 1.0])], ids=str)
def test_a_prior_scaled_by_a_bad_factor_is_skipped(scale):
    def model():
        with poutine.scale(scale=scale):
            pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    sites, skipped = find_gaussian_sites(model)
    assert "w" not in sites and "poutine.scale" in skipped["w"]


def test_a_masked_prior_is_skipped():
    def model():
        with poutine.mask(mask=torch.tensor([True, False, True])):
            pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    sites, skipped = find_gaussian_sites(model)
    assert "w" not in sites and "masked" in skipped["w"]


def test_local_and_dynamic_sites_are_marked():
    def model(x):
        prior_scale = pyro.param(
            "prior_scale", torch.tensor(1.5), constraint=dist.constraints.positive
        )
        w = pyro.sample("w", dist.Normal(0.0, prior_scale).expand([2]).to_event(1))
        v = pyro.sample("v", dist.Normal(0.0, x.abs().mean()))
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(x @ w + z + v + u, 1.0), obs=x[:, 0])

    sites, _ = find_gaussian_sites(model, torch.randn(5, 2))
    assert {n: s.dynamic for n, s in sites.items()} == {
        "w": True,
        "v": True,
        "u": False,
        "z": False,
    }
    assert {n: s.local for n, s in sites.items()} == {"w": False, "v": False, "u": False, "z": True}


def test_read_priors_reads_a_learned_prior_again_and_checks_the_structure():
    def model(x):
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        w = pyro.sample("w", dist.Normal(0.0, s).expand([x.shape[1]]).to_event(1))
        return x @ w

    x = torch.randn(4, 3)
    sites, _ = find_gaussian_sites(model, x)
    with torch.no_grad():
        pyro.param("s").unconstrained().fill_(torch.tensor(2.0).log())
    fresh = read_priors(model, sites, {"w": torch.zeros(3)}, x)
    assert torch.allclose(fresh["w"].prior_scale, torch.tensor(2.0))
    with pytest.raises(StructureError, match=r"site 'w' has shape \(5,\).*but \(3,\)"):
        read_priors(model, sites, {"w": torch.zeros(3)}, torch.randn(4, 5))


def test_a_reparameterised_site_does_not_make_its_plates_data_plates():
    def model(x):
        with pyro.plate("features", x.shape[-1]):
            w_shared = pyro.sample("w_shared", dist.Normal(0.0, 1.0))
            tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
            w = pyro.sample("w", dist.Normal(w_shared, tau))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal((x * w).sum(-1), 0.2), obs=x[:, 0])

    reparam = poutine.reparam(model, config={"w": LocScaleReparam(centered=0.0)})
    sites, _ = find_gaussian_sites(reparam, torch.randn(10, 3))
    assert not sites["w_shared"].local and not sites["w_decentered"].local
