import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal

from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.poutine import PriorScaleMessenger, prior_scale, prune

FACTOR = torch.tensor([[0.5], [2.0], [1e-3]])  # one per row of w


def _model():
    w = pyro.sample("w", dist.Normal(1.0, 2.0).expand([3, 4]).to_event(2))
    u = pyro.sample("u", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("rows", 6, subsample_size=3) as rows:
        v = pyro.sample("v", dist.Normal(0.0, 1.0))
    pyro.sample("obs", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))
    return w, u, v, rows


def test_the_model_computes_with_the_rescaled_draw_and_the_site_keeps_its_prior():
    trace = poutine.trace(prior_scale(_model, {"w": FACTOR, "obs": torch.tensor(3.0)})).get_trace()
    w, u, v, _ = trace.nodes["_RETURN"]["value"]
    node = trace.nodes["w"]
    z = node["value"]
    # w = m + γ (z − m), exactly: under z ~ N(m, s²), w ~ N(m, (γ s)²)
    assert torch.equal(w, 1.0 + FACTOR * (z - 1.0))
    assert not torch.equal(w, z)
    # the site as recorded, which the ELBO scores: the draw under the prior it had
    assert isinstance(node["fn"].base_dist, dist.Normal)
    assert torch.equal(node["fn"].base_dist.scale, torch.full((3, 4), 2.0))
    torch.testing.assert_close(node["fn"].log_prob(z), dist.Normal(1.0, 2.0).log_prob(z).sum())
    # the unnamed site and the observed one are left as they were
    assert torch.equal(u, trace.nodes["u"]["value"])
    assert trace.nodes["obs"]["value"] == 0.5
    assert isinstance(prior_scale(scales={"w": FACTOR}), PriorScaleMessenger)


def test_inside_the_pruning_handler_pruned_elements_stay_exactly_zero():
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1] = False
    trace = poutine.trace(prune(prior_scale(_model, {"w": FACTOR}), {"w": keep})).get_trace()
    w = trace.nodes["_RETURN"]["value"][0]
    node = trace.nodes["w"]
    assert isinstance(node["fn"], PrunedNormal) and torch.equal(node["fn"].keep, keep)
    z = node["value"]
    assert (z[1] == 0).all() and (w[1] == 0).all()  # not m + γ (0 − m) = 1 − γ
    assert torch.equal(w[keep], (1.0 + FACTOR * (z - 1.0))[keep])
    expected = dist.Normal(1.0, 2.0).log_prob(z[keep]).sum()
    torch.testing.assert_close(node["fn"].log_prob(z), expected)


def test_factors_follow_plate_subsampling_and_guide_deltas_are_left_alone():
    factor = torch.arange(1.0, 7.0)
    trace = poutine.trace(prior_scale(_model, {"v": factor})).get_trace()
    v, rows = trace.nodes["_RETURN"]["value"][2:]
    assert torch.equal(v, factor[rows] * trace.nodes["v"]["value"])
    guide = AutoNormal(_model)
    guide()
    with PriorScaleMessenger({"w": FACTOR}):
        guide_trace = poutine.trace(guide).get_trace()
    assert isinstance(guide_trace.nodes["w"]["fn"], dist.Delta)
    returned = guide_trace.nodes["_RETURN"]["value"]["w"]
    assert torch.equal(returned, guide_trace.nodes["w"]["value"])


def test_a_replayed_draw_is_rescaled_and_scored_unchanged():
    conditioned = poutine.condition(prior_scale(_model, {"w": FACTOR}), {"w": torch.ones(3, 4) * 3})
    trace = poutine.trace(conditioned).get_trace()
    w = trace.nodes["_RETURN"]["value"][0]
    assert torch.equal(w, torch.full((3, 4), 3.0))  # observed: left alone
    guide_trace = poutine.trace(_model).get_trace()
    replayed = poutine.trace(poutine.replay(prior_scale(_model, {"w": FACTOR}), guide_trace))
    trace = replayed.get_trace()
    z = guide_trace.nodes["w"]["value"]
    assert torch.equal(trace.nodes["w"]["value"], z)
    assert torch.equal(trace.nodes["_RETURN"]["value"][0], 1.0 + FACTOR * (z - 1.0))


@pytest.mark.parametrize(
    "factor, match",
    [
        (0.5, "site 'w' must be a floating-point tensor, got float"),
        (torch.ones(3, 1, dtype=torch.long), "site 'w' must be a floating-point tensor"),
        (torch.tensor([[1.0], [-1.0], [1.0]]), "must be non-negative and finite, got -1.0"),
        (torch.tensor([1.0, float("nan"), 1.0]), "must be non-negative and finite, got nan"),
        (torch.tensor(float("inf")), "must be non-negative and finite, got inf"),
    ],
)
def test_bad_factors_name_the_site(factor, match):
    with pytest.raises(ValueError, match=match):
        PriorScaleMessenger({"w": factor})


def test_a_factor_that_does_not_fit_or_a_prior_that_is_not_normal_names_the_site():
    with pytest.raises(ValueError, match=r"shape \(2,\) does not fit site 'w' of shape \(3, 4\)"):
        prior_scale(_model, {"w": torch.ones(2)})()

    def gamma_model():
        pyro.sample("s", dist.Gamma(2.0, 2.0))

    with pytest.raises(ValueError, match="site 's' has a prior scale factor but its distribution"):
        prior_scale(gamma_model, {"s": torch.tensor(2.0)})()
