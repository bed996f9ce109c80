"""The fused kernels behind ``reduce``, checked against the plain formula."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_bmr import (
    BayesianModelReduction,
    MaskError,
    SpikeAndSlabRule,
    ThresholdRule,
    _kernels,
    delta_f,
)
from pyro_bmr._tensors import as_tensors
from pyro_bmr.free_energy import _direct, spike_constants


def _posterior(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = (torch.randn(n, generator=g) * torch.rand(n, generator=g)).to(dtype)
    scale = (torch.rand(n, generator=g) * 0.5 + 0.01).to(dtype)
    return loc, scale


def _plain(loc, scale, prior_loc, prior_scale, reduced_loc=0.0):
    """ΔF by the general formula at s̃ = 0, as delta_f computed it before the fast path."""
    return _direct(*as_tensors(loc, scale, prior_loc, prior_scale, reduced_loc, 0.0))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "prior",
    [(0.0, 1.0, 0.0), (0.3, 0.7, -0.2), ("per-element", None, 0.1)],
    ids=["standard", "shifted", "per-element"],
)
def test_eager_spike_is_bitwise_the_general_formula(dtype, prior):
    loc, scale = _posterior(10_000, dtype)
    prior_loc, prior_scale, reduced_loc = prior
    if prior_loc == "per-element":
        prior_loc = torch.linspace(-1, 1, 10_000, dtype=dtype)
        prior_scale = torch.linspace(0.1, 2, 10_000, dtype=dtype)
    expected = _plain(loc, scale, prior_loc, prior_scale, reduced_loc)
    out = delta_f(loc, scale, prior_loc, prior_scale, reduced_loc)
    assert out.delta_f.dtype == dtype
    assert torch.equal(out.delta_f, expected)
    assert torch.equal(out.loc, torch.full_like(expected, reduced_loc))
    assert torch.equal(out.scale, torch.zeros_like(expected))
    # the in-place variant used by reduce gives the same bits
    m, s, m_red = as_tensors(loc, scale, prior_loc, prior_scale, reduced_loc)[2:]
    terms = spike_constants(m, s, m_red, loc.shape)
    assert torch.equal(_kernels._spike_inplace(loc, scale, *terms, m_red), expected)


def _check_threshold_kernel(loc, scale, old, threshold=0.0, atol=0.0):
    m, s, m_red, tau = (
        torch.tensor(v, dtype=loc.dtype, device=loc.device) for v in (0.0, 1.0, 0.0, threshold)
    )
    terms = spike_constants(m, s, m_red, loc.shape)
    old_bytes = None if old is None else old.view(torch.uint8)
    df, keep, pruned, stats = _kernels.spike_threshold(loc, scale, *terms, m_red, tau, old_bytes)
    expected = _plain(loc.cpu(), scale.cpu(), 0.0, 1.0)
    assert df.device == loc.device
    df, keep, pruned, stats, old = (
        None if t is None else t.cpu() for t in (df, keep, pruned, stats, old)
    )
    assert torch.allclose(df, expected, rtol=0, atol=atol)
    keep, pruned = keep.view(torch.bool), pruned.view(torch.bool)
    before = torch.ones_like(keep) if old is None else old
    assert torch.equal(keep, (df <= threshold) & before)
    assert torch.equal(pruned, ~keep)
    newly = before & ~keep
    assert stats.dtype == torch.float64
    assert stats[0].item() == before.sum().item()
    assert stats[1].item() == keep.sum().item()
    assert stats[2].item() == pytest.approx(df.double()[newly].sum().item(), rel=1e-6)
    assert stats[3].item() == 0.0  # every ΔF finite


@pytest.mark.parametrize("with_mask", [False, True], ids=["first", "masked"])
def test_eager_threshold_kernel_matches_the_plain_decision(kernels, with_mask):
    loc, scale = _posterior(5000)
    old = torch.rand(5000, generator=torch.Generator().manual_seed(3)) < 0.7
    _check_threshold_kernel(loc, scale, old if with_mask else None, threshold=0.5)


def test_compiled_threshold_kernel_matches_the_plain_formula(kernels):
    """The compiled path (forced on for a small input) agrees with the plain formula
    to a few ulps and makes the same decisions; it must not fall back."""
    kernels.setenv(_kernels.ENV_VAR, "1")
    loc, scale = _posterior(4099)  # not a multiple of any vector width
    old = torch.rand(4099, generator=torch.Generator().manual_seed(4)) < 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _check_threshold_kernel(loc, scale, old, threshold=0.0, atol=1e-5)
    assert "cpu" not in _kernels._failed
    assert _kernels._spike_threshold in _kernels._compiled


@pytest.mark.compile_fallback
def test_a_failing_compile_warns_once_and_falls_back_to_eager(kernels):
    kernels.setenv(_kernels.ENV_VAR, "1")
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn)
            raise RuntimeError("no C++ compiler")

        return run

    kernels.setattr(torch, "compile", broken_compile)
    loc, scale = _posterior(300)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _check_threshold_kernel(loc, scale, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _check_threshold_kernel(loc, scale, None)  # not tried again
    assert len(calls) == 1


@pytest.mark.compile_fallback
@pytest.mark.parametrize(
    "error, shown",
    [
        (RuntimeError("no C++ compiler\nsee the log"), "RuntimeError: no C++ compiler"),
        (OSError(), "OSError: "),
    ],
    ids=["first-line", "empty"],
)
def test_the_fallback_warning_names_the_device_and_the_error(kernels, error, shown):
    kernels.setenv(_kernels.ENV_VAR, "1")

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise error

        return run

    kernels.setattr(torch, "compile", broken_compile)
    loc, scale = _posterior(300)
    with pytest.warns(RuntimeWarning) as record:
        _check_threshold_kernel(loc, scale, None)
    assert [str(w.message) for w in record] == [
        f"pyro_bmr: torch.compile failed on cpu ({shown}); using eager kernels. "
        "Set PYRO_BMR_COMPILE=0 to skip compiling."
    ]
    assert record[0].filename == __file__  # the first line outside the library


def test_each_kernel_is_compiled_once_and_reused(kernels):
    kernels.setenv(_kernels.ENV_VAR, "1")
    compiled = []

    def counting_compile(fn, **kwargs):
        compiled.append(fn)
        return fn

    kernels.setattr(torch, "compile", counting_compile)
    for n in (300, 301, 302):
        loc, scale = _posterior(n)
        _check_threshold_kernel(loc, scale, None)
        _check_threshold_kernel(loc, scale, torch.arange(n) % 3 > 0)
    assert sorted(f.__name__ for f in compiled) == sorted(
        f.__name__ for f in {_kernels._spike_threshold_first, _kernels._spike_threshold}
    )


@pytest.mark.counts_recompiles
def test_a_compiled_kernel_takes_new_sizes_without_recompiling(kernels):
    """Sites shrink and change between reductions: a kernel compiled for one size
    must not be recompiled for every other."""
    kernels.setenv(_kernels.ENV_VAR, "1")
    loc, scale = _posterior(4099)
    _check_threshold_kernel(loc, scale, None, atol=1e-5)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (5003, 1031):
            loc, scale = _posterior(n)
            _check_threshold_kernel(loc, scale, None, atol=1e-5)


def test_compile_mode_reads_the_environment(kernels):
    spellings = {
        "never": ["0", "false", "off", "no", "never", " Never ", "FALSE"],
        "always": ["1", "true", "on", "yes", "always", "ALWAYS", " On"],
        "auto": ["auto", "", " Auto "],
    }
    for mode, values in spellings.items():
        for value in values:
            kernels.setenv(_kernels.ENV_VAR, value)
            assert _kernels.compile_mode() == mode, value
    kernels.setenv(_kernels.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="PYRO_BMR_COMPILE must be 0, 1 or auto"):
        _kernels.compile_mode()
    kernels.delenv(_kernels.ENV_VAR)
    assert _kernels.compile_mode() == "auto"
    cpu = torch.device("cpu")
    big, site = _kernels.COMPILE_MIN_NUMEL, _kernels.COMPILE_MIN_SITE
    assert _kernels.compiles(site, big, cpu)  # both sizes at their minimum
    assert not _kernels.compiles(site - 1, big, cpu)
    assert not _kernels.compiles(site, big - 1, cpu)
    assert not _kernels.compiles(10, 10, cpu)
    kernels.setenv(_kernels.ENV_VAR, "never")
    assert not _kernels.compiles(10 * big, 10 * big, cpu)
    kernels.setenv(_kernels.ENV_VAR, "always")
    assert _kernels.compiles(10, 10, cpu)


def _wide_model():
    pyro.sample("w", dist.Normal(0.0, 1.0).expand([40, 30]).to_event(2))
    pyro.sample("b", dist.Normal(torch.linspace(-1, 1, 30), 0.5).to_event(1))


def _fitted_guide(seed=0):
    guide = AutoNormal(_wide_model, init_scale=0.05)
    guide()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("w", "b"):
            loc = pyro.param(f"AutoNormal.locs.{name}").unconstrained()
            loc.copy_(torch.randn(loc.shape, generator=g) * torch.rand(loc.shape, generator=g))
    return guide


def _savage_dickey(loc, scale, prior_loc, prior_scale):
    """ln q(0) − ln p(0) in float64 with torch.distributions: independent of the library."""
    zero = torch.zeros((), dtype=torch.float64)
    q = torch.distributions.Normal(loc.double(), scale.double())
    p = torch.distributions.Normal(prior_loc.double(), prior_scale.double())
    return (q.log_prob(zero) - p.log_prob(zero)).to(loc.dtype)


@pytest.mark.parametrize("compile_mode", ["0", "1"])
@pytest.mark.parametrize(
    "rule", [ThresholdRule(0.0), ThresholdRule(1.5), SpikeAndSlabRule()], ids=repr
)
def test_reduce_twice_matches_the_plain_formula_and_rule(kernels, rule, compile_mode):
    # "1" forces the compiled kernels on these small sites
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    guide = _fitted_guide()
    bmr = BayesianModelReduction(guide, rule)
    sites = bmr.sites()
    masks, total_new = {}, 0.0
    for _ in range(2):
        plain, oracle = {}, {}
        for name, site in sites.items():
            loc, scale = (t.clone() for t in bmr.posterior.loc_scale(name))
            plain[name] = delta_f(loc, scale, site.prior_loc, site.prior_scale).delta_f
            oracle[name] = _savage_dickey(loc, scale, site.prior_loc, site.prior_scale)
        report = bmr.reduce()
        total_new, pruned = 0.0, 0
        for name, df in plain.items():
            old = masks.get(name, torch.ones(df.shape, dtype=torch.bool))
            got = report.delta_f[name]
            assert torch.allclose(got, oracle[name], rtol=1e-5, atol=1e-5)
            if compile_mode == "0":  # the eager kernels are the general formula, bitwise
                assert torch.equal(got, df)
            keep = rule.keep(got, old) & old
            assert torch.equal(bmr.masks[name], keep)
            df = got
            total_new += df[old & ~keep].double().sum().item()
            pruned += int((~keep).sum())
            masks[name] = keep
            # pruned locs are zeroed in the guide
            assert (bmr.posterior.loc_scale(name)[0][~keep] == 0).all()
        assert report.num_pruned == pruned
        assert report.total_delta_f == pytest.approx(total_new, rel=1e-6, abs=1e-9)
        # the second reduction sees moved posteriors, as after more training
        with torch.no_grad():
            for name in sites:
                loc = pyro.param(f"AutoNormal.locs.{name}").unconstrained()
                loc.add_(0.3 * torch.randn(loc.shape, generator=torch.Generator().manual_seed(9)))
    assert report.num_newly_pruned >= 0


def test_reduce_repairs_out_of_range_elements_like_delta_f(kernels):
    guide = _fitted_guide()
    with torch.no_grad():
        # |μ/σ| ≈ 2.5e19: (μ/σ)² overflows float32 but ΔF ≈ −3.1e38 does not; the
        # third has a tiny σ, and ΔF is −inf in truth
        locs = pyro.param("AutoNormal.locs.w").unconstrained()
        scales = pyro.param("AutoNormal.scales.w").unconstrained()
        locs[0, :3] = torch.tensor([2.5e19, -2.5e19, 1e30])
        scales[0, :3] = torch.tensor([0.5413248538970947, 0.5413248538970947, -80.0])
    loc, scale = (t.clone() for t in (guide.locs.w.detach(), guide.scales.w.detach()))
    expected = delta_f(loc, scale, 0.0, 1.0).delta_f
    prior_b = torch.linspace(-1, 1, 30)
    df_b = delta_f(guide.locs.b.detach().clone(), guide.scales.b.detach(), prior_b, 0.5).delta_f
    assert not torch.isfinite(_plain(loc, scale, 0.0, 1.0)[0, :2]).any()
    assert torch.isfinite(expected[0, :2]).all() and (expected[0, :2] < -3e38).all()
    assert expected[0, 2] == -float("inf")
    bmr = BayesianModelReduction(guide)
    report = bmr.reduce()
    assert torch.equal(report.delta_f["w"], expected)
    keep = expected <= 0
    assert torch.equal(bmr.masks["w"], keep)
    gained = expected[~keep].double().sum() + df_b[df_b > 0].double().sum()
    assert report.total_delta_f == pytest.approx(gained.item(), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_kernels_and_reduce_on_cuda_match_the_plain_formula(kernels, compile_mode):
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    loc, scale = _posterior(100_003)
    old = torch.rand(100_003, generator=torch.Generator().manual_seed(5)) < 0.5
    _check_threshold_kernel(loc.cuda(), scale.cuda(), None, atol=1e-5)
    _check_threshold_kernel(loc.cuda(), scale.cuda(), old.cuda(), atol=1e-5)

    with torch.device("cuda"):
        guide = AutoNormal(_wide_model, init_scale=0.05)
        guide()
    with torch.no_grad():
        for name in ("w", "b"):
            param = pyro.param(f"AutoNormal.locs.{name}").unconstrained()
            param.copy_(_posterior(param.numel(), seed=6)[0].reshape(param.shape))
    bmr = BayesianModelReduction(guide)
    plain = {}
    for name, site in bmr.sites().items():
        mu, sigma = (t.clone() for t in bmr.posterior.loc_scale(name))
        assert mu.device.type == "cuda"
        plain[name] = delta_f(mu.cpu(), sigma.cpu(), site.prior_loc.cpu(), site.prior_scale.cpu())
    report = bmr.reduce()
    for name, expected in plain.items():
        assert report.delta_f[name].device.type == "cuda"
        assert torch.allclose(report.delta_f[name].cpu(), expected.delta_f, rtol=1e-6, atol=1e-5)
        assert torch.equal(bmr.masks[name].cpu(), expected.delta_f <= 0)


def test_a_loaded_mask_that_does_not_fit_is_refused_and_changes_nothing(kernels):
    guide = _fitted_guide()
    bmr = BayesianModelReduction(guide)
    # the guide has its parameters, so the masks are checked at once, all or nothing
    with pytest.raises(MaskError, match="does not fit site 'w'"):
        bmr.load_state_dict({"masks": {"w": torch.ones(7, dtype=torch.bool)}})
    assert dict(bmr.masks) == {}
    bmr.reduce()
    assert set(bmr.masks) == set(bmr.sites())


def test_compiled_site_threshold_is_the_rules_own_method(kernels):
    """The fused path compiles the rule's site_threshold; it agrees with the eager
    method, and the reduction it drives with the plain rule."""
    kernels.setenv(_kernels.ENV_VAR, "1")
    g = torch.Generator().manual_seed(5)
    df = torch.cat([torch.randn(3000, generator=g) + 2.0, -20 * torch.rand(1099, generator=g)])
    mask = (torch.rand(4099, generator=g) < 0.8).float()
    rule = SpikeAndSlabRule(alpha0=2.0, beta0=3.0, num_iterations=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = _kernels.site_threshold(rule, df, mask)
    assert SpikeAndSlabRule.site_threshold in _kernels._compiled
    assert torch.allclose(compiled, rule.site_threshold(df, mask), rtol=1e-5)
    guide = _fitted_guide()
    bmr = BayesianModelReduction(guide, rule)
    plain = {}
    for name, site in bmr.sites().items():
        loc, scale = (t.clone() for t in bmr.posterior.loc_scale(name))
        plain[name] = delta_f(loc, scale, site.prior_loc, site.prior_scale).delta_f
    bmr.reduce()
    for name, df in plain.items():
        assert torch.equal(bmr.masks[name], rule.keep(df, torch.ones_like(df, dtype=torch.bool)))


# -- the in-place kernels, each against an oracle written here in float64 -----------


def _oracle_df(loc, log_scale, prior_loc, prior_scale, reduced_loc):
    """ln q(m̃) − ln p(m̃) (Savage–Dickey) with torch.distributions, in float64."""
    at = torch.as_tensor(reduced_loc, dtype=torch.float64)
    q = torch.distributions.Normal(loc.double(), log_scale.double().exp())
    p = torch.distributions.Normal(torch.as_tensor(prior_loc).double(), prior_scale)
    return q.log_prob(at) - p.log_prob(at)


@pytest.mark.parametrize("compile_mode", ["0", "1"], ids=["eager", "compiled"])
def test_counts_stay_exact_past_the_float32_integers(kernels, compile_mode):
    """2**24 + 3 kept elements: a count summed in float32 would read 2**24 + 4."""
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    n = (1 << 24) + 3
    loc, scale = torch.full((n,), 10.0), torch.full((n,), 0.01)
    m, s, m_red, tau = (torch.tensor(v) for v in (0.0, 1.0, 0.0, 0.0))
    terms = spike_constants(m, s, m_red, loc.shape)
    old = torch.ones(n, dtype=torch.uint8)
    for before in (None, old):
        stats = _kernels.spike_threshold(loc, scale, *terms, m_red, tau, before)[3]
        assert stats[:2].tolist() == [n, n]


def test_a_rule_s_own_decision_is_counted_exactly_past_the_float32_integers():
    """The path of rules that are not thresholds, and of ΔF with infinities."""
    from pyro_bmr._scoring import Scored

    n = (1 << 24) + 3
    site = Scored("w", torch.Size([n]), None)
    site.df = torch.zeros(n)
    site.replace_keep(torch.ones(n, dtype=torch.bool))
    assert site.stats.dtype == torch.float64 and site.stats[:2].tolist() == [n, n]


def _spike_prune_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, generator=g) * 2
    log_scale = torch.rand(n, generator=g) * 3 - 3
    prior_loc = torch.randn(n, generator=g) * 0.2
    prior_scale = torch.rand(n, generator=g) + 0.5
    old = (torch.rand(n, generator=g) < 0.7).view(torch.uint8)
    return loc, log_scale, prior_loc, prior_scale, old


@pytest.mark.parametrize("exact_count", [True, False], ids=["float-count", "int-count"])
@pytest.mark.parametrize("with_old", [False, True], ids=["first", "again"])
@pytest.mark.parametrize("compile_mode", ["1", "auto"])
def test_spike_prune_scores_prunes_and_counts_like_the_oracle(
    kernels, compile_mode, with_old, exact_count
):
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    if not exact_count:  # the exact float32 count stops at 2**24 elements: go past it
        kernels.setattr(_kernels, "_EXACT_FLOAT32_COUNT", 100)
    n, tau, m_red = 1031, 0.25, 0.1
    loc, log_scale, prior_loc, prior_scale, old = _spike_prune_inputs(n, seed=5)
    old = old if with_old else None
    before = loc.clone()
    log_s, d_sq = spike_constants(prior_loc, prior_scale, torch.tensor(m_red), loc.shape)
    done = _kernels.spike_prune(
        loc, log_scale, log_s, d_sq, torch.tensor(m_red), torch.tensor(tau), old
    )
    if compile_mode == "auto":  # too small a site to compile for: nothing done
        assert done is None and torch.equal(loc, before)
        return
    df, keep, stats = done
    expected = _oracle_df(before, log_scale, prior_loc, prior_scale, m_red)
    torch.testing.assert_close(df.double(), expected, rtol=1e-5, atol=1e-5)
    was_kept = torch.ones(n, dtype=torch.bool) if old is None else old.view(torch.bool)
    kept = (df <= tau) & was_kept
    assert keep.dtype == torch.uint8 and torch.equal(keep.view(torch.bool), kept)
    assert 0 < int(kept.sum()) < int(was_kept.sum())  # some pruned now, some kept
    # pruned elements (now and before) are zeroed in place, the others untouched
    assert torch.all(loc[~kept] == 0) and torch.equal(loc[kept], before[kept])
    newly = was_kept & ~kept
    assert stats.dtype == torch.float64 and stats.shape == (4,)
    assert stats[0] == int(was_kept.sum()) and stats[1] == int(kept.sum())
    assert stats[2].item() == pytest.approx(expected[newly].sum().item(), rel=1e-5)
    assert stats[3] == 0  # every ΔF finite


def test_spike_prune_leaves_a_non_finite_delta_f_to_reduce(kernels):
    kernels.setenv(_kernels.ENV_VAR, "1")
    loc, log_scale, prior_loc, prior_scale, _ = _spike_prune_inputs(64, seed=6)
    log_scale[3] = float("nan")
    loc[5] = 50.0  # far out: ΔF very negative, kept
    before = loc.clone()
    log_s, d_sq = spike_constants(prior_loc, prior_scale, torch.tensor(0.0), loc.shape)
    df, keep, stats = _kernels.spike_prune(
        loc, log_scale, log_s, d_sq, torch.tensor(0.0), torch.tensor(0.0), None
    )
    assert torch.isnan(df[3]) and torch.isnan(stats[3])
    assert loc[3] == before[3]  # not zeroed: reduce repairs and decides it from μ
    assert keep[5] == 1 and loc[5] == 50.0


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_storage_safe_accepts_normal_scales_and_refuses_the_rest(kernels, compile_mode):
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    for dtype in (torch.float32, torch.float64):
        info = torch.finfo(dtype)
        low, high = math.log(info.tiny) + 1, math.log(info.max) - 1
        loc = torch.linspace(-3, 3, 37, dtype=dtype)

        def safe(loc_values, rho_values, good=loc):
            pairs = [(good, torch.zeros_like(good))] * 2 + [(loc_values, rho_values)]
            return bool(_kernels.storage_safe(pairs, work=1 << 30))

        rho = torch.linspace(low, high, 37, dtype=dtype)  # both limits included
        assert safe(loc, rho)
        for value in (low - 0.01, high + 0.01, float("nan"), float("inf"), -float("inf")):
            bad = rho.clone()
            bad[17] = value
            assert not safe(loc, bad), value
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = loc.clone()
            bad[0] = value
            assert not safe(bad, rho), value
        empty = torch.zeros(0, dtype=dtype)
        assert safe(empty, empty)  # an empty site is skipped
    assert bool(_kernels.storage_safe([]))


@pytest.mark.parametrize("with_old", [False, True], ids=["first", "again"])
@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_decide_keeps_and_counts_like_the_oracle(kernels, compile_mode, with_old):
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    g = torch.Generator().manual_seed(8)
    # whole numbers, many exactly at the threshold 1 (kept), and pruned ΔFs whose
    # float32 sum loses the small ones beside them (float64 does not)
    df = torch.randint(-3, 4, (777,), generator=g).float()
    df[:5] = 1.0
    df[[5, 6, 21, 38]] = torch.tensor([2.0**25, -(2.0**25), 2.0**25, -(2.0**25)])
    old = (torch.rand(777, generator=g) < 0.6).view(torch.uint8) if with_old else None
    if old is not None:
        old[:40] = 1
    was_kept = torch.ones(777, dtype=torch.bool) if old is None else old.view(torch.bool)
    keep, pruned, stats = _kernels.decide(df, torch.tensor(1.0), old)
    kept = (df <= 1.0) & was_kept
    assert torch.equal(keep.view(torch.bool), kept)
    assert torch.equal(pruned.view(torch.bool), ~kept)
    newly = was_kept & ~kept
    assert kept[:5].all() and stats.dtype == torch.float64
    assert stats.tolist()[:2] == [int(was_kept.sum()), int(kept.sum())]
    assert stats[2].item() == df.double()[newly].sum().item()  # exact: integers
    assert stats[3] == 0


@pytest.mark.parametrize("entry", ["spike_threshold", "spike_probe", "decide", "site_threshold"])
@pytest.mark.parametrize("first", [True, False])
def test_a_big_reduction_compiles_its_mid_sized_sites(kernels, entry, first):
    """In auto mode, what counts is the whole reduction's size (``work``): a site of
    70,000 elements compiles within a reduction of 2**21, not on its own."""
    kernels.setenv(_kernels.ENV_VAR, "auto")
    n = 70_000
    loc, scale = _posterior(n)
    log_s, d_sq = spike_constants(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))
    old = None if first else (torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5)
    old = None if old is None else old.view(torch.uint8)
    tau, m_red = torch.tensor(0.0), torch.tensor(0.0)
    calls = {
        "spike_threshold": lambda work: _kernels.spike_threshold(
            loc, scale, log_s, d_sq, m_red, tau, old, work
        ),
        "spike_probe": lambda work: _kernels.spike_probe(loc, scale, log_s, d_sq, m_red, work),
        "decide": lambda work: _kernels.decide(loc, tau, old, work),
        "site_threshold": lambda work: _kernels.site_threshold(
            SpikeAndSlabRule(), loc, None if old is None else old.view(torch.bool), work
        ),
    }
    calls[entry](None)  # alone: too small to compile for
    assert _kernels._compiled == {}
    calls[entry](1 << 21)
    assert len(_kernels._compiled) == 1


@pytest.mark.parametrize("compile_mode", ["0", "1"])
def test_spike_probe_scores_like_the_oracle_and_flags_non_finite(kernels, compile_mode):
    kernels.setenv(_kernels.ENV_VAR, compile_mode)
    loc, log_scale, prior_loc, prior_scale, _ = _spike_prune_inputs(300, seed=9)
    log_s, d_sq = spike_constants(prior_loc, prior_scale, torch.tensor(0.2), loc.shape)
    df, probe = _kernels.spike_probe(loc, log_scale.exp(), log_s, d_sq, torch.tensor(0.2))
    expected = _oracle_df(loc, log_scale, prior_loc, prior_scale, 0.2)
    torch.testing.assert_close(df.double(), expected, rtol=1e-5, atol=1e-5)
    assert probe == 0 and probe.dtype == torch.float64
    scale = log_scale.exp()
    scale[7] = float("nan")
    assert torch.isnan(_kernels.spike_probe(loc, scale, log_s, d_sq, torch.tensor(0.2))[1])
