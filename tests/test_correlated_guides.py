"""BayesianModelReduction of guides with correlations, against exact evidences.

Bayesian linear regression on scikit-learn's diabetes data (its serum columns s1–s5 are
collinear), with a known noise scale and a N(0, 1) prior: the posterior is Gaussian in
closed form, and is written into ``AutoMultivariateNormal`` and
``AutoLowRankMultivariateNormal`` exactly, so that what BMR says of a reduced model can be
compared with that model's exact log evidence, ln N(y; 0, s² X_K X_Kᵀ + σ²I), and its exact
posterior.
"""

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from sklearn.datasets import load_diabetes
from torch.distributions import transform_to

from pyro_bmr import (
    BayesianModelReduction,
    PruningRule,
    SpikeAndSlabRule,
    ThresholdRule,
    delta_f,
)
from pyro_bmr.correlated_free_energy import mvn_delta_f
from pyro_bmr.posteriors import _parameter

SIGMA, PRIOR = 0.7, 1.0  # noise and prior scales
GUIDES = [AutoMultivariateNormal, AutoLowRankMultivariateNormal]


@pytest.fixture(scope="module")
def diabetes():
    data = load_diabetes()
    X = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)
    return (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()


def model(X, y=None):
    """Two sites, the clinical and the serum coefficients, one regression."""
    zero = X.new_zeros(())
    a = pyro.sample("w_a", dist.Normal(zero, PRIOR).expand([4]).to_event(1))
    b = pyro.sample("w_s", dist.Normal(zero, PRIOR).expand([6]).to_event(1))
    w = torch.cat([a, b], -1).unsqueeze(-2)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), SIGMA), obs=y)


def exact_posterior(X, y, keep=None, prior=PRIOR, mean=0.0):
    """Mean and covariance of the coefficients ``keep`` when the others are 0, under
    the prior N(mean, prior²) on each."""
    XK = X if keep is None else X[:, keep]
    cov = torch.linalg.inv(XK.T @ XK / SIGMA**2 + torch.eye(XK.shape[1], dtype=X.dtype) / prior**2)
    return cov @ (XK.T @ y / SIGMA**2 + mean / prior**2), cov


def log_evidence(X, y, keep, mean=0.0):
    """ln p(y) with the coefficients ``keep`` under N(mean, PRIOR²), the others 0."""
    XK = X[:, keep]
    cov = PRIOR**2 * XK @ XK.T + SIGMA**2 * torch.eye(len(y), dtype=X.dtype)
    loc = XK.sum(-1) * mean
    return torch.distributions.MultivariateNormal(loc, cov).log_prob(y)


def _set(guide, attr, value):
    param, constraint = _parameter(guide, attr)
    with torch.no_grad():
        param.copy_(transform_to(constraint).inv(value))


def exact_guide(kind, X, y, loc=None, cov=None, of=model):
    """A guide of ``kind`` for the model ``of`` holding N(loc, cov), by default the
    exact posterior of ``model``."""
    if loc is None:
        loc, cov = exact_posterior(X, y)
    n = len(loc)
    guide = kind(of) if kind is not AutoLowRankMultivariateNormal else kind(of, rank=n)
    guide(X, y)
    _set(guide, "loc", loc)
    if kind is AutoMultivariateNormal:
        tril = torch.linalg.cholesky(cov)
        _set(guide, "scale", tril.diagonal())
        _set(guide, "scale_tril", tril / tril.diagonal()[:, None])
    else:  # cov = W Wᵀ + D, D below the smallest eigenvalue; W = diag(scale) cov_factor
        diag = torch.full((n,), 0.5 * float(torch.linalg.eigvalsh(cov)[0]), dtype=cov.dtype)
        _set(guide, "scale", diag.sqrt())
        _set(guide, "cov_factor", torch.linalg.cholesky(cov - diag.diag()) / diag.sqrt()[:, None])
    torch.testing.assert_close(guide.get_posterior().covariance_matrix.detach(), cov)
    return guide


def kept(bmr):
    return torch.cat([bmr.masks["w_a"], bmr.masks["w_s"]])


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1.0])
def test_joint_delta_f_is_the_exact_evidence_where_mean_field_is_not(diabetes, kind, threshold):
    X, y = diabetes
    guide = exact_guide(kind, X, y)
    loc, cov = exact_posterior(X, y)
    bmr = BayesianModelReduction(guide, ThresholdRule(threshold))
    report = bmr.reduce(X, y)
    keep = kept(bmr)
    assert 0 < int((~keep).sum()) < 10
    exact = log_evidence(X, y, keep) - log_evidence(X, y, torch.ones(10, dtype=torch.bool))
    assert report.joint_delta_f == pytest.approx(float(exact), rel=1e-6)
    # each element is scored from its marginal, exactly
    marginal = delta_f(loc, cov.diagonal().sqrt(), 0.0, PRIOR).delta_f
    torch.testing.assert_close(torch.cat([report.delta_f["w_a"], report.delta_f["w_s"]]), marginal)
    # mean-field BMR on the same marginals prunes the same set and sums its elements
    diagonal = AutoDiagonalNormal(model)
    diagonal(X, y)
    _set(diagonal, "loc", loc)
    _set(diagonal, "scale", cov.diagonal().sqrt())
    mean_field = BayesianModelReduction(diagonal, ThresholdRule(threshold))
    mf_report = mean_field.reduce(X, y)
    assert torch.equal(kept(mean_field), keep) and mf_report.joint_delta_f is None
    assert mf_report.total_delta_f == pytest.approx(report.total_delta_f, rel=1e-9)
    if threshold <= 0:  # the set holds substitutes (s1, s2 and s3, s4): the sum is wrong
        assert mf_report.total_delta_f - float(exact) > 4.0


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
def test_a_second_reduction_scores_against_the_model_the_first_left(diabetes, kind):
    # after the first reduction the guide holds the reduced model's exact posterior;
    # the elements pruned then are outside the model the second one reduces further
    X, y = diabetes
    guide = exact_guide(kind, X, y)
    bmr = BayesianModelReduction(guide, ThresholdRule(2.0), update_posterior=True)
    bmr.reduce(X, y)
    first = kept(bmr)
    bmr.rule = ThresholdRule(0.0)
    report = bmr.reduce(X, y)
    second = kept(bmr)
    assert 0 < int((first & ~second).sum()) and int(second.sum()) > 0
    assert not (second & ~first).any()
    exact = log_evidence(X, y, second) - log_evidence(X, y, first)
    assert report.joint_delta_f == pytest.approx(float(exact), rel=1e-6)
    loc, _ = exact_posterior(X, y, second)
    torch.testing.assert_close(guide.get_posterior().loc.detach()[second], loc)


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
def test_update_posterior_writes_the_exact_reduced_posterior(diabetes, kind):
    X, y = diabetes
    guide = exact_guide(kind, X, y)
    bmr = BayesianModelReduction(guide, update_posterior=True)
    bmr.reduce(X, y)
    keep = kept(bmr)
    loc, cov = exact_posterior(X, y, keep)
    q = guide.get_posterior()
    torch.testing.assert_close(q.loc.detach()[keep], loc, rtol=1e-9, atol=1e-12)
    joint = q.covariance_matrix.detach()
    torch.testing.assert_close(joint[keep][:, keep], cov, rtol=1e-9, atol=1e-12)
    assert (q.loc.detach()[~keep] == 0).all() and (joint[keep][:, ~keep] == 0).all()
    # the reduced guide is that posterior: its log density on a draw, and its draws
    trace = pyro.poutine.trace(bmr(guide)).get_trace(X, y)
    latent = trace.nodes[f"_{kind.__name__}_latent"]
    value = latent["value"]
    assert (value[~keep] == 0).all()
    reduced = torch.distributions.MultivariateNormal(loc, cov)
    torch.testing.assert_close(latent["fn"].log_prob(value), reduced.log_prob(value[keep]))
    for parallel in (False, True):
        draws = Predictive(bmr(model), guide=bmr(guide), num_samples=200, parallel=parallel)(X)
        w = torch.cat([draws["w_a"], draws["w_s"]], -1).reshape(200, 10)
        assert (w[:, ~keep] == 0).all() and (w[:, keep] != 0).all()


@pytest.mark.parametrize("reduced_loc", [0.0, 0.1])
def test_update_posterior_with_a_soft_reduced_prior(diabetes, reduced_loc):
    X, y = diabetes
    guide = exact_guide(AutoMultivariateNormal, X, y)
    bmr = BayesianModelReduction(
        guide, reduced_loc=reduced_loc, reduced_scale=0.1, update_posterior=True
    )
    report = bmr.reduce(X, y)
    keep = kept(bmr)
    assert 0 < int(keep.sum()) < 10
    # the set is pruned to 0, as the model then runs it, whatever m̃
    everything = log_evidence(X, y, torch.ones(10, dtype=torch.bool))
    exact = log_evidence(X, y, keep) - everything
    assert report.joint_delta_f == pytest.approx(float(exact), rel=1e-9)
    loc, cov = exact_posterior(X, y, keep, prior=0.1, mean=reduced_loc)  # N(m̃, 0.1²)
    q = guide.get_posterior()
    # float64 throughout: m̃ = 0.1 rounded to float32 would move the mean by ~1e-9
    torch.testing.assert_close(q.loc.detach()[keep], loc, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(q.covariance_matrix.detach()[keep][:, keep], cov)


PRIOR_MEAN = 0.1  # not a float32 number


def shifted_model(X, y=None):
    """``model`` with every coefficient's prior at N(0.1, PRIOR²)."""
    mean = X.new_full((), PRIOR_MEAN)
    a = pyro.sample("w_a", dist.Normal(mean, PRIOR).expand([4]).to_event(1))
    b = pyro.sample("w_s", dist.Normal(mean, PRIOR).expand([6]).to_event(1))
    w = torch.cat([a, b], -1).unsqueeze(-2)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), SIGMA), obs=y)


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
def test_a_prior_mean_off_zero_is_scored_in_float64(diabetes, kind):
    X, y = diabetes
    loc, cov = exact_posterior(X, y, mean=PRIOR_MEAN)
    guide = exact_guide(kind, X, y, loc, cov, of=shifted_model)
    bmr = BayesianModelReduction(guide)
    report = bmr.reduce(X, y)
    keep = kept(bmr)
    assert 0 < int((~keep).sum()) < 10
    everything = torch.ones(10, dtype=torch.bool)
    exact = log_evidence(X, y, keep, PRIOR_MEAN) - log_evidence(X, y, everything, PRIOR_MEAN)
    # float64 agrees to ~1e-13; a prior mean rounded to float32 is off by ~1e-10
    assert report.joint_delta_f == pytest.approx(float(exact), rel=1e-11)


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
def test_greedy_finds_a_better_set_on_collinear_inputs(diabetes, kind):
    X, y = diabetes
    everything = log_evidence(X, y, torch.ones(10, dtype=torch.bool))
    reports, masks = {}, {}
    for joint in (None, "greedy"):
        guide = exact_guide(kind, X, y)
        bmr = BayesianModelReduction(guide, joint=joint, update_posterior=True)
        reports[joint], masks[joint] = bmr.reduce(X, y), kept(bmr)
        exact = log_evidence(X, y, masks[joint]) - everything
        assert reports[joint].joint_delta_f == pytest.approx(float(exact), rel=1e-6)
    assert reports["greedy"].joint_delta_f > reports[None].joint_delta_f + 4.0
    # the rule prunes s2 (5) with s3 and s4; greedy keeps it: the best of all 1024 sets
    assert (~masks[None]).nonzero().flatten().tolist() == [0, 5, 6, 7, 9]
    assert (~masks["greedy"]).nonzero().flatten().tolist() == [0, 6, 7, 9]
    loc, cov = exact_posterior(X, y)
    subsets = torch.tensor([[(k >> i) & 1 for i in range(10)] for k in range(1024)]).bool()
    scale = torch.where(subsets, 0.0, PRIOR).to(torch.float64)
    every = mvn_delta_f(loc, 0.0, PRIOR, 0.0, scale, scale_tril=torch.linalg.cholesky(cov))
    assert reports["greedy"].joint_delta_f == pytest.approx(float(every.delta_f.max()), rel=1e-9)


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
def test_greedy_leaves_an_excluded_site_whole_and_a_second_pass_starts_from_the_first(
    diabetes, kind
):
    X, y = diabetes
    everything = log_evidence(X, y, torch.ones(10, dtype=torch.bool))
    guide = exact_guide(kind, X, y)
    rule = ThresholdRule(exclude=["w_s"])
    bmr = BayesianModelReduction(guide, rule, joint="greedy", update_posterior=True)
    first = bmr.reduce(X, y)
    after_first = kept(bmr)
    assert bmr.masks["w_s"].all() and not bmr.masks["w_a"].all()
    assert first.joint_delta_f == pytest.approx(
        float(log_evidence(X, y, after_first) - everything), rel=1e-6
    )
    # the second pass chooses among the elements the first kept, and scores the
    # model it leaves against the model the first left
    second = bmr.reduce(X, y)
    after_second = kept(bmr)
    assert not (after_second & ~after_first).any() and bmr.masks["w_s"].all()
    assert second.joint_delta_f == pytest.approx(
        float(log_evidence(X, y, after_second) - log_evidence(X, y, after_first)), abs=1e-6
    )


class _PositiveRule(PruningRule):
    """ΔF > 0 pruned, without saying that it is a threshold."""

    def keep(self, delta_f, mask):
        return delta_f <= 0


@pytest.mark.parametrize("kind", GUIDES, ids=lambda k: k.__name__)
def test_greedy_measures_a_rule_without_a_threshold_against_zero(diabetes, kind):
    X, y = diabetes
    masks, reports = [], []
    for rule in (ThresholdRule(), _PositiveRule()):
        bmr = BayesianModelReduction(exact_guide(kind, X, y), rule, joint="greedy")
        reports.append(bmr.reduce(X, y))
        masks.append(kept(bmr))
    assert torch.equal(masks[0], masks[1])
    assert (~masks[1]).nonzero().flatten().tolist() == [0, 6, 7, 9]
    assert reports[1].joint_delta_f == pytest.approx(reports[0].joint_delta_f, rel=1e-12)


@pytest.mark.parametrize(
    "rule",
    [ThresholdRule(), ThresholdRule(1.5), ThresholdRule(-0.5), SpikeAndSlabRule(), _PositiveRule()],
)
def test_greedy_gives_the_rule_s_masks_on_a_diagonal_posterior(rule):
    def small(X=None):
        pyro.sample("w", dist.Normal(torch.zeros(()), 1.0).expand([30]).to_event(1))

    g = torch.Generator().manual_seed(3)
    loc = torch.randn(30, generator=g)
    scale = 0.05 + 0.5 * torch.rand(30, generator=g)
    masks = []
    for joint in (None, "greedy"):
        guide = AutoMultivariateNormal(small)
        guide()
        _set(guide, "loc", loc)
        _set(guide, "scale", scale)
        bmr = BayesianModelReduction(guide, rule, joint=joint)
        report = bmr.reduce()
        masks.append(bmr.masks["w"])
        pruned = ~masks[-1]
        assert report.joint_delta_f == pytest.approx(float(report.delta_f["w"][pruned].sum()))
    assert 0 < int((~masks[0]).sum()) < 30
    assert torch.equal(masks[0], masks[1])


def test_a_site_that_cannot_be_reduced_is_skipped_and_moves_with_its_correlations():
    def noisy(x, y=None):
        sigma = pyro.sample("sigma", dist.LogNormal(torch.zeros(()), 1.0))
        w = pyro.sample("w", dist.Normal(torch.zeros(()), 2.0).expand([3]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)

    x, y = torch.randn(5, 3), torch.randn(5)
    guide = AutoMultivariateNormal(noisy)
    guide(x, y)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = (a @ a.T / 4 + 0.1 * torch.eye(4, dtype=torch.float64)).float()
    loc = torch.tensor([0.3, 0.05, 2.0, -0.02])  # [log σ, w]; w₀ and w₂ are near 0
    tril = torch.linalg.cholesky(cov)
    _set(guide, "loc", loc)
    _set(guide, "scale", tril.diagonal())
    _set(guide, "scale_tril", tril / tril.diagonal()[:, None])
    bmr = BayesianModelReduction(guide, update_posterior=True)
    report = bmr.reduce(x, y)
    assert "LogNormal is not an elementwise Normal" in report.skipped["sigma"]
    assert list(report.delta_f) == ["w"]
    pruned = torch.cat([torch.tensor([False]), ~bmr.masks["w"]])
    assert pruned.tolist() == [False, True, False, True]
    # Gaussian conditioning of the joint on w_S = 0, the constrained site's log σ included
    k, s = ~pruned, pruned
    gain = cov[k][:, s] @ torch.linalg.inv(cov[s][:, s])
    q = guide.get_posterior()
    torch.testing.assert_close(q.loc.detach()[k], loc[k] - gain @ loc[s])
    torch.testing.assert_close(
        q.covariance_matrix.detach()[k][:, k], cov[k][:, k] - gain @ cov[s][:, k]
    )
    marginal = torch.distributions.MultivariateNormal(loc[s], cov[s][:, s])
    prior = dist.Normal(0.0, 2.0).log_prob(torch.zeros(2)).sum()
    assert report.joint_delta_f == pytest.approx(float(marginal.log_prob(torch.zeros(2)) - prior))


def test_bad_input_is_refused_with_a_clear_error(diabetes):
    X, y = diabetes
    with pytest.raises(TypeError, match="AutoDelta is not a Gaussian guide"):
        BayesianModelReduction(AutoDelta(model))
    message = (
        "joint='greedy' chooses a set to prune to the point mass (reduced_scale=0, here 0.0) "
        "under a guide with correlations (AutoMultivariateNormal, AutoLowRankMultivariateNormal, "
        "here AutoNormal): under a mean-field guide the ΔF of a set is the sum of its elements'"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BayesianModelReduction(AutoNormal(model), joint="greedy")
    guide = exact_guide(AutoMultivariateNormal, X, y)
    with pytest.raises(ValueError, match="reduced_scale=0, here 0.1"):
        BayesianModelReduction(guide, joint="greedy", reduced_scale=0.1)
    with pytest.raises(ValueError, match="joint must be None or 'greedy'"):
        BayesianModelReduction(guide, joint="best")
    with pytest.raises(ValueError, match="update_posterior needs a soft reduced prior"):
        BayesianModelReduction(AutoNormal(model), update_posterior=True)
    with torch.no_grad():
        guide.loc[5] = float("nan")
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    bmr = BayesianModelReduction(guide, update_posterior=True, joint="greedy")
    with pytest.raises(ValueError, match="guide location of site 'w_s'"):
        bmr.reduce(X, y)
    assert not bmr.masks
    for name, param in guide.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, equal_nan=True)
