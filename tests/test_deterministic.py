import copy
import io
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn
from torch.distributions import constraints

from pyro_bmr import BayesianModelReduction, _pyro_compat
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
    with pytest.raises(TypeError, match="BayesianModule.*'net'"):
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


# -- a PyroModule of the user's own ----------------------------------------------------


def _gaussian(*shape, scale=1.0):
    return PyroSample(dist.Normal(0.0, scale).expand(shape).to_event(len(shape)))


class BayesianRegression(PyroModule):
    """Pyro's Bayesian-regression tutorial model."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = _gaussian(out_features, in_features)
        self.linear.bias = _gaussian(out_features, scale=10.0)

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


class BNN(PyroModule):
    """A hand-written Bayesian classifier: Gaussian weights, ReLU, categorical likelihood."""

    def __init__(self, features=8, hidden=16, classes=2):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](features, hidden)
        self.fc1.weight = _gaussian(hidden, features)
        self.fc1.bias = _gaussian(hidden)
        self.fc2 = PyroModule[nn.Linear](hidden, classes)
        self.fc2.weight = _gaussian(classes, hidden)
        self.fc2.bias = _gaussian(classes)

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def _fit_and_reduce(model, x, y, steps, lr):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(x, y)
    return guide, bmr


def _export_quietly(model, guide, x, bmr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the output of these exports is not random
        return export(model, guide, x, bmr=bmr)


def _check_own_module_export(exported, model, guide, bmr, x, x_new, kept):
    """The export samples nothing, holds the posterior means and predicts as the model."""
    assert type(exported) is type(model) and not exported.training
    for _, sub in exported.named_modules():
        assert _pyro_compat.random_attributes(sub) == ()
        assert _pyro_compat.param_attributes(sub) == {}
    means = guide_means(guide, x, bmr=bmr)
    params = dict(exported.named_parameters())
    assert set(params) == set(means) - set(kept)  # kept: latent sites outside the network
    for name, value in params.items():
        assert type(value) is nn.Parameter
        assert torch.equal(value, means[name])
        assert (value[~bmr.masks[name]] == 0).all()
    assert any((~mask).any() for mask in bmr.masks.values())
    with torch.no_grad():
        reference = poutine.condition(model, data=means)(x_new)
        assert torch.allclose(exported(x_new), reference, atol=1e-5)
    # the state round-trips, into the export and into a copy of it
    buffer = io.BytesIO()
    torch.save(exported.state_dict(), buffer)
    other = copy.deepcopy(exported)
    with torch.no_grad():
        for value in other.parameters():
            value.zero_()
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        assert torch.equal(other(x_new), exported(x_new))
    # the original model is untouched
    assert _pyro_compat.random_attributes(next(m for m in model.modules() if m is not model))


def test_tutorial_regression_exports_in_its_own_class():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g)
    coef = torch.tensor([2.0, 0.0, -1.5, 0.0, 0.0])
    y = x @ coef + 0.5 + 0.3 * torch.randn(100, generator=g)
    model = BayesianRegression(5, 1)
    guide, bmr = _fit_and_reduce(model, x, y, steps=100, lr=0.1)
    exported = _export_quietly(model, guide, x, bmr)
    assert type(exported.linear) is nn.Linear
    assert torch.equal(exported.linear.weight[0] == 0, coef == 0)
    x_new = torch.randn(7, 5, generator=g)
    _check_own_module_export(exported, model, guide, bmr, x, x_new, kept=["sigma"])
    # forward still runs the model's Pyro statements, not the weights' samples
    trace = poutine.trace(exported).get_trace(x_new)
    assert {"sigma", "obs"} <= set(trace.nodes) and "linear.weight" not in trace.nodes


def test_hand_written_bnn_exports_in_its_own_class():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = BNN(features=8, hidden=16, classes=2)
    guide, bmr = _fit_and_reduce(model, x, y, steps=60, lr=0.03)
    exported = _export_quietly(model, guide, x, bmr)
    assert [type(exported.fc1), type(exported.fc2)] == [nn.Linear, nn.Linear]
    x_new = torch.randn(9, 8, generator=g)
    _check_own_module_export(exported, model, guide, bmr, x, x_new, kept=[])


class _Medians:
    """A stand-in for a fitted guide: fixed posterior medians."""

    def __init__(self, **medians):
        self.medians = medians

    def median(self, *args, **kwargs):
        return dict(self.medians)


class ScaledLinear(PyroModule[nn.Linear]):
    """A user's subclass of a converted class, with a forward of its own."""

    def forward(self, x):
        return 2.0 * super().forward(x) + self.shift


def test_subclass_of_a_converted_class_keeps_its_forward():
    layer = ScaledLinear(3, 2)
    layer.weight = _gaussian(2, 3)
    layer.shift = PyroParam(torch.full((2,), 0.5), constraints.positive)
    weight = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    guide = _Medians(weight=weight)
    x = torch.randn(4, 3)
    exported = export(layer, guide, x)
    assert type(exported) is ScaledLinear
    assert _pyro_compat.random_attributes(exported) == ()
    assert _pyro_compat.param_attributes(exported) == {}
    assert torch.allclose(exported.shift, torch.full((2,), 0.5))
    with torch.no_grad():
        expected = 2.0 * (x @ weight.T + layer.bias) + 0.5
        assert torch.allclose(exported(x), expected, atol=1e-6)


class Sampler(BNN):
    """Returns the sampled labels: its output is random."""

    def forward(self, x, y=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def test_an_export_whose_output_is_random_warns():
    model = Sampler(features=3, hidden=4, classes=2)
    x = torch.randn(64, 3)
    guide = _Medians(**{name: site["value"] for name, site in _latents(model, x).items()})
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match=r"samples \['obs'\]") as caught:
        export(model, guide, x)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    assert list(pyro.get_param_store().keys()) == []  # the check left no parameters there


class Extra(BNN):
    """Uses a second head only when asked to."""

    def __init__(self):
        super().__init__(features=3, hidden=4, classes=2)
        self.extra = PyroModule[nn.Linear](4, 2)
        self.extra.weight = _gaussian(2, 4)

    def forward(self, x, y=None, extra=False):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + self.extra(h) if extra else self.fc2(h)


def _latents(model, *args, **kwargs):
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


def test_errors_name_the_submodule():
    model = Extra()
    x = torch.randn(5, 3)
    guide = _Medians(**{n: s["value"] for n, s in _latents(model, x, extra=True).items()})
    with pytest.raises(ValueError, match="'extra'.*'weight'.*site 'extra.weight' is not in"):
        export(model, guide, x)  # the model does not use its head on these arguments
    stranger = PyroModule[nn.Linear](3, 2)
    stranger.weight = _gaussian(2, 3)
    with pytest.raises(ValueError, match="exported module.*'weight'.*did not run"):
        export(model, guide, x, module=stranger)  # not part of the model
    assert type(export(model, guide, x, extra=True)) is Extra

    class Discrete(PyroModule):
        def __init__(self):
            super().__init__()
            self.k = PyroSample(dist.Categorical(logits=torch.zeros(3)))

        def forward(self, x):
            return x * self.k

    with pytest.raises(TypeError, match="exported module.*'k'.*discrete"):
        export(Discrete(), _Medians(), x)
