import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_bmr.nn import BayesianModule, GaussianPrior, HorseshoePrior, LayerScalePrior


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _trace(bnn, x=None):
    x = torch.randn(5, 4) if x is None else x
    return poutine.trace(bnn).get_trace(x)


def _base(fn):
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn


def _latents(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def test_gaussian_prior_sites_and_scale():
    pyro.set_rng_seed(0)
    trace = _trace(BayesianModule(_net(), GaussianPrior(scale=0.5)))
    latents = _latents(trace)
    assert list(latents) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    shapes = {
        "net.0.weight": (3, 4),
        "net.0.bias": (3,),
        "net.2.weight": (2, 3),
        "net.2.bias": (2,),
    }
    for name, site in latents.items():
        assert site["value"].shape == shapes[name]
        assert site["fn"].event_shape == shapes[name]
        base = _base(site["fn"])
        assert isinstance(base, dist.Normal)
        assert torch.equal(base.loc, torch.zeros(shapes[name]))
        assert torch.equal(base.scale, torch.full(shapes[name], 0.5))


def test_layer_scale_prior_decentered_sites_have_standard_normal_priors():
    pyro.set_rng_seed(0)
    bnn = BayesianModule(_net(), LayerScalePrior())
    trace = _trace(bnn)
    latents = _latents(trace)
    assert set(latents) == {
        "net.0.prior_precision",
        "net.0.weight_decentered",
        "net.0.bias_decentered",
        "net.2.prior_precision",
        "net.2.weight_decentered",
        "net.2.bias_decentered",
    }
    assert set(latents) == set(bnn.latent_sites())
    for layer in ("net.0", "net.2"):
        gamma = latents[f"{layer}.prior_precision"]["fn"]
        assert isinstance(gamma, dist.Gamma)
        assert (gamma.concentration.item(), gamma.rate.item()) == (2.0, 2.0)
        scale = latents[f"{layer}.prior_precision"]["value"].rsqrt()
        for param in ("weight", "bias"):
            z = latents[f"{layer}.{param}_decentered"]
            base = _base(z["fn"])
            assert isinstance(base, dist.Normal)
            assert torch.equal(base.loc, torch.zeros_like(z["value"]))
            assert torch.equal(base.scale, torch.ones_like(z["value"]))
            # The parameter the network uses is the scale times the standardised one.
            w = trace.nodes[f"{layer}.{param}"]
            assert w["is_observed"]
            torch.testing.assert_close(w["value"], scale * z["value"], rtol=0, atol=0)


def test_layer_scale_prior_scales_every_layer_but_the_output():
    # the authors' prior: c divided by 10 on every layer but the output layer
    pyro.set_rng_seed(0)
    bnn = BayesianModule(_net(), LayerScalePrior(hidden_scale=0.1))
    trace = _trace(bnn)
    for layer, factor in (("net.0", 0.1), ("net.2", 1.0)):
        c = trace.nodes[f"{layer}.prior_precision"]["value"].rsqrt()
        for param in ("weight", "bias"):
            w = trace.nodes[f"{layer}.{param}"]["value"]
            z = trace.nodes[f"{layer}.{param}_decentered"]["value"]
            torch.testing.assert_close(w, factor * c * z)
    assert "hidden_scale=0.1" in repr(LayerScalePrior(hidden_scale=0.1))
    assert repr(LayerScalePrior()) == "LayerScalePrior(concentration=2.0, rate=2.0)"
    with pytest.raises(ValueError, match="hidden_scale must be positive"):
        LayerScalePrior(hidden_scale=0.0)


def test_layer_scale_prior_reparam_config_is_exposed():
    bnn = BayesianModule(_net(), LayerScalePrior())
    config = bnn.reparam_config()
    assert sorted(config) == sorted(bnn.random_sites())
    assert all(r.centered == 0.0 for r in config.values())
    assert BayesianModule(_net(), GaussianPrior()).reparam_config() == {}


def test_horseshoe_prior_has_the_regularised_horseshoe_sites():
    pyro.set_rng_seed(0)
    bnn = BayesianModule(_net(), HorseshoePrior())
    trace = _trace(bnn)
    latents = _latents(trace)
    expected = {
        "horseshoe_global_scale": (),
        "horseshoe_slab_variance": (),
        "net.0.weight_row_scale": (3,),
        "net.0.weight_local_scale": (3, 4),  # the first layer only
        "net.0.weight_decentered": (3, 4),
        "net.0.bias_decentered": (3,),
        "net.2.weight_row_scale": (2,),
        "net.2.weight_decentered": (2, 3),
        "net.2.bias_decentered": (2,),
    }
    assert {name: tuple(site["value"].shape) for name, site in latents.items()} == expected
    assert set(bnn.latent_sites()) == set(expected)
    assert isinstance(latents["horseshoe_global_scale"]["fn"], dist.HalfCauchy)
    slab = latents["horseshoe_slab_variance"]["fn"]
    assert isinstance(slab, dist.InverseGamma)
    assert (slab.base_dist.concentration.item(), slab.base_dist.rate.item()) == (2.0, 6.0)
    for name in ("net.0.weight_row_scale", "net.0.weight_local_scale", "net.2.weight_row_scale"):
        assert isinstance(_base(latents[name]["fn"]), dist.HalfCauchy)
    for name in ("net.0.weight", "net.2.bias"):
        base = _base(latents[name + "_decentered"]["fn"])
        assert torch.equal(base.scale, torch.ones_like(base.scale))

    def value(name):
        return trace.nodes[name]["value"]

    tau, c2 = value("horseshoe_global_scale"), value("horseshoe_slab_variance")

    def regularised(lam):
        return (c2 * (tau * lam) ** 2 / (c2 + (tau * lam) ** 2)).sqrt()

    lam0 = value("net.0.weight_row_scale")[:, None] * value("net.0.weight_local_scale")
    torch.testing.assert_close(
        value("net.0.weight"), regularised(lam0) * value("net.0.weight_decentered")
    )
    # A bias shares its weight's row scales, without the per-weight ones.
    torch.testing.assert_close(
        value("net.0.bias"),
        regularised(value("net.0.weight_row_scale")) * value("net.0.bias_decentered"),
    )
    torch.testing.assert_close(
        value("net.2.weight"),
        regularised(value("net.2.weight_row_scale")[:, None]) * value("net.2.weight_decentered"),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianPrior(scale=0.0),
        lambda: LayerScalePrior(rate=-1.0),
        lambda: HorseshoePrior(global_scale=0.0),
    ],
)
def test_priors_reject_non_positive_hyperparameters(make):
    with pytest.raises(ValueError, match="must be positive"):
        make()


def test_prior_refuses_to_shadow_an_attribute():
    class Odd(nn.Linear):
        prior_precision = 3.0

    with pytest.raises(ValueError, match="prior_precision"):
        BayesianModule(Odd(2, 2), LayerScalePrior())
