"""The authors' reduced, layer-wise regularised horseshoe (LayerHorseshoePrior)."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_bmr.nn import BayesianModule, LayerHorseshoePrior


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Linear(1, 2))


def _trace(bnn, x):
    return poutine.trace(bnn).get_trace(x)


def test_sites_are_the_authors_per_layer_global_row_and_slab():
    bnn = BayesianModule(_net(), LayerHorseshoePrior())
    trace = _trace(bnn, torch.randn(5, 3))
    latent = {name for name, site in trace.nodes.items() if site["type"] == "sample"}
    assert {
        "net.0.horseshoe_global",
        "net.0.weight_row_u",
        "net.0.weight_row_v",
        "net.0.slab_precision",
        "net.0.weight_decentered",
        "net.0.bias_decentered",
        "net.2.weight_row_u",  # a one-row layer: no global scale, tau = tau0
        "net.2.slab_precision",
        "net.3.horseshoe_global",  # the output layer: one half-Cauchy scale
    } <= latent
    assert "net.2.horseshoe_global" not in latent and "net.3.weight_row_u" not in latent
    assert "net.3.slab_precision" not in latent
    assert trace.nodes["net.0.weight_row_u"]["value"].shape == (4,)
    assert trace.nodes["net.0.horseshoe_global"]["value"].shape == (2,)


def test_scales_follow_the_authors_formula():
    tau0 = 0.03
    bnn = BayesianModule(_net(), LayerHorseshoePrior(global_scale=tau0))
    pyro.set_rng_seed(1)
    trace = _trace(bnn, torch.randn(5, 3))
    value = {name: site["value"] for name, site in trace.nodes.items() if site["type"] == "sample"}

    def gamma(layer, has_global=True):
        a = value[f"net.{layer}.horseshoe_global"] if has_global else torch.ones(2)
        psi = tau0**2 * a[0] / a[1] * value[f"net.{layer}.weight_row_v"]  # tau^2 lambda^2 xi
        xi = value[f"net.{layer}.weight_row_u"]
        return torch.sqrt(psi / (xi + value[f"net.{layer}.slab_precision"] * psi))

    for layer, has_global in [("0", True), ("2", False)]:
        expected = gamma(layer, has_global)
        torch.testing.assert_close(
            value[f"net.{layer}.weight"],
            expected[:, None] * value[f"net.{layer}.weight_decentered"],
        )
        torch.testing.assert_close(
            value[f"net.{layer}.bias"], expected * value[f"net.{layer}.bias_decentered"]
        )
    a = value["net.3.horseshoe_global"]
    torch.testing.assert_close(
        value["net.3.weight"], torch.sqrt(a[0] / a[1]) * value["net.3.weight_decentered"]
    )


def test_the_gamma_ratio_is_a_half_cauchy():
    """sqrt(a/b), a, b ~ Gamma(1/2, 1): the CDF of C+(0, 1) is (2/pi) atan(x)."""
    pyro.set_rng_seed(0)
    prior = LayerHorseshoePrior()
    bnn = BayesianModule(nn.Sequential(nn.Linear(2, 1)), prior)  # output layer only
    ratios = torch.stack(
        [
            _trace(bnn, torch.zeros(1, 2)).nodes["net.0.horseshoe_global"]["value"]
            for _ in range(4000)
        ]
    )
    scale = torch.sqrt(ratios[:, 0] / ratios[:, 1]).sort().values
    empirical = torch.arange(1, len(scale) + 1) / len(scale)
    distance = (empirical - 2 / math.pi * torch.atan(scale)).abs().max()
    assert distance < 0.03  # Kolmogorov-Smirnov, n = 4000: 1% critical value 0.026


@pytest.mark.parametrize(
    "kwargs", [{"global_scale": 0.0}, {"slab_concentration": -1.0}, {"slab_rate": 0.0}]
)
def test_bad_hyper_parameters_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"LayerHorseshoePrior {name} must be positive"):
        LayerHorseshoePrior(**kwargs)
