import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam
from torch.distributions import Gamma

from pyro_bmr import delta_f
from pyro_bmr.horseshoe_fit import (
    HorseshoeModel,
    _RowDeltaF,
    _stable_step,
    fit_horseshoe,
    layer_of,
    standardised_delta_f,
    standardised_posterior,
)

F64 = torch.float64


def _posterior(shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=g, dtype=dtype)
    scale = 0.05 + 0.9 * torch.rand(shape, generator=g, dtype=dtype)
    return loc, scale


def test_standardised_delta_f_and_posterior_are_delta_f_at_a_standard_prior():
    loc, scale = _posterior((6, 5), seed=0)
    g = torch.tensor([0.0, 1e-8, 0.3, 1.0, 2.5], dtype=F64)
    expected = delta_f(loc, scale, 0.0, 1.0, 0.0, g.sqrt())
    torch.testing.assert_close(standardised_delta_f(loc, scale, g), expected.delta_f)
    reduced_loc, reduced_scale = standardised_posterior(loc, scale, g)
    torch.testing.assert_close(reduced_loc, expected.loc)
    torch.testing.assert_close(reduced_scale, expected.scale)
    assert torch.equal(
        standardised_delta_f(loc, scale, torch.ones(5, dtype=F64)), torch.zeros(6, 5, dtype=F64)
    )


def test_a_posterior_wider_than_its_prior_is_clipped_to_it():
    loc = torch.tensor([0.0, 0.7], dtype=F64)
    g = torch.tensor([1e-6, 3.0, 1e6], dtype=F64).unsqueeze(-1)
    wide = standardised_delta_f(loc, torch.full((2,), 3.0, dtype=F64), g)
    torch.testing.assert_close(wide, standardised_delta_f(loc, torch.ones(2, dtype=F64), g))
    assert torch.isfinite(wide).all()
    torch.testing.assert_close(wide[:, 1], -(0.7**2) * (1 - g[:, 0]) / 2)
    assert torch.equal(wide[:, 0], torch.zeros(3, dtype=F64))  # the posterior is the prior


@pytest.mark.parametrize("batch", [(), (3,)])
def test_row_kernel_sums_the_formula_and_its_gradient(batch):
    loc, scale = _posterior((4, 7), seed=1)
    g = 0.01 + torch.rand(batch + (4, 1), dtype=F64, generator=torch.Generator().manual_seed(2))
    var = scale.square()
    by_kernel = g.clone().requires_grad_()
    value = _RowDeltaF.apply(by_kernel, loc.square(), var, 1 - var)
    by_formula = g.clone().requires_grad_()
    expected = standardised_delta_f(loc, scale, by_formula).sum(-1)
    assert value.shape == batch + (4,)
    torch.testing.assert_close(value, expected)
    weights = torch.randn(value.shape, dtype=F64)
    (value * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(by_kernel.grad, by_formula.grad)


def _two_layers(dtype=F64):
    # layer "a": a weight and the bias that shares its 3 rows; layer "b": one row
    w, s = _posterior((3, 4), seed=3, dtype=dtype)
    b, t = _posterior((3,), seed=4, dtype=dtype)
    v, r = _posterior((1, 5), seed=5, dtype=dtype)
    return {"a.w": (w, s), "a.b": (b, t), "b.w": (v, r)}


def test_objective_is_delta_f_plus_the_log_hyperprior():
    posteriors = _two_layers()
    model = HorseshoeModel(posteriors, global_scale=0.1, slab=(2.0, 6.0))
    trace = poutine.trace(model).get_trace()
    latents = {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample"}
    latents = {n: v for n, v in latents.items() if not trace.nodes[n]["is_observed"]}
    assert set(latents) == {
        "a.slab_precision",
        "a.horseshoe_global",
        "a.w.row_u",
        "a.w.row_v",
        "b.slab_precision",  # a layer of one row has no global scale
        "b.w.row_u",
        "b.w.row_v",
    }
    assert all(value.dtype == F64 for value in latents.values())
    half = Gamma(torch.tensor(0.5, dtype=F64), torch.tensor(1.0, dtype=F64))
    slab = Gamma(torch.tensor(2.0, dtype=F64), torch.tensor(6.0, dtype=F64))
    expected = 0.0
    for layer, rows in [("a", "a.w.row"), ("b", "b.w.row")]:
        c_inv = latents[f"{layer}.slab_precision"]
        expected = expected + slab.log_prob(c_inv)
        tau_sq = torch.tensor(0.1**2, dtype=F64)
        if layer == "a":
            a1, a2 = latents["a.horseshoe_global"]
            tau_sq = tau_sq * a1 / a2
            expected = expected + half.log_prob(a1) + half.log_prob(a2)
        u, v = latents[f"{rows}_u"], latents[f"{rows}_v"]
        expected = expected + half.log_prob(u).sum() + half.log_prob(v).sum()
        lam_sq = v / u  # the authors' γ² = τ²λ² / (1 + c⁻² τ²λ²)
        gamma = (tau_sq * lam_sq / (1 + c_inv * tau_sq * lam_sq)).sqrt()
        for site in [name for name in posteriors if layer_of(name) == layer]:
            loc, scale = posteriors[site]
            per_row = gamma.reshape((-1,) + (1,) * (loc.dim() - 1))
            expected = expected + delta_f(loc, scale, 0.0, 1.0, 0.0, per_row).delta_f.sum()
    torch.testing.assert_close(trace.log_prob_sum(), expected)
    variances = model.reduced_variances(latents)
    assert variances["a.w"].shape == (3, 1) and variances["a.b"].shape == (3,)
    assert torch.equal(variances["a.w"][:, 0], variances["a.b"])


def test_fit_shrinks_rows_without_evidence_and_keeps_clear_signals():
    # rows 0-3: the posterior is the prior (no evidence); rows 4-7: |μ| = 5 ≫ σ
    loc = torch.cat([torch.zeros(4, 20), torch.full((4, 20), 5.0)])
    scale = torch.cat([torch.ones(4, 20), torch.full((4, 20), 0.1)])
    model = HorseshoeModel({"l.w": (loc, scale), "l.b": (loc[:, 0], scale[:, 0])})
    store = pyro.get_param_store()
    outside = pyro.param("outside", torch.ones(2))
    fit = fit_horseshoe(model, num_steps=200, num_particles=2, lr=0.05, num_samples=200)
    assert list(store.keys()) == ["outside"] and pyro.param("outside") is outside
    assert len(fit.losses) == 200 and fit.losses[-1] < fit.losses[0]
    weight, bias = fit.scales["l.w"], fit.scales["l.b"]
    assert weight.shape == (8, 1) and bias.shape == (8,) and weight.dtype == torch.float32
    assert torch.equal(weight[:, 0], bias)
    assert (weight[:4] < 0.2).all() and (weight[4:] > 0.7).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"global_scale": 0.0}, "global_scale must be a positive number, got 0.0"),
        ({"slab": (2.0,)}, r"slab must be \(concentration, rate\)"),
        ({"slab": (2.0, -1.0)}, r"slab must be \(concentration, rate\)"),
    ],
)
def test_bad_hyperpriors_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HorseshoeModel(_two_layers(), **kwargs)


def test_bad_fits_are_refused_before_any_step():
    with pytest.raises(ValueError, match="at least one site"):
        HorseshoeModel({})
    with pytest.raises(ValueError, match="site 'e' has no elements"):
        HorseshoeModel({"e": (torch.zeros(0, 3), torch.ones(0, 3))})
    model = HorseshoeModel(_two_layers())
    for kwargs, match in [
        ({"num_steps": 0}, "num_steps must be a positive int, got 0"),
        ({"num_particles": 1.5}, "num_particles must be a positive int"),
        ({"num_samples": True}, "num_samples must be a positive int"),
        ({"lr": float("nan")}, "lr must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=match):
            fit_horseshoe(model, **kwargs)


def test_no_draw_and_no_posterior_makes_the_objective_or_the_factors_nan():
    # draws a fit can wander to: underflowed to 0, or huge, with the narrowest posterior
    loc = torch.tensor([[0.0, 3e3], [1.0, 0.0]])
    model = HorseshoeModel({"l.w": (loc, torch.full((2, 2), 1e-30))})
    for value in (0.0, 1e-30, 1e30):
        for slab in (0.0, 1e30):
            values = {
                "l.slab_precision": torch.tensor([slab]),
                "l.horseshoe_global": torch.tensor([[value, 1 / max(value, 1e-30)]]),
                "l.w.row_u": torch.full((1, 2), value),
                "l.w.row_v": torch.full((1, 2), 1 / max(value, 1e-30)),
            }
            g = model.reduced_variances(values)["l.w"]
            precision = model.expected_precisions(values)["l.w"]
            assert torch.isfinite(g).all() and (g >= 0).all(), (value, slab)
            assert torch.isfinite(precision).all() and (precision > 0).all(), (value, slab)
            group = model._layers[0].rows[0]
            df = _RowDeltaF.apply(g, group.mu_sq, group.var, group.one_minus_var)
            assert torch.isfinite(df).all(), (value, slab)


def test_a_reduction_never_widens_the_prior():
    # ΔF = μ² (g − 1)/2 grows without bound in g: a reduction never widens the prior
    model = HorseshoeModel({"l.w": (torch.full((2, 3), 3.0), torch.ones(2, 3))})
    wide = {
        "l.slab_precision": torch.tensor([1e-20]),
        "l.horseshoe_global": torch.tensor([[1e10, 1e-10]]),
        "l.w.row_u": torch.tensor([[1e-10, 1.0]]),
        "l.w.row_v": torch.tensor([[1e10, 1.0]]),
    }
    g = model.reduced_variances(wide)["l.w"][0, :, 0]
    assert g.tolist() == pytest.approx([1.0, 1.0])
    assert model.expected_precisions(wide)["l.w"][:, 0].tolist() == pytest.approx([1.0, 1.0])
    narrow = {**wide, "l.horseshoe_global": torch.tensor([[1.0, 1.0]])}
    g = model.reduced_variances(narrow)["l.w"][0, :, 0]
    assert g[0] == pytest.approx(1.0) and g[1] == pytest.approx(1e-4)  # the cap, and below


def test_a_step_with_a_non_finite_gradient_changes_nothing(monkeypatch):
    model = HorseshoeModel(_two_layers(torch.float32))
    with pyro.get_param_store().scope():
        guide = AutoNormal(model)
        svi = SVI(model, guide, Adam({"lr": 0.1}), Trace_ELBO())
        _stable_step(svi)
        before = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
        loss_and_grads = svi.loss_and_grads

        def poisoned(model, guide):
            loss = loss_and_grads(model, guide)
            next(iter(pyro.get_param_store().values())).unconstrained().grad.fill_(float("nan"))
            return loss

        monkeypatch.setattr(svi, "loss_and_grads", poisoned)
        loss, stepped = _stable_step(svi)
        assert math.isfinite(loss) and not stepped
        after = pyro.get_param_store()
        assert all(torch.equal(after[n].detach(), v) for n, v in before.items())
        monkeypatch.setattr(svi, "loss_and_grads", loss_and_grads)
        assert _stable_step(svi)[1]
        assert not all(torch.equal(after[n].detach(), v) for n, v in before.items())
