import io
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoNormal,
)
from pyro.infer.reparam import LocScaleReparam
from pyro.optim import Adam

from pyro_bmr import BayesianModelReduction, MaskError, ThresholdRule, delta_f
from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.poutine import PruneMessenger

from .models import BayesianMLP, autonormal_at, fit, regression_model, subsampled_model


def _fitted_and_reduced(data, steps):
    """The sparse regression fitted by SVI for ``steps`` steps, then reduced once."""
    X, y, _ = data
    guide = AutoNormal(regression_model)
    fit(regression_model, guide, X, y, steps=steps)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X, y)
    return X, y, guide, bmr


def test_reduce_prunes_the_null_coefficients_and_zeroes_them(sparse_regression):
    X, y, w = sparse_regression
    guide = AutoNormal(regression_model)
    fit(regression_model, guide, X, y)
    bmr = BayesianModelReduction(guide)
    assert bmr.guide is guide and bmr.model is guide.model
    kept_before = guide.locs.w.detach().clone()
    report = bmr.reduce(X, y)

    keep = bmr.masks["w"]
    assert keep.dtype == torch.bool and keep.shape == (50,)
    assert keep[:5].all()
    assert (~keep[5:]).sum() >= 40
    assert report.num_pruned == int((~keep).sum()) == report.num_newly_pruned
    assert report.num_elements == 50
    assert torch.equal(report.delta_f["w"] > 0, ~keep)
    assert report.total_delta_f == pytest.approx(report.delta_f["w"][~keep].sum().item(), rel=1e-5)
    assert report.total_delta_f > 0
    # pruned locs are zero, kept locs untouched
    loc = guide.locs.w.detach()
    assert torch.equal(loc[~keep], torch.zeros(int((~keep).sum())))
    assert torch.equal(loc[keep], kept_before[keep])
    # the report explains the observed site is not a latent, and skips nothing else
    assert report.skipped == {}
    sparsity = bmr.sparsity()
    assert sparsity.per_site["w"] == pytest.approx((~keep).float().mean().item())
    assert sparsity.total == sparsity.per_site["w"]


def test_reduced_model_and_guide_log_densities_drop_pruned_elements(sparse_regression):
    X, y, guide, bmr = _fitted_and_reduced(sparse_regression, steps=200)
    keep = bmr.masks["w"]

    guide_tr = pyro.poutine.trace(bmr(guide)).get_trace(X, y)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(bmr(regression_model), guide_tr)).get_trace(
        X, y
    )
    w = guide_tr.nodes["w"]["value"]
    assert torch.equal(w[~keep], torch.zeros(int((~keep).sum())))
    assert (w[keep] != 0).all()

    aux = guide_tr.nodes["w_unconstrained"]
    assert isinstance(aux["fn"], PrunedNormal)
    loc, scale = guide.locs.w.detach(), guide.scales.w.detach()
    expected_q = dist.Normal(loc, scale).log_prob(w)[keep].sum()
    assert torch.allclose(aux["fn"].log_prob(w), expected_q)
    expected_p = dist.Normal(0.0, 1.0).log_prob(w)[keep].sum()
    assert torch.allclose(model_tr.nodes["w"]["fn"].log_prob(w), expected_p)
    # a non-zero value at a pruned position has no density under the point mass
    bad = w.clone()
    bad[~keep] = 0.1
    assert model_tr.nodes["w"]["fn"].log_prob(bad) == -float("inf")


def test_plate_with_subsampling_masks_follow_the_subsample():
    pyro.set_rng_seed(1)
    N, d = 300, 6
    X = torch.randn(N, d)
    y = X @ torch.tensor([1.0, 0, 0, -2.0, 0, 0]) + 0.5 * torch.randn(N)
    guide = AutoNormal(subsampled_model)
    bmr = BayesianModelReduction(guide, local_latents=True)  # z is local to the data
    fit(subsampled_model, guide, X, y, steps=400)
    report = bmr.reduce(X, y)
    assert set(bmr.masks) == {"w", "z"}
    assert bmr.masks["z"].shape == (N,)  # the full plate, not the subsample
    assert (~bmr.masks["z"]).any() and (~bmr.masks["w"]).any()
    assert report.num_elements == N + d

    tr = pyro.poutine.trace(bmr(guide)).get_trace(X, y)
    idx = tr.nodes["data"]["value"]
    z = tr.nodes["z"]["value"]
    assert z.shape == (64,)
    assert torch.equal(z == 0, ~bmr.masks["z"][idx])
    # training continues on the reduced model
    fit(subsampled_model, guide, X, y, steps=5, bmr=bmr)


def test_pyro_module_mlp_with_dotted_site_names():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    net = BayesianMLP()
    guide = AutoNormal(net)
    fit(net, guide, x, y, steps=50)
    bmr = BayesianModelReduction(guide, ThresholdRule(-1.0))
    bmr.reduce(x, y)
    assert set(bmr.masks) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert bmr.masks["fc1.weight"].shape == (8, 4)
    assert bmr.sparsity().total > 0
    samples = Predictive(bmr(net), guide=bmr(guide), num_samples=20)(x)
    w = samples["fc1.weight"].reshape(20, 8, 4)
    assert (w[:, ~bmr.masks["fc1.weight"]] == 0).all()
    assert (w[:, bmr.masks["fc1.weight"]] != 0).all()


def test_predictive_gives_exact_zeros_and_reduced_predictions(sparse_regression):
    X, y, guide, bmr = _fitted_and_reduced(sparse_regression, steps=200)
    keep = bmr.masks["w"]
    pred = Predictive(bmr(regression_model), guide=bmr(guide), num_samples=50)
    w = pred(X)["w"].reshape(50, 50)
    assert (w[:, ~keep] == 0).all() and (w[:, keep] != 0).all()
    # the prior predictive of the reduced model is also pruned
    prior = Predictive(bmr(regression_model), num_samples=10)(X)
    assert (prior["w"].reshape(10, 50)[:, ~keep] == 0).all()


@pytest.mark.parametrize(
    "loss",
    [
        Trace_ELBO(),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        TraceMeanField_ELBO(),
        TraceGraph_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=2),
        JitTrace_ELBO(),
    ],
    ids=["Trace", "Trace-vectorized", "TraceMeanField", "TraceGraph", "Renyi", "JitTrace"],
)
def test_every_elbo_trains_the_reduced_model_without_touching_pruned_elements(
    loss, sparse_regression
):
    X, y, guide, bmr = _fitted_and_reduced(sparse_regression, steps=150)
    keep = bmr.masks["w"]
    assert (~keep).sum() > 30

    svi = SVI(bmr(regression_model), bmr(guide), Adam({"lr": 0.01}), loss)
    for _ in range(3):
        value = svi.step(X, y)
        assert torch.isfinite(torch.tensor(value))
        loc_param = pyro.param("AutoNormal.locs.w").unconstrained()
        assert loc_param.grad is None or (loc_param.grad[~keep] == 0).all()
    # pruned locs never move: their gradient and hence Adam's moments are zero
    assert (guide.locs.w.detach()[~keep] == 0).all()


def test_auto_diagonal_normal_is_supported(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoDiagonalNormal(regression_model)
    fit(regression_model, guide, X, y, steps=300)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X, y)
    keep = bmr.masks["w"]
    assert keep[:5].all() and (~keep[5:]).sum() >= 40
    assert (guide.loc.detach()[~keep] == 0).all()
    samples = Predictive(bmr(regression_model), guide=bmr(guide), num_samples=10)(X)
    assert (samples["w"].reshape(10, 50)[:, ~keep] == 0).all()
    fit(regression_model, guide, X, y, steps=3, bmr=bmr)


def test_non_gaussian_and_constrained_sites_are_listed_not_scored():
    def model(X, y=None):
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        log_w = pyro.sample("log_w", dist.LogNormal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 2.0).to_event(1))
        with pyro.plate("data", X.shape[0]):
            pyro.sample("y", dist.Normal(X @ w * log_w, sigma), obs=y)

    X, y = torch.randn(20, 3), torch.randn(20)
    guide = AutoNormal(model)
    guide(X, y)
    report = BayesianModelReduction(guide).reduce(X, y)
    assert set(report.delta_f) == {"w"}
    assert "HalfNormal" in report.skipped["sigma"] or "constrained" in report.skipped["sigma"]
    assert "log_w" in report.skipped
    with pytest.raises(ValueError, match="'sigma' cannot be reduced"):
        BayesianModelReduction(guide, sites=["sigma"]).reduce(X, y)


def test_priors_with_non_zero_loc_and_per_element_scale_are_read_exactly():
    prior_loc = torch.tensor([0.5, -1.0, 0.0])
    prior_scale = torch.tensor([0.3, 2.0, 1.0])

    def model():
        pyro.sample("w", dist.Normal(prior_loc, prior_scale).to_event(1))

    guide = AutoNormal(model, init_scale=0.05)
    guide()
    loc, scale = guide.locs.w.detach().clone(), guide.scales.w.detach().clone()
    report = BayesianModelReduction(guide).reduce()
    expected = delta_f(loc, scale, prior_loc, prior_scale).delta_f
    assert torch.equal(report.delta_f["w"], expected)


def test_hierarchical_prior_is_detected():
    def model():
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        pyro.sample("w", dist.Normal(0.0, tau).expand([4]).to_event(1))

    guide = AutoNormal(model)
    guide()
    report = BayesianModelReduction(guide).reduce()
    assert "w" in report.skipped and "LocScaleReparam" in report.skipped["w"]

    reparam = pyro.poutine.reparam(model, {"w": LocScaleReparam(0.0)})
    guide = AutoNormal(reparam)
    guide()
    report = BayesianModelReduction(guide).reduce()
    assert "w_decentered" in report.delta_f


def test_a_guide_that_is_not_gaussian_is_rejected():
    with pytest.raises(TypeError, match="AutoDelta is not a Gaussian guide"):
        BayesianModelReduction(AutoDelta(regression_model))


def test_unsupported_guide_and_rule_types_are_rejected():
    with pytest.raises(TypeError, match="unsupported guide type"):
        BayesianModelReduction(pyro.infer.autoguide.AutoLaplaceApproximation(regression_model))
    with pytest.raises(TypeError, match="^rule must be a PruningRule, got float$"):
        BayesianModelReduction(AutoNormal(regression_model), rule=0.5)


@pytest.mark.parametrize("reduced_scale", [0.0, 0.3])
def test_nan_or_non_positive_guide_scale_names_the_site(reduced_scale, sparse_regression):
    # under a soft reduced prior a zero scale gives a finite ΔF: only the check of
    # the scales themselves can tell
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    guide(X, y)
    message = "^guide scale of site 'w' has NaN, inf or non-positive values$"
    with torch.no_grad():
        pyro.param("AutoNormal.scales.w").unconstrained()[3] = float("nan")
    with pytest.raises(ValueError, match=message):
        BayesianModelReduction(guide, reduced_scale=reduced_scale).reduce(X, y)
    with torch.no_grad():
        pyro.param("AutoNormal.scales.w").unconstrained()[3] = -float("inf")  # softplus → 0
    with pytest.raises(ValueError, match=message):
        BayesianModelReduction(guide, reduced_scale=reduced_scale).reduce(X, y)


def test_reduced_prior_too_wide_names_the_site(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model, init_scale=2.0)
    guide(X, y)
    bmr = BayesianModelReduction(guide, reduced_scale=100.0, update_posterior=True)
    with pytest.raises(ValueError, match="too wide for site 'w'"):
        bmr.reduce(X, y)


def test_unknown_site_and_bad_masks_are_rejected(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    guide(X, y)
    with pytest.raises(ValueError, match="unknown site 'nope'"):
        BayesianModelReduction(guide, sites=["nope"]).reduce(X, y)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X, y)
    # every entry point reports a bad mask with one error type, naming the site
    with pytest.raises(MaskError, match="does not fit site 'w'"):
        bmr.set_mask("w", torch.ones(49, dtype=torch.bool))
    with pytest.raises(MaskError, match="must be a bool tensor"):
        bmr.set_mask("w", torch.ones(50))
    with pytest.raises(MaskError, match="unknown site 'v'"):
        bmr.set_mask("v", torch.ones(50, dtype=torch.bool))
    with pytest.raises(MaskError, match="does not fit site 'w'"):
        bmr.load_state_dict({"masks": {"w": torch.ones(3, dtype=torch.bool)}})
    # loaded masks are checked against the guide's sites as they are loaded
    fresh = BayesianModelReduction(guide)
    with pytest.raises(MaskError, match="does not fit site 'w'"):
        fresh.load_state_dict({"masks": {"w": torch.ones(7, dtype=torch.bool)}})
    with pytest.raises(MaskError, match="site 'w' must be a bool tensor"):
        fresh.load_state_dict({"masks": {"w": torch.ones(50)}})
    with pytest.raises(MaskError, match="site 'w' must be a bool tensor"):
        PruneMessenger({"w": torch.ones(50, dtype=torch.uint8)})


def test_masks_are_cumulative_and_reset_restores(sparse_regression):
    X, y, guide, bmr = _fitted_and_reduced(sparse_regression, steps=200)
    first = bmr.masks["w"].clone()
    bmr.rule = ThresholdRule(1e9)  # would keep everything
    report = bmr.reduce(X, y)
    assert torch.equal(bmr.masks["w"], first)
    assert report.num_newly_pruned == 0 and report.total_delta_f == 0.0
    bmr.reset()
    assert dict(bmr.masks) == {}
    with pytest.raises(TypeError):
        bmr.masks["w"] = first  # read-only view


def test_state_round_trip_restores_identical_predictions(sparse_regression):
    X, y, guide, bmr = _fitted_and_reduced(sparse_regression, steps=200)
    buffer = io.BytesIO()
    torch.save({"guide": guide.state_dict(), "bmr": bmr.state_dict()}, buffer)
    pyro.set_rng_seed(7)
    before = Predictive(bmr(regression_model), guide=bmr(guide), num_samples=30)(X)["y"]

    pyro.clear_param_store()
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    guide2 = AutoNormal(regression_model)
    guide2(X, y)
    guide2.load_state_dict(state["guide"])
    bmr2 = BayesianModelReduction(guide2)
    bmr2.load_state_dict(state["bmr"])
    pyro.set_rng_seed(7)
    after = Predictive(bmr2(regression_model), guide=bmr2(guide2), num_samples=30)(X)["y"]
    assert torch.equal(before, after)
    assert torch.equal(bmr2.masks["w"], bmr.masks["w"])


def test_soft_reduced_prior_updates_kept_posteriors(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    fit(regression_model, guide, X, y, steps=200)
    loc, scale = guide.locs.w.detach().clone(), guide.scales.w.detach().clone()
    bmr = BayesianModelReduction(guide, reduced_scale=0.1, update_posterior=True)
    bmr.reduce(X, y)
    keep = bmr.masks["w"]
    reduced = delta_f(loc, scale, 0.0, 1.0, 0.0, 0.1)
    assert torch.allclose(guide.locs.w.detach()[keep], reduced.loc[keep], rtol=1e-5)
    assert torch.allclose(guide.scales.w.detach()[keep], reduced.scale[keep], rtol=1e-4)
    assert (guide.locs.w.detach()[~keep] == 0).all()
    message = (
        "update_posterior needs a soft reduced prior (reduced_scale > 0): under the point "
        "mass the reduced posterior of a pruned element is exactly zero"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BayesianModelReduction(guide, update_posterior=True)
    with pytest.raises(ValueError, match="^reduced_scale must be non-negative, got -0.1$"):
        BayesianModelReduction(guide, reduced_scale=-0.1)


def test_soft_reduced_prior_repairs_out_of_range_elements_and_their_posteriors():
    # (μ/s̃)² overflows float32 for the first two elements, while their ΔF (about
    # −1.7e38) and reduced posterior do not: both come from the log domain
    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([6]).to_event(1))

    guide = AutoNormal(model)
    guide()
    with torch.no_grad():
        pyro.param("AutoNormal.locs.w").unconstrained().copy_(
            torch.tensor([1.2e19, -1.2e19, 0.2, 0.0, 1e-3, 2.5])
        )
        pyro.param("AutoNormal.scales.w").unconstrained().copy_(
            torch.tensor([0.3, 0.3, 0.1, 0.4, 0.05, 0.2]).log()
        )
    loc, scale = guide.locs.w.detach().clone(), guide.scales.w.detach().clone()
    expected = delta_f(loc, scale, 0.0, 1.0, 0.0, 0.5)
    assert torch.isfinite(expected.delta_f).all() and (expected.delta_f[:2] < -1e38).all()
    bmr = BayesianModelReduction(guide, reduced_scale=0.5, update_posterior=True)
    report = bmr.reduce()
    assert torch.equal(report.delta_f["w"], expected.delta_f)
    keep = expected.delta_f <= 0
    assert torch.equal(bmr.masks["w"], keep) and keep[:2].all() and not keep.all()
    assert torch.equal(guide.locs.w.detach()[keep], expected.loc[keep])
    assert torch.allclose(guide.scales.w.detach()[keep], expected.scale[keep], rtol=1e-6)
    assert (guide.locs.w.detach()[~keep] == 0).all()


def test_a_reduced_prior_equal_to_the_prior_scores_zero_where_kappa_underflows():
    # s̃ = s = 1e-20 ≪ σ: κ = (s̃/σ)² underflows float32, and the direct evaluation's
    # rounding, divided by κ, gives ΔF 3.8e-6 for the second element (pruned) where
    # the exact value is 0: the log domain must redo these elements
    def model():
        pyro.sample("w", dist.Normal(0.0, 1e-20).expand([3]).to_event(1))

    guide = AutoNormal(model)
    guide()
    with torch.no_grad():
        pyro.param("AutoNormal.locs.w").unconstrained().copy_(torch.tensor([0.7, -0.3, 1.5]))
        pyro.param("AutoNormal.scales.w").unconstrained().copy_(torch.tensor([-0.7, 0.5, 0.2]))
    loc, scale = guide.locs.w.detach().clone(), guide.scales.w.detach().clone()
    expected = delta_f(loc, scale, 0.0, 1e-20, 0.0, 1e-20)
    bmr = BayesianModelReduction(guide, reduced_scale=1e-20, update_posterior=True)
    report = bmr.reduce()
    assert torch.equal(report.delta_f["w"], torch.zeros(3))
    assert bmr.masks["w"].all()
    assert torch.equal(guide.locs.w.detach(), loc)
    # the exact reduced posterior is q itself; the log domain loses |ln s̃| ≈ 46 ulps,
    # and the guide keeps the scale through softplus
    assert torch.allclose(guide.scales.w.detach(), expected.scale, rtol=1e-6)
    assert torch.allclose(guide.scales.w.detach(), scale, rtol=1e-5)


def test_handler_works_as_a_context_manager(sparse_regression):
    X, y, guide, bmr = _fitted_and_reduced(sparse_regression, steps=100)
    with bmr:
        tr = pyro.poutine.trace(guide).get_trace(X, y)
    assert (tr.nodes["w"]["value"][~bmr.masks["w"]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduced_scale", [0.0, 0.1])
def test_a_prior_varying_by_column_is_scored_element_by_element(dtype, reduced_scale):
    """The plain (not fused) path, in the site's dtype, against the closed form
    written out here in float64 (test_free_energy checks delta_f against mpmath)."""
    prior_loc = torch.linspace(-0.5, 0.5, 30, dtype=dtype)
    prior_scale = torch.linspace(0.2, 2.0, 30, dtype=dtype)

    def model():
        pyro.sample("w", dist.Normal(prior_loc, prior_scale).expand([40, 30]).to_event(2))

    pyro.clear_param_store()
    g = torch.Generator().manual_seed(8)
    loc = torch.randn(40, 30, generator=g, dtype=dtype)
    scales = 0.05 + torch.rand(40, 30, generator=g, dtype=dtype)
    guide = autonormal_at(model, {"w": loc}, {"w": scales})
    loc, scale = (
        t.detach().clone() for t in BayesianModelReduction(guide).posterior.loc_scale("w")
    )
    reduced_loc = 0.0 if reduced_scale == 0 else 0.1  # a point mass must be at 0
    bmr = BayesianModelReduction(guide, reduced_loc=reduced_loc, reduced_scale=reduced_scale)
    report = bmr.reduce()
    assert report.delta_f["w"].dtype == dtype
    f64 = torch.float64
    mu, sigma, m, s = (t.to(f64) for t in (loc, scale, prior_loc, prior_scale))
    if reduced_scale == 0:  # ln q(0) − ln p(0)
        zero = torch.zeros((), dtype=f64)
        expected = dist.Normal(mu, sigma).log_prob(zero) - dist.Normal(m, s).log_prob(zero)
    else:  # Gaussian prior N(m, s²) → N(m̃, s̃²), closed form in the precisions
        m_red = torch.tensor(reduced_loc, dtype=f64)
        p, p_red, p_post = 1 / s**2, 1 / torch.tensor(reduced_scale, dtype=f64) ** 2, 1 / sigma**2
        prec = p_post + p_red - p  # the reduced posterior's precision
        mean = (p_post * mu + p_red * m_red - p * m) / prec
        expected = 0.5 * (
            torch.log(p_post / prec)
            + torch.log(p_red / p)
            + prec * mean**2
            - (p_post * mu**2 + p_red * m_red**2 - p * m**2)
        )
    tolerance = 1e-12 if dtype == f64 else 2e-5
    torch.testing.assert_close(
        report.delta_f["w"].to(f64), expected, rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize(
    "kind, reduced_scale",
    [("AutoNormal", 0.0), ("AutoNormal", 0.1), ("MeanFieldGuide, fused", 0.0)],
)
def test_a_float64_site_is_decided_against_the_threshold_in_float64(kind, reduced_scale, kernels):
    """An element whose ΔF is exactly τ is kept; τ rounded to float32 (below it
    here) would prune it. On the plain path (AutoNormal), the soft path, and the
    fused pass that scores, decides and zeroes in one kernel (MeanFieldGuide)."""
    from pyro_bmr import _kernels
    from pyro_bmr.guides import MeanFieldGuide

    kernels.setenv(_kernels.ENV_VAR, "1")

    def model():
        pyro.sample("w", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0).expand([50]))

    def guide():
        pyro.clear_param_store()
        g = torch.Generator().manual_seed(9)
        loc = torch.randn(50, generator=g, dtype=torch.float64)
        scales = 0.05 + torch.rand(50, generator=g, dtype=torch.float64)
        if kind == "AutoNormal":
            guide = autonormal_at(model, {"w": loc}, {"w": scales})
        else:
            guide = MeanFieldGuide(model)
            guide()
            with torch.no_grad():
                guide.loc_unconstrained.copy_(loc)
                guide.scale_unconstrained.copy_(scales.log())
        return guide

    scores = BayesianModelReduction(guide(), reduced_scale=reduced_scale).reduce().delta_f["w"]
    down = scores.to(torch.float32).double() < scores  # float32 rounds these below
    tau = float(scores[down][0])
    bmr = BayesianModelReduction(guide(), ThresholdRule(tau), reduced_scale=reduced_scale)
    report = bmr.reduce()
    assert torch.equal(bmr.masks["w"], scores <= tau)
    assert torch.allclose(report.delta_f["w"], scores, rtol=1e-15, atol=0)
    if kind != "AutoNormal":
        assert _kernels._spike_prune in _kernels._compiled  # the fused pass ran
