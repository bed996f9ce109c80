"""No silent wrong answer from BayesianModelReduction: each case either works
correctly or raises an error that names the site and changes nothing."""

import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.optim import Adam

from pyro_bmr import BayesianModelReduction, CompiledTrace_ELBO, MaskError, StochasticBMR, delta_f
from pyro_bmr.sites import StructureError

from .models import counted, fit, regression_model, subsampled_model


def _params():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def _learned_prior_model(X, y=None):
    s = pyro.param("prior_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    w = pyro.sample("w", dist.Normal(0.0, s).expand([X.shape[1]]).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 0.5), obs=y)


def _with_prior_moved(data, *args, **kwargs):
    """The learned-prior model fitted to ``data``, reduced once with these arguments,
    and its prior scale then moved to 2.013: the handler, and the posterior's loc and
    scale."""
    guide = AutoNormal(_learned_prior_model)
    fit(_learned_prior_model, guide, *data, steps=100)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(*args, **kwargs)
    with torch.no_grad():
        pyro.param("prior_scale").unconstrained().fill_(torch.tensor(2.013).log())
    loc, scale = (t.clone() for t in bmr.posterior.loc_scale("w"))
    return bmr, loc, scale


def test_a_learned_prior_is_read_afresh_at_every_reduction(sparse_regression):
    X, y, _ = sparse_regression
    bmr, loc, scale = _with_prior_moved((X, y), X, y)
    report = bmr.reduce(X, y)
    expected = delta_f(loc, scale, 0.0, 2.013).delta_f
    kept = bmr.masks["w"]
    assert torch.allclose(report.delta_f["w"][kept], expected[kept], rtol=1e-5)


def test_a_learned_prior_read_with_keywords_or_without_arguments_a_clear_error(sparse_regression):
    X, y, _ = sparse_regression
    bmr, loc, scale = _with_prior_moved((X, y), X=X, y=y)
    # read afresh from a run with keyword arguments, which draws no random number
    kept, rng = bmr.masks["w"], torch.get_rng_state()
    report = bmr.reduce(X=X, y=y)
    assert torch.equal(torch.get_rng_state(), rng)
    expected = delta_f(loc, scale, 0.0, 2.013).delta_f
    assert torch.allclose(report.delta_f["w"][kept], expected[kept], rtol=1e-5)
    masks, before = dict(bmr.masks), _params()
    message = (
        "the priors of sites ['w'] are learned or computed, and reduce() reads them afresh "
        "by running the model: pass it the model's arguments, as when the sites were found"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        bmr.reduce()
    assert all(torch.equal(bmr.masks[n], m) for n, m in masks.items())
    assert all(torch.equal(v, before[k]) for k, v in _params().items())


def test_a_tempered_prior_is_scored_as_the_model_runs_it():
    def model():
        with poutine.scale(scale=0.01):
            pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    guide = AutoNormal(model)
    guide()
    with torch.no_grad():
        guide.locs.w.copy_(torch.tensor([0.05, 1.0, 3.0]))
    loc, scale = (t.clone() for t in BayesianModelReduction(guide).posterior.loc_scale("w"))
    report = BayesianModelReduction(guide).reduce()
    expected = delta_f(loc, scale, 0.0, 10.0).delta_f  # s / √β = 1 / 0.1
    assert torch.allclose(report.delta_f["w"], expected)
    assert not torch.allclose(report.delta_f["w"], delta_f(loc, scale, 0.0, 1.0).delta_f)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
def test_a_bad_guide_location_raises_and_changes_nothing(bad, guide_cls, sparse_regression):
    X, y, _ = sparse_regression
    guide = guide_cls(regression_model)
    fit(regression_model, guide, X, y, steps=50)
    bmr = BayesianModelReduction(guide)
    with torch.no_grad():
        loc, _ = bmr.posterior.loc_scale("w")
        where = torch.zeros(loc.shape, dtype=torch.bool)
        where[7] = True
        bmr.posterior.assign("w", where, torch.tensor(bad), None)
    before = _params()
    with pytest.raises(ValueError, match="guide location of site 'w' has NaN or infinite"):
        bmr.reduce(X, y)
    after = _params()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
    assert dict(bmr.masks) == {}


def test_arguments_of_the_same_shapes_reuse_the_sites_without_tracing_again(sparse_regression):
    X, y, _ = sparse_regression
    model, calls = counted(regression_model)
    guide = AutoNormal(model)
    fit(model, guide, X, y, steps=20)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X, y)
    calls.clear()
    bmr.reduce(X + 1, y)  # other values, the same shapes: a prior that is fixed is not read
    assert calls == []


def test_arguments_of_another_shape_are_checked_not_ignored(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    fit(regression_model, guide, X, y, steps=20)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X, y)
    # another batch of the same structure is fine
    bmr.reduce(X[:100], y[:100])
    with pytest.raises(StructureError, match=r"site 'w' has shape \(60,\).*but \(50,\)"):
        bmr.reduce(torch.randn(100, 60), y[:100])


def test_reducing_an_unfitted_guide_warns(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    bmr = BayesianModelReduction(guide)
    with pytest.warns(UserWarning, match="guide looks unfitted") as caught:
        bmr.reduce(X, y)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    # two elements are enough to tell
    pyro.clear_param_store()
    pair = AutoNormal(lambda: pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1)))
    pair()
    with pytest.warns(UserWarning, match=r"every guide scale of the sites \['w'\] is 0.1"):
        BayesianModelReduction(pair).reduce()
    fitted = AutoNormal(regression_model, init_scale=0.05)
    pyro.clear_param_store()
    fit(regression_model, fitted, X, y, steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        BayesianModelReduction(fitted).reduce(X, y)


def test_masks_loaded_before_the_sites_are_known_are_validated_at_first_use(sparse_regression):
    X, y, _ = sparse_regression
    keep = torch.ones(50, dtype=torch.bool)
    keep[10:] = False

    # AutoDiagonalNormal never called: nothing to check against until the model runs
    guide = AutoDiagonalNormal(regression_model)
    bmr = BayesianModelReduction(guide)
    bmr.load_state_dict({"masks": {"w": keep, "nope": keep}})
    with pytest.raises(MaskError, match="call sites"):
        bmr.sparsity()
    with pytest.raises(MaskError, match="unknown site 'nope'"):
        bmr(guide)(X, y)
    assert dict(bmr.masks) == {}  # all or nothing

    # the first use found the sites: masks are now checked as they are loaded
    with pytest.raises(MaskError, match=r"mask of shape \(7,\) does not fit site 'w'"):
        bmr.load_state_dict({"masks": {"w": keep[:7]}})

    fresh = BayesianModelReduction(AutoDiagonalNormal(regression_model))
    fresh.load_state_dict({"masks": {"w": keep[:7]}})
    with pytest.raises(MaskError, match=r"mask of shape \(7,\) does not fit site 'w'"):
        fresh(regression_model)(X, y)

    bmr.load_state_dict({"masks": {"w": keep}})
    trace = poutine.trace(bmr(regression_model)).get_trace(X=X, y=y)  # keyword arguments
    assert (trace.nodes["w"]["value"][10:] == 0).all()
    assert bmr.sparsity().total == pytest.approx(0.8)

    # used before anything can tell the sites: a clear error, and nothing applied
    unready = BayesianModelReduction(AutoDiagonalNormal(regression_model))
    unready.load_state_dict({"masks": {"w": keep}})
    with pytest.raises(MaskError, match="cannot be checked yet: the guide has no parameters"):
        with unready:
            pass
    with pytest.raises(MaskError, match="call sites"):
        unready.sparsity()

    # a guide with its parameters checks at once
    guide = AutoNormal(regression_model)
    guide(X, y)
    bmr = BayesianModelReduction(guide)
    with pytest.raises(MaskError, match="unknown site 'nope'"):
        bmr.load_state_dict({"masks": {"nope": keep}})
    assert bmr.sparsity().total == 0


def test_masks_hand_out_copies(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    fit(regression_model, guide, X, y, steps=100)
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X, y)
    before = bmr.masks["w"]
    view = bmr.masks["w"]
    view[0] = ~view[0]
    assert torch.equal(bmr.masks["w"], before)
    with pytest.raises(TypeError):
        bmr.masks["w"] = view


def _pruned_gradients(svi, pruned, *args):
    """The largest gradient ``svi``'s ELBO gives the pruned locations of ``w`` (its
    JIT ELBO compiled for these very model and guide objects): exactly 0 for the
    reduced model, not for one that still treats them as kept."""
    loc = pyro.param("AutoNormal.locs.w")
    loc.grad = None
    svi.loss_and_grads(svi.model, svi.guide, *args)
    grad = loc.grad[pruned].abs().max().item()
    for p in pyro.get_param_store().values():
        p.unconstrained().grad = None
    return grad


@pytest.mark.parametrize("elbo_class", [JitTrace_ELBO, CompiledTrace_ELBO])
def test_a_jit_elbo_reused_after_reduce_runs_the_reduced_model(elbo_class, sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    bmr = BayesianModelReduction(guide)
    elbo = elbo_class()
    svi = SVI(bmr(regression_model), bmr(guide), Adam({"lr": 0.05}), elbo)
    for _ in range(100):  # compiled before any reduction, with no masks
        svi.step(X, y)
    for _ in range(2):
        bmr.reduce(X, y)
        pruned = ~bmr.masks["w"]
        assert pruned.any()
        assert _pruned_gradients(svi, pruned, X, y) == 0
        for _ in range(30):
            svi.step(X, y)


@pytest.mark.parametrize("elbo_class", [JitTrace_ELBO, CompiledTrace_ELBO])
def test_stochastic_bmr_with_a_jit_elbo_runs_the_reduced_model(elbo_class, sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    elbo = elbo_class()
    trainer = StochasticBMR(regression_model, guide, Adam({"lr": 0.05}), elbo)
    for _ in range(3):
        trainer.fit(lambda: (X, y), num_epochs=1, steps_per_epoch=60, progress=False)
        pruned = ~trainer.bmr.masks["w"]
        assert _pruned_gradients(trainer._svi, pruned, X, y) == 0
    assert trainer.bmr.sparsity().total > 0.5


def test_local_latents_are_left_alone_by_default():
    X, y = torch.randn(300, 3), torch.randn(300)
    guide = AutoNormal(subsampled_model)
    fit(subsampled_model, guide, X, y, steps=30)
    report = BayesianModelReduction(guide).reduce(X, y)
    assert set(report.delta_f) == {"w"}
    assert report.skipped == {
        "z": "a local latent (in a data plate); local_latents=True reduces it"
    }
    report = BayesianModelReduction(guide, local_latents=True).reduce(X, y)
    assert set(report.delta_f) == {"w", "z"}
    report = BayesianModelReduction(guide, local_latents=True, sites=["z"]).reduce(X, y)
    assert set(report.delta_f) == {"z"} and report.skipped == {"w": "not requested"}


def test_a_site_the_guide_does_not_cover_is_listed_as_skipped():
    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        pyro.sample("v", dist.Normal(0.0, 1.0))

    guide = AutoNormal(poutine.block(model, hide=["v"]))
    guide()
    with torch.no_grad():
        pyro.param("AutoNormal.scales.w").unconstrained().copy_(torch.tensor([0.1, 0.2, 0.3]))
    report = BayesianModelReduction(guide, model=model).reduce()
    assert set(report.delta_f) == {"w"} and report.skipped == {"v": "not in the guide"}


def test_a_point_mass_away_from_zero_is_refused_since_pruning_fixes_elements_at_zero():
    message = (
        "reduced_loc=0.5 with the point mass (reduced_scale=0) scores the model with each "
        "pruned element fixed at 0.5, but pruning fixes it at 0: use reduced_loc=0, a soft "
        "reduced prior (reduced_scale > 0), or pyro_bmr.delta_f for the scores alone"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BayesianModelReduction(AutoNormal(regression_model), reduced_loc=0.5)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal])
@pytest.mark.parametrize("reduced_scale", [1e-3, 0.3, 1.0])
def test_reduce_scores_the_reduced_prior_it_is_given(guide_cls, reduced_scale, sparse_regression):
    X, y, _ = sparse_regression
    guide = guide_cls(regression_model)
    fit(regression_model, guide, X, y, steps=50)
    bmr = BayesianModelReduction(guide, reduced_loc=0.5, reduced_scale=reduced_scale)
    loc, scale = (t.clone() for t in bmr.posterior.loc_scale("w"))
    report = bmr.reduce(X, y)
    expected = delta_f(loc, scale, 0.0, 1.0, 0.5, reduced_scale).delta_f
    assert torch.allclose(report.delta_f["w"], expected, rtol=1e-5, atol=1e-5)
    centred = delta_f(loc, scale, 0.0, 1.0, 0.0, reduced_scale).delta_f
    assert not torch.allclose(report.delta_f["w"], centred, rtol=1e-3)
