import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
from torch import nn

from pyro_bmr.nn import (
    BayesianModule,
    GaussianPrior,
    HorseshoePrior,
    LayerScalePrior,
    exclude_normalization,
    to_bayesian,
)


def _conv1d_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 2))


def _sample_sites(trace):
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }


def test_converts_a_module_it_has_never_seen():
    original = _conv1d_net()
    bnn = to_bayesian(original, GaussianPrior(scale=2.0))
    x = torch.randn(5, 1, 8)
    trace = poutine.trace(bnn).get_trace(x)
    sites = _sample_sites(trace)
    shapes = {
        "net.0.weight": (4, 1, 3),
        "net.0.bias": (4,),
        "net.3.weight": (2, 24),
        "net.3.bias": (2,),
    }
    assert {name: tuple(site["value"].shape) for name, site in sites.items()} == shapes
    assert bnn.random_sites() == list(shapes)
    for site in sites.values():
        assert isinstance(site["fn"].base_dist, dist.Normal)
        assert torch.equal(site["fn"].base_dist.scale, torch.full(site["value"].shape, 2.0))
    assert trace.nodes["_RETURN"]["value"].shape == (5, 2)
    # The output is the deterministic network run at the sampled parameters.
    params = {name.removeprefix("net."): site["value"] for name, site in sites.items()}
    expected = torch.func.functional_call(original, params, (x,))
    torch.testing.assert_close(trace.nodes["_RETURN"]["value"], expected)
    # The argument is left untouched.
    assert not isinstance(original, PyroModule)
    assert isinstance(original[0].weight, nn.Parameter)


def test_each_call_draws_new_parameters():
    bnn = BayesianModule(_conv1d_net())
    x = torch.randn(3, 1, 8)
    assert not torch.equal(bnn(x), bnn(x))


def test_predicate_keeps_chosen_parameters_deterministic():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    bnn = BayesianModule(net, LayerScalePrior(), predicate=exclude_normalization)
    assert bnn.random_sites() == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    pyro.clear_param_store()
    trace = poutine.trace(bnn).get_trace(torch.randn(2, 3))
    params = {name for name, site in trace.nodes.items() if site["type"] == "param"}
    assert params == {"net.1.weight", "net.1.bias"}
    assert not any(name.startswith("net.1.") for name in _sample_sites(trace))
    only_weights = BayesianModule(net, predicate=lambda name, module: name.endswith("weight"))
    assert only_weights.random_sites() == ["net.0.weight", "net.1.weight", "net.2.weight"]


@pytest.mark.parametrize("prior", [GaussianPrior(), LayerScalePrior(), HorseshoePrior()])
def test_init_loc_fn_starts_the_guide_at_the_deterministic_network(prior):
    pyro.clear_param_store()
    original = _conv1d_net()
    bnn = BayesianModule(original, prior)
    guide = AutoNormal(bnn, init_loc_fn=bnn.init_loc_fn)
    x = torch.randn(4, 1, 8)
    guide(x)
    trace = poutine.trace(poutine.condition(bnn, guide.median())).get_trace(x)
    for name, param in original.named_parameters():
        torch.testing.assert_close(trace.nodes["net." + name]["value"], param.detach())
    torch.testing.assert_close(trace.nodes["_RETURN"]["value"], original(x).detach())


def test_tied_parameters_are_refused():
    tied = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"'0.weight', '1.weight'"):
        BayesianModule(tied)
    # Tied parameters kept deterministic are fine.
    bnn = BayesianModule(tied, predicate=lambda name, module: name.endswith("bias"))
    assert bnn.random_sites() == ["net.0.bias", "net.1.bias"]


def test_a_shared_module_draws_its_parameters_once_per_call():
    linear = nn.Linear(2, 2)
    bnn = BayesianModule(nn.Sequential(linear, nn.Tanh(), linear))
    trace = poutine.trace(bnn).get_trace(torch.randn(3, 2))
    assert len(_sample_sites(trace)) == 2 == len(bnn.random_sites())
    assert set(bnn.random_sites()) <= set(trace.nodes)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        BayesianModule(lambda x: x)
    with pytest.raises(TypeError, match="Prior"):
        BayesianModule(nn.Linear(2, 2), prior="gaussian")
    with pytest.raises(ValueError, match="no parameter"):
        BayesianModule(nn.Linear(2, 2), predicate=lambda name, module: False)


def test_copies_follow_their_own_dtype():
    bnn = BayesianModule(_conv1d_net(), HorseshoePrior())
    twin = copy.deepcopy(bnn).double()
    trace = poutine.trace(twin).get_trace(torch.randn(2, 1, 8, dtype=torch.float64))
    sites = _sample_sites(trace)
    assert all(site["value"].dtype == torch.float64 for site in sites.values())
    assert trace.nodes["_RETURN"]["value"].dtype == torch.float64
    assert bnn(torch.randn(2, 1, 8)).dtype == torch.float32
    assert twin.hyper_sites() == bnn.hyper_sites()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_priors_follow_the_module_to_cuda():
    bnn = BayesianModule(_conv1d_net(), HorseshoePrior()).cuda()
    trace = poutine.trace(bnn).get_trace(torch.randn(2, 1, 8, device="cuda"))
    assert all(site["value"].is_cuda for site in _sample_sites(trace).values())
