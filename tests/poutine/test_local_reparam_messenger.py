import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_bmr import BayesianModelReduction
from pyro_bmr.guides import MeanFieldGuide
from pyro_bmr.poutine.local_reparam_messenger import (
    LOCAL_REPARAMETERIZATION,
    LocalReparameterizationMessenger,
    local_reparameterization,
)

ORIGINAL = {name: getattr(F, name) for name in ("linear", "conv1d", "conv2d", "conv3d")}


def _mlp_model(x, y=None):
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 2.0).expand([2, 4]).to_event(2))
    h = F.linear(torch.relu(F.linear(x, w1, b1)), w2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Categorical(logits=h), obs=y)
    return h


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def _fitted_guide(model, x, y, steps=30):
    guide = MeanFieldGuide(model, init_scale=0.3)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide


def _run(handler, model, guide, *args):
    with handler:
        guide_trace = poutine.trace(guide).get_trace(*args)
        return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)


def test_first_run_draws_weights_then_sites_turn_local():
    x, y = _data()
    guide = _fitted_guide(_mlp_model, x, y)
    handler = local_reparameterization()
    first = _run(handler, _mlp_model, guide, x, y)
    assert first.nodes["w1"]["infer"][LOCAL_REPARAMETERIZATION]
    assert isinstance(first.nodes["w1"]["fn"], dist.Independent)  # drawn as usual
    second = _run(handler, _mlp_model, guide, x, y)
    loc = guide.median()
    for name in ("w1", "b1", "w2"):
        # the guide's stand-in is the posterior mean; nothing is drawn
        assert torch.equal(second.nodes[name]["value"], loc[name])
    assert type(second.nodes["w1"]["fn"]).__name__ == "_NegativeKL"


def test_analytic_kl_matches_torch():
    x, y = _data()
    guide = _fitted_guide(_mlp_model, x, y)
    handler = local_reparameterization()
    _run(handler, _mlp_model, guide, x, y)
    trace = _run(handler, _mlp_model, guide, x, y)
    trace.compute_log_prob()
    loc = guide.loc.detach()
    scale = guide.scale.detach()
    for site, prior_scale in (("w1", 1.0), ("b1", 1.0), ("w2", 2.0)):
        part = guide._site(site)
        q = torch.distributions.Normal(loc[part.start : part.stop], scale[part.start : part.stop])
        p = torch.distributions.Normal(0.0, prior_scale)
        expected = -kl_divergence(q, p).sum()
        assert torch.allclose(trace.nodes[site]["log_prob_sum"], expected, rtol=1e-5)


def test_per_element_prior_kl_matches_torch():
    prior_loc = torch.linspace(-1, 1, 12).reshape(4, 3)
    prior_scale = torch.linspace(0.5, 2, 12).reshape(4, 3)

    def model(x):
        w = pyro.sample("w", dist.Normal(prior_loc, prior_scale).to_event(2))
        return F.linear(x, w)

    x, _ = _data()
    guide = MeanFieldGuide(model, init_scale=0.4)
    guide(x)
    with torch.no_grad():
        guide.loc.normal_()
    handler = local_reparameterization()
    _run(handler, model, guide, x)
    trace = _run(handler, model, guide, x)
    trace.compute_log_prob()
    q = torch.distributions.Normal(guide.loc.detach().view(4, 3), guide.scale.detach().view(4, 3))
    expected = -kl_divergence(q, torch.distributions.Normal(prior_loc, prior_scale)).sum()
    assert torch.allclose(trace.nodes["w"]["log_prob_sum"], expected, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_kl_gradient(masked):
    from pyro_bmr.poutine.local_reparam_messenger import _Draw, _kl_scalar_prior

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    rho = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    keep = torch.rand(4, 3, generator=g) > 0.4 if masked else None
    m, s = torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64)

    def fused(mu, rho):
        return _kl_scalar_prior(_Draw("w", mu, rho.exp(), keep, True), m, s, keep)

    def composed(mu, rho):  # the same KL through autograd
        return _kl_scalar_prior(
            _Draw("w", mu, rho.exp(), keep, True), m.requires_grad_(), s.requires_grad_(), keep
        )

    assert torch.autograd.gradcheck(fused, (mu, rho))
    assert torch.allclose(fused(mu, rho), composed(mu, rho))
    q = torch.distributions.Normal(mu, rho.exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(m, s))
    assert torch.allclose(fused(mu, rho), kl.sum() if keep is None else kl[keep].sum())


def test_preactivations_have_the_moments_of_sampled_weights():
    torch.manual_seed(0)
    loc = torch.randn(3, 5)
    scale = torch.rand(3, 5) + 0.1
    b_loc, b_scale = torch.randn(3), torch.rand(3) + 0.1
    x = torch.randn(1, 5).expand(20000, 5)

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 5]).to_event(2))
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        return F.linear(x, w, b)

    def guide(x):
        infer = {LOCAL_REPARAMETERIZATION: True}
        pyro.sample("w", dist.Normal(loc, scale).to_event(2), infer=dict(infer))
        pyro.sample("b", dist.Normal(b_loc, b_scale).to_event(1), infer=dict(infer))

    handler = local_reparameterization()
    _run(handler, model, guide, x)
    out = _run(handler, model, guide, x).nodes["_RETURN"]["value"]
    mean = x[0] @ loc.T + b_loc
    var = x[0].square() @ scale.square().T + b_scale.square()
    # independent draws per example: sample moments within 5 standard errors
    assert torch.allclose(out.mean(0), mean, atol=5 * (var / 20000).sqrt().max().item())
    assert torch.allclose(out.var(0), var, rtol=0.05)


def test_conv2d_preactivations_have_the_moments_of_sampled_weights():
    torch.manual_seed(0)
    loc, scale = torch.randn(2, 1, 3, 3), torch.rand(2, 1, 3, 3) + 0.1
    x = torch.randn(1, 1, 4, 4).expand(8000, 1, 4, 4)

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 1, 3, 3]).to_event(4))
        return nn.functional.conv2d(x, w, padding=1)

    def guide(x):
        pyro.sample(
            "w", dist.Normal(loc, scale).to_event(4), infer={LOCAL_REPARAMETERIZATION: True}
        )

    handler = local_reparameterization()
    _run(handler, model, guide, x)
    out = _run(handler, model, guide, x).nodes["_RETURN"]["value"]
    mean = ORIGINAL["conv2d"](x[:1], loc, padding=1)[0]
    var = ORIGINAL["conv2d"](x[:1].square(), scale.square(), padding=1)[0]
    assert torch.allclose(out.mean(0), mean, atol=5 * (var / 8000).sqrt().max().item())
    assert torch.allclose(out.var(0), var, rtol=0.1)


def test_local_elbo_has_the_expectation_of_the_sampled_elbo():
    x, y = _data(n=8)
    guide = _fitted_guide(_mlp_model, x, y)
    elbo = Trace_ELBO()
    with torch.no_grad():
        sampled = torch.tensor([elbo.loss(_mlp_model, guide, x, y) for _ in range(800)])
        handler = local_reparameterization()
        with handler:
            local = torch.tensor([elbo.loss(_mlp_model, guide, x, y) for _ in range(800)])
    se = (sampled.var() / 800 + local.var() / 800).sqrt()
    assert abs(sampled.mean() - local.mean()) < 4 * se
    assert local.var() < sampled.var()  # the KL term no longer adds noise


def test_trace_mean_field_elbo_matches_trace_elbo_under_the_handler():
    x, y = _data()
    guide = _fitted_guide(_mlp_model, x, y)
    handler = local_reparameterization()
    with handler, torch.no_grad():
        Trace_ELBO().loss(_mlp_model, guide, x, y)
        pyro.set_rng_seed(1)
        a = Trace_ELBO().loss(_mlp_model, guide, x, y)
        pyro.set_rng_seed(1)
        b = TraceMeanField_ELBO().loss(_mlp_model, guide, x, y)
    assert a == pytest.approx(b, rel=1e-6)


def test_pruned_weights_add_no_mean_and_no_variance():
    x, y = _data()
    guide = _fitted_guide(_mlp_model, x, y)
    bmr = BayesianModelReduction(guide)
    bmr.sites(x, y)
    keep = torch.ones(4, 3, dtype=torch.bool)
    keep[1] = False  # unit 1 of the hidden layer loses every incoming weight ...
    bmr.set_mask("w1", keep)
    bmr.set_mask("b1", torch.tensor([True, False, True, True]))  # ... and its bias
    handler = local_reparameterization()
    hidden = {}

    def model(x, y=None):
        w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
        b1 = pyro.sample("b1", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
        hidden["pre"] = F.linear(x, w1, b1)
        w2 = pyro.sample("w2", dist.Normal(0.0, 2.0).expand([2, 4]).to_event(2))
        h = F.linear(torch.relu(hidden["pre"]), w2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=h), obs=y)

    with handler:
        for _ in range(2):  # the first run draws the weights and learns their use
            Trace_ELBO().loss(bmr(model), bmr(guide), x, y)
        assert {"w1", "b1", "w2"} <= handler._analytic
        part = guide._site("w1")
        with torch.no_grad():  # a pruned location that drifted must not leak through
            guide.loc_unconstrained[part.start + 3 : part.start + 6] = 5.0
        loss = Trace_ELBO().differentiable_loss(bmr(model), bmr(guide), x, y)
        loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(hidden["pre"][:, 1].abs() < 1e-12)  # pruned unit: no mean, no noise
    assert torch.all(hidden["pre"][:, 0].abs() > 0)
    grad = guide.loc_unconstrained.grad[part.start : part.stop].view(4, 3)
    scale_grad = guide.scale_unconstrained.grad[part.start : part.stop].view(4, 3)
    assert torch.all(grad[1] == 0) and torch.all(scale_grad[1] == 0)
    assert torch.all(grad[0] != 0) and torch.all(torch.isfinite(scale_grad))


def test_kl_of_pruned_sites_sums_over_kept_elements():
    x, y = _data()
    guide = _fitted_guide(_mlp_model, x, y)
    bmr = BayesianModelReduction(guide)
    bmr.sites(x, y)
    keep = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) > 0.5
    bmr.set_mask("w1", keep)
    handler = local_reparameterization()
    _run(handler, bmr(_mlp_model), bmr(guide), x, y)
    trace = _run(handler, bmr(_mlp_model), bmr(guide), x, y)
    trace.compute_log_prob()
    part = guide._site("w1")
    q = torch.distributions.Normal(
        guide.loc.detach()[part.start : part.stop].view(4, 3),
        guide.scale.detach()[part.start : part.stop].view(4, 3),
    )
    expected = -(kl_divergence(q, torch.distributions.Normal(0.0, 1.0)) * keep).sum()
    assert torch.allclose(trace.nodes["w1"]["log_prob_sum"], expected, rtol=1e-5)


def test_weights_not_fed_to_one_layer_call_are_drawn():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 3]).to_event(2))
        v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([3, 3]).to_event(2))
        u = pyro.sample("u", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        h = F.linear(F.linear(x, w), w)  # w shared by two calls
        return h + x @ v.T + u  # v and u never in a layer call

    x, _ = _data()
    guide = MeanFieldGuide(model)
    handler = local_reparameterization()
    for _ in range(3):
        trace = _run(handler, model, guide, x)
    assert handler._analytic == set()
    for name in ("w", "v", "u"):
        assert isinstance(trace.nodes[name]["fn"], dist.Independent)


def test_a_site_that_stops_feeding_its_layer_is_an_error():
    use_layer = {"on": True}

    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3, 3]).to_event(2))
        return F.linear(x, w) if use_layer["on"] else x @ w.T

    x, _ = _data()
    guide = MeanFieldGuide(model)
    handler = local_reparameterization()
    _run(handler, model, guide, x)
    _run(handler, model, guide, x).compute_log_prob()
    use_layer["on"] = False
    trace = _run(handler, model, guide, x)
    with pytest.raises(RuntimeError, match="'w' fed 0 linear"):
        trace.compute_log_prob()


def test_handler_restores_functional():
    handler = local_reparameterization()
    assert isinstance(handler, LocalReparameterizationMessenger)
    with pytest.raises(RuntimeError):
        with handler:
            assert F.linear is not ORIGINAL["linear"]
            raise RuntimeError("boom")
    assert all(getattr(F, name) is fn for name, fn in ORIGINAL.items())


def test_function_form_wraps_what_runs_inference():
    x, y = _data()
    guide = _fitted_guide(_mlp_model, x, y)

    def both(*args):
        guide_trace = poutine.trace(guide).get_trace(*args)
        return poutine.trace(poutine.replay(_mlp_model, trace=guide_trace)).get_trace(*args)

    wrapped = local_reparameterization(both)
    wrapped(x, y)
    second = wrapped(x, y)
    assert type(second.nodes["w1"]["fn"]).__name__ == "_NegativeKL"
    assert torch.equal(second.nodes["w1"]["value"], guide.median()["w1"])
    assert all(getattr(F, name) is fn for name, fn in ORIGINAL.items())
    # wrapping the model alone leaves it as it is: its weights are drawn and used
    model_only = local_reparameterization(_mlp_model)
    for _ in range(2):
        trace = poutine.trace(model_only).get_trace(x, y)
        assert isinstance(trace.nodes["w1"]["fn"], dist.Independent)


def test_layers_reach_the_handler_as_messages():
    seen = []

    class Spy(pyro.poutine.messenger.Messenger):
        def _pyro_affine_layer(self, msg):
            seen.append((msg["fn"].__name__, len(msg["args"])))

    x = torch.randn(3, 4)
    with local_reparameterization(), Spy():
        F.linear(x, torch.randn(2, 4))
        F.conv1d(x.unsqueeze(1), torch.randn(5, 1, 2), None, 1)
    assert seen == [("linear", 2), ("conv1d", 4)]
    assert torch.allclose(F.linear(x, torch.ones(1, 4)), x.sum(1, keepdim=True))


def test_svi_with_handler_and_pyro_module_layers_learns():
    from pyro.nn import PyroModule, PyroSample

    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = PyroModule[nn.Linear](3, 2)
            self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
            self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([2]).to_event(1))

        def forward(self, x, y=None):
            logits = self.fc(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
            return logits

    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    net = Net()
    guide = MeanFieldGuide(net, init_scale=0.05)
    svi = SVI(net, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    handler = local_reparameterization()
    with handler:
        losses = [svi.step(x, y) for _ in range(150)]
    assert {"fc.weight", "fc.bias"} <= handler._analytic
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_step_on_cuda():
    x, y = (t.cuda() for t in _data())

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(x.new_zeros(()), 1.0).expand([2, 3]).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=F.linear(x, w)), obs=y)

    guide = MeanFieldGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    handler = local_reparameterization()
    with handler:
        for _ in range(3):
            svi.step(x, y)
    assert handler._analytic == {"w"} and guide.loc.is_cuda
