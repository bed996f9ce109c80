from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_bmr import BayesianModelReduction
from pyro_bmr.guides import GUIDES, MeanFieldGuide, MeanFieldGuidePosterior, make_guide
from pyro_bmr.posteriors import mean_field_posterior
from pyro_bmr.poutine import LocalReparameterizationMessenger
from pyro_bmr.poutine.local_reparam_messenger import LOCAL_REPARAMETERIZATION


def _conjugate_model(y):
    # w ~ N(0, 1) per coordinate, y_n ~ N(w, 1): posterior N(sum y / (n + 1), 1 / (n + 1))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(w, 1.0).to_event(1), obs=y)


def _mixed_model(x):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=4) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("obs", dist.Normal(z @ w, sigma).to_event(1), obs=x[idx])


def test_fits_the_conjugate_posterior():
    y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)) + 1.0
    guide = MeanFieldGuide(_conjugate_model)
    optim = pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.99})  # lr 0.1 -> 0.002
    svi = SVI(_conjugate_model, guide, optim, Trace_ELBO())
    for _ in range(400):
        svi.step(y)
    loc, scale = mean_field_posterior(guide).loc_scale("w")
    assert torch.allclose(loc, y.sum(0) / 21, atol=0.05)
    assert torch.allclose(scale, torch.full((3,), 21**-0.5), rtol=0.1)


def test_sites_shapes_plates_and_constraints():
    x = torch.randn(10, 3)
    guide = MeanFieldGuide(
        _mixed_model, init_loc_fn=init_to_value(values={"sigma": torch.tensor(2.0)})
    )
    trace = poutine.trace(guide).get_trace(x)
    assert guide.loc.shape == (2 * 3 + 1 + 10 * 2,)  # z at the full plate size
    assert trace.nodes["w"]["value"].shape == (2, 3)
    assert trace.nodes["z"]["value"].shape == (4, 2)  # subsampled
    assert trace.nodes["sigma"]["value"] > 0
    assert trace.nodes["w"]["infer"][LOCAL_REPARAMETERIZATION]
    median = guide.median()
    assert median["sigma"] == pytest.approx(2.0)
    assert median["z"].shape == (10, 2)
    # one param statement for all locations and one for all scales
    params = [n for n, s in poutine.trace(guide).get_trace(x).nodes.items() if s["type"] == "param"]
    assert params == ["MeanFieldGuide.loc", "MeanFieldGuide.scale"]
    # model and guide agree on every latent site, so any ELBO runs
    loss = Trace_ELBO().loss(_mixed_model, guide, x)
    assert torch.isfinite(torch.tensor(loss))


def test_init_and_errors():
    with pytest.raises(ValueError, match="init_scale"):
        MeanFieldGuide(_conjugate_model, init_scale=0.0)
    guide = MeanFieldGuide(_conjugate_model, init_scale=0.3)
    guide(torch.zeros(2, 3))
    assert torch.allclose(guide.scale, torch.full((3,), 0.3))
    assert torch.all(guide.loc == 0)  # init_to_feasible, as AutoNormal
    with pytest.raises(ValueError, match="no site 'v'"):
        guide._site("v")

    def empty(x):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="no latent sample sites"):
        MeanFieldGuide(empty)(torch.zeros(()))

    def mixed_dtype():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))

    with pytest.raises(ValueError, match="'b' has dtype torch.float64"):
        MeanFieldGuide(mixed_dtype)()


def test_bayesian_model_reduction_reads_and_prunes_the_guide():
    x = torch.randn(10, 3)
    guide = MeanFieldGuide(_mixed_model)
    svi = SVI(_mixed_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    posterior = mean_field_posterior(guide)
    assert isinstance(posterior, MeanFieldGuidePosterior)
    assert posterior.sites()["w"] is None and "constrained" in posterior.sites()["sigma"]
    loc, scale = posterior.loc_scale("w")
    part = guide._site("w")
    assert torch.equal(loc, guide.loc.detach()[part.start : part.stop].view(2, 3))
    assert torch.equal(scale, guide.scale.detach()[part.start : part.stop].view(2, 3))
    # σ = exp(ρ) exactly, and reduce's fused path gets views of the parameters
    assert torch.equal(guide.scale.detach(), guide.scale_unconstrained.detach().exp())
    loc_view, rho_view = posterior.loc_log_scale("w")
    offset = part.start * loc_view.element_size()
    assert loc_view.data_ptr() == guide.loc_unconstrained.data_ptr() + offset
    assert torch.equal(rho_view.exp(), scale)

    bmr = BayesianModelReduction(guide, sites=["w"])
    bmr.sites(x)
    keep = torch.tensor([[True, False, True], [False, True, True]])
    bmr.set_mask("w", keep)
    samples = Predictive(bmr(_mixed_model), guide=bmr(guide), num_samples=20)(x)["w"]
    samples = samples.reshape(20, 2, 3)
    assert torch.all(samples[:, ~keep] == 0) and torch.all(samples[:, keep] != 0)

    posterior.assign("w", ~keep, torch.tensor(0.0), torch.tensor(0.5))
    loc, scale = posterior.loc_scale("w")
    assert torch.all(loc[~keep] == 0) and torch.allclose(scale[~keep], torch.tensor(0.5))
    assert torch.all(loc[keep] != 0)


def test_reduce_end_to_end():
    y = torch.randn(30, 3, generator=torch.Generator().manual_seed(1))
    y[:, 0] += 3.0  # only the first coordinate is far from zero
    guide = MeanFieldGuide(_conjugate_model)
    bmr = BayesianModelReduction(guide)
    svi = SVI(bmr(_conjugate_model), bmr(guide), pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(y)
    report = bmr.reduce(y)
    assert bmr.masks["w"][0] and report.num_elements == 3
    pruned = ~bmr.masks["w"]
    assert torch.all(mean_field_posterior(guide).loc_scale("w")[0][pruned] == 0)


@pytest.mark.parametrize("kind", GUIDES)
def test_make_guide(kind):
    guide, training = make_guide(_conjugate_model, kind, init_scale=0.05)
    expected = AutoNormal if kind == "auto" else MeanFieldGuide
    assert type(guide) is expected
    context = LocalReparameterizationMessenger if kind == "local" else nullcontext
    assert isinstance(training, context)
    y = torch.randn(5, 3)
    svi = SVI(_conjugate_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(2):
        with training:
            svi.step(y)
    assert mean_field_posterior(guide).loc_scale("w")[1].shape == (3,)


def test_make_guide_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown guide kind 'fast'"):
        make_guide(_conjugate_model, "fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guide_on_cuda():
    y = torch.randn(5, 3, device="cuda")

    def model(y):
        w = pyro.sample("w", dist.Normal(y.new_zeros(()), 1.0).expand([3]).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("obs", dist.Normal(w, 1.0).to_event(1), obs=y)

    guide = MeanFieldGuide(model)
    SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()).step(y)
    assert guide.loc.is_cuda and guide.median()["w"].is_cuda
