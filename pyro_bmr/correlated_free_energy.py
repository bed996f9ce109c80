"""Closed-form ΔF and reduced posteriors for correlated Gaussian posteriors.

For a block of :math:`n` elements with fitted posterior :math:`q(w) = \\mathcal N(\\mu, \\Sigma)`,
full prior :math:`p(w) = \\mathcal N(m, \\operatorname{diag} s^2)` and reduced prior
:math:`\\tilde p(w) = \\mathcal N(\\tilde m, \\operatorname{diag}\\tilde s^2)`,
:math:`\\Delta F = \\ln\\int q(w)\\,\\tilde p(w)/p(w)\\,dw`. Let :math:`S` be the elements with
:math:`\\tilde s = 0` (point masses at :math:`\\tilde m`) and :math:`K` the others. Both priors
being diagonal, :math:`\\tilde p/p` is a product of factors that can be integrated one kind at
a time: each turns the current Gaussian into the posterior under the prior changed so far and
adds the log of its normaliser to ΔF. Only the changed elements enter (an unchanged one adds
exactly nothing), and no term is large where the answer is not:

1. **Tilt** on :math:`K`, :math:`\\mathcal N(w; \\tilde m, s^2)/\\mathcal N(w; m, s^2) =
   e^{\\eta^\\top(w - (m + \\tilde m)/2)}`, :math:`\\eta = (\\tilde m - m)/s^2`:
   :math:`\\Delta F \\mathrel{+}= \\eta^\\top(\\mu - \\tfrac{m + \\tilde m}2) + \\tfrac12\\eta^\\top\\Sigma\\eta`,
   :math:`\\mu \\mathrel{+}= \\Sigma\\eta`.
2. **Shrink** (:math:`\\tilde s < s`, point masses included). With :math:`\\omega = 1 - \\tilde s^2/s^2`,
   the full prior is :math:`w = u + \\epsilon` with :math:`u \\sim \\tilde p` and an independent
   :math:`\\epsilon \\sim \\mathcal N(m - \\tilde m, \\omega s^2)`, so :math:`\\tilde p(w)/p(w) =
   p(\\epsilon = 0 \\mid w)/p(\\epsilon = 0)`: a Savage–Dickey ratio, i.e. observing
   :math:`\\sqrt\\omega(w - \\tilde m)` with noise :math:`\\tilde s`. With :math:`V = \\operatorname{diag}\\sqrt\\omega`,
   :math:`N = \\operatorname{diag}\\tilde s^2 + V\\Sigma V` and :math:`g = V(\\mu - \\tilde m)`,

   .. math:: \\Delta F \\mathrel{+}= \\textstyle\\sum \\ln s - \\tfrac12\\ln|N| - \\tfrac12 g^\\top N^{-1}g
       + \\tfrac12\\sum_S ((\\tilde m - m)/s)^2, \\quad
       \\mu \\mathrel{-}= \\Sigma V N^{-1}g, \\quad \\Sigma \\mathrel{-}= \\Sigma V N^{-1}V\\Sigma.

   On :math:`S`, :math:`N = \\Sigma_{SS}`: the generalised Savage–Dickey ratio
   :math:`\\ln q_S(\\tilde m_S) - \\ln p_S(\\tilde m_S)` with the marginal of :math:`q`, and the
   survivors' means move by :math:`-\\Sigma_{KS}\\Sigma_{SS}^{-1}(\\mu_S - \\tilde m_S)`, which
   mean-field BMR cannot do. A small :math:`\\tilde s` is the continuous limit; no
   :math:`1/\\tilde s` is ever formed.
3. **Widen** (:math:`\\tilde s > s`), :math:`H = \\operatorname{diag}(s^{-2} - \\tilde s^{-2})^{1/2}`,
   :math:`N = I - H\\Sigma H`, positive definite exactly when the reduced posterior is proper
   (else a :class:`ValueError` names the block), :math:`b = H(\\mu - \\tilde m)`:
   :math:`\\Delta F \\mathrel{+}= \\sum\\ln(s/\\tilde s) - \\tfrac12\\ln|N| + \\tfrac12 b^\\top N^{-1}b`,
   :math:`\\mu \\mathrel{+}= \\Sigma HN^{-1}b`, :math:`\\Sigma \\mathrel{+}= \\Sigma HN^{-1}H\\Sigma`.

Together they equal the textbook precision update :math:`\\tilde\\Pi = \\Sigma^{-1} + \\tilde P - P`
(:math:`P`, :math:`\\tilde P` the priors' precisions) and its ΔF, whose large terms cancel in
floating point. The reduced posterior is exactly :math:`\\tilde m` on :math:`S`.

* :func:`mvn_delta_f`: stage 2 is one QR of the array :math:`\\bigl[\\begin{smallmatrix} VF &
  \\operatorname{diag}\\tilde s \\\\ F & 0 \\end{smallmatrix}\\bigr]` (:math:`\\Sigma = FF^\\top`),
  whose lower-triangular form :math:`\\bigl[\\begin{smallmatrix} R_{11} & 0 \\\\ R_{21} & R_{22}
  \\end{smallmatrix}\\bigr]` has :math:`R_{11}R_{11}^\\top = N`, :math:`R_{21} = \\Sigma VR_{11}^{-\\top}`
  and :math:`R_{22}R_{22}^\\top` the reduced covariance (a square-root Kalman update, no
  covariance formed or subtracted); :math:`S` is ordered last so that :math:`R_{22}` is exact on
  :math:`K`, and a block's own :math:`S` needs no loop. :math:`O(n^3)`.
* :func:`lowrank_delta_f`, :math:`\\Sigma = WW^\\top + D`: :math:`N = \\operatorname{diag}(\\tilde s^2
  + \\omega D) + (VW)(VW)^\\top` by Woodbury, and the reduced covariance stays low rank plus
  diagonal: conditioning on :math:`w_S` gives :math:`D_K + W_K(I + W_S^\\top D_S^{-1}W_S)^{-1}W_K^\\top`,
  and generally :math:`(\\Sigma^{-1} + \\tilde P - P)^{-1} = \\rho D + \\rho WM^{-1}(\\rho W)^\\top`
  with :math:`\\rho D = (D^{-1} + \\tilde P - P)^{-1}`, :math:`\\rho = \\tilde s^2/(\\tilde s^2 + \\omega D)`,
  and :math:`M` the capacitance of :math:`N` (Woodbury twice); widening likewise. :math:`O(nr^2)`.
* :func:`matrix_normal_delta_f`: point masses on whole rows and columns, the prior unchanged
  elsewhere, keep the Kronecker form; any other reduced prior goes through the dense
  covariance, up to :data:`MAX_DENSE_ELEMENTS` elements.

All are batched over leading block dimensions, follow the inputs' dtype and device, and use
QR and Cholesky factorisations and triangular solves only (a ``precision`` becomes a
covariance factor by one triangular solve, as in torch's ``MultivariateNormal``).
"""

from typing import NamedTuple

import torch
from torch.linalg import cholesky_ex, solve_triangular

from pyro_bmr._tensors import as_tensors

Number = float | torch.Tensor

__all__ = [
    "MAX_DENSE_ELEMENTS",
    "CorrelatedDeltaF",
    "LowRankDeltaF",
    "MatrixNormalDeltaF",
    "lowrank_delta_f",
    "matrix_normal_delta_f",
    "mvn_delta_f",
]

#: The largest weight matrix (``i * j`` elements) that :func:`matrix_normal_delta_f` scores
#: through its dense covariance (a QR of a ``2ij × 2ij`` array) when the reduced prior breaks
#: the Kronecker structure.
MAX_DENSE_ELEMENTS = 1024


class CorrelatedDeltaF(NamedTuple):
    """Result of :func:`mvn_delta_f`.

    :ivar torch.Tensor delta_f: ΔF per block, shape ``batch``.
    :ivar torch.Tensor loc: reduced posterior mean, :math:`\\tilde m` on point masses.
    :ivar torch.Tensor scale_tril: lower-triangular factor of the reduced covariance, with
        zero rows and columns on point masses.
    """

    delta_f: torch.Tensor
    loc: torch.Tensor
    scale_tril: torch.Tensor


class LowRankDeltaF(NamedTuple):
    """Result of :func:`lowrank_delta_f`: the reduced covariance is
    ``cov_factor @ cov_factor.mT + diag(cov_diag)``, zero on point masses."""

    delta_f: torch.Tensor
    loc: torch.Tensor
    cov_factor: torch.Tensor
    cov_diag: torch.Tensor


class MatrixNormalDeltaF(NamedTuple):
    """Result of :func:`matrix_normal_delta_f`. Where the reduction keeps the Kronecker form,
    ``row_scale_tril`` and ``col_scale_tril`` factor the reduced row and column covariances
    (zero on pruned rows and columns) and ``scale_tril`` is ``None``; otherwise those two are
    ``None`` and ``scale_tril`` factors the dense ``(i*j, i*j)`` covariance of
    ``loc.flatten(-2)``."""

    delta_f: torch.Tensor
    loc: torch.Tensor
    row_scale_tril: torch.Tensor | None
    col_scale_tril: torch.Tensor | None
    scale_tril: torch.Tensor | None = None


def mvn_delta_f(
    loc: torch.Tensor,
    prior_loc: Number,
    prior_scale: Number,
    reduced_loc: Number = 0.0,
    reduced_scale: Number = 0.0,
    *,
    scale_tril: torch.Tensor | None = None,
    precision: torch.Tensor | None = None,
) -> CorrelatedDeltaF:
    """Score a diagonal reduced prior against a full-covariance Gaussian posterior.

    :param loc: posterior mean :math:`\\mu`, shape ``batch + (n,)``.
    :param prior_loc: full prior mean :math:`m`, broadcastable to ``loc``.
    :param prior_scale: full prior standard deviation :math:`s > 0`.
    :param reduced_loc: reduced prior mean :math:`\\tilde m` (default 0).
    :param reduced_scale: reduced prior standard deviation :math:`\\tilde s \\ge 0`; 0 (the
        default) is the point mass at ``reduced_loc``, which may differ between blocks.
    :param scale_tril: lower-triangular :math:`L` with :math:`\\Sigma = LL^\\top` and positive
        diagonal, shape ``batch + (n, n)``.
    :param precision: :math:`\\Sigma^{-1}`, symmetric positive definite; give exactly one of
        ``scale_tril`` and ``precision``.
    :returns: ``CorrelatedDeltaF(delta_f, loc, scale_tril)``.
    :raises ValueError: for bad shapes or scales, or where the reduced posterior is improper.
    """
    fn = "mvn_delta_f"
    if (scale_tril is None) == (precision is None):
        raise ValueError(f"{fn}: give exactly one of scale_tril and precision")
    matrix, name = (scale_tril, "scale_tril") if precision is None else (precision, "precision")
    mu, m, s, m_red, s_red, matrix = as_tensors(
        loc, prior_loc, prior_scale, reduced_loc, reduced_scale, matrix
    )
    n = mu.shape[-1] if mu.dim() else 0
    vectors = dict(prior_loc=m, prior_scale=s, reduced_loc=m_red, reduced_scale=s_red)
    batch = _batch_shape(fn, mu, 1, {name: (matrix, (n, n))}, vectors)
    _check_scales(fn, prior_scale=s, reduced_scale=s_red)
    mu, m, s, m_red, s_red = (x.expand(*batch, n) for x in (mu, m, s, m_red, s_red))
    matrix = matrix.expand(*batch, n, n)
    if precision is None:
        _check_tril(fn, "scale_tril", matrix)
        tril = matrix
    else:
        if bool(((matrix - matrix.mT).abs() > 1e-5 * matrix.abs().amax()).any()):
            raise ValueError(f"{fn}: precision must be symmetric")
        low, info = cholesky_ex(matrix.flip(-2, -1))  # Λ = UUᵀ with U = low reversed, upper
        if bool((info > 0).any()):
            raise ValueError(f"{fn}: precision must be positive definite")
        # Σ = U⁻ᵀU⁻¹, so U⁻ᵀ is a lower factor of Σ (a triangular solve, as in torch's MVN)
        tril = solve_triangular(low.flip(-2, -1).mT, _eye(matrix), upper=False)
    return CorrelatedDeltaF(*_mvn(fn, mu, tril, m, s, m_red, s_red))


def _mvn(fn, mu, factor, m, s, m_red, s_red):
    """ΔF, reduced loc and scale_tril given any factor ``F`` of Σ = FFᵀ (lower triangular
    where there are no point masses), by the three exact stages of the module docstring."""
    point = s_red == 0
    perm = None
    if bool(point.any()):  # K first, in its order, then S
        perm = torch.argsort(point.to(torch.int8), dim=-1, stable=True)
        vectors = (mu, m, s, m_red, s_red, point)
        mu, m, s, m_red, s_red, point = (x.gather(-1, perm) for x in vectors)
        factor = _take(factor, perm, -2)
    keep = ~point
    t = s_red / s
    omega = (1 - t) * (1 + t)  # s̃²(1/s̃² − 1/s²)
    # 1. tilt: on K, move the full prior's mean from m to m̃
    eta = torch.where(keep, (m_red - m) / s / s, 0.0)
    f_eta = (factor.mT @ eta.unsqueeze(-1)).squeeze(-1)
    df = (eta * (mu - 0.5 * (m + m_red))).sum(-1) + 0.5 * (f_eta * f_eta).sum(-1)
    mu = mu + (factor @ f_eta.unsqueeze(-1)).squeeze(-1)
    # 2. shrink (s̃ < s, point masses included): pseudo-observations √ω (w − m̃) with noise s̃
    shrink = omega > 0
    if bool(shrink.any()):
        n = mu.shape[-1]
        v = torch.where(shrink, omega.sqrt(), 0.0)
        noise = torch.diag_embed(torch.where(shrink, s_red, 1.0))
        top = torch.cat([v.unsqueeze(-1) * factor, noise], -1)
        low = _lower_factor(torch.cat([top, torch.cat([factor, torch.zeros_like(noise)], -1)], -2))
        r11, r21, factor = low[..., :n, :n], low[..., n:, :n], low[..., n:, n:]
        y = solve_triangular(r11, (v * (mu - m_red)).unsqueeze(-1), upper=False).squeeze(-1)
        z_prior = (m_red - m) / s
        sd = torch.where(shrink, s.log(), 0.0) + torch.where(point, 0.5 * z_prior * z_prior, 0.0)
        df = df + sd.sum(-1) - _log_diag(r11) - 0.5 * (y * y).sum(-1)
        mu = mu - (r21 @ y.unsqueeze(-1)).squeeze(-1)
    # 3. widen (s̃ > s): N = I − HΣH with H² = 1/s² − 1/s̃², positive definite iff proper
    widen = omega < 0
    if bool(widen.any()):
        h = torch.where(widen, (-omega).sqrt() / s_red, 0.0)
        hf = h.unsqueeze(-1) * factor
        chol, info = cholesky_ex(_eye(hf) - hf @ hf.mT)
        _raise_improper(fn, info > 0)
        y = solve_triangular(chol, (h * (mu - m_red)).unsqueeze(-1), upper=False)
        log_ratio = torch.where(widen, s.log() - s_red.log(), 0.0).sum(-1)
        df = df + log_ratio - _log_diag(chol) + 0.5 * y.square().sum((-2, -1))
        gain = factor @ solve_triangular(chol, hf, upper=False).mT  # ΣH chol⁻ᵀ
        mu = mu + (gain @ y).squeeze(-1)
        factor = _lower_factor(torch.cat([factor, gain], -1))  # Σ + ΣHN⁻¹HΣ
    post_loc = torch.where(keep, mu, m_red)
    post_tril = factor * (keep.unsqueeze(-1) & keep.unsqueeze(-2))
    if perm is not None:  # K kept its order, so the factor stays lower triangular
        inv = torch.argsort(perm, dim=-1)
        post_loc, post_tril = post_loc.gather(-1, inv), _permute(post_tril, inv)
    return df, post_loc, post_tril


def lowrank_delta_f(
    loc: torch.Tensor,
    cov_factor: torch.Tensor,
    cov_diag: torch.Tensor,
    prior_loc: Number,
    prior_scale: Number,
    reduced_loc: Number = 0.0,
    reduced_scale: Number = 0.0,
) -> LowRankDeltaF:
    """Score a diagonal reduced prior against a low-rank-plus-diagonal Gaussian posterior,
    :math:`\\Sigma = WW^\\top + D` as in :class:`~pyro.distributions.LowRankMultivariateNormal`,
    in :math:`O(nr^2)` per block.

    :param loc: posterior mean, shape ``batch + (n,)``.
    :param cov_factor: :math:`W`, shape ``batch + (n, r)``.
    :param cov_diag: :math:`D > 0`, broadcastable to ``loc``.
    :param prior_loc: full prior mean :math:`m`.
    :param prior_scale: full prior standard deviation :math:`s > 0`.
    :param reduced_loc: reduced prior mean :math:`\\tilde m` (default 0).
    :param reduced_scale: reduced prior standard deviation :math:`\\tilde s \\ge 0`; 0 (the
        default) is the point mass at ``reduced_loc``.
    :returns: ``LowRankDeltaF(delta_f, loc, cov_factor, cov_diag)``, the reduced posterior
        again low rank plus diagonal, zero on point masses.
    :raises ValueError: for bad shapes or scales, or where the reduced posterior is improper.
    """
    fn = "lowrank_delta_f"
    mu, w, dg, m, s, m_red, s_red = as_tensors(
        loc, cov_factor, cov_diag, prior_loc, prior_scale, reduced_loc, reduced_scale
    )
    n, r = (mu.shape[-1] if mu.dim() else 0), (w.shape[-1] if w.dim() else 0)
    vectors = dict(cov_diag=dg, prior_loc=m, prior_scale=s, reduced_loc=m_red, reduced_scale=s_red)
    batch = _batch_shape(fn, mu, 1, {"cov_factor": (w, (n, r))}, vectors)
    _check_scales(fn, cov_diag=dg, prior_scale=s, reduced_scale=s_red)
    mu, dg, m, s, m_red, s_red = (x.expand(*batch, n) for x in (mu, dg, m, s, m_red, s_red))
    w = w.expand(*batch, n, r)
    point = s_red == 0
    keep = ~point
    t = s_red / s
    omega = (1 - t) * (1 + t)
    # 1. tilt: on K, move the full prior's mean from m to m̃ (Ση = Dη + W Wᵀη)
    eta = torch.where(keep, (m_red - m) / s / s, 0.0)
    w_eta = (w.mT @ eta.unsqueeze(-1)).squeeze(-1)
    df = (eta * (mu - 0.5 * (m + m_red) + 0.5 * dg * eta)).sum(-1) + 0.5 * (w_eta * w_eta).sum(-1)
    mu = mu + dg * eta + (w @ w_eta.unsqueeze(-1)).squeeze(-1)
    # 2. shrink (s̃ < s, point masses included): N = diag(s̃² + ωD) + (VW)(VW)ᵀ over A
    shrink = omega > 0
    den = torch.where(shrink, s_red * s_red + omega * dg, 1.0)
    v = torch.where(shrink, omega.sqrt(), 0.0)
    chol, x, res = _ridge(v.unsqueeze(-1) * w, den, (v * (mu - m_red)).unsqueeze(-1))
    z_prior = (m_red - m) / s
    sd = torch.where(shrink, s.log() - 0.5 * den.log(), 0.0)
    sd = sd + torch.where(point, 0.5 * z_prior * z_prior, 0.0)
    quad = res.square().sum((-2, -1)) + x.square().sum((-2, -1))  # gᵀN⁻¹g
    df = df + sd.sum(-1) - _log_diag(chol) - 0.5 * quad
    # μ −= Σ V N⁻¹ g = D V N⁻¹ g + W x, as Wᵀ V N⁻¹ g = x: no 1/den on the residual
    mu = mu - dg * v * res.squeeze(-1) / den.sqrt() - (w @ x).squeeze(-1)
    # (Λ + Δ)⁻¹ = ρD + ρW M⁻¹ (ρW)ᵀ, ρ = s̃²/(s̃² + ωD), and M = I + (VW)ᵀ(VW)/den is chol's
    rho = torch.where(shrink, s_red * s_red / den, 1.0)
    dg = rho * dg
    w = solve_triangular(chol.mT, rho.unsqueeze(-1) * w, upper=True, left=False)
    # 3. widen (s̃ > s): N = I − HΣH = diag(1 − h²D) − (HW)(HW)ᵀ, positive definite iff proper
    widen = omega < 0
    if bool(widen.any()):
        h = torch.where(widen, (-omega).sqrt() / s_red, 0.0)
        den = 1 - h * h * dg
        hw = h.unsqueeze(-1) * w / den.sqrt().unsqueeze(-1)
        chol, info = cholesky_ex(_eye(w, r) - hw.mT @ hw)
        _raise_improper(fn, (den <= 0).any(-1) | (info > 0))
        b = h * (mu - m_red) / den.sqrt()
        y = solve_triangular(chol, hw.mT @ b.unsqueeze(-1), upper=False)
        log_ratio = torch.where(widen, s.log() - s_red.log(), 0.0).sum(-1)
        df = df + log_ratio - 0.5 * den.log().sum(-1) - _log_diag(chol)
        df = df + 0.5 * ((b * b).sum(-1) + y.square().sum((-2, -1)))
        p = solve_triangular(chol.mT, y, upper=True)  # Wᵀ H N⁻¹ b
        mu = mu + dg * h * (b + (hw @ p).squeeze(-1)) / den.sqrt() + (w @ p).squeeze(-1)
        dg = dg / den
        w = solve_triangular(chol.mT, w / den.unsqueeze(-1), upper=True, left=False)
    post_loc = torch.where(keep, mu, m_red)
    post_factor = w * keep.unsqueeze(-1)
    return LowRankDeltaF(df, post_loc, post_factor, torch.where(keep, dg, 0.0))


def matrix_normal_delta_f(
    loc: torch.Tensor,
    row_scale_tril: torch.Tensor,
    col_scale_tril: torch.Tensor,
    prior_loc: Number,
    prior_scale: Number,
    reduced_loc: Number = 0.0,
    reduced_scale: Number = 0.0,
) -> MatrixNormalDeltaF:
    """Score a diagonal reduced prior against a matrix-normal posterior of a weight matrix.

    Convention: :math:`\\operatorname{Cov}(W_{ab}, W_{cd}) = U_{ac}V_{bd}`, with row covariance
    :math:`U = L_UL_U^\\top` (``i × i``) and column covariance :math:`V = L_VL_V^\\top`
    (``j × j``); so the column-stacked :math:`\\operatorname{vec}W` has covariance
    :math:`V\\otimes U` and ``loc.flatten(-2)`` (row-major) has ``kron(U, V)``.

    Exact in the family when the reduced prior is a point mass on whole rows and/or whole
    columns and equals the full prior elsewhere: the kept rows are conditioned on the pruned
    rows through :math:`U`, then the kept columns on the pruned columns through :math:`V`.
    Any other reduced prior is scored exactly through the dense covariance when ``i * j`` is
    at most :data:`MAX_DENSE_ELEMENTS`; beyond, score the elements from their marginals.

    :param loc: posterior mean :math:`M`, shape ``batch + (i, j)``.
    :param row_scale_tril: :math:`L_U`, shape ``batch + (i, i)``.
    :param col_scale_tril: :math:`L_V`, shape ``batch + (j, j)``.
    :param prior_loc: full prior mean, broadcastable to ``loc``.
    :param prior_scale: full prior standard deviation :math:`s > 0`.
    :param reduced_loc: reduced prior mean (default 0).
    :param reduced_scale: reduced prior standard deviation :math:`\\ge 0` (0: point mass).
    :returns: :class:`MatrixNormalDeltaF`.
    :raises ValueError: for bad input, an improper reduced posterior, or a reduced prior that
        breaks the Kronecker form of a matrix with more than :data:`MAX_DENSE_ELEMENTS`.
    """
    fn = "matrix_normal_delta_f"
    mu, lu, lv, m, s, m_red, s_red = as_tensors(
        loc, row_scale_tril, col_scale_tril, prior_loc, prior_scale, reduced_loc, reduced_scale
    )
    i, j = mu.shape[-2:] if mu.dim() >= 2 else (0, 0)
    vectors = dict(prior_loc=m, prior_scale=s, reduced_loc=m_red, reduced_scale=s_red)
    matrices = dict(row_scale_tril=(lu, (i, i)), col_scale_tril=(lv, (j, j)))
    batch = _batch_shape(fn, mu, 2, matrices, vectors)
    _check_tril(fn, "row_scale_tril", lu)
    _check_tril(fn, "col_scale_tril", lv)
    _check_scales(fn, prior_scale=s, reduced_scale=s_red)
    mu, m, s, m_red, s_red = (x.expand(*batch, i, j) for x in (mu, m, s, m_red, s_red))
    lu, lv = lu.expand(*batch, i, i), lv.expand(*batch, j, j)
    point = s_red == 0
    rows, cols = point.all(-1), point.all(-2)
    cross = rows.unsqueeze(-1) | cols.unsqueeze(-2)
    if bool((point == cross).all() and (cross | ((s_red == s) & (m_red == m))).all()):
        return _matrix_normal_kron(mu, lu, lv, m, s, m_red, rows, cols, cross)
    if i * j > MAX_DENSE_ELEMENTS:
        raise ValueError(
            f"{fn}: this reduced prior breaks the Kronecker form and the {i}×{j} matrix has "
            f"more than MAX_DENSE_ELEMENTS = {MAX_DENSE_ELEMENTS} elements for the dense "
            "covariance; score its elements from their marginals instead"
        )
    tril = (lu[..., :, None, :, None] * lv[..., None, :, None, :]).reshape(*batch, i * j, i * j)
    mu, m, s, m_red, s_red = (x.flatten(-2) for x in (mu, m, s, m_red, s_red))
    df, post_loc, post_tril = _mvn(fn, mu, tril, m, s, m_red, s_red)
    return MatrixNormalDeltaF(df, post_loc.unflatten(-1, (i, j)), None, None, post_tril)


def _matrix_normal_kron(mu, lu, lv, m, s, m_red, rows, cols, cross):
    """Pruned rows R, then pruned columns C, conditioned on through U and V. With R (C)
    ordered first, the lower factor of the permuted U (V), from a QR, holds those of U_RR and
    of the Schur complement U_K|R in its diagonal blocks."""
    i, j = mu.shape[-2:]
    pu = pv = None
    if bool(rows.any()):
        pu = torch.argsort((~rows).to(torch.int8), dim=-1, stable=True)
        lu, rows = _lower_factor(_take(lu, pu, -2)), rows.gather(-1, pu)
        mu, m, s, m_red, cross = (_take(x, pu, -2) for x in (mu, m, s, m_red, cross))
    if bool(cols.any()):
        pv = torch.argsort((~cols).to(torch.int8), dim=-1, stable=True)
        lv, cols = _lower_factor(_take(lv, pv, -2)), cols.gather(-1, pv)
        mu, m, s, m_red, cross = (_take(x, pv, -1) for x in (mu, m, s, m_red, cross))
    r_f, c_f = rows.to(mu.dtype), cols.to(mu.dtype)
    n_r, n_c = r_f.sum(-1), c_f.sum(-1)
    log_u, log_v = (x.diagonal(dim1=-2, dim2=-1).log() for x in (lu, lv))
    # rows R given (all columns): MN(M_R, U_RR, V); M_K moves by U_KR U_RR⁻¹ (m̃ − M)_R
    y = solve_triangular(lu, (mu - m_red) * r_f.unsqueeze(-1), upper=False) * r_f.unsqueeze(-1)
    quad = solve_triangular(lv, y.mT, upper=False).square().sum((-2, -1))
    mu = mu - lu @ y
    # then, within rows K, the columns C: MN(M_KC, U_K|R, V_CC); M_K,Kc moves through V
    keep_rows = ~rows
    cond_u = torch.where(keep_rows.unsqueeze(-1) & keep_rows.unsqueeze(-2), lu, _eye(lu))
    d2 = (mu - m_red) * keep_rows.unsqueeze(-1) * c_f.unsqueeze(-2)
    g = solve_triangular(lv, d2.mT, upper=False) * c_f.unsqueeze(-1)
    quad = quad + solve_triangular(cond_u, g.mT, upper=False).square().sum((-2, -1))
    mu = mu - (lv @ g).mT
    log_det = j * (log_u * r_f).sum(-1) + n_r * log_v.sum(-1)
    log_det = log_det + n_c * (log_u * (1 - r_f)).sum(-1) + (i - n_r) * (log_v * c_f).sum(-1)
    z_prior = (m_red - m) / s
    prior = torch.where(cross, s.log() + 0.5 * z_prior * z_prior, 0.0).sum((-2, -1))
    post_loc = torch.where(cross, m_red, mu)
    post_u = lu * (keep_rows.unsqueeze(-1) & keep_rows.unsqueeze(-2))
    post_v = lv * ((~cols).unsqueeze(-1) & (~cols).unsqueeze(-2))
    if pu is not None:
        inv = torch.argsort(pu, dim=-1)
        post_loc, post_u = _take(post_loc, inv, -2), _permute(post_u, inv)
    if pv is not None:
        inv = torch.argsort(pv, dim=-1)
        post_loc, post_v = _take(post_loc, inv, -1), _permute(post_v, inv)
    return MatrixNormalDeltaF(prior - log_det - 0.5 * quad, post_loc, post_u, post_v)


def _lower_factor(rows: torch.Tensor) -> torch.Tensor:
    """A lower-triangular L with LLᵀ = ``rows @ rows.mT``, from a QR of ``rows.mT`` (never
    forming the product), with a non-negative diagonal."""
    r = torch.linalg.qr(rows.mT, mode="r").R
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
    return (r * sign.unsqueeze(-1)).mT


def _ridge(w, dg, v):
    """For Σ = D + WWᵀ: the Cholesky factor of I + WᵀD⁻¹W, x = (I + WᵀD⁻¹W)⁻¹WᵀD⁻¹v and
    the residual D^(-1/2)(v − Wx), column by column of ``v``; then
    uᵀΣ⁻¹v = res_u·res_v + x_u·x_v, which is stationary in x, so rounding in x enters it only
    to second order (unlike |D^(-1/2)v|² − |L⁻¹WᵀD⁻¹v|²)."""
    root = dg.sqrt().unsqueeze(-1)
    scaled = w / root
    chol, _ = cholesky_ex(_eye(w, w.shape[-1]) + scaled.mT @ scaled)
    x = torch.cholesky_solve(scaled.mT @ (v / root), chol)
    return chol, x, (v - w @ x) / root


def _take(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` permuted along ``dim`` (-1 or -2) by the batched permutation ``perm``."""
    index = perm.unsqueeze(-1) if dim == -2 else perm.unsqueeze(-2)
    return x.gather(dim, index.expand_as(x))


def _permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The square matrices ``x`` with rows and columns permuted by ``perm``."""
    return _take(_take(x, perm, -2), perm, -1)


def _eye(like: torch.Tensor, n: int | None = None) -> torch.Tensor:
    n = like.shape[-1] if n is None else n
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _log_diag(chol: torch.Tensor) -> torch.Tensor:
    return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _raise_improper(fn: str, bad: torch.Tensor) -> None:
    if bool(bad.any()):
        block = tuple(int(k) for k in torch.nonzero(bad)[0])
        where = f"block {block}, {int(bad.sum())} block(s) in all" if block else "the block"
        raise ValueError(
            f"{fn}: the reduced posterior is not proper (its precision is not positive "
            f"definite) in {where}: where s̃ > s, "
            "1/s² − 1/s̃² must stay below the posterior precision in every direction"
        )


def _batch_shape(fn, mu, event, matrices, vectors) -> torch.Size:
    """The broadcast batch shape of ``loc`` (``event`` trailing dimensions), of ``matrices``
    (name → (tensor, its required trailing shape)) and of ``vectors`` (broadcast to ``loc``)."""
    if mu.dim() < event:
        raise ValueError(f"{fn}: loc must have {event} event dimension(s), got {tuple(mu.shape)}")
    ev = mu.shape[mu.dim() - event :]
    shapes = [mu.shape[: mu.dim() - event]]
    for name, (x, want) in matrices.items():
        k = len(want)
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != tuple(want):
            raise ValueError(
                f"{fn}: {name} must have shape batch + {tuple(want)} for loc of shape "
                f"{tuple(mu.shape)}, got {tuple(x.shape)}"
            )
        shapes.append(x.shape[: x.dim() - k])
    for name, x in vectors.items():
        tail = x.shape[max(x.dim() - event, 0) :]
        if any(a not in (1, b) for a, b in zip(reversed(tail), reversed(ev))):
            raise ValueError(
                f"{fn}: {name} of shape {tuple(x.shape)} does not broadcast to loc of shape "
                f"{tuple(mu.shape)}"
            )
        shapes.append(x.shape[: max(x.dim() - event, 0)])
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as err:
        raise ValueError(f"{fn}: the batch shapes of the inputs do not broadcast: {err}") from None


def _check_scales(fn: str, **scales: torch.Tensor) -> None:
    for name, x in scales.items():
        strict = name != "reduced_scale"
        ok = torch.isfinite(x) & ((x > 0) if strict else (x >= 0))
        if not bool(ok.all()):
            need = "positive" if strict else "non-negative"
            bad = x[~ok].flatten()[0].item()
            raise ValueError(f"{fn}: {name} must be finite and {need}, got {bad}")


def _check_tril(fn: str, name: str, x: torch.Tensor) -> None:
    diag = x.diagonal(dim1=-2, dim2=-1)
    if not bool((torch.isfinite(diag) & (diag > 0)).all()):
        raise ValueError(f"{fn}: {name} must have a finite, positive diagonal")
    if bool((x.triu(1) != 0).any()):
        raise ValueError(f"{fn}: {name} must be lower triangular")
