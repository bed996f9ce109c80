import math
import re

import mpmath
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyro_bmr import delta_f, free_energy
from pyro_bmr.free_energy import spike_constants

# the textbook formula cancels terms as far apart as 1e-2600 and 1e2600 (float64
# extremes squared and divided), so the reference needs about 9000 bits
mpmath.mp.prec = 9000


def _exact(mu, sigma, m, s, m_red, s_red):
    """ΔF, reduced loc and scale from the textbook formula in exact-enough arithmetic."""
    mu, sigma, m, s, m_red, s_red = map(mpmath.mpf, (mu, sigma, m, s, m_red, s_red))
    if s_red == 0:
        df = (
            mpmath.log(s / sigma)
            - (mu - m_red) ** 2 / (2 * sigma**2)
            + (m_red - m) ** 2 / (2 * s**2)
        )
        return df, m_red, mpmath.mpf(0)
    pi, pi0, pi_red = 1 / sigma**2, 1 / s**2, 1 / s_red**2
    pi_post = pi + pi_red - pi0
    mu_post = (pi * mu + pi_red * m_red - pi0 * m) / pi_post
    df = (
        mpmath.log(pi * pi_red / (pi_post * pi0)) / 2
        - (pi * mu**2 + pi_red * m_red**2 - pi0 * m**2 - pi_post * mu_post**2) / 2
    )
    return df, mu_post, 1 / mpmath.sqrt(pi_post)


def _orthogonal_regression(n=40, d=6, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    X = q * torch.linspace(1.0, 4.0, d, dtype=torch.float64)  # orthogonal, unequal norms
    prior_loc = torch.linspace(-0.5, 0.5, d, dtype=torch.float64)
    prior_scale = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    w = torch.tensor([1.5, 0.0, -2.0, 0.0, 0.05, 0.8], dtype=torch.float64)
    y = X @ w + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, noise, prior_loc, prior_scale


def _log_evidence(X, y, noise, loc, scale):
    cov = noise**2 * torch.eye(len(y), dtype=X.dtype) + (X * scale**2) @ X.T
    return torch.distributions.MultivariateNormal(X @ loc, cov).log_prob(y)


@pytest.mark.parametrize(
    "reduced",
    [
        ("spike at 0", 0.0, 0.0),
        ("shrink s/10", 0.0, 0.1),
        ("shifted spike", 0.3, 0.0),
        ("shifted shrink", -0.2, 0.25),
    ],
    ids=lambda r: r[0],
)
@pytest.mark.parametrize("which", [[1], [3, 4], [0, 1, 2, 3, 4, 5]], ids=str)
def test_matches_exact_evidence_of_bayesian_linear_regression(reduced, which):
    _, red_loc, red_factor = reduced
    X, y, noise, m, s = _orthogonal_regression()
    # exact posterior: diagonal because X is orthogonal
    post_prec = 1 / s**2 + (X * X).sum(0) / noise**2
    post_loc = (m / s**2 + X.T @ y / noise**2) / post_prec
    post_scale = post_prec.rsqrt()

    idx = torch.tensor(which)
    m_red, s_red = m.clone(), s.clone()
    m_red[idx] = red_loc
    s_red[idx] = red_factor * s[idx]
    expected = _log_evidence(X, y, noise, m_red, s_red) - _log_evidence(X, y, noise, m, s)

    out = delta_f(post_loc[idx], post_scale[idx], m[idx], s[idx], m_red[idx], s_red[idx])
    assert out.delta_f.dtype == torch.float64
    assert torch.allclose(out.delta_f.sum(), expected, rtol=1e-5, atol=0)

    # the reduced posterior is the exact posterior under the reduced prior
    if red_factor > 0:
        exact_prec = 1 / s_red**2 + (X * X).sum(0) / noise**2
        exact_loc = (m_red / s_red**2 + X.T @ y / noise**2) / exact_prec
        assert torch.allclose(out.loc, exact_loc[idx], rtol=1e-10)
        assert torch.allclose(out.scale, exact_prec[idx].rsqrt(), rtol=1e-10)
    else:
        assert torch.equal(out.loc, torch.full_like(out.loc, red_loc))
        assert torch.equal(out.scale, torch.zeros_like(out.scale))


def test_savage_dickey_spike_is_exact_not_a_limit():
    mu, sigma, m, s = 0.3, 0.1, 0.2, 1.5
    expected = math.log(s / sigma) - 0.5 * (mu / sigma) ** 2 + 0.5 * (m / s) ** 2
    out = delta_f(torch.tensor(mu, dtype=torch.float64), sigma, m, s)
    assert out.delta_f.item() == pytest.approx(expected, rel=1e-14)
    # a tiny reduced scale approaches the spike from the soft side
    near = delta_f(torch.tensor(mu, dtype=torch.float64), sigma, m, s, 0.0, 1e-9)
    assert near.delta_f.item() == pytest.approx(expected, rel=1e-9)


def test_no_reduction_scores_zero():
    loc = torch.randn(100, dtype=torch.float64)
    scale = torch.rand(100, dtype=torch.float64) + 0.1
    out = delta_f(loc, scale, 0.2, 1.3, 0.2, 1.3)
    assert torch.allclose(out.delta_f, torch.zeros(100, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(out.loc, loc) and torch.allclose(out.scale, scale)


def test_broadcasting_dtype_and_device_follow_inputs():
    loc = torch.randn(3, 4)
    out = delta_f(loc, torch.full((4,), 0.5), torch.zeros(3, 1), 1.0)
    assert out.delta_f.shape == (3, 4) and out.delta_f.dtype == torch.float32
    out64 = delta_f(loc.double(), 0.5, 0.0, 1.0)
    assert out64.delta_f.dtype == torch.float64
    assert torch.allclose(out64.delta_f.float(), out.delta_f, rtol=1e-6)


_TOO_WIDE = (
    "delta_f: the reduced prior is too wide for the posterior: the reduced posterior "
    "precision is not positive at 1 element(s); a reduced prior wider than the full prior "
    "needs σ² (1/s² − 1/s̃²) < 1"
)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0.0, 0.0, 0.0, 1.0), "delta_f: scale must be finite and positive, got 0.0"),
        ((0.0, float("nan"), 0.0, 1.0), "delta_f: scale must be finite and positive, got nan"),
        ((0.0, 1.0, 0.0, -1.0), "delta_f: prior_scale must be finite and positive, got -1.0"),
        (
            (0.0, 1.0, 0.0, 1.0, 0.0, -0.5),
            "delta_f: reduced_scale must be finite and non-negative, got -0.5",
        ),
        ((0.0, 2.0, 0.0, 1.0, 0.0, 3.0), _TOO_WIDE),
        # κ = 1 + σ²/s̃² − σ²/s² is exactly 0 here (s̃/s = 1.25, σ/s̃ = 4/3)
        ((0.0, 4.0, 0.0, 2.4, 0.0, 3.0), _TOO_WIDE),
    ],
)
def test_bad_input_raises(args, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        delta_f(*[torch.tensor(a) for a in args])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_reduced_prior_wider_than_the_prior_is_valid_while_kappa_is_positive(dtype):
    # σ > s̃ > s: κ = (s̃/σ)² + 1 − (s̃/s)² = 0.63; and the reduced scale a number
    # other than 0, which is not the point mass
    for args in ((0.3, 1.2, 0.0, 1.0, 0.0, 1.1), (0.3, 0.2, 0.1, 2.0, 0.0, 1.0)):
        exact = [float(x) for x in _exact(*args)]
        out = delta_f(torch.tensor(args[0], dtype=dtype), *args[1:])
        got = [x.item() for x in out]
        assert got == pytest.approx(exact, rel=10 * torch.finfo(dtype).eps), args


def test_extreme_values_stay_finite_or_overflow_with_the_right_sign():
    f32 = dict(dtype=torch.float32)
    cases = {
        # (mu, sigma, m, s): expected
        "tiny sigma, zero mean": ((0.0, 1e-30, 0.0, 1.0), math.log(1e30)),
        "huge z": ((1e30, 1e-30, 0.0, 1.0), -math.inf),
        "huge prior z": ((0.0, 1.0, 1e30, 1e-30), math.inf),
        "sigma > s": ((0.0, 1e30, 0.0, 1.0), -math.log(1e30)),
        "cancelling huge terms": ((1e30, 1e-30, 1e30, 1e-30), 0.0),
    }
    for name, (args, expected) in cases.items():
        value = delta_f(*[torch.tensor(a, **f32) for a in args]).delta_f.item()
        if math.isinf(expected):
            assert value == expected, name
        else:
            assert value == pytest.approx(expected, rel=1e-5, abs=1e-5), name


_finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_positive32 = st.floats(
    min_value=0.0, exclude_min=True, width=32, allow_nan=False, allow_infinity=False
)
_F32_MAX = float(torch.finfo(torch.float32).max)


def _check_against_exact(dtype, mu, sigma, m, s, m_red, s_red):
    inputs = [torch.tensor([v], dtype=dtype) for v in (mu, sigma, m, s, m_red, s_red)]
    if not all(torch.isfinite(x).all() for x in inputs) or not (inputs[1] > 0 and inputs[3] > 0):
        return  # the value does not exist in this dtype
    exact, _, _ = _exact(*[x.item() for x in inputs])
    _check_value(delta_f(*inputs), exact, inputs, dtype)
    if s_red == 0:  # the point mass given as a number takes its own, exact path
        _check_value(delta_f(*inputs[:5], 0.0), exact, inputs, dtype)


def _check_value(out, exact, inputs, dtype):
    for got in out:
        assert not torch.isnan(got).any()
    value = out.delta_f.item()
    limit = float(torch.finfo(dtype).max)
    if math.isinf(value):
        # infinite only where the exact value is out of range, with its sign
        assert abs(exact) > limit / 2 and math.copysign(1, value) == math.copysign(1, exact)
        return
    # A finite result is judged against the size of the formula's terms (backward
    # stability): where huge terms cancel, rounding the inputs' differences alone
    # leaves an absolute error of a few ulps of those terms, whatever the method.
    inv = [mpmath.mpf(x.item()) for x in inputs]
    terms = abs(mpmath.log(inv[3])) + abs(mpmath.log(inv[1])) + abs(exact) + 1
    mu_, sigma_, m_, s_, m_red_, s_red_ = inv
    if s_red_ == 0:
        terms += ((mu_ - m_red_) / sigma_) ** 2 / 2 + ((m_red_ - m_) / s_) ** 2 / 2
    else:
        kappa = 1 + (sigma_ / s_red_) ** 2 - (sigma_ / s_) ** 2
        bracket = (
            ((mu_ - m_red_) / s_red_) ** 2
            + ((mu_ - m_) / s_) ** 2
            + (sigma_ * (m_red_ - m_) / (s_red_ * s_)) ** 2
        )
        terms += abs(mpmath.log(kappa)) / 2 + bracket / (2 * kappa)
    # where the direct evaluation overflowed, the log-domain one loses |ln x| ulps
    eps = float(torch.finfo(dtype).eps)
    allowed = eps * float(terms) * (64 + 2 * abs(float(mpmath.log(terms))))
    assert abs(value - float(exact)) <= allowed


@settings(max_examples=400, deadline=None, derandomize=True)
@given(mu=_finite32, sigma=_positive32, m=_finite32, s=_positive32, m_red=_finite32)
# (μ/σ)² overflows while ΔF ≈ −2.4e38 does not, with |μ| < 1: the log domain's
# ln|μ − m̃| where both are below one
@example(mu=0.5, sigma=2.27e-20, m=0.0, s=1.0, m_red=0.0)
def test_spike_float32_never_nan_and_agrees_with_exact(mu, sigma, m, s, m_red):
    _check_against_exact(torch.float32, mu, sigma, m, s, m_red, 0.0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    mu=_finite32,
    sigma=_positive32,
    m=_finite32,
    s=_positive32,
    m_red=_finite32,
    shrink=st.floats(min_value=1e-6, max_value=1.0),
)
def test_soft_reduction_float32_never_nan_and_agrees_with_exact(mu, sigma, m, s, m_red, shrink):
    _check_against_exact(torch.float32, mu, sigma, m, s, m_red, s * shrink)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    mu=_finite32,
    sigma_over_s=st.floats(min_value=1e-3, max_value=0.99),
    m=_finite32,
    s=st.floats(min_value=1e-30, max_value=1e30),
    m_red=_finite32,
    widen=st.floats(min_value=1.0, max_value=8.0, exclude_min=True),
)
# (μ/s)² overflows while ΔF ≈ 8.9e36 does not: the log domain with s̃ > s
@example(mu=3e19, sigma_over_s=0.5, m=0.0, s=1.0, m_red=0.0, widen=1.01)
# (s̃/s)² m overflows while the reduced posterior mean, -2.6e37, does not
@example(mu=0.0, sigma_over_s=0.5, m=8.507059173023462e37, s=1.0, m_red=0.0, widen=2.0)
def test_reduced_prior_wider_than_the_prior_float32_agrees_with_exact(
    mu, sigma_over_s, m, s, m_red, widen
):
    # s̃ > s is valid where σ² (1/s² − 1/s̃²) < 1, so σ < s suffices
    _check_against_exact(torch.float32, mu, s * sigma_over_s, m, s, m_red, s * widen)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    mu=st.floats(allow_nan=False, allow_infinity=False),
    sigma=st.floats(min_value=5e-324, allow_nan=False, allow_infinity=False),
    m=st.floats(allow_nan=False, allow_infinity=False),
    s=st.floats(min_value=5e-324, allow_nan=False, allow_infinity=False),
)
def test_spike_float64_never_nan_and_agrees_with_exact(mu, sigma, m, s):
    _check_against_exact(torch.float64, mu, sigma, m, s, 0.0, 0.0)


def test_a_prior_broadcast_wider_than_the_posterior_gives_the_broadcast_shape():
    # Normal(0, 1).expand(...) costs one element; ΔF still has every element's
    prior_loc, prior_scale = torch.tensor(0.2).expand(3), torch.tensor(1.5).expand(3)
    out = delta_f(torch.tensor(0.3), torch.tensor(0.1), prior_loc, prior_scale)
    expected = math.log(1.5 / 0.1) - 0.5 * (0.3 / 0.1) ** 2 + 0.5 * (0.2 / 1.5) ** 2
    assert out.delta_f.shape == out.loc.shape == out.scale.shape == (3,)
    assert torch.allclose(out.delta_f, torch.full((3,), expected), rtol=1e-6)


def test_spike_constants_are_one_value_for_a_broadcast_prior_else_one_per_element():
    shape = torch.Size([2, 3])
    m_red = torch.tensor(0.5)
    log_s, d_sq = spike_constants(torch.tensor(0.0).expand(shape), torch.tensor(2.0), m_red, shape)
    assert log_s.dim() == d_sq.dim() == 0
    assert log_s.item() == pytest.approx(math.log(2.0)) and d_sq.item() == pytest.approx(1 / 16)
    # a prior that varies along the last dimension only: one value per element, flat
    prior_scale = torch.tensor([1.0, 2.0, 4.0])
    log_s, d_sq = spike_constants(torch.zeros(()), prior_scale, m_red, shape)
    assert log_s.shape == d_sq.shape == (6,)
    assert torch.allclose(log_s, prior_scale.log().repeat(2))
    assert torch.allclose(d_sq, (0.5 / prior_scale).square().repeat(2))
    # without a shape, broadcastable to the prior
    log_s, _ = spike_constants(torch.zeros(()), prior_scale, m_red)
    assert log_s.shape == (3,)


_ORDINARY = [
    # (μ, σ, m, s, m̃, s̃): point masses, shrinking, shifting and widening priors, with
    # every log-domain difference of either sign and terms below and above one
    (0.3, 0.1, 0.2, 1.5, 0.0, 0.0),
    (-0.05, 0.4, 0.0, 1.0, 0.1, 0.0),
    (0.7, 0.2, 0.1, 0.5, -0.3, 0.25),
    (0.01, 0.03, 0.0, 0.2, 0.0, 0.1),
    (2.0, 0.5, -1.0, 3.0, 0.5, 1.0),
    (0.4, 0.3, 0.0, 1.0, 0.0, 1.2),
    (-0.2, 0.05, 0.1, 0.3, 0.15, 0.6),
    (0.3, 0.2, 0.25, 0.8, 0.25, 0.79),
    (0.3, 1.2, 0.1, 1.0, -0.2, 1.1),  # σ > s̃ > s: b < 1 and w < 0
]


@pytest.mark.parametrize("values", _ORDINARY, ids=str)
def test_the_log_domain_evaluation_agrees_with_exact_on_ordinary_values(values):
    # the repair path is used only where the direct one overflows; it must give the
    # same quantities everywhere, where its logarithms of differences are below zero
    inputs = [torch.tensor([v], dtype=torch.float64) for v in values]
    exact = [float(x) for x in _exact(*values)]
    got = [t.item() for t in free_energy._log_domain(*inputs)]
    assert got == pytest.approx(exact, rel=1e-11, abs=1e-12)


def test_log1mexp_is_accurate_on_both_sides_of_the_switch():
    for x in (-1e-12, -1e-6, -0.5, -0.6931, -0.6932, -1.0, -30.0, -700.0):
        got = free_energy._log1mexp(torch.tensor(x, dtype=torch.float64)).item()
        exact = float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x))))
        assert got == pytest.approx(exact, rel=1e-14), x


def test_float32_agrees_with_the_savage_dickey_ratio_on_typical_values():
    # an independent oracle: ln q(0) − ln p(0) with torch.distributions, in float64
    g = torch.Generator().manual_seed(1)
    loc = torch.randn(10_000, generator=g) * 3
    scale = torch.rand(10_000, generator=g) * 2 + 1e-3
    out32 = delta_f(loc, scale, 0.0, 1.0).delta_f
    zero = torch.zeros((), dtype=torch.float64)
    q = torch.distributions.Normal(loc.double(), scale.double())
    p = torch.distributions.Normal(zero, torch.ones((), dtype=torch.float64))
    expected = q.log_prob(zero) - p.log_prob(zero)
    assert torch.allclose(out32.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    loc, scale = torch.randn(1000), torch.rand(1000) + 0.01
    cpu = delta_f(loc, scale, 0.0, 1.0, 0.0, 0.1)
    gpu = delta_f(loc.cuda(), scale.cuda(), 0.0, 1.0, 0.0, 0.1)
    assert gpu.delta_f.device.type == "cuda"
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), rtol=1e-5, atol=1e-6)
