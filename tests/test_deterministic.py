import io

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule
from torch import nn

from pyro_bmr import BayesianModelReduction
from pyro_bmr.deterministic import (
    SPARSE_MIN_SIZE,
    SPARSE_MIN_SIZE_SINGLE,
    LinearChain,
    export,
    guide_means,
)
from pyro_bmr.guides import MeanFieldGuide
from pyro_bmr.nn import BayesianClassifier, GaussianPrior, LayerScalePrior
from pyro_bmr.paper.networks import MLP, LeNet5
from pyro_bmr.posteriors import mean_field_posterior


def _fit(model, guide_cls, x, y, steps=20):
    guide = guide_cls(model, init_loc_fn=model.init_loc_fn, init_scale=0.05)
    bmr = BayesianModelReduction(guide)
    svi = SVI(bmr(model), bmr(guide), pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide, bmr


def _prune(bmr, x, y, fraction=0.6, seed=0):
    """Random masks, plus a dead hidden unit and an unused one in the first layer."""
    g = torch.Generator().manual_seed(seed)
    for name, site in bmr.sites(x, y).items():
        keep = torch.rand(site.shape, generator=g) > fraction
        if name.endswith("1.weight") or name.endswith("1.weight_decentered"):
            keep[0] = False  # unit 0: no input weight (its bias is kept: folded)
        if name.endswith("3.weight") or name.endswith("3.weight_decentered"):
            keep[:, 1] = False  # unit 1 of the first hidden layer: no output weight
        bmr.set_mask(name, keep)


def _reference(model, guide, bmr, x):
    """The reduced model run with every latent site at its posterior mean."""
    with torch.no_grad():
        return poutine.condition(model, data=guide_means(guide, x, bmr=bmr))(x)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 1, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g)


@pytest.mark.parametrize("guide_cls", [AutoNormal, MeanFieldGuide])
def test_gaussian_mlp_matches_the_posterior_mean_of_the_reduced_model(data, guide_cls):
    x, y = data
    model = BayesianClassifier(MLP((1, 4, 4), 3, hidden=(8, 6)), 100, GaussianPrior())
    guide, bmr = _fit(model, guide_cls, x, y)
    _prune(bmr, x, y)
    exported = export(model, guide, x, bmr=bmr)
    assert isinstance(exported, LinearChain) and not exported.training
    assert [layer.shape for layer in exported.layers][0] == (6, 16)  # units 0 and 1 gone
    with torch.no_grad():
        assert torch.allclose(exported(x), _reference(model, guide, bmr, x), atol=1e-5)
        assert torch.allclose(exported(x[:1]), _reference(model, guide, bmr, x[:1]), atol=1e-5)
    # the posterior mean of a Gaussian site is the guide's loc, zero where pruned
    loc, _ = mean_field_posterior(guide).loc_scale("net.1.weight")
    mean = guide_means(guide, x, bmr=bmr)["net.1.weight"]
    keep = bmr.masks["net.1.weight"]
    assert torch.equal(mean, torch.where(keep, loc, torch.zeros_like(loc)))


def test_decentered_prior_exports_scale_times_weight(data):
    x, y = data
    model = BayesianClassifier(MLP((1, 4, 4), 3, hidden=(8, 6)), 100, LayerScalePrior())
    guide, bmr = _fit(model, MeanFieldGuide, x, y)
    _prune(bmr, x, y)
    exported = export(model, guide, x, bmr=bmr)
    with torch.no_grad():
        assert torch.allclose(exported(x), _reference(model, guide, bmr, x), atol=1e-5)


def test_uncompressed_export_is_the_plain_network(data):
    x, y = data
    net = MLP((1, 4, 4), 3, hidden=(8,))
    model = BayesianClassifier(net, 100, GaussianPrior())
    guide, bmr = _fit(model, MeanFieldGuide, x, y)
    exported = export(model, guide, x, bmr=bmr, compress=False)
    assert type(exported) is MLP
    assert not any(isinstance(m, PyroModule) for m in exported.modules())
    assert exported.state_dict().keys() == net.state_dict().keys()
    assert all(isinstance(p, nn.Parameter) for p in exported.parameters())
    with torch.no_grad():
        assert torch.allclose(exported(x), _reference(model, guide, bmr, x), atol=1e-6)
    # the original Bayesian model is untouched
    assert isinstance(model.net[1], PyroModule) and "weight" in model.net[1]._pyro_samples


def test_sparse_kernels_and_saved_state(data):
    x, y = data
    model = BayesianClassifier(MLP((1, 32, 32), 3, hidden=(64,)), 100, GaussianPrior())
    x = torch.randn(24, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    guide, bmr = _fit(model, MeanFieldGuide, x, y, steps=2)
    bmr.sites(x, y)
    g = torch.Generator().manual_seed(0)
    bmr.set_mask("net.1.weight", torch.rand(64, 1024, generator=g) > 0.97)
    assert 1024 * 64 >= max(SPARSE_MIN_SIZE, SPARSE_MIN_SIZE_SINGLE)
    dense = export(model, guide, x, bmr=bmr, sparse_density=0.0)
    sparse = export(model, guide, x, bmr=bmr, sparse_density=0.05)
    assert [layer.sparse_batch for layer in sparse.layers] == [True, False]
    assert [layer.sparse_single for layer in sparse.layers] == [True, False]
    assert not any(layer.sparse_batch or layer.sparse_single for layer in dense.layers)
    assert "values" in sparse.state_dict() or "layers.0.values" in sparse.state_dict()
    with torch.no_grad():
        ref = _reference(model, guide, bmr, x)
        for batch in (x, x[:1]):
            assert torch.allclose(sparse(batch), ref[: len(batch)], atol=1e-5)
            assert torch.allclose(dense(batch), ref[: len(batch)], atol=1e-5)

    def saved(module):
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        return buffer.getbuffer().nbytes

    plain = export(model, guide, x, bmr=bmr, compress=False)
    assert saved(sparse) * 5 < saved(plain)
    # a saved and reloaded chain (whole module) predicts the same
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(reloaded(x), sparse(x))


def test_folding_a_dead_unit_is_exact():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        seq[0].weight[2] = 0.0  # dead unit with a bias: outputs gelu(b) constantly
        seq[2].weight[:, 0] = 0.0  # unit 0 of layer 1 unused
        seq[2].weight[3] = 0.0
        seq[2].bias[3] = 0.0  # dead and zero: tanh(0) = 0
    chain = LinearChain.from_layers([(seq[0], [seq[1]]), (seq[2], [seq[3]]), (seq[4], [])])
    assert [layer.shape for layer in chain.layers] == [(2, 5), (3, 2), (2, 3)]
    x = torch.randn(7, 5)
    with torch.no_grad():
        assert torch.allclose(chain(x), seq(x), atol=1e-6)
        assert torch.allclose(chain(x[:1]), seq(x[:1]), atol=1e-6)


def test_conv_network_exports(data):
    x = torch.randn(6, 1, 12, 12)
    y = torch.randint(0, 3, (6,))
    model = BayesianClassifier(LeNet5((1, 12, 12), 3), 100, GaussianPrior())
    guide, bmr = _fit(model, MeanFieldGuide, x, y, steps=2)
    _prune(bmr, x, y, fraction=0.5)
    exported = export(model, guide, x, bmr=bmr)
    assert isinstance(exported[0], nn.Conv2d) and isinstance(exported[-1], LinearChain)
    with torch.no_grad():
        assert torch.allclose(exported(x), _reference(model, guide, bmr, x), atol=1e-5)


def test_errors(data):
    x, y = data
    model = BayesianClassifier(MLP((1, 4, 4), 3, hidden=(8,)), 100, GaussianPrior())
    guide, bmr = _fit(model, MeanFieldGuide, x, y, steps=1)
    with pytest.raises(TypeError, match="must be a PyroModule"):
        export(model, guide, x, module=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="PyroModule of its own"):
        export(model, guide, x, module=model)
    with pytest.raises(ValueError, match="sparse_density"):
        export(model, guide, x, sparse_density=2.0)
    with pytest.raises(TypeError, match="no median"):
        guide_means(lambda x: None)

    class Fake:
        masks = {"nope": torch.ones(2, dtype=torch.bool)}

    with pytest.raises(ValueError, match="'nope'"):
        guide_means(guide, x, bmr=Fake())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_on_cuda(data):
    x, y = (t.cuda() for t in data)
    model = BayesianClassifier(MLP((1, 4, 4), 3, hidden=(8,)), 100, GaussianPrior()).cuda()
    guide, bmr = _fit(model, MeanFieldGuide, x, y, steps=2)
    exported = export(model, guide, x, bmr=bmr)
    with torch.no_grad():
        assert torch.allclose(exported(x), _reference(model, guide, bmr, x), atol=1e-5)
