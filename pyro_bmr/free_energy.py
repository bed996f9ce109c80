"""Closed-form change in free energy (ΔF) of a reduced Gaussian prior.

For one element with full prior :math:`p(w) = \\mathcal N(m, s^2)`, fitted
posterior :math:`q(w) = \\mathcal N(\\mu, \\sigma^2)` and reduced prior
:math:`\\tilde p(w) = \\mathcal N(\\tilde m, \\tilde s^2)`, Bayesian model
reduction gives, with precisions :math:`\\pi = \\sigma^{-2}`,
:math:`\\pi_0 = s^{-2}`, :math:`\\tilde\\pi_0 = \\tilde s^{-2}`,

.. math::

    \\tilde\\pi &= \\pi + \\tilde\\pi_0 - \\pi_0, \\qquad
    \\tilde\\mu = (\\pi\\mu + \\tilde\\pi_0\\tilde m - \\pi_0 m) / \\tilde\\pi,\\\\
    \\Delta F &= \\ln \\int q(w)\\,\\frac{\\tilde p(w)}{p(w)}\\,dw
      = \\tfrac12 \\ln\\frac{\\pi\\tilde\\pi_0}{\\tilde\\pi\\pi_0}
      - \\tfrac12\\bigl(\\pi\\mu^2 + \\tilde\\pi_0\\tilde m^2 - \\pi_0 m^2
      - \\tilde\\pi\\tilde\\mu^2\\bigr).

Expanding the square and dividing through by :math:`\\pi` gives the form that is
evaluated here, which never forms a precision and so cannot overflow where the
scales are tiny:

.. math::

    \\kappa &= \\tilde\\pi / \\pi = 1 + \\sigma^2/\\tilde s^2 - \\sigma^2/s^2,\\\\
    \\Delta F &= \\ln\\frac{s}{\\tilde s} - \\tfrac12\\ln\\kappa
      - \\frac{1}{2\\kappa}\\Bigl[\\frac{(\\mu-\\tilde m)^2}{\\tilde s^2}
      - \\frac{(\\mu-m)^2}{s^2}
      - \\frac{\\sigma^2(\\tilde m-m)^2}{\\tilde s^2 s^2}\\Bigr].

Multiplying :math:`\\kappa` and the bracket by :math:`\\tilde s^2/g^2`, with
:math:`g = \\max(\\sigma, \\tilde s)`, makes every ratio at most one in size and
turns the point-mass limit :math:`\\tilde s = 0` into an exact case rather than a
limit: there :math:`\\Delta F = \\ln q(\\tilde m) - \\ln p(\\tilde m)`, the
Savage–Dickey density ratio, e.g. :math:`\\ln(s/\\sigma) - \\mu^2/2\\sigma^2 + m^2/2s^2`
at :math:`\\tilde m = 0`.

The direct evaluation is accurate to a few ulps of its terms; where it overflows
or underflows (huge means, scales far apart) the few affected elements are
evaluated again in the log domain, so the result is never NaN and is infinite
only where the true value lies outside the dtype's range.
"""

from typing import NamedTuple

import torch

from pyro_bmr._tensors import as_tensors, compact

Number = float | torch.Tensor

__all__ = ["DeltaF", "delta_f", "spike_constants", "spike_delta_f"]


class DeltaF(NamedTuple):
    """Result of :func:`delta_f`.

    :ivar torch.Tensor delta_f: log evidence of the reduced model minus that of the
        full model; positive where the reduced model is better.
    :ivar torch.Tensor loc: mean :math:`\\tilde\\mu` of the reduced posterior.
    :ivar torch.Tensor scale: standard deviation of the reduced posterior (zero
        under a point-mass reduced prior).
    """

    delta_f: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor


def delta_f(
    loc: Number,
    scale: Number,
    prior_loc: Number,
    prior_scale: Number,
    reduced_loc: Number = 0.0,
    reduced_scale: Number = 0.0,
    *,
    validate: bool = True,
) -> DeltaF:
    """Score reduced Gaussian priors against a fitted Gaussian posterior.

    Elementwise with broadcasting, on the device and dtype of the tensor inputs
    (Python numbers take the dtype of the tensors; all numbers give the default
    dtype). See the module docstring for the formulas.

    :param loc: posterior mean :math:`\\mu`.
    :param scale: posterior standard deviation :math:`\\sigma > 0`.
    :param prior_loc: full prior mean :math:`m`.
    :param prior_scale: full prior standard deviation :math:`s > 0`.
    :param reduced_loc: reduced prior mean :math:`\\tilde m` (default 0).
    :param reduced_scale: reduced prior standard deviation :math:`\\tilde s \\ge 0`;
        0 (the default) is the point mass at ``reduced_loc``, handled exactly.
    :param bool validate: check that the scales are positive and finite and that
        the reduced posterior precision :math:`\\tilde\\pi` is positive, raising
        :class:`ValueError` otherwise.
    :returns: ``DeltaF(delta_f, loc, scale)``: ΔF and the reduced posterior.
    :rtype: DeltaF
    """
    mu, sigma, m, s, m_red, s_red = as_tensors(
        loc, scale, prior_loc, prior_scale, reduced_loc, reduced_scale
    )
    if validate:
        _validate_scales(sigma, s, s_red)
    if not isinstance(reduced_scale, torch.Tensor) and reduced_scale == 0:
        return _spike(mu, sigma, m, s, m_red, s_red)
    result, post_loc, post_scale, invalid, unsafe = _direct(mu, sigma, m, s, m_red, s_red)
    if validate and bool(invalid.any()):
        raise ValueError(
            "delta_f: the reduced prior is too wide for the posterior: the reduced "
            f"posterior precision is not positive at {int(invalid.sum())} element(s); "
            "a reduced prior wider than the full prior needs σ² (1/s² − 1/s̃²) < 1"
        )
    if bool(unsafe.any()):
        result, post_loc, post_scale = _repair(
            (result, post_loc, post_scale), unsafe, (mu, sigma, m, s, m_red, s_red)
        )
    return DeltaF(result, post_loc, post_scale)


def _spike(mu, sigma, m, s, m_red, s_red) -> DeltaF:
    """:func:`delta_f` under the point mass (``s_red`` zero): the Savage–Dickey
    ratio, the same operations as :func:`_direct` there without the terms that
    vanish, and with an exact reduced posterior (``m_red`` and 0)."""
    shape = torch.broadcast_shapes(*(x.shape for x in (mu, sigma, m, s, m_red, s_red)))
    log_s, d_priors_sq = spike_constants(m, s, m_red)
    result = spike_delta_f(mu, sigma, log_s, d_priors_sq, m_red)
    if result.shape != shape:
        result = result.expand(shape).clone()
    unsafe = ~torch.isfinite(result)
    if bool(unsafe.any()):
        (result,) = _repair((result,), unsafe, (mu, sigma, m, s, m_red, s_red))
    post_loc = m_red.expand(shape).clone()
    return DeltaF(result, post_loc, torch.zeros_like(post_loc))


def spike_constants(
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    reduced_loc: torch.Tensor,
    shape: torch.Size | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of the point-mass ΔF that do not involve the posterior,
    :math:`(\\ln s, ((\\tilde m - m)/s)^2)`, computed once per distinct prior value
    (a broadcast prior costs one element). With ``shape``, each is returned either
    0-dim or flattened over ``shape``; else broadcastable to the prior."""
    prior_loc, prior_scale = _compact_value(prior_loc), _compact_value(prior_scale)
    d_priors = (reduced_loc - prior_loc) / prior_scale
    terms = torch.log(prior_scale), d_priors * d_priors
    if shape is None:
        return terms
    return tuple(t if t.dim() == 0 else t.expand(shape).reshape(-1) for t in terms)


def spike_delta_f(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    log_s: torch.Tensor,
    d_priors_sq: torch.Tensor,
    reduced_loc: torch.Tensor,
) -> torch.Tensor:
    """ΔF of the point mass at ``reduced_loc`` given :func:`spike_constants`, with
    broadcasting:

    .. math:: \\Delta F = \\ln s - \\ln\\sigma
        - \\tfrac12\\bigl[((\\mu - \\tilde m)/\\sigma)^2 - ((\\tilde m - m)/s)^2\\bigr],

    the operations and their order those of the general formula at
    :math:`\\tilde s = 0`, where :math:`g = \\sigma`, :math:`a = \\kappa = 1`, :math:`b = 0`."""
    d_red = (mu - reduced_loc) / sigma
    return (log_s - torch.log(sigma)) - 0.5 * (d_red * d_red - d_priors_sq)


def _compact_value(t: torch.Tensor) -> torch.Tensor:
    """:func:`~pyro_bmr._tensors.compact`, and 0-dim where one value is left."""
    t = compact(t)
    return t.reshape(()) if t.numel() == 1 else t


def _direct(mu, sigma, m, s, m_red, s_red, posterior: bool = True) -> tuple:
    """The direct evaluation: ``(ΔF, loc, scale, invalid, unsafe)``. ``invalid`` marks
    elements whose reduced posterior precision is not positive, ``unsafe`` those to
    evaluate again in the log domain; loc and scale are ``None`` unless ``posterior``."""
    g = torch.maximum(sigma, s_red)
    a = sigma / g  # one of a, b is exactly 1
    b = s_red / g
    t = s_red / s
    w = (1 - t) * (1 + t)  # 1 − s̃²/s², accurate near t = 1
    kappa = b * b + a * a * w
    d_red = (mu - m_red) / g
    d_full = (mu - m) * (b / s)  # exactly 0 under the point mass, however small s
    d_priors = a * (m_red - m) / s
    quad = (d_red * d_red - d_full * d_full - d_priors * d_priors) / kappa
    result = torch.log(s) - torch.log(g) - 0.5 * torch.log(kappa) - 0.5 * quad
    finite = torch.isfinite(result)
    post_loc = post_scale = None
    if posterior:
        post_loc = (b * b * mu + a * a * (m_red - t * t * m)) / kappa
        post_scale = sigma * b / torch.sqrt(kappa)
        finite = finite & torch.isfinite(post_loc) & torch.isfinite(post_scale)
    unsafe = ~finite | (kappa < torch.finfo(result.dtype).tiny)
    # κ > 0 unless the reduced prior is wider than the full one (w < 0) by enough;
    # decided without forming κ, which can underflow
    invalid = (w < 0) & (b <= a * torch.sqrt(torch.clamp(-w, min=0)))
    return result, post_loc, post_scale, invalid, unsafe


def _repair(values: tuple, unsafe: torch.Tensor, inputs: tuple) -> tuple:
    """Replace the ``unsafe`` elements of ``values`` by the log-domain evaluation."""
    shape = unsafe.shape
    args = [x.expand(shape)[unsafe] for x in inputs]
    safe = _log_domain(*args)
    return tuple(x.expand(shape).clone().masked_scatter_(unsafe, y) for x, y in zip(values, safe))


def _validate_scales(sigma: torch.Tensor, s: torch.Tensor, s_red: torch.Tensor) -> None:
    for name, x, strict in (
        ("scale", sigma, True),
        ("prior_scale", s, True),
        ("reduced_scale", s_red, False),
    ):
        ok = torch.isfinite(x) & ((x > 0) if strict else (x >= 0))
        if not bool(ok.all()):
            bad = x[~ok].flatten()[0].item()
            need = "positive" if strict else "non-negative"
            raise ValueError(f"delta_f: {name} must be finite and {need}, got {bad}")


def _log_abs_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ln|x − y| without overflow in the subtraction."""
    big = torch.maximum(x.abs(), y.abs())
    safe_big = torch.where(big > 0, big, torch.ones_like(big))
    return torch.log(big) + torch.log((x / safe_big - y / safe_big).abs())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """ln(1 − eˣ) for x ≤ 0 (Mächler 2012)."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def _signed_exp_diff(lx: torch.Tensor, ly: torch.Tensor) -> tuple:
    """Sign and log magnitude of eˡˣ − eˡʸ, exact zero where lx == ly."""
    hi = torch.maximum(lx, ly)
    gap = (lx - ly).abs()
    equal = (lx == ly) | (torch.isinf(lx) & torch.isinf(ly) & (lx < 0) & (ly < 0))
    gap = torch.where(equal, torch.ones_like(gap), gap)
    log_mag = torch.where(equal, torch.full_like(hi, -float("inf")), hi + _log1mexp(-gap))
    sign = torch.where(equal, torch.zeros_like(hi), torch.sign(lx - torch.where(equal, lx, ly)))
    return sign, log_mag


def _log_domain(mu, sigma, m, s, m_red, s_red) -> tuple:
    """The same quantities as :func:`delta_f`, computed from logarithms of every
    factor, for the elements where the direct evaluation left the dtype's range."""
    log_sigma, log_s = torch.log(sigma), torch.log(s)
    log_s_red = torch.log(s_red)  # -inf for the point mass
    log_g = torch.maximum(log_sigma, log_s_red)
    la, lb = log_sigma - log_g, log_s_red - log_g
    lt = log_s_red - log_s
    # ln |w| with w = 1 − t², and ln κ = ln(b² + a² w), w ≥ 0 where t ≤ 1
    t = torch.exp(lt)
    log_abs_w = torch.where(t < 0.5, torch.log1p(-t * t), torch.log((1 - t).abs()) + torch.log1p(t))
    log_kappa_pos = torch.logaddexp(2 * lb, 2 * la + log_abs_w)
    log_kappa_neg = 2 * lb + _log1mexp(torch.clamp(2 * la + log_abs_w - 2 * lb, max=0.0))
    log_kappa = torch.where(t <= 1, log_kappa_pos, log_kappa_neg)

    l_red = 2 * (_log_abs_diff(mu, m_red) - log_g)
    # ln b/s as ln(s̃/s) − ln g (= lb − ln s): exact when s̃ = s, where κ = b² can
    # underflow and any rounding left in l_red − l_full is multiplied by 1/κ
    l_full = 2 * (_log_abs_diff(mu, m) + lt - log_g)
    l_priors = 2 * (la + _log_abs_diff(m_red, m) - log_s)
    sign, log_num = _signed_exp_diff(l_red, torch.logaddexp(l_full, l_priors))
    half_quad = sign * torch.exp(log_num - log_kappa - 0.6931471805599453)
    result = (log_s - log_g - 0.5 * log_kappa) - half_quad

    # reduced posterior: loc = (b² μ + a² (m̃ − t² m)) / κ, scale = σ b / √κ
    # m̃ − t²m = t²(m̃/t² − m) where t > 1, so that t²m, which can overflow, is
    # never formed
    lift = 2 * torch.clamp(lt, min=0)
    x = m_red * torch.exp(-lift)
    y = torch.exp(2 * torch.clamp(lt, max=0)) * m
    prior_part = torch.sign(x - y) * torch.exp(2 * la - log_kappa + lift + _log_abs_diff(x, y))
    post_loc = torch.exp(2 * lb - log_kappa) * mu + prior_part
    post_scale = torch.exp(log_sigma + lb - 0.5 * log_kappa)
    return result, post_loc, post_scale
