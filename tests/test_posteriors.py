"""The guides Pyro users write: AutoGuideList and guide functions, read by
pyro_bmr.guide_function_posterior and pyro_bmr.guide_list_posterior; and what mean_field_posterior refuses."""

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.nn import PyroModule, PyroParam

from pyro_bmr import BayesianModelReduction, delta_f, make_guide, posteriors, register_posterior
from pyro_bmr.guide_function_posterior import GuideFunctionPosterior
from pyro_bmr.guide_list_posterior import AutoGuideListPosterior
from pyro_bmr.posteriors import AutoNormalPosterior, MeanFieldPosterior, mean_field_posterior

D = 50  # coefficients, the first 5 non-zero
DELTA_REASON = (
    "drawn by AutoDelta (part 1 of the AutoGuideList), a point mass: BMR needs a Gaussian posterior"
)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, D, generator=g)
    w = torch.zeros(D)
    w[:5] = torch.tensor([2.0, -1.5, 1.0, 3.0, -2.0])
    return X, X @ w + 0.5 * torch.randn(100, generator=g)


def model(X, y=None):
    """Sparse linear regression with a learned noise scale, exp(log_sigma)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    log_sigma = pyro.sample("log_sigma", dist.Normal(0.0, 1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, log_sigma.exp()), obs=y)


def guide(X, y=None):
    """Written by hand: softplus scales, and a noise scale whose loc is no param."""
    loc = pyro.param("w_loc", torch.zeros(X.shape[-1]))
    rho = pyro.param("w_rho", torch.full((X.shape[-1],), -3.0))
    pyro.sample("w", dist.Normal(loc, F.softplus(rho)).to_event(1))
    log_sigma = pyro.param("log_sigma_half", torch.tensor(0.0))
    pyro.sample("log_sigma", dist.Normal(2 * log_sigma, 0.05))


def guide_list():
    guides = AutoGuideList(model)
    guides.append(AutoNormal(poutine.block(model, hide=["log_sigma"]), init_scale=0.05))
    guides.append(AutoDelta(poutine.block(model, expose=["log_sigma"])))
    return guides


def _fit(guide, X, y, steps=100, bmr=None):
    wrap = (lambda fn: fn) if bmr is None else bmr
    svi = SVI(wrap(model), wrap(guide), pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    for _ in range(steps):
        svi.step(X, y)


def _w_samples(bmr, guide, X):
    return Predictive(bmr(model), guide=bmr(guide), num_samples=5, return_sites=["w"])(X)["w"]


# -- AutoGuideList ---------------------------------------------------------------------


def test_auto_guide_list_reduces_its_mean_field_part(data):
    X, y = data
    guides = guide_list()
    _fit(guides, X, y)
    normal = guides[0]
    loc, scale = normal.locs.w.detach().clone(), normal.scales.w.detach().clone()

    bmr = BayesianModelReduction(guides)
    assert isinstance(bmr.posterior, AutoGuideListPosterior)
    assert bmr.model is model  # the list's model, not the part's blocked copy
    report = bmr.reduce(X, y)

    keep = bmr.masks["w"]
    assert keep[:5].all() and (~keep).sum() >= 40
    assert report.skipped == {"log_sigma": DELTA_REASON}
    torch.testing.assert_close(report.delta_f["w"], delta_f(loc, scale, 0.0, 1.0).delta_f)
    assert (normal.locs.w.detach()[~keep] == 0).all()
    assert torch.equal(normal.locs.w.detach()[keep], loc[keep])

    # training on: the pruned elements stay exactly zero, in the params and samples
    _fit(guides, X, y, steps=5, bmr=bmr)
    assert (normal.locs.w.detach()[~keep] == 0).all()
    assert (_w_samples(bmr, guides, X)[..., ~keep] == 0).all()
    bmr.reduce(X, y)  # and reduces again, with the list already set up
    assert not (bmr.masks["w"] & ~keep).any()


def test_auto_guide_list_posterior_sets_up_the_list_and_delegates(data):
    X, y = data
    guides = guide_list()
    posterior = mean_field_posterior(guides)
    with pytest.raises(ValueError, match="call prepare"):
        posterior.sites()
    state = torch.get_rng_state()
    with poutine.trace() as outer:
        posterior.prepare(X, y)  # never run: sets up the list and its parts
    assert len(outer.trace.nodes) == 0 and torch.equal(torch.get_rng_state(), state)
    assert guides.prototype_trace is not None and guides[1].prototype_trace is not None
    assert posterior.model is model
    assert posterior.sites() == {"w": None, "log_sigma": DELTA_REASON}

    loc, scale = posterior.loc_scale("w")
    assert loc.shape == scale.shape == (D,)
    assert torch.equal(scale, guides[0].scales.w.detach())
    with pytest.raises(ValueError, match="'log_sigma' of the AutoGuideList cannot be reduced"):
        posterior.loc_scale("log_sigma")
    keep = torch.arange(D) < 5
    posterior.assign("w", ~keep, torch.tensor(0.0), torch.tensor(0.3))
    assert (guides[0].locs.w[~keep] == 0).all()
    torch.testing.assert_close(guides[0].scales.w[~keep], torch.full((D - 5,), 0.3))
    assert posterior.guide_masks({"w": keep}) == {"w_unconstrained": keep}
    with pytest.raises(ValueError, match="'log_sigma' has a mask.*point mass"):
        posterior.guide_masks({"log_sigma": torch.tensor(True)})
    posterior.prepare(X, y)  # again: a no-op for autoguides
    assert torch.equal(posterior.loc_scale("w")[0], guides[0].locs.w.detach())


def test_guide_masks_before_the_list_has_run_name_the_fix():
    posterior = mean_field_posterior(guide_list())
    assert posterior.guide_masks({}) == {}
    with pytest.raises(ValueError, match="'w' is not known before the guide has run"):
        posterior.guide_masks({"w": torch.ones(D, dtype=torch.bool)})


def _part_function(X, y=None):
    loc = pyro.param("part_loc", torch.zeros(()))
    pyro.sample("log_sigma", dist.Normal(loc, 0.1))


@pytest.mark.parametrize(
    "part, reason",
    [
        (AutoDiagonalNormal, None),
        (AutoMultivariateNormal, "a Gaussian with correlations"),
        (AutoLowRankMultivariateNormal, "a Gaussian with correlations"),
        (AutoLaplaceApproximation, "cannot read: unsupported guide type AutoLaplace"),
        (_part_function, None),
    ],
    ids=["diagonal", "mvn", "lowrank", "laplace", "function"],
)
def test_every_kind_of_part_is_read_or_listed(data, part, reason):
    X, y = data
    guides = AutoGuideList(model)
    guides.append(AutoNormal(poutine.block(model, hide=["log_sigma"])))
    if part is _part_function:
        guides.append(part)
    else:
        guides.append(part(poutine.block(model, expose=["log_sigma"])))
    posterior = mean_field_posterior(guides)
    posterior.prepare(X, y)
    sites = posterior.sites()
    assert sites["w"] is None
    if reason is None:
        assert sites["log_sigma"] is None
        loc, scale = posterior.loc_scale("log_sigma")
        assert loc.shape == scale.shape == ()
        posterior.assign("log_sigma", torch.tensor(True), torch.tensor(0.0), None)
        assert posterior.loc_scale("log_sigma")[0] == 0
        masks = {"log_sigma": torch.tensor(True), "w": torch.ones(D, dtype=torch.bool)}
        translated = posterior.guide_masks(masks)
        assert "w_unconstrained" in translated and len(translated) == 2
    else:
        assert reason in sites["log_sigma"] and "part 1 of the AutoGuideList" in sites["log_sigma"]


def test_a_site_no_part_draws_is_listed(data):
    X, y = data
    guides = AutoGuideList(model)
    guides.append(AutoNormal(poutine.block(model, hide=["log_sigma"])))
    posterior = mean_field_posterior(guides)
    posterior.prepare(X, y)
    assert posterior.sites() == {
        "w": None,
        "log_sigma": "not drawn by any part of the AutoGuideList",
    }


# -- guide functions ------------------------------------------------------------------


def test_guide_function_is_reduced_through_its_params(data):
    X, y = data
    _fit(guide, X, y)
    loc = pyro.param("w_loc").detach().clone()
    scale = F.softplus(pyro.param("w_rho")).detach()

    bmr = BayesianModelReduction(guide, model=model)
    assert isinstance(bmr.posterior, GuideFunctionPosterior)
    report = bmr.reduce(X, y)

    keep = bmr.masks["w"]
    assert keep[:5].all() and (~keep).sum() >= 40
    torch.testing.assert_close(report.delta_f["w"], delta_f(loc, scale, 0.0, 1.0).delta_f)
    assert (pyro.param("w_loc").detach()[~keep] == 0).all()
    assert torch.equal(pyro.param("w_loc").detach()[keep], loc[keep])
    reason = report.skipped["log_sigma"]
    assert reason == (
        "guide site 'log_sigma': its Normal loc is not a pyro.param, so pruned elements cannot "
        "be pinned to zero; write loc = pyro.param(...) or register a MeanFieldPosterior with "
        "pyro_bmr.register_posterior"
    )

    # training on: the pruned elements stay exactly zero, in the params and samples
    _fit(guide, X, y, steps=5, bmr=bmr)
    assert (pyro.param("w_loc").detach()[~keep] == 0).all()
    assert (pyro.param("w_loc").grad[~keep] == 0).all()
    assert (_w_samples(bmr, guide, X)[..., ~keep] == 0).all()
    # the next reduction reads the params as they are now, not as first traced
    loc, scale = pyro.param("w_loc").detach().clone(), F.softplus(pyro.param("w_rho")).detach()
    report = bmr.reduce(X, y)
    expected = delta_f(loc, scale, 0.0, 1.0).delta_f
    torch.testing.assert_close(report.delta_f["w"][keep], expected[keep])


def test_keyword_arguments_reach_the_model_and_the_guide_at_every_reduction(data):
    X, y = data
    _fit(guide, X, y)
    bmr = BayesianModelReduction(guide, model=model)
    bmr.reduce(X=X, y=y)
    # the guide function is traced again with them: its scales are read as they are now
    with torch.no_grad():
        pyro.param("w_rho").sub_(1.0)
    loc, scale = pyro.param("w_loc").detach().clone(), F.softplus(pyro.param("w_rho")).detach()
    keep = bmr.masks["w"].clone()
    report = bmr.reduce(X=X, y=y)
    expected = delta_f(loc, scale, 0.0, 1.0).delta_f
    torch.testing.assert_close(report.delta_f["w"][keep], expected[keep])


def test_naming_a_site_whose_loc_is_no_param_is_an_error(data):
    X, y = data
    with pytest.raises(
        ValueError, match="'log_sigma' cannot be reduced: .*loc is not a pyro.param"
    ):
        BayesianModelReduction(guide, model=model, sites=["log_sigma"]).reduce(X, y)


def test_posterior_reads_fresh_values_without_a_new_prepare(data):
    X, y = data
    posterior = mean_field_posterior(guide)
    with pytest.raises(ValueError, match="call prepare"):
        posterior.loc_scale("w")
    state = torch.get_rng_state()
    with poutine.trace() as outer:
        posterior.prepare(X, y)
    assert len(outer.trace.nodes) == 0 and torch.equal(torch.get_rng_state(), state)
    _, scale = posterior.loc_scale("w")
    _fit(guide, X, y, steps=2)  # the params move in place
    loc, new_scale = posterior.loc_scale("w")
    assert torch.equal(new_scale, F.softplus(pyro.param("w_rho")).detach())
    assert not torch.equal(new_scale, scale)
    assert torch.equal(loc, pyro.param("w_loc").detach())
    with pytest.raises(ValueError, match="no latent site 'v'"):
        posterior.loc_scale("v")


def test_constrained_and_reshaped_params_are_written_through_the_store(data):
    X, y = data

    def guide(X, y=None):
        loc = pyro.param("W", torch.zeros(5, 10), constraint=constraints.interval(-10.0, 10.0))
        scale = pyro.param("w_scale", torch.full((D,), 0.1), constraint=constraints.positive)
        pyro.sample("w", dist.Normal(loc.reshape(D), scale).to_event(1))
        pyro.sample("log_sigma", dist.Normal(pyro.param("s", torch.tensor(-0.5)), 0.05))

    _fit(guide, X, y)
    loc = pyro.param("W").detach().reshape(D).clone()
    scale = pyro.param("w_scale").detach().clone()
    bmr = BayesianModelReduction(
        guide, model=model, sites=["w"], reduced_scale=0.01, update_posterior=True
    )
    report = bmr.reduce(X, y)
    keep = bmr.masks["w"]
    assert keep[:5].all() and (~keep).sum() >= 40
    reduced = delta_f(loc, scale, 0.0, 1.0, 0.0, 0.01)
    torch.testing.assert_close(report.delta_f["w"], reduced.delta_f)
    new_loc = pyro.param("W").detach().reshape(D)
    assert (new_loc[~keep] == 0).all()
    torch.testing.assert_close(new_loc[keep], reduced.loc[keep])
    torch.testing.assert_close(pyro.param("w_scale").detach()[keep], reduced.scale[keep])


def test_a_pyro_module_guide_is_read_through_its_pyro_params(data):
    X, y = data

    class Guide(PyroModule):
        def __init__(self):
            super().__init__()
            self.loc = PyroParam(torch.linspace(-1.0, 1.0, D))
            self.scale = PyroParam(torch.full((D,), 0.05), constraint=constraints.positive)

        def forward(self, X, y=None):
            pyro.sample("w", dist.Normal(self.loc, self.scale).to_event(1))

    guide = Guide()
    posterior = mean_field_posterior(guide)
    assert isinstance(posterior, GuideFunctionPosterior)
    posterior.prepare(X, y)
    assert posterior.sites() == {"w": None}
    where = torch.arange(D) % 2 == 0
    posterior.assign("w", where, torch.tensor(0.0), torch.tensor(0.2))
    loc, scale = posterior.loc_scale("w")
    assert (guide.loc.detach()[where] == 0).all() and torch.equal(loc, guide.loc.detach())
    torch.testing.assert_close(scale[where], torch.full((D // 2,), 0.2))
    torch.testing.assert_close(guide.scale.detach()[~where], torch.full((D // 2,), 0.05))


def test_guide_sites_that_cannot_be_pruned_are_listed_with_the_reason():
    def guide():
        pyro.sample("delta", dist.Delta(pyro.param("d", torch.zeros(3))).to_event(1))
        pyro.sample("twice", dist.Normal(2 * pyro.param("t", torch.zeros(3)), 1.0).to_event(1))
        one = pyro.param("one", torch.zeros(1))
        pyro.sample("broadcast", dist.Normal(one, torch.ones(3)).to_event(1))
        three = pyro.param("three", torch.zeros(3))
        pyro.sample("expanded", dist.Normal(three, 1.0).expand([2, 3]).to_event(2))
        pyro.sample("slice", dist.Normal(pyro.param("big", torch.zeros(2, 3))[1], 1.0).to_event(1))
        shared = pyro.param("shared", torch.zeros(3))
        pyro.sample("first", dist.Normal(shared, 1.0).to_event(1))
        pyro.sample("second", dist.Normal(shared, 1.0).to_event(1))
        positive = pyro.param("positive", torch.ones(3), constraint=constraints.positive)
        pyro.sample("positive_loc", dist.Normal(positive, 1.0).to_event(1))
        with pyro.plate("data", 10, subsample_size=4):
            pyro.sample("local", dist.Normal(pyro.param("z", torch.zeros(4)), 1.0))
        pyro.sample("ok", dist.Normal(pyro.param("ok_loc", torch.zeros(2)), 1.0).to_event(1))

    posterior = mean_field_posterior(guide)
    posterior.prepare()
    sites = posterior.sites()
    expected = {
        "delta": "guide site 'delta': Independent is not an elementwise Normal",
        "twice": "guide site 'twice': its Normal loc is not a pyro.param",
        "broadcast": "guide site 'broadcast': its Normal loc is a slice or broadcast of pyro.param 'one'",
        "expanded": "guide site 'expanded': its Normal loc is a slice or broadcast of pyro.param 'three'",
        "slice": "its Normal loc is a slice or broadcast of pyro.param 'big'",
        "first": "pyro.param 'shared' is also the loc of 'second'",
        "second": "pyro.param 'shared' is also the loc of 'first'",
        "positive_loc": "'positive' is constrained to GreaterThan(lower_bound=0.0), which excludes 0",
        "local": "inside the subsampled plate 'data'",
    }
    assert set(sites) == {*expected, "ok"} and sites["ok"] is None
    for name, reason in expected.items():
        assert reason in sites[name], (name, sites[name])
    with pytest.raises(ValueError, match="'twice': its Normal loc is not a pyro.param"):
        posterior.loc_scale("twice")


def test_update_posterior_needs_the_scale_to_be_a_param(data):
    X, y = data
    _fit(guide, X, y)
    bmr = BayesianModelReduction(
        guide, model=model, sites=["w"], reduced_scale=0.01, update_posterior=True
    )
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    with pytest.raises(
        ValueError, match="'w': update_posterior .* needs the Normal scale to be a pyro.param"
    ):
        bmr.reduce(X, y)
    # reduce checks before it writes: the guide is untouched, and no mask was set
    assert all(torch.equal(v.detach(), before[k]) for k, v in pyro.get_param_store().items())
    assert dict(bmr.masks) == {}
    # the posterior itself checks before it writes anything
    posterior = mean_field_posterior(guide)
    posterior.prepare(X, y)
    pyro.param("w_loc").data.fill_(1.0)
    where = torch.ones(D, dtype=torch.bool)
    with pytest.raises(ValueError, match="update_posterior"):
        posterior.assign("w", where, torch.tensor(0.0), torch.tensor(0.2))
    assert (pyro.param("w_loc") == 1).all()
    posterior.check_assign("w", scale=False)  # pruning alone is fine
    posterior.assign("w", where, torch.tensor(0.0), None)
    assert (pyro.param("w_loc") == 0).all()


def test_guide_function_errors_say_what_to_do(data):
    X, y = data
    with pytest.raises(TypeError, match=r"BayesianModelReduction\(guide, model=model\)"):
        BayesianModelReduction(guide).reduce(X, y)

    def needs_three(X, y, z):
        pass

    bmr = BayesianModelReduction(needs_three, model=model)
    with pytest.raises(
        TypeError, match="could not trace the guide .*needs_three.*register_posterior"
    ):
        bmr.reduce(X, y)


# -- what mean_field_posterior refuses, and registration -------------------------------


def test_the_tuple_make_guide_returns_is_rejected_with_the_fix():
    message = r"make_guide returns \(guide, training_context\): pass the guide, e.g. `guide, training = make_guide\(model, 'local'\)`"
    with pytest.raises(TypeError, match=message):
        BayesianModelReduction(make_guide(model, "local"))
    with pytest.raises(TypeError, match=message):
        mean_field_posterior(make_guide(model))
    with pytest.raises(TypeError, match="a guide must be callable, got int"):
        mean_field_posterior(3)


def test_register_posterior_for_one_guide_function(monkeypatch):
    monkeypatch.setattr(posteriors, "_BY_GUIDE", {})

    class Mine(AutoNormalPosterior):
        pass

    def other(X, y=None):
        pass

    register_posterior(guide)(Mine)
    assert type(mean_field_posterior(guide)) is Mine
    assert type(mean_field_posterior(other)) is GuideFunctionPosterior
    with pytest.raises(TypeError, match="a guide type or a guide callable, got int"):
        register_posterior(3)
    assert issubclass(Mine, MeanFieldPosterior)
