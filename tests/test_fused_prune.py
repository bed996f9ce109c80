"""``reduce`` on a guide that stores σ = exp(ρ): ΔF, the decision and the zeroing of
pruned locs in one compiled pass, checked against the plain formula and rule."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_bmr import BayesianModelReduction, ThresholdRule, _kernels, delta_f
from pyro_bmr.guides import MeanFieldGuide


@pytest.fixture
def compiled(kernels):
    """Fresh compile state, compiled kernels whatever the size."""
    kernels.setenv(_kernels.ENV_VAR, "1")
    return kernels


def _model():
    pyro.sample("w", dist.Normal(0.0, 1.0).expand([40, 30]).to_event(2))
    pyro.sample("b", dist.Normal(torch.linspace(-1, 1, 30), 0.5).to_event(1))


def _guide(seed=0):
    pyro.clear_param_store()
    guide = MeanFieldGuide(_model, init_scale=0.05)
    guide()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        loc, rho = guide.loc_unconstrained, guide.scale_unconstrained
        loc.copy_(torch.randn(loc.shape, generator=g) * torch.rand(loc.shape, generator=g))
        rho.add_(0.5 * torch.randn(rho.shape, generator=g))
    return guide


def _plain(bmr, reduced_scale=0.0):
    out = {}
    for name, site in bmr.sites().items():
        loc, scale = (t.clone() for t in bmr.posterior.loc_scale(name))
        df = delta_f(loc, scale, site.prior_loc, site.prior_scale, 0.0, reduced_scale).delta_f
        out[name] = (loc, df)
    return out


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_fused_reduce_matches_the_plain_formula_rule_and_zeroing(compiled, threshold):
    rule = ThresholdRule(threshold)
    bmr = BayesianModelReduction(_guide(), rule)
    masks = {}
    for _ in range(2):
        plain = _plain(bmr)
        report = bmr.reduce()
        pruned, gained = 0, 0.0
        for name, (loc_before, df) in plain.items():
            old = masks.get(name, torch.ones(df.shape, dtype=torch.bool))
            # ln σ is read as ρ, not as ln(exp(ρ)): a few ulps of ΔF apart
            assert torch.allclose(report.delta_f[name], df, rtol=1e-6, atol=1e-5)
            near = (df - threshold).abs() < 1e-4
            keep = rule.keep(df, old) & old
            assert torch.equal(bmr.masks[name] | near, keep | near)
            keep = bmr.masks[name]
            loc_after = bmr.posterior.loc_scale(name)[0]
            assert (loc_after[~keep] == 0).all()
            assert torch.equal(loc_after[keep], loc_before[keep])  # kept: untouched
            pruned += int((~keep).sum())
            gained += report.delta_f[name][old & ~keep].double().sum().item()
            masks[name] = keep
        assert report.num_pruned == pruned
        # the kernel sums the float32 ΔF in float64, as here: only the order differs
        assert report.total_delta_f == pytest.approx(gained, rel=1e-12)
        with torch.no_grad():  # more training moves the posterior
            bmr.guide.loc_unconstrained.add_(0.3 * torch.randn(bmr.guide.loc.shape))
    assert _kernels._spike_prune in _kernels._compiled  # the fused pass ran
    assert "cpu" not in _kernels._failed


def test_fused_reduce_decides_as_the_eager_path(compiled):
    fused = BayesianModelReduction(_guide(1))
    fused_report = fused.reduce()
    compiled.setenv(_kernels.ENV_VAR, "0")
    eager = BayesianModelReduction(_guide(1))
    eager_report = eager.reduce()
    for name, df in eager_report.delta_f.items():
        near = df.abs() < 1e-4
        assert torch.equal(fused.masks[name] | near, eager.masks[name] | near)
        assert torch.equal(
            fused.posterior.loc_scale(name)[0] * ~near, eager.posterior.loc_scale(name)[0] * ~near
        )
    assert fused_report.num_pruned == eager_report.num_pruned


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -200.0])
def test_a_bad_scale_raises_naming_its_site_and_leaves_the_guide_untouched(compiled, bad):
    guide = _guide()
    with torch.no_grad():
        guide.scale_unconstrained[-5] = bad  # in "b", the site scored last
    before = {k: v.detach().clone() for k, v in guide.named_parameters()}
    bmr = BayesianModelReduction(guide)
    with pytest.raises(ValueError, match="guide scale of site 'b'"):
        bmr.reduce()
    for k, v in guide.named_parameters():
        assert torch.equal(v.detach(), before[k]) or torch.equal(
            v.detach().isnan(), before[k].isnan()
        )
    assert torch.equal(guide.loc_unconstrained.detach(), before["loc_unconstrained"])
    assert dict(bmr.masks) == {}


def test_fused_reduce_repairs_out_of_range_elements(compiled):
    guide = _guide()
    with torch.no_grad():
        # |μ/σ| ≈ 2.5e19 overflows (μ/σ)² in float32 but not ΔF ≈ −3.1e38; the third
        # has a σ so small that ΔF is −inf in truth: all three are kept, untouched
        guide.loc_unconstrained[:3] = torch.tensor([2.5e19, -2.5e19, 1e30])
        guide.scale_unconstrained[:3] = torch.tensor([0.0, 0.0, -80.0])
    bmr = BayesianModelReduction(guide)
    plain = _plain(bmr)
    report = bmr.reduce()
    loc_w, expected = plain["w"]
    assert torch.isfinite(expected.view(-1)[:2]).all() and expected.view(-1)[2] == -float("inf")
    assert torch.allclose(report.delta_f["w"], expected, rtol=1e-6, atol=1e-5)
    assert bmr.masks["w"].view(-1)[:3].all()
    assert torch.equal(bmr.posterior.loc_scale("w")[0].view(-1)[:3], loc_w.view(-1)[:3])
    near = expected.abs() < 1e-4
    assert torch.equal(bmr.masks["w"] | near, (expected <= 0) | near)
    assert _kernels._spike_prune in _kernels._compiled  # the fused pass ran, then the repair


def test_autonormal_takes_the_plain_path(compiled):
    guide = pyro.infer.autoguide.AutoNormal(_model)
    guide()
    assert BayesianModelReduction(guide).posterior.loc_log_scale("w") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_reduce_on_cuda_matches_the_plain_formula(compiled):
    with torch.device("cuda"):
        guide = MeanFieldGuide(_model, init_scale=0.05)
        guide()
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        loc = guide.loc_unconstrained
        loc.copy_(torch.randn(loc.shape, generator=g) * torch.rand(loc.shape, generator=g))
    bmr = BayesianModelReduction(guide)
    plain = _plain(bmr)
    report = bmr.reduce()
    for name, (loc_before, df) in plain.items():
        assert report.delta_f[name].device.type == "cuda"
        assert torch.allclose(report.delta_f[name], df, rtol=1e-6, atol=1e-5)
        near = df.abs() < 1e-4
        assert torch.equal(bmr.masks[name] | near, (df <= 0) | near)
        loc_after, keep = bmr.posterior.loc_scale(name)[0], bmr.masks[name]
        assert (loc_after[~keep] == 0).all()
        assert torch.equal(loc_after[keep], loc_before[keep])


def test_scales_near_the_dtype_limits_take_the_exact_plain_path(compiled):
    guide = _guide()
    with torch.no_grad():
        guide.scale_unconstrained[0] = -100.0  # σ ≈ 3.7e-44: subnormal, but positive
    bmr = BayesianModelReduction(guide)
    assert not bool(
        _kernels.storage_safe([(guide.loc.detach(), guide.scale_unconstrained.detach())])
    )
    plain = _plain(bmr)
    report = bmr.reduce()
    for name, (_, df) in plain.items():
        assert torch.allclose(report.delta_f[name], df, rtol=1e-6, atol=1e-5)
    assert _kernels._spike_prune not in _kernels._compiled


def test_fused_pass_leaves_an_excluded_site_whole(compiled):
    # "b" has a per-element prior mean, so the flat prior terms matter too
    guide = _guide(seed=4)
    loc_b = guide.loc_unconstrained.detach()[-30:].clone()
    plain = {name: df for name, (_, df) in _plain(BayesianModelReduction(guide)).items()}
    bmr = BayesianModelReduction(guide, ThresholdRule(exclude=["b"]))
    report = bmr.reduce()
    assert _kernels._spike_prune in _kernels._compiled  # the fused in-place pass ran
    assert bmr.masks["b"].all() and torch.equal(guide.loc_unconstrained.detach()[-30:], loc_b)
    assert (plain["b"] > 0).any()  # it would have been pruned
    for name in ("w", "b"):
        assert torch.allclose(report.delta_f[name], plain[name], rtol=1e-5, atol=1e-5)
    assert torch.equal(bmr.masks["w"], plain["w"] <= 0)


def test_fused_reduce_in_float64_with_a_prior_varying_by_column(compiled):
    # the prior's mean varies along the columns only (a stride-0 expand): its terms
    # are flattened over the site for the flat pass
    def model():
        prior_loc = torch.linspace(-1, 1, 30, dtype=torch.float64).expand(40, 30)
        pyro.sample("w", dist.Normal(prior_loc, 0.5).to_event(2))

    pyro.clear_param_store()
    guide = MeanFieldGuide(model, init_scale=0.05)
    guide()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        guide.loc_unconstrained.copy_(torch.randn(1200, generator=g, dtype=torch.float64))
        guide.scale_unconstrained.add_(0.5 * torch.randn(1200, generator=g, dtype=torch.float64))
    bmr = BayesianModelReduction(guide)
    loc, scale = (t.clone() for t in bmr.posterior.loc_scale("w"))
    assert loc.dtype == torch.float64 and loc.shape == (40, 30)
    prior_loc = torch.linspace(-1, 1, 30, dtype=torch.float64)
    expected = delta_f(loc, scale, prior_loc, 0.5).delta_f
    report = bmr.reduce()
    assert _kernels._spike_prune in _kernels._compiled  # the fused in-place pass ran
    assert torch.allclose(report.delta_f["w"], expected, rtol=1e-12, atol=1e-10)
    keep = expected <= 0
    assert torch.equal(bmr.masks["w"], keep) and 0 < int(keep.sum()) < 1200
    assert (bmr.posterior.loc_scale("w")[0][~keep] == 0).all()


def test_a_soft_reduced_prior_takes_the_plain_path_and_scores_the_soft_prior(compiled):
    bmr = BayesianModelReduction(_guide(seed=5), reduced_scale=0.3)
    plain = _plain(bmr, reduced_scale=0.3)
    report = bmr.reduce()
    assert _kernels._spike_prune not in _kernels._compiled  # the point-mass pass did not run
    for name, (_, df) in plain.items():
        assert torch.allclose(report.delta_f[name], df, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("minimum, fused", [(1230, True), (1231, False)])
def test_by_default_the_fused_pass_runs_on_a_reduction_big_enough(compiled, minimum, fused):
    # auto mode with the sizes scaled down: the whole reduction (1,230 elements, of
    # which "w" holds 1,200) decides, not the site alone
    compiled.setenv(_kernels.ENV_VAR, "auto")
    compiled.setattr(_kernels, "COMPILE_MIN_NUMEL", minimum)
    compiled.setattr(_kernels, "COMPILE_MIN_SITE", 100)
    bmr = BayesianModelReduction(_guide())
    plain = _plain(bmr)
    report = bmr.reduce()
    assert (_kernels._spike_prune in _kernels._compiled) == fused
    for name, (_, df) in plain.items():
        assert torch.allclose(report.delta_f[name], df, rtol=1e-6, atol=1e-5)


def test_fused_pass_keeps_an_element_whose_delta_f_is_exactly_the_threshold(compiled):
    # σ = exp(0) = s = 1 and μ = m = m̃ = 0: ΔF is exactly 0, the default threshold,
    # and a tie keeps the element (ΔF ≤ τ), with and without masks from before
    guide = _guide()
    with torch.no_grad():
        guide.loc_unconstrained[:3] = 0.0
        guide.scale_unconstrained[:3] = 0.0
    bmr = BayesianModelReduction(guide)
    for _ in range(2):
        report = bmr.reduce()
        assert (report.delta_f["w"].view(-1)[:3] == 0).all()
        assert bmr.masks["w"].view(-1)[:3].all() and not bmr.masks["w"].all()
    assert _kernels._spike_prune in _kernels._compiled  # the fused pass ran


@pytest.mark.compile_fallback
def test_a_failing_compile_of_the_fused_pass_warns_and_prunes_as_the_eager_path(compiled):
    def compile_failing_on_the_fused_pass(fn, **kwargs):
        if fn is not _kernels._spike_prune:
            return fn  # the checks before it compile

        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    compiled.setattr(torch, "compile", compile_failing_on_the_fused_pass)
    fallback = BayesianModelReduction(_guide(1))
    with pytest.warns(RuntimeWarning, match="torch.compile failed on cpu"):
        fallback_report = fallback.reduce()
    assert _kernels._failed == {"cpu"}
    compiled.setenv(_kernels.ENV_VAR, "0")
    eager = BayesianModelReduction(_guide(1))
    eager_report = eager.reduce()
    for name, df in eager_report.delta_f.items():
        assert torch.equal(fallback_report.delta_f[name], df)
        assert torch.equal(fallback.masks[name], eager.masks[name])
        assert torch.equal(
            fallback.posterior.loc_scale(name)[0], eager.posterior.loc_scale(name)[0]
        )
    assert fallback_report.num_pruned == eager_report.num_pruned > 0
