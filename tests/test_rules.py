import pytest
import torch

from pyro_bmr import PruningRule, SpikeAndSlabRule, ThresholdRule


def test_threshold_rule_keeps_where_delta_f_is_at_most_tau():
    df = torch.tensor([-1.0, 0.0, 0.5, 2.0, float("inf"), -float("inf")])
    mask = torch.ones(6, dtype=torch.bool)
    assert ThresholdRule().keep(df, mask).tolist() == [True, True, False, False, False, True]
    assert ThresholdRule(1.0).keep(df, mask).tolist() == [True, True, True, False, False, True]
    with pytest.raises(ValueError, match="^ThresholdRule: threshold must not be NaN$"):
        ThresholdRule(float("nan"))


def _reference_log_odds(df, mask, a0, b0, iterations):
    zeta = torch.digamma(torch.tensor(a0, dtype=torch.float64)) - torch.digamma(
        torch.tensor(b0, dtype=torch.float64)
    )
    for _ in range(iterations):
        q = [float(torch.sigmoid(zeta - d)) if m else 0.0 for d, m in zip(df.tolist(), mask)]
        alpha = a0 + sum(q)
        beta = b0 + sum(1 - x for x in q)
        zeta = torch.digamma(torch.tensor(alpha, dtype=torch.float64)) - torch.digamma(
            torch.tensor(beta, dtype=torch.float64)
        )
    return zeta


def test_spike_and_slab_rule_matches_the_fixed_point_iteration():
    g = torch.Generator().manual_seed(0)
    df = torch.cat([torch.randn(40, generator=g) + 3.0, -torch.rand(10, generator=g) * 20])
    df = df.double()
    mask = torch.ones(50, dtype=torch.bool)
    mask[:5] = False  # already pruned: enter with q = 0
    rule = SpikeAndSlabRule(alpha0=2.0, beta0=3.0, num_iterations=7)
    zeta = rule.log_odds(df, mask)
    expected = _reference_log_odds(df, mask.tolist(), 2.0, 3.0, 7)
    assert torch.allclose(zeta, expected, rtol=1e-12)
    assert torch.equal(rule.keep(df, mask), df <= zeta)
    # mostly-irrelevant weights make the learned inclusion log-odds negative
    assert zeta < 0
    assert rule.keep(df, mask)[-10:].all()


def test_spike_and_slab_handles_infinite_delta_f_without_nan():
    df = torch.tensor([float("inf"), -float("inf"), 0.0])
    zeta = SpikeAndSlabRule().log_odds(df, torch.ones(3, dtype=torch.bool))
    assert torch.isfinite(zeta)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha0": 0.0}, "alpha0 must be positive"),
        ({"beta0": -1.0}, "beta0 must be positive"),
        ({"num_iterations": 0}, "num_iterations must be >= 1"),
    ],
)
def test_spike_and_slab_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpikeAndSlabRule(**kwargs)


def test_rules_have_a_readable_repr():
    assert repr(ThresholdRule(0.5)) == "ThresholdRule(threshold=0.5)"
    assert repr(SpikeAndSlabRule()) == (
        "SpikeAndSlabRule(alpha0=1.0, beta0=1.0, num_iterations=10)"
    )
    assert repr(ThresholdRule(exclude=["out"])) == (
        "ThresholdRule(exclude=frozenset({'out'}), threshold=0.0)"
    )


def test_one_iteration_is_allowed_and_each_iteration_counts():
    df = torch.tensor([-3.0, 0.5, 2.0, 4.0, -1.0])
    mask = torch.ones(5, dtype=torch.bool)
    one = SpikeAndSlabRule(num_iterations=1).log_odds(df, mask)
    assert torch.allclose(one, _reference_log_odds(df.double(), mask.tolist(), 1.0, 1.0, 1).float())
    ten = SpikeAndSlabRule().log_odds(df, mask)  # the default: 10 iterations of Beta(1, 1)
    assert torch.allclose(
        ten, _reference_log_odds(df.double(), mask.tolist(), 1.0, 1.0, 10).float()
    )
    assert not torch.allclose(one, ten)


def test_an_element_at_the_threshold_is_kept():
    df = torch.tensor([-3.0, 0.5, 2.0, 4.0, -1.0], dtype=torch.float64)
    mask = torch.ones(5, dtype=torch.bool)
    rule = SpikeAndSlabRule()
    zeta = rule.log_odds(df, mask)
    df[1] = zeta  # ζ depends on ΔF only through the sums, which change a little
    zeta = rule.log_odds(df, mask)
    for _ in range(50):  # move the element onto the fixed point exactly
        df[1] = zeta
        zeta = rule.log_odds(df, mask)
    assert df[1] == zeta and rule.keep(df, mask)[1]
    assert ThresholdRule(0.5).keep(torch.tensor([0.5]), torch.ones(1, dtype=torch.bool)).item()


class _EveryOtherRule(PruningRule):
    """Not a threshold: keeps every other element."""

    def keep(self, delta_f, mask):
        keep = torch.zeros_like(delta_f, dtype=torch.bool)
        keep.view(-1)[::2] = True
        return keep


class _StrictRule(ThresholdRule):
    """A subclass that changes the decision, and says so through fixed_threshold."""

    def keep(self, delta_f, mask):
        return delta_f <= self.threshold - 3.0

    def fixed_threshold(self):
        return None


class _SiteMedianRule(PruningRule):
    """A threshold computed from each site's ΔF, declared through site_threshold."""

    def keep(self, delta_f, mask):
        return delta_f <= self.site_threshold(delta_f.reshape(-1), None)

    def site_threshold(self, delta_f, mask):
        return delta_f.median()


def _reduced_masks(rule, loc):
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    from pyro_bmr import BayesianModelReduction

    def model():
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([loc.numel()]).to_event(1))

    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide()
    with torch.no_grad():
        guide.locs.w.copy_(loc)
    bmr = BayesianModelReduction(guide, rule)
    report = bmr.reduce()
    return bmr.masks["w"], report.delta_f["w"]


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_the_reduction_follows_the_rules_protocol(compile_mode, kernels):
    kernels.setenv("PYRO_BMR_COMPILE", compile_mode)
    loc = torch.linspace(-0.5, 0.5, 11)
    # a rule that is no threshold is asked through keep
    keep, _ = _reduced_masks(_EveryOtherRule(), loc)
    assert keep.tolist() == [i % 2 == 0 for i in range(11)]
    # a subclass that overrides keep and withdraws its threshold is asked through keep
    keep, df = _reduced_masks(_StrictRule(0.0), loc)
    assert torch.equal(keep, df <= -3.0) and not torch.equal(keep, df <= 0.0)
    # a per-site threshold decides
    keep, df = _reduced_masks(_SiteMedianRule(), loc)
    assert torch.equal(keep, df <= df.median()) and 0 < int(keep.sum()) < 11


def test_rules_declare_their_thresholds():
    df = torch.tensor([0.5, -1.0, 3.0])
    assert ThresholdRule(0.25).fixed_threshold() == 0.25
    assert ThresholdRule().site_threshold(df, None) is None
    rule = SpikeAndSlabRule()
    assert rule.fixed_threshold() is None
    assert torch.equal(
        rule.site_threshold(df, None), rule.log_odds(df, torch.ones(3, dtype=torch.bool))
    )
    assert _EveryOtherRule().fixed_threshold() is None
    assert _EveryOtherRule().site_threshold(df, None) is None


def _two_site_guide():
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0).expand([40]).to_event(1))
        pyro.sample("b", dist.Normal(0.0, 1.0).expand([7]).to_event(1))

    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        guide.locs.a.copy_(torch.randn(40, generator=g) * torch.rand(40, generator=g))
        guide.locs.b.copy_(torch.randn(7, generator=g) * 2)
        pyro.param("AutoNormal.scales.a").unconstrained().copy_(torch.randn(40, generator=g) - 2)
        pyro.param("AutoNormal.scales.b").unconstrained().copy_(torch.randn(7, generator=g) - 2)
    return guide


@pytest.mark.parametrize("compile_mode", ["0", "1"])
@pytest.mark.parametrize("kind", ["threshold", "spike-and-slab", "spike-and-slab, one group"])
def test_excluded_sites_are_scored_and_never_pruned(kind, compile_mode, kernels):
    from pyro_bmr import BayesianModelReduction

    # built inside the test, so that a mutation testing tool sees the constructor run
    if kind == "threshold":
        rule = ThresholdRule(exclude=["b"])
    elif kind == "spike-and-slab":
        rule = SpikeAndSlabRule(exclude=lambda name: name == "b")
    else:  # b shares a's group, whose threshold is learned from a alone
        rule = SpikeAndSlabRule(exclude=lambda name: name == "b", groups=lambda name: "layer")
    kernels.setenv("PYRO_BMR_COMPILE", compile_mode)
    guide = _two_site_guide()
    loc_b = guide.locs.b.detach().clone()
    bmr = BayesianModelReduction(guide, rule)
    report = bmr.reduce()
    assert bmr.masks["b"].all() and torch.equal(guide.locs.b.detach(), loc_b)
    assert (report.delta_f["b"] > 0).any()  # it would have been pruned
    assert (~bmr.masks["a"]).any()
    assert not rule.prunes("b") and rule.prunes("a")
    if kind != "threshold":
        df = report.delta_f["a"]
        zeta = rule.log_odds(df, torch.ones_like(df, dtype=torch.bool))
        assert torch.equal(bmr.masks["a"], df <= zeta)


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_without_groups_each_site_learns_its_own_threshold(compile_mode, kernels):
    from pyro_bmr import BayesianModelReduction

    kernels.setenv("PYRO_BMR_COMPILE", compile_mode)
    rule = SpikeAndSlabRule(num_iterations=4)
    bmr = BayesianModelReduction(_two_site_guide(), rule)
    report = bmr.reduce()
    zetas = []
    for name in ("a", "b"):
        df = report.delta_f[name]
        zetas.append(rule.log_odds(df, torch.ones_like(df, dtype=torch.bool)))
        assert torch.equal(bmr.masks[name], df <= zetas[-1])
    assert abs(float(zetas[0] - zetas[1])) > 0.1


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_sites_of_a_group_share_one_threshold(compile_mode, kernels):
    from pyro_bmr import BayesianModelReduction

    kernels.setenv("PYRO_BMR_COMPILE", compile_mode)
    guide = _two_site_guide()
    rule = SpikeAndSlabRule(num_iterations=4, groups=lambda name: "layer")
    bmr = BayesianModelReduction(guide, rule)
    report = bmr.reduce()
    df = torch.cat([report.delta_f["a"], report.delta_f["b"]])
    zeta = rule.log_odds(df, torch.ones_like(df, dtype=torch.bool))
    assert torch.equal(bmr.masks["a"], report.delta_f["a"] <= zeta)
    assert torch.equal(bmr.masks["b"], report.delta_f["b"] <= zeta)
    # alone, each site would learn its own sparsity and decide otherwise
    alone = SpikeAndSlabRule(num_iterations=4)
    separate = [
        report.delta_f[n]
        <= alone.log_odds(report.delta_f[n], torch.ones_like(report.delta_f[n], dtype=torch.bool))
        for n in ("a", "b")
    ]
    assert not (
        torch.equal(separate[0], bmr.masks["a"]) and torch.equal(separate[1], bmr.masks["b"])
    )
    assert rule.group("a") == rule.group("b") != alone.group("a")


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_a_group_threshold_counts_its_pruning_members_with_their_masks(compile_mode, kernels):
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoNormal

    from pyro_bmr import BayesianModelReduction

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0).expand([40]).to_event(1))
        pyro.sample("b", dist.Normal(0.0, 1.0).expand([400]).to_event(1))
        pyro.sample("c", dist.Normal(0.0, 1.0).expand([30]).to_event(1))

    kernels.setenv("PYRO_BMR_COMPILE", compile_mode)
    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, size in (("a", 40), ("c", 30)):
            pyro.param(f"AutoNormal.locs.{name}").copy_(torch.randn(size, generator=g) * 0.3)
            pyro.param(f"AutoNormal.scales.{name}").unconstrained().copy_(
                torch.randn(size, generator=g) - 2
            )
        # b is excluded; all of it would be kept, which would raise a shared ζ
        pyro.param("AutoNormal.locs.b").copy_(3 + torch.rand(400, generator=g))
        pyro.param("AutoNormal.scales.b").unconstrained().fill_(-3.0)
    rule = SpikeAndSlabRule(num_iterations=4, groups=lambda name: "layer", exclude=["b"])
    bmr = BayesianModelReduction(guide, rule)
    bmr.reduce()
    assert bmr.masks["b"].all() and (~bmr.masks["a"]).any() and (~bmr.masks["c"]).any()
    # a second reduction after "a" was reset: the group's ζ comes from a and c (b is
    # excluded), with c's mask and ones for a, which has none
    mask_c = bmr.masks["c"]
    bmr.reset(["a"])
    report = bmr.reduce()
    df = torch.cat([report.delta_f["a"], report.delta_f["c"]])
    zeta = rule.site_threshold(df, torch.cat([torch.ones(40), mask_c.float()]))
    assert torch.equal(bmr.masks["a"], report.delta_f["a"] <= zeta)
    assert torch.equal(bmr.masks["c"], (report.delta_f["c"] <= zeta) & mask_c)
    assert bmr.masks["b"].all()
    # with b counted, ζ would be another, and so would the decisions on a
    with_b = rule.site_threshold(torch.cat([df, report.delta_f["b"]]), None)
    assert not torch.equal(report.delta_f["a"] <= with_b, bmr.masks["a"])


class _KeepAllAfterFirstRule(PruningRule):
    """Not a threshold: prunes the first half of the first site it is asked about,
    then keeps everything."""

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def keep(self, delta_f, mask):
        self.calls += 1
        keep = torch.ones_like(delta_f, dtype=torch.bool)
        if self.calls == 1:
            keep.view(-1)[: delta_f.numel() // 2] = False
        return keep


def test_a_rule_asked_through_keep_never_unprunes_and_respects_exclusion():
    from pyro_bmr import BayesianModelReduction

    guide = _two_site_guide()
    rule = _KeepAllAfterFirstRule(exclude=["b"])
    bmr = BayesianModelReduction(guide, rule)
    bmr.reduce()
    first = bmr.masks["a"]
    assert (~first).sum() == 20 and bmr.masks["b"].all()
    bmr.reduce()  # the rule now keeps everything: what was pruned stays pruned
    assert torch.equal(bmr.masks["a"], first) and bmr.masks["b"].all()


class _BetterHalfOfKeptRule(PruningRule):
    """Not a threshold, and reads the mask: keeps the better half of what is kept."""

    def keep(self, delta_f, mask):
        return mask & (delta_f <= delta_f[mask].median())


def test_a_rule_asked_through_keep_sees_the_current_mask_and_never_the_excluded_site():
    from pyro_bmr import BayesianModelReduction

    guide = _two_site_guide()
    with torch.no_grad():  # a ΔF of -inf (beyond float32): b is decided outside the kernel
        guide.locs.b[0] = 1e30
    bmr = BayesianModelReduction(guide, _BetterHalfOfKeptRule(exclude=["b"]))
    mask = torch.ones(40, dtype=torch.bool)
    for _ in range(2):
        report = bmr.reduce()
        df = report.delta_f["a"]
        mask = mask & (df <= df[mask].median())
        assert torch.equal(bmr.masks["a"], mask)
        assert bmr.masks["b"].all() and report.delta_f["b"][0] == -float("inf")
    assert int(mask.sum()) == 10  # 40, then 20, then 10


def test_excluding_leaves_more_sites_alone_and_keeps_the_rule():
    rule = ThresholdRule(0.5, exclude=["a"])
    wider = rule.excluding(["b"])
    assert type(wider) is ThresholdRule and wider.threshold == 0.5
    assert [wider.prunes(s) for s in "abc"] == [False, False, True]
    assert [rule.prunes(s) for s in "abc"] == [False, True, True]  # the original unchanged
    assert rule.excluding([]).prunes("b")


def test_spike_and_slab_computes_in_the_dtype_of_delta_f():
    # hyperparameters that float32 cannot hold exactly, and elements that are all
    # pruned (q ~ 0), so that zeta is as sensitive to alpha0 as it can be
    df = torch.full((20,), 30.0, dtype=torch.float64)
    df[:3] = torch.tensor([-2.0, 0.5, 1.0], dtype=torch.float64)
    mask = torch.ones(20, dtype=torch.bool)
    rule = SpikeAndSlabRule(alpha0=0.1, beta0=0.3, num_iterations=2)
    zeta = rule.log_odds(df, mask)
    assert zeta.dtype == torch.float64 and zeta.device == df.device
    expected = _reference_log_odds(df, mask.tolist(), 0.1, 0.3, 2)
    assert torch.allclose(zeta, expected, rtol=1e-13, atol=0)


class _OldStyleRule(PruningRule):
    """A user's rule written before ``exclude`` and ``groups`` existed: it never
    calls ``PruningRule.__init__``."""

    def __init__(self, threshold):
        self.threshold = threshold

    def keep(self, delta_f, mask):
        return delta_f <= self.threshold


def test_a_rule_that_skips_the_base_init_prunes_every_site_on_its_own():
    rule = _OldStyleRule(0.0)
    assert rule.prunes("w") and rule.group("w") == ("site", "w")


def test_groups_map_sites_to_keys_distinct_from_site_names():
    layer = lambda site: site.rsplit(".", 1)[0]  # noqa: E731
    for rule in (ThresholdRule(groups=layer), SpikeAndSlabRule(groups=layer)):
        assert rule.group("fc.weight") == rule.group("fc.bias") == ("group", "fc")
        # a group named like a site is not that site
        assert rule.group("fc.weight") != ThresholdRule().group("fc")
    with pytest.raises(TypeError, match=r"^groups must map a site name to a group key, got 3$"):
        ThresholdRule(groups=3)
