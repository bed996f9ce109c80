import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch import nn

from pyro_bmr import BayesianModelReduction, SpikeAndSlabRule
from pyro_bmr.nn import BayesianClassifier, LayerScalePrior, posterior_means, predict_proba


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=6):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=generator), torch.randint(3, (n,), generator=generator)


def test_likelihood_is_scaled_to_the_dataset_size():
    model = BayesianClassifier(_net(), dataset_size=60)
    x, y = _data()
    trace = poutine.trace(model).get_trace(x, y)
    obs = trace.nodes["obs"]
    assert obs["is_observed"] and torch.equal(obs["value"], y)
    assert obs["scale"] == pytest.approx(10.0)
    assert trace.nodes["_RETURN"]["value"].shape == (6, 3)
    trace.compute_log_prob()
    logits = trace.nodes["_RETURN"]["value"]
    expected = 10.0 * torch.distributions.Categorical(logits=logits).log_prob(y).sum()
    torch.testing.assert_close(obs["log_prob_sum"], expected)  # the scale is included


def test_bad_labels_and_sizes_are_refused():
    model = BayesianClassifier(_net(), dataset_size=60)
    x, y = _data()
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        model(x, y[:3])
    for size in (0, 2.5, True):
        with pytest.raises(ValueError, match="dataset_size"):
            BayesianClassifier(_net(), dataset_size=size)


def test_predict_proba_with_a_point_mass_guide_is_the_network_softmax():
    pyro.clear_param_store()
    original = _net()
    model = BayesianClassifier(original, dataset_size=6)
    guide = AutoDelta(model, init_loc_fn=model.init_loc_fn)
    x, y = _data()
    guide(x, y)
    probs = predict_proba(model, guide, x, num_samples=3)
    torch.testing.assert_close(probs, original(x).softmax(-1))


def test_predict_proba_averages_probabilities_over_samples():
    pyro.clear_param_store()
    model = BayesianClassifier(_net(), dataset_size=6, prior=LayerScalePrior())
    guide = AutoNormal(model, init_loc_fn=model.init_loc_fn, init_scale=0.5)
    x, y = _data()
    guide(x, y)
    pyro.set_rng_seed(3)
    probs = predict_proba(model, guide, x, num_samples=4)
    assert probs.shape == (6, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    pyro.set_rng_seed(3)
    single = [predict_proba(model, guide, x, num_samples=1) for _ in range(4)]
    torch.testing.assert_close(probs, sum(single) / 4)
    with pytest.raises(ValueError, match="num_samples"):
        predict_proba(model, guide, x, num_samples=0)


def test_posterior_means_of_reduced_model_are_zero_where_pruned():
    pyro.clear_param_store()
    model = BayesianClassifier(_net(), dataset_size=6, prior=LayerScalePrior())
    guide = AutoNormal(model, init_loc_fn=model.init_loc_fn, init_scale=0.01)
    x, y = _data()
    guide(x, y)
    bmr = BayesianModelReduction(guide, SpikeAndSlabRule(), model=model)
    bmr.reduce(x, y)
    assert sorted(bmr.masks) == sorted(name + "_decentered" for name in model.random_sites())
    num_pruned = sum(int((~mask).sum()) for mask in bmr.masks.values())
    assert 0 < num_pruned < sum(mask.numel() for mask in bmr.masks.values())
    means = posterior_means(bmr(model), bmr(guide), x, sites=model.random_sites(), num_samples=20)
    assert sorted(means) == sorted(model.random_sites())
    for name, mean in means.items():
        mask = bmr.masks[name + "_decentered"]
        assert mean.shape == mask.shape
        assert torch.all(mean[~mask] == 0)
        assert torch.all(mean[mask] != 0)
    probs = predict_proba(bmr(model), bmr(guide), x, num_samples=2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))


def test_posterior_means_estimate_scale_times_standardised_weight():
    pyro.clear_param_store()
    model = BayesianClassifier(_net(), dataset_size=6, prior=LayerScalePrior())
    guide = AutoNormal(model, init_loc_fn=model.init_loc_fn, init_scale=1e-3)
    x, y = _data()
    guide(x, y)
    means = posterior_means(model, guide, x, sites=["net.1.weight"], num_samples=50)
    median = guide.median()
    expected = median["net.1.prior_precision"].rsqrt() * median["net.1.weight_decentered"]
    torch.testing.assert_close(means["net.1.weight"], expected, rtol=1e-2, atol=1e-4)
    with pytest.raises(ValueError, match="'nope'"):
        posterior_means(model, guide, x, sites=["nope"], num_samples=1)
