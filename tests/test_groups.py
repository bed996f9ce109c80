"""Structured reduction: unit ΔF, the rules per group, dead units and the report."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from torch.distributions import transform_to

from pyro_bmr import BayesianModelReduction, MaskError, SpikeAndSlabRule, ThresholdRule
from pyro_bmr.groups import Member, UnitCount, UnitGroup

from .models import autonormal_at

F64 = torch.float64


def model(x, y=None):
    """A two-layer ReLU network: 4 hidden units (rows of w1, entries of b1), read by
    the columns of w2."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, 2.0).expand([4]).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([2, 4]).to_event(2))
    out = torch.relu(x @ w1.T + b1) @ w2.T
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(out, 1.0).to_event(1), obs=y)


HIDDEN = UnitGroup(
    "hidden",
    members=(Member("w1", 0), Member("b1", 0)),
    readers=(Member("w2", 1),),
)
X = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
Y = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
PRIOR_SCALE = {"w1": 1.0, "b1": 2.0, "w2": 1.0}


def _fitted_guide(locs, scales):
    return autonormal_at(model, locs, scales, X, Y)


def _posterior(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (4, 3), "b1": (4,), "w2": (2, 4)}
    locs = {n: 0.6 * torch.randn(s, generator=g) for n, s in shapes.items()}
    scales = {n: 0.2 + 0.6 * torch.rand(s, generator=g) for n, s in shapes.items()}
    return locs, scales


def _element_df(loc, scale, prior_scale):
    """The Savage–Dickey ratio ln q(0) − ln p(0), in float64 (independent oracle)."""
    zero = torch.zeros((), dtype=F64)
    posterior = dist.Normal(loc.to(F64), scale.to(F64))
    return posterior.log_prob(zero) - dist.Normal(zero, prior_scale).log_prob(zero)


def _unit_df(locs, scales):
    """ΔF of each hidden unit: its w1 row and b1 entry summed."""
    df = {n: _element_df(locs[n], scales[n], PRIOR_SCALE[n]) for n in locs}
    return df["w1"].sum(dim=1) + df["b1"]


def test_a_unit_is_pruned_where_the_sum_of_its_elements_delta_f_is_positive():
    locs, scales = _posterior()
    # unit 2: no evidence for it (posterior at the prior's mode, wide); unit 0: strong
    locs["w1"][2], scales["w1"][2], locs["b1"][2], scales["b1"][2] = 0.0, 0.9, 0.0, 1.5
    locs["w1"][0] = 3.0
    guide = _fitted_guide(locs, scales)
    expected = _unit_df(locs, scales)
    bmr = BayesianModelReduction(guide, ThresholdRule(), groups=[HIDDEN], prune_elements=False)
    report = bmr.reduce(X, Y)
    keep = expected <= 0
    assert keep.tolist().count(False) >= 1 and bool(keep[0]) and not bool(keep[2])
    masks = bmr.masks
    assert torch.equal(masks["w1"], keep[:, None].expand(4, 3))
    assert torch.equal(masks["b1"], keep)
    # dead units propagate: the columns of w2 that read them
    assert torch.equal(masks["w2"], keep[None, :].expand(2, 4))
    assert report.units == {"hidden": UnitCount(int(keep.sum()), 4)}
    assert bmr.units() == report.units
    # the guide's locations of every pruned element are zero, the others untouched
    assert torch.all(guide.locs.w1.detach()[~keep] == 0)
    assert torch.all(guide.locs.w2.detach()[:, ~keep] == 0)
    assert torch.equal(guide.locs.w1.detach()[keep], locs["w1"][keep])
    gained = expected[~keep].sum() + _element_df(locs["w2"], scales["w2"], 1.0)[:, ~keep].sum()
    assert report.total_delta_f == pytest.approx(float(gained), rel=1e-5)
    assert "hidden: kept" in str(report)


def test_threshold_decides_on_the_unit_sum_not_on_elements():
    # every element of unit 1 has ΔF > 0 except one strongly negative: the unit stays
    locs, scales = _posterior(1)
    locs["w1"][1], scales["w1"][1] = torch.tensor([0.0, 0.0, 4.0]), torch.tensor([0.9, 0.9, 0.3])
    guide = _fitted_guide(locs, scales)
    expected = _unit_df(locs, scales)
    assert expected[1] < 0
    bmr = BayesianModelReduction(guide, ThresholdRule(), groups=[HIDDEN], prune_elements=False)
    bmr.reduce(X, Y)
    masks = bmr.masks
    assert torch.equal(masks["b1"], expected <= 0)
    # no element pruning on the grouped sites: only whole units
    assert torch.equal(masks["w1"], (expected <= 0)[:, None].expand(4, 3))


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 2.5])
def test_units_scored_against_what_the_element_decisions_keep_of_them(threshold):
    locs, scales = _posterior(2)
    guide = _fitted_guide(locs, scales)
    df = {n: _element_df(locs[n], scales[n], PRIOR_SCALE[n]) for n in locs}
    element_keep = {n: d <= threshold for n, d in df.items()}
    # a unit's ΔF sums the elements that the element decisions keep: pruning it
    # against keeping what they leave of it
    left = {n: torch.where(element_keep[n], df[n], torch.zeros_like(df[n])) for n in df}
    in_play = element_keep["w1"].any(1) | element_keep["b1"]
    unit_keep = in_play & (left["w1"].sum(1) + left["b1"] <= threshold)
    if threshold == 2.5:  # units pruned whose elements the element decisions keep
        assert bool((in_play & ~unit_keep).any())
    bmr = BayesianModelReduction(guide, ThresholdRule(threshold), groups=[HIDDEN])
    bmr.reduce(X, Y)
    masks = bmr.masks
    assert torch.equal(masks["w1"], element_keep["w1"] & unit_keep[:, None])
    assert torch.equal(masks["b1"], element_keep["b1"] & unit_keep)
    assert torch.equal(masks["w2"], element_keep["w2"] & unit_keep[None, :])
    # a second reduction scores the units on the elements kept by the first
    df_left = {n: torch.where(masks[n], df[n], torch.zeros_like(df[n])) for n in df}
    unit_left = df_left["w1"].sum(1) + df_left["b1"]
    bmr.reduce(X, Y)
    assert torch.equal(bmr.masks["b1"], masks["b1"] & (unit_left <= threshold))


def test_with_elements_pruned_too_narrow_inputs_do_not_vote_out_an_informative_unit():
    """Many inputs narrow at zero (each worth pruning on its own) and one informative
    input: against the whole unit they would prune it, and the model left would have
    less evidence than the one that prunes only them."""
    locs, scales = _posterior(6)
    locs["w1"][1], scales["w1"][1] = torch.tensor([0.0, 0.0, 1.5]), torch.tensor([0.02, 0.02, 0.4])
    locs["b1"][1], scales["b1"][1] = 0.0, 0.02
    locs["w2"][:, 1], scales["w2"][:, 1] = 2.0, 0.3  # what reads it is informative too
    df = {n: _element_df(locs[n], scales[n], PRIOR_SCALE[n]) for n in locs}
    whole = df["w1"][1].sum() + df["b1"][1]
    informative = df["w1"][1, 2]
    assert whole > 0 and informative < 0  # the whole unit's ΔF says prune it
    # keeping the informative input beats pruning the unit by -informative
    pruned_inputs = whole - informative
    assert pruned_inputs > whole
    bmr = BayesianModelReduction(_fitted_guide(locs, scales), ThresholdRule(), groups=[HIDDEN])
    bmr.reduce(X, Y)
    assert bmr.masks["w1"][1].tolist() == [False, False, True] and not bmr.masks["b1"][1]
    assert bmr.masks["w2"][:, 1].all()  # the unit lives, and so do its readers
    # the units-only reduction compares with the whole unit and prunes it
    units_only = BayesianModelReduction(
        _fitted_guide(locs, scales), ThresholdRule(), groups=[HIDDEN], prune_elements=False
    )
    units_only.reduce(X, Y)
    assert not units_only.masks["w1"][1].any()


def test_spike_and_slab_learns_one_keep_probability_per_group():
    locs, scales = _posterior(3)
    guide = _fitted_guide(locs, scales)
    rule = SpikeAndSlabRule(alpha0=2.0, beta0=3.0)
    unit = _unit_df(locs, scales)
    alive = torch.ones(4, dtype=torch.bool)
    # the oracle: the fixed-point iteration of the rule's docstring, in float64
    zeta = torch.digamma(torch.tensor(2.0, dtype=F64)) - torch.digamma(torch.tensor(3.0, dtype=F64))
    for _ in range(rule.num_iterations):
        q = torch.sigmoid(zeta - unit)
        zeta = torch.digamma(2.0 + q.sum()) - torch.digamma(3.0 + (1 - q).sum())
    bmr = BayesianModelReduction(guide, rule, groups=[HIDDEN], prune_elements=False)
    bmr.reduce(X, Y)
    assert torch.equal(bmr.masks["b1"], alive & (unit <= zeta))


def test_a_unit_left_dead_by_element_pruning_propagates():
    locs, scales = _posterior(4)
    # unit 3: every element worthless one by one, though not as a unit (irrelevant here)
    locs["w1"][3], scales["w1"][3], locs["b1"][3], scales["b1"][3] = 0.0, 0.9, 0.0, 1.8
    locs["w2"][:, 3] = 2.0  # its readers look useful: they are pruned because it is dead
    guide = _fitted_guide(locs, scales)
    group = UnitGroup("hidden", HIDDEN.members, HIDDEN.readers)
    bmr = BayesianModelReduction(guide, ThresholdRule(exclude=["hidden"]), groups=[group])
    bmr.reduce(X, Y)
    masks = bmr.masks
    assert not masks["w1"][3].any() and not masks["b1"][3]
    assert not masks["w2"][:, 3].any()
    assert bmr.units()["hidden"].kept <= 3


def test_excluded_group_keeps_its_units_and_units_accumulate():
    locs, scales = _posterior(5)
    locs["w1"][2], scales["w1"][2], locs["b1"][2], scales["b1"][2] = 0.0, 0.9, 0.0, 1.5
    guide = _fitted_guide(locs, scales)
    bmr = BayesianModelReduction(
        guide, ThresholdRule(exclude=["hidden"]), groups=[HIDDEN], prune_elements=False
    )
    bmr.reduce(X, Y)
    assert bmr.units() == {"hidden": UnitCount(4, 4)}
    bmr = BayesianModelReduction(guide, ThresholdRule(), groups=[HIDDEN], prune_elements=False)
    first = bmr.reduce(X, Y).units["hidden"].kept
    assert first < 4
    # a second reduction keeps what the first pruned pruned
    assert bmr.reduce(X, Y).units["hidden"].kept <= first


def test_a_reduction_that_prunes_a_whole_layer_says_so_once():
    # no unit carries evidence: every posterior narrow at the prior's mode
    locs, scales = _posterior(6)
    for name in ("w1", "b1"):
        locs[name].zero_()
        scales[name].mul_(0.1)
    guide = _fitted_guide(locs, scales)
    bmr = BayesianModelReduction(guide, ThresholdRule(), groups=[HIDDEN], prune_elements=False)
    with pytest.warns(UserWarning, match=r"every unit of group 'hidden' \(the last 4\)") as caught:
        report = bmr.reduce(X, Y)
    assert caught[0].filename == __file__  # the caller's line, not the library's
    assert report.units == {"hidden": UnitCount(0, 4)}  # the rule's decision stands
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bmr.reduce(X, Y)  # already gone: nothing new to say
    # one unit with evidence keeps the layer alive, and nothing is said
    locs["w1"][1] = 3.0
    bmr = BayesianModelReduction(
        _fitted_guide(locs, scales), ThresholdRule(), groups=[HIDDEN], prune_elements=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bmr.reduce(X, Y).units == {"hidden": UnitCount(1, 4)}


def test_a_layer_emptied_by_its_element_decisions_says_so_too():
    locs, scales = _posterior(6)
    for name in ("w1", "b1"):  # every element worth pruning on its own
        locs[name].zero_()
        scales[name].mul_(0.1)
    bmr = BayesianModelReduction(_fitted_guide(locs, scales), ThresholdRule(), groups=[HIDDEN])
    with pytest.warns(UserWarning, match=r"every unit of group 'hidden' \(the last 4\)"):
        report = bmr.reduce(X, Y)
    assert report.units == {"hidden": UnitCount(0, 4)}


def test_member_layouts_against_loops():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(12, 5, generator=g, dtype=F64)
    # fused query/key/value rows of 2 heads of width 2: rows [q0 q0 q1 q1 k0 k0 ...]
    heads = Member("qkv", dim=0, unit_size=2, period=4)
    assert heads.num_units(values.shape) == 2
    expected = torch.zeros(2, dtype=F64)
    for row in range(12):
        expected[(row % 4) // 2] += values[row].sum()
    assert torch.allclose(heads.per_unit_sum(values, 2), expected)
    # a flattened channel: 5 columns in blocks; 12 // 3 = 4 per unit along dim 0
    blocks = Member("w", dim=0, unit_size=3)
    expanded = blocks.expand(torch.tensor([True, False, True, True]), values.shape)
    assert expanded.shape == values.shape
    assert torch.equal(expanded[:, 0], torch.tensor([True] * 3 + [False] * 3 + [True] * 6))
    columns = Member("w", dim=1)
    assert torch.allclose(columns.per_unit_sum(values, 5), values.sum(0))
    assert torch.equal(
        heads.unit_index(values.shape, values.device)[:8], torch.tensor([0, 0, 1, 1] * 2)
    )


def test_bad_groups_are_refused_naming_the_group_and_the_site():
    locs, scales = _posterior()
    guide = _fitted_guide(locs, scales)
    unknown = UnitGroup("g", (Member("w3", 0),))
    with pytest.raises(MaskError, match=r"unit group 'g'.*'w3'"):
        BayesianModelReduction(guide, groups=[unknown]).reduce(X, Y)
    mismatch = UnitGroup("g", (Member("w1", 0), Member("w2", 0)))
    with pytest.raises(MaskError, match=r"unit group 'g': members disagree.*w1 \(dim 0\): 4"):
        BayesianModelReduction(guide, groups=[mismatch]).reduce(X, Y)
    untiled = UnitGroup("g", (Member("w1", 1, unit_size=2),))
    with pytest.raises(MaskError, match=r"dimension 1 of site 'w1' \(length 3\)"):
        BayesianModelReduction(guide, groups=[untiled]).reduce(X, Y)
    with pytest.raises(MaskError, match="no dimension 2"):
        BayesianModelReduction(guide, groups=[UnitGroup("g", (Member("b1", 2),))]).reduce(X, Y)
    with pytest.raises(MaskError, match="two unit groups are named 'hidden'"):
        BayesianModelReduction(guide, groups=[HIDDEN, HIDDEN]).reduce(X, Y)
    with pytest.raises(TypeError, match="^groups must be UnitGroup s, got str$"):
        BayesianModelReduction(guide, groups=["w1"])
    with pytest.raises(ValueError, match="period 3 must be a positive multiple of unit_size 2"):
        Member("w1", 0, unit_size=2, period=3)
    with pytest.raises(ValueError, match="has no members"):
        UnitGroup("g", ())
    # nothing was changed by the failed reductions
    assert torch.equal(guide.locs.w1.detach(), locs["w1"])


def _correlated_guide():
    guide = AutoMultivariateNormal(model)
    guide(X, Y)
    g = torch.Generator().manual_seed(6)
    n = 12 + 4 + 8
    with torch.no_grad():
        guide.loc.copy_(2.0 * torch.randn(n, generator=g))
        guide.loc[[6, 7, 8, 14]] = 0.0  # unit 2: its w1 row and b1 entry near zero
        guide.loc[[3, 4, 5, 13]] = 0.5  # unit 1: small, strongly correlated values
        tril = torch.tril(0.15 * torch.randn(n, n, generator=g), -1) + torch.eye(n)
        tril[[4, 5, 13], 3] = 4.0
        unconstrained = transform_to(constraints.unit_lower_cholesky).inv(tril)
        pyro.param("AutoMultivariateNormal.scale_tril").unconstrained().copy_(unconstrained)
        scale = 0.3 + 0.3 * torch.rand(n, generator=g)
        pyro.param("AutoMultivariateNormal.scale").unconstrained().copy_(scale.expm1().log())
    return guide


def test_under_a_correlated_guide_a_unit_is_scored_from_its_joint_marginal():
    guide = _correlated_guide()
    # the oracle: ln q_u(0) − ln p_u(0) over the unit's elements, from the guide's
    # own distribution, in float64; the flat vector is w1 (row-major), b1, w2
    q = guide.get_posterior()
    loc, cov = q.loc.detach().to(F64), q.covariance_matrix.detach().to(F64)
    prior_scale = torch.tensor([1.0] * 12 + [2.0] * 4 + [1.0] * 8, dtype=F64)
    expected, marginals = [], []
    zeros = torch.zeros(4, dtype=F64)
    for unit in range(4):
        idx = torch.tensor([3 * unit, 3 * unit + 1, 3 * unit + 2, 12 + unit])
        posterior = dist.MultivariateNormal(loc[idx], cov[idx][:, idx])
        prior = dist.Normal(torch.zeros(4, dtype=F64), prior_scale[idx])
        marginal = dist.Normal(loc[idx], cov[idx, idx].sqrt())
        marginals.append((marginal.log_prob(zeros) - prior.log_prob(zeros)).sum())
        expected.append(
            posterior.log_prob(torch.zeros(4, dtype=F64))
            - prior.log_prob(torch.zeros(4, dtype=F64)).sum()
        )
    expected = torch.stack(expected)
    keep = expected <= 0
    assert 0 < int(keep.sum()) < 4
    # unit 1 is pruned jointly, though the sum of its marginal ΔF would keep it
    assert not keep[1] and torch.stack(marginals)[1] < 0
    bmr = BayesianModelReduction(guide, ThresholdRule(), groups=[HIDDEN], prune_elements=False)
    report = bmr.reduce(X, Y)
    assert torch.equal(bmr.masks["b1"], keep)
    assert torch.equal(bmr.masks["w2"], keep[None, :].expand(2, 4))
    # the set the report scores jointly is the units' elements and their readers
    assert report.joint_delta_f is not None
    assert report.units["hidden"] == UnitCount(int(keep.sum()), 4)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_under_a_correlated_guide_a_unit_is_scored_given_the_elements_pruned_now(threshold):
    """ΔF(u ∪ P) − ΔF(P): the unit's kept elements at zero in the posterior
    conditioned on the elements P that the same reduction prunes one by one."""
    guide = _correlated_guide()
    q = guide.get_posterior()
    loc, cov = q.loc.detach().to(F64), q.covariance_matrix.detach().to(F64)
    prior_scale = torch.tensor([1.0] * 12 + [2.0] * 4 + [1.0] * 8, dtype=F64)
    marginal_df = dist.Normal(loc, cov.diagonal().sqrt()).log_prob(torch.zeros(24, dtype=F64))
    marginal_df = marginal_df - dist.Normal(0.0, prior_scale).log_prob(torch.zeros((), dtype=F64))
    pruned_now = marginal_df > threshold  # the element decisions, on marginals
    # condition on P = 0 (the Gaussian conditional, from the covariance)
    p, r = pruned_now.nonzero().squeeze(1), (~pruned_now).nonzero().squeeze(1)
    gain = cov[r][:, p] @ torch.linalg.inv(cov[p][:, p])
    cond_loc = loc[r] - gain @ loc[p]
    cond_cov = cov[r][:, r] - gain @ cov[p][:, r]
    position = {int(i): k for k, i in enumerate(r)}
    unit_keep = torch.zeros(4, dtype=torch.bool)
    for unit in range(4):
        idx = [i for i in (3 * unit, 3 * unit + 1, 3 * unit + 2, 12 + unit) if i in position]
        if not idx:
            continue  # every element pruned on its own: the unit is dead
        k = torch.tensor([position[i] for i in idx])
        posterior = dist.MultivariateNormal(cond_loc[k], cond_cov[k][:, k])
        prior = dist.Normal(torch.zeros(len(idx), dtype=F64), prior_scale[idx])
        zero = torch.zeros(len(idx), dtype=F64)
        unit_df = posterior.log_prob(zero) - prior.log_prob(zero).sum()
        unit_keep[unit] = bool(unit_df <= threshold)
    element_keep = ~pruned_now
    w1_keep = element_keep[:12].view(4, 3) & unit_keep[:, None]
    b1_keep = element_keep[12:16] & unit_keep
    alive = w1_keep.any(1) | b1_keep
    bmr = BayesianModelReduction(guide, ThresholdRule(threshold), groups=[HIDDEN])
    report = bmr.reduce(X, Y)
    assert torch.equal(bmr.masks["w1"], w1_keep)
    assert torch.equal(bmr.masks["b1"], b1_keep)
    assert torch.equal(bmr.masks["w2"], element_keep[16:].view(2, 4) & alive[None, :])
    assert report.units["hidden"] == UnitCount(int(alive.sum()), 4)
    # again: nothing is pruned one by one now, and the elements pruned before are
    # outside the current model (marginalised), so a unit is scored on the marginal
    # of its kept elements
    flat = torch.cat([bmr.masks[n].reshape(-1) for n in ("w1", "b1", "w2")])
    second = torch.zeros(4, dtype=torch.bool)
    for unit in range(4):
        idx = [i for i in (3 * unit, 3 * unit + 1, 3 * unit + 2, 12 + unit) if flat[i]]
        if idx:
            posterior = dist.MultivariateNormal(loc[idx], cov[idx][:, idx])
            prior = dist.Normal(torch.zeros(len(idx), dtype=F64), prior_scale[idx])
            zero = torch.zeros(len(idx), dtype=F64)
            second[unit] = bool(posterior.log_prob(zero) - prior.log_prob(zero).sum() <= threshold)
    bmr.reduce(X, Y)
    assert torch.equal(bmr.masks["b1"], b1_keep & second)
    assert torch.equal(bmr.masks["w1"], w1_keep & second[:, None])
    if threshold == 1.0:  # a unit goes that keeps an element of its own
        assert bool(
            (unit_keep != (element_keep[:12].view(4, 3).any(1) | element_keep[12:16])).any()
        )


def test_groups_prune_to_the_point_mass_as_the_rule_decides():
    guide = AutoMultivariateNormal(model)
    guide(X, Y)
    with pytest.raises(ValueError, match=r"groups prune units.*joint=None, here 'greedy'"):
        BayesianModelReduction(guide, groups=[HIDDEN], joint="greedy")
    with pytest.raises(ValueError, match=r"reduced_scale=0, here 0.1"):
        BayesianModelReduction(AutoNormal(model), groups=[HIDDEN], reduced_scale=0.1)
    # a unit held at 1 is not dead: what reads it still touches the likelihood
    with pytest.raises(ValueError, match=r"point mass at zero \(reduced_loc=0, here 1.0"):
        BayesianModelReduction(
            AutoNormal(model), groups=[HIDDEN], reduced_loc=1.0, reduced_scale=0.1
        )
