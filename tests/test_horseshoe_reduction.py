import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_bmr.horseshoe_reduction as horseshoe_reduction
from pyro_bmr import MeanFieldGuide, StochasticBMR, delta_f
from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.horseshoe_fit import HorseshoeFit
from pyro_bmr.horseshoe_reduction import HorseshoeReduction
from pyro_bmr.posteriors import mean_field_posterior

ROWS, COLS = 8, 20
FAST = {"num_steps": 200, "num_particles": 2, "lr": 0.05, "num_samples": 200}


def _model(x=None, y=None, dtype=torch.float32):
    zero = torch.zeros((), dtype=dtype)
    w = pyro.sample("hidden.w", dist.Normal(zero, 2.0).expand([ROWS, COLS]).to_event(2))
    b = pyro.sample("hidden.b", dist.Normal(zero, 2.0).expand([ROWS]).to_event(1))
    v = pyro.sample("out.w", dist.Normal(zero, 1.0).expand([ROWS]).to_event(1))
    if x is not None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(torch.tanh(x @ w.T + b) @ v, 0.1), obs=y)
    return w, b, v


def _fitted_guide(guide_type=AutoNormal, dtype=torch.float32):
    """A guide set by hand: rows 0-3 of the hidden layer have nearly their prior as
    posterior (no evidence: μ = 0.2, σ = s = 2), rows 4-7 a clear signal (μ = 10,
    σ = 0.2)."""

    def model():
        return _model(dtype=dtype)

    guide = guide_type(model)
    guide()
    posterior = mean_field_posterior(guide)
    signal = torch.arange(ROWS) >= 4
    for name, shape in [("hidden.w", (ROWS, COLS)), ("hidden.b", (ROWS,))]:
        rows = signal.reshape((ROWS,) + (1,) * (len(shape) - 1)).expand(shape)
        loc = torch.where(rows, 10.0, 0.2).to(dtype)
        scale = torch.where(rows, 0.2, 2.0).to(dtype)
        posterior.assign(name, torch.ones(shape, dtype=torch.bool), loc, scale)
    posterior.assign("out.w", torch.ones(ROWS, dtype=torch.bool), torch.ones(ROWS), None)
    return model, guide


def test_reduce_prunes_rows_without_evidence_and_moves_the_rest_to_the_reduced_posterior():
    model, guide = _fitted_guide()
    red = HorseshoeReduction(guide, exclude=["out.w"], threshold=0.2, **FAST)
    report = red.reduce()
    masks = red.masks
    assert set(masks) == {"hidden.w", "hidden.b", "out.w"}
    assert torch.equal(masks["hidden.w"].all(-1), torch.arange(ROWS) >= 4)
    assert torch.equal(masks["hidden.w"].any(-1), masks["hidden.b"])
    assert masks["out.w"].all()  # excluded: never pruned, counted by the sparsity
    assert report.num_newly_pruned == report.num_pruned == 4 * COLS + 4
    assert report.num_elements == ROWS * COLS + 2 * ROWS
    assert report.skipped == {"out.w": "excluded"} and set(red.scales) == {"hidden.w", "hidden.b"}
    assert red.sparsity().total == pytest.approx(report.num_pruned / report.num_elements)
    gamma = red.scales["hidden.w"]
    assert gamma.shape == (ROWS, 1) and torch.equal(gamma[:, 0], red.scales["hidden.b"])
    assert torch.equal(gamma, red.last_fit.scales["hidden.w"])  # the first: one factor
    # kept elements now hold the reduced posterior under N(0, (2γ)²), in the variable
    # z / γ that the model scales by γ; pruned ones are at 0
    loc, scale = mean_field_posterior(guide).loc_scale("hidden.w")
    expected = delta_f(10.0, 0.2, 0.0, 2.0, 0.0, 2 * gamma[4:].expand(4, COLS))
    torch.testing.assert_close(loc[4:], expected.loc / gamma[4:])
    torch.testing.assert_close(scale[4:], expected.scale / gamma[4:])
    assert (loc[:4] == 0).all()
    torch.testing.assert_close(report.delta_f["hidden.w"][4:], expected.delta_f)


def test_the_reduced_model_runs_the_rescaled_prior_and_the_masks_and_the_guide_neither():
    model, guide = _fitted_guide(MeanFieldGuide)  # draws at the model's site names
    red = HorseshoeReduction(guide, model=model, exclude=lambda site: site == "out.w", num_steps=20)
    red.reduce()
    keep = torch.ones(ROWS, COLS, dtype=torch.bool)
    keep[0, :3] = False  # compose with masks set on the handler
    red.bmr.set_mask("hidden.w", keep)
    guide_trace = poutine.trace(red(guide)).get_trace()
    trace = poutine.trace(poutine.replay(red(model), trace=guide_trace)).get_trace()
    node = trace.nodes["hidden.w"]
    gamma = red.scales["hidden.w"]
    assert isinstance(node["fn"], PrunedNormal) and torch.equal(node["fn"].keep, keep)
    # the site keeps its prior N(0, 2²) and the guide's draw z, which the ELBO scores ...
    z = node["value"]
    assert torch.equal(z, guide_trace.nodes["hidden.w"]["value"]) and (z[~keep] == 0).all()
    torch.testing.assert_close(node["fn"].scale, torch.full((ROWS, COLS), 2.0))
    expected = dist.Normal(0.0, 2.0).log_prob(z)[keep].sum()
    torch.testing.assert_close(node["fn"].log_prob(z), expected)
    # ... and the model computes with γ z ~ N(0, (2γ)²), zero where pruned
    w, b, v = trace.nodes["_RETURN"]["value"]
    assert torch.equal(w, torch.where(keep, gamma * z, 0.0))
    assert torch.equal(b, red.scales["hidden.b"] * trace.nodes["hidden.b"]["value"])
    # the excluded site is left alone
    assert torch.equal(v, trace.nodes["out.w"]["value"])
    # the guide draws from its own posterior, not rescaled
    _, scale = mean_field_posterior(guide).loc_scale("hidden.w")
    guide_fn = guide_trace.nodes["hidden.w"]["fn"]
    torch.testing.assert_close(guide_fn.scale[keep], scale[keep])


def test_factors_multiply_over_reductions_and_prune_once_below_the_threshold(monkeypatch):
    model, guide = _fitted_guide(dtype=torch.float64)
    factor = torch.tensor([5e-3] * 4 + [2.0] * 4, dtype=torch.float64)
    seen = []

    def fake_fit(model, **options):
        rows = [group for layer in model._layers for group in layer.rows]
        seen.append({group.name: (group.var.clone(), group.mu_sq.clone()) for group in rows})
        scales = {n: factor.reshape((ROWS,) + (1,) * (len(s) - 1)) for n, s in model.shapes.items()}
        return HorseshoeFit(scales, [0.0])

    monkeypatch.setattr(horseshoe_reduction, "fit_horseshoe", fake_fit)
    red = HorseshoeReduction(guide, exclude=["out.w"], update_posterior=False)
    pruned = []
    for _ in range(4):
        report = red.reduce()
        pruned.append(report.num_newly_pruned)
    # 5e-3, 2.5e-5, 1.25e-7 < 1e-6: the rows without evidence go at the third
    assert pruned == [0, 0, 4 * COLS + 4, 0]
    # a pruned row keeps the factor that pruned it
    expected = torch.tensor([5e-3**3] * 4 + [2.0**4] * 4, dtype=torch.float64)
    torch.testing.assert_close(red.scales["hidden.w"][:, 0], expected)
    assert red.scales["hidden.w"].dtype == torch.float64
    assert torch.equal(red.masks["hidden.w"].all(-1), torch.arange(ROWS) >= 4)
    # every fit sees the guide's variable standardised by its prior, s = 2
    signal = (torch.arange(ROWS) >= 4)[:, None]
    for fit in seen[:3]:
        var, mu_sq = fit["hidden.w.row"]  # the weight's 20 columns and the bias
        torch.testing.assert_close(var, torch.where(signal, 0.01, 1.0).expand_as(var).to(var))
        torch.testing.assert_close(mu_sq, torch.where(signal, 25.0, 0.01).expand_as(var).to(var))
    # once pruned, rows enter the fit as (0, 1): they add nothing to ΔF
    var, mu_sq = seen[3]["hidden.w.row"]
    assert (var[:4] == 1).all() and (mu_sq[:4] == 0).all()
    trace = poutine.trace(red(model)).get_trace()
    z = trace.nodes["hidden.w"]["value"]
    w = trace.nodes["_RETURN"]["value"][0]
    torch.testing.assert_close(w[4:], 2.0**4 * z[4:])
    assert (w[:4] == 0).all()


def test_stochastic_bmr_trains_and_reduces_with_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, COLS, generator=g)
    y = torch.tanh(x[:, 0]) + 0.1 * torch.randn(100, generator=g)
    guide = AutoNormal(_model, init_scale=0.05)
    red = HorseshoeReduction(guide, model=_model, exclude=["out.w"], num_steps=30, num_particles=2)
    trainer = StochasticBMR(_model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO(), bmr=red)
    history = trainer.fit(lambda: (x, y), num_epochs=2, steps_per_epoch=30, progress=False)
    assert [h["epoch"] for h in history] == [0, 1]
    assert set(history[-1]["pruned_fraction"]) == {"hidden.w", "hidden.b", "out.w"}
    # the SVI model runs the rescaled prior
    trace = poutine.trace(red(_model)).get_trace(x, y)
    gamma = red.scales["hidden.w"]
    w = trace.nodes["_RETURN"]["value"][0]
    keep = red.masks["hidden.w"]
    torch.testing.assert_close(w, torch.where(keep, gamma * trace.nodes["hidden.w"]["value"], 0.0))
    assert not torch.equal(gamma, torch.ones_like(gamma))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"threshold": -1.0}, "threshold must be a non-negative number"),
        ({"num_steps": 0}, "num_steps must be a positive int"),
        ({"num_samples": 0}, "num_samples must be a positive int"),
        ({"slab": (2.0,)}, r"slab must be \(concentration, rate\)"),
        ({"global_scale": -1e-2}, "global_scale must be a positive number"),
    ],
)
def test_bad_options_are_refused(options, match):
    _, guide = _fitted_guide()
    with pytest.raises(ValueError, match=match):
        HorseshoeReduction(guide, **options)
    with pytest.raises(ValueError, match=match):
        HorseshoeReduction.check_options(**options)


def test_unknown_options_are_refused():
    _, guide = _fitted_guide()
    with pytest.raises(TypeError, match="bogus"):
        HorseshoeReduction(guide, bogus=1)
    with pytest.raises(ValueError, match="unknown option.* bogus of HorseshoeReduction"):
        HorseshoeReduction.check_options(bogus=1)


def test_bad_input_raises_before_anything_changes():
    model, guide = _fitted_guide()
    with pytest.raises(TypeError, match="groups must map a site name"):
        HorseshoeReduction(guide, groups="layer")
    red = HorseshoeReduction(guide, exclude=["hidden.w", "hidden.b", "out.w"], **FAST)
    with pytest.raises(ValueError, match="every reducible site is excluded"):
        red.reduce()
    posterior = mean_field_posterior(guide)
    where = torch.zeros(ROWS, dtype=torch.bool)
    where[2] = True
    posterior.assign("hidden.b", where, torch.tensor(float("nan")), None)
    red = HorseshoeReduction(guide, exclude=["out.w"], **FAST)
    before = posterior.loc_scale("hidden.w")[0].clone()
    with pytest.raises(
        ValueError, match="site 'hidden.b': the guide's locations are not all finite"
    ):
        red.reduce()
    assert dict(red.masks) == {} and dict(red.scales) == {}
    assert torch.equal(posterior.loc_scale("hidden.w")[0], before)


def test_state_dict_round_trips_masks_and_factors(tmp_path):
    model, guide = _fitted_guide()
    red = HorseshoeReduction(guide, exclude=["out.w"], threshold=0.2, **FAST)
    red.reduce()
    path = tmp_path / "red.pt"
    torch.save(red.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"masks", "scales"} and set(state["scales"]) == {"hidden.w", "hidden.b"}

    other = HorseshoeReduction(guide, exclude=["out.w"], threshold=0.2, **FAST)
    other.load_state_dict(state)
    for name, mask in red.masks.items():
        assert torch.equal(other.masks[name], mask)
    for name, scale in red.scales.items():
        assert torch.equal(other.scales[name], scale)
    # the factors are applied: the loaded reduction's model draws as the original's
    draws = []
    for reduction in (red, other, HorseshoeReduction(guide, exclude=["out.w"], **FAST)):
        pyro.set_rng_seed(5)
        draws.append(poutine.trace(reduction(model)).get_trace().nodes["hidden.w"]["value"])
    assert torch.equal(draws[0], draws[1]) and not torch.allclose(draws[0], draws[2])

    bad = {"masks": state["masks"], "scales": {"hidden.w": -state["scales"]["hidden.w"]}}
    with pytest.raises(ValueError, match="'hidden.w' must be non-negative and finite"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="'masks' and 'scales'"):
        other.load_state_dict({"masks": state["masks"]})
    for name, scale in red.scales.items():  # a refused state changes nothing
        assert torch.equal(other.scales[name], scale)
