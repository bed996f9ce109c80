"""ΔF and reduced posteriors of correlated Gaussian posteriors, against independent oracles:
the exact evidences of a linear-Gaussian model (textbook Gaussian conditioning, dense, with
``torch.linalg``), the mean-field :func:`pyro_bmr.free_energy.delta_f`, and each other."""

import pytest
import torch

from pyro_bmr.correlated_free_energy import (
    MAX_DENSE_ELEMENTS,
    lowrank_delta_f,
    matrix_normal_delta_f,
    mvn_delta_f,
)
from pyro_bmr.free_energy import delta_f

F64 = dict(dtype=torch.float64)


def _spd(n, gen, jitter=0.3):
    a = torch.randn(n, n, generator=gen, **F64)
    return a @ a.T / n + jitter * torch.eye(n, **F64)


def _exact(A, R, y, loc, scale):
    """ln p(y) and the posterior of w for y = A w + N(0, R), w ~ N(loc, diag scale²), by
    Gaussian conditioning in the data space (so scale = 0 pins w exactly)."""
    prior_cov = torch.diag(scale**2)
    cov_y = A @ prior_cov @ A.T + R
    gain = torch.linalg.solve(cov_y, A @ prior_cov).T
    log_z = torch.distributions.MultivariateNormal(A @ loc, cov_y).log_prob(y)
    return log_z, loc + gain @ (y - A @ loc), prior_cov - gain @ A @ prior_cov


def _likelihood_for(mu, cov, m, s):
    """A Gaussian likelihood (A = I) whose posterior under N(m, diag s²) is N(mu, cov)."""
    prec, prior_prec = torch.linalg.inv(cov), torch.diag(s**-2)
    noise = torch.linalg.inv(prec - prior_prec)
    assert bool((torch.linalg.eigvalsh(prec - prior_prec) > 0).all())
    return torch.eye(len(mu), **F64), noise, noise @ (prec @ mu - prior_prec @ m)


def _reference(A, R, y, m, s, m_red, s_red):
    """ΔF = ln Z̃ − ln Z, the posterior q under p, and the exact posterior under p̃."""
    log_z, mu, cov = _exact(A, R, y, m, s)
    log_z_red, mu_red, cov_red = _exact(A, R, y, m_red, s_red)
    return log_z_red - log_z, (mu, cov), (mu_red, cov_red)


# reduced priors on a block of 6 as (reduced_loc, reduced_scale) given m and s; unchanged
# elsewhere: point masses, shifts, shrinking, widening and mixtures
REDUCTIONS = {
    "spike at 0 on a set": lambda m, s: _reduce(
        m, s, {1: (0.0, 0.0), 3: (0.0, 0.0), 4: (0.0, 0.0)}
    ),
    "shifted spike": lambda m, s: _reduce(m, s, {2: (0.4, 0.0)}),
    "shrink": lambda m, s: _reduce(m, s, {0: (m[0], 0.2 * s[0]), 5: (m[5], 0.05 * s[5])}),
    "mixed": lambda m, s: _reduce(
        m, s, {1: (0.0, 0.0), 4: (0.1, 0.3 * s[4]), 0: (m[0], 1.5 * s[0]), 5: (m[5] + 0.4, s[5])}
    ),
    "all pinned": lambda m, s: (torch.zeros_like(m), torch.zeros_like(s)),
}


def _reduce(m, s, changes):
    m_red, s_red = m.clone(), s.clone()
    for k, (loc, scale) in changes.items():
        m_red[k], s_red[k] = loc, scale
    return m_red, s_red


def _regression(seed=0, n=6, obs=9):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(obs, n, generator=g, **F64)
    R = _spd(obs, g)
    y = torch.randn(obs, generator=g, **F64)
    m = 0.3 * torch.randn(n, generator=g, **F64)
    s = 0.5 + torch.rand(n, generator=g, **F64)
    return A, R, y, m, s


def _check_against(out_loc, out_cov, expected, s_red, m_red):
    mu_red, cov_red = expected
    assert torch.allclose(out_loc, mu_red, rtol=0, atol=1e-10)
    assert torch.allclose(out_cov, cov_red, rtol=0, atol=1e-10)
    pinned = s_red == 0
    assert torch.equal(out_loc[pinned], m_red[pinned])


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
@pytest.mark.parametrize("given", ["scale_tril", "precision"])
def test_mvn_matches_the_exact_evidence_and_posterior(reduction, given):
    A, R, y, m, s = _regression()
    m_red, s_red = REDUCTIONS[reduction](m, s)
    expected_df, (mu, cov), expected = _reference(A, R, y, m, s, m_red, s_red)
    matrix = torch.linalg.cholesky(cov) if given == "scale_tril" else torch.linalg.inv(cov)
    out = mvn_delta_f(mu, m, s, m_red, s_red, **{given: matrix})
    assert abs(out.delta_f.item() - expected_df.item()) < 1e-10
    assert torch.equal(out.scale_tril, out.scale_tril.tril())
    assert not out.scale_tril[s_red == 0].any() and not out.scale_tril[:, s_red == 0].any()
    _check_against(out.loc, out.scale_tril @ out.scale_tril.mT, expected, s_red, m_red)


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
def test_lowrank_matches_the_exact_evidence_and_posterior(reduction):
    g = torch.Generator().manual_seed(1)
    n, r = 6, 2
    W = 0.5 * torch.randn(n, r, generator=g, **F64)
    D = 0.1 + 0.3 * torch.rand(n, generator=g, **F64)
    mu = torch.randn(n, generator=g, **F64)
    m = 0.3 * torch.randn(n, generator=g, **F64)
    s = 2.0 + torch.rand(n, generator=g, **F64)
    A, R, y = _likelihood_for(mu, W @ W.T + torch.diag(D), m, s)
    m_red, s_red = REDUCTIONS[reduction](m, s)
    expected_df, (mu_q, cov_q), expected = _reference(A, R, y, m, s, m_red, s_red)
    assert torch.allclose(mu_q, mu, atol=1e-12) and torch.allclose(cov_q, W @ W.T + torch.diag(D))
    out = lowrank_delta_f(mu, W, D, m, s, m_red, s_red)
    assert abs(out.delta_f.item() - expected_df.item()) < 1e-10
    assert out.cov_factor.shape == (n, r) and out.cov_diag.shape == (n,)
    cov = out.cov_factor @ out.cov_factor.mT + torch.diag(out.cov_diag)
    _check_against(out.loc, cov, expected, s_red, m_red)


def _matrix_normal(seed=2, i=3, j=4):
    g = torch.Generator().manual_seed(seed)
    lu = 0.4 * torch.linalg.cholesky(_spd(i, g, 0.5))
    lv = 0.4 * torch.linalg.cholesky(_spd(j, g, 0.5))
    M = torch.randn(i, j, generator=g, **F64)
    m = 0.1 * torch.randn(i, j, generator=g, **F64)
    s = 3.0 + torch.rand(i, j, generator=g, **F64)
    return M, lu, lv, m, s


def _prune(m, s, rows=(), cols=(), at=0.0):
    m_red, s_red = m.clone(), s.clone()
    for r in rows:
        m_red[r], s_red[r] = at, 0.0
    for c in cols:
        m_red[:, c], s_red[:, c] = at, 0.0
    return m_red, s_red


@pytest.mark.parametrize(
    "rows, cols, at", [((1,), (), 0.0), ((), (0, 3), 0.0), ((0, 2), (1,), 0.3), ((), (), 0.0)]
)
def test_matrix_normal_keeps_the_kronecker_form_for_whole_rows_and_columns(rows, cols, at):
    M, lu, lv, m, s = _matrix_normal()
    cov = torch.kron(lu @ lu.T, lv @ lv.T)  # row-major flattening
    m_red, s_red = _prune(m, s, rows, cols, at)
    A, R, y = _likelihood_for(M.flatten(), cov, m.flatten(), s.flatten())
    expected_df, _, expected = _reference(
        A, R, y, m.flatten(), s.flatten(), m_red.flatten(), s_red.flatten()
    )
    out = matrix_normal_delta_f(M, lu, lv, m, s, m_red, s_red)
    assert out.scale_tril is None
    assert abs(out.delta_f.item() - expected_df.item()) < 1e-10
    for f in (out.row_scale_tril, out.col_scale_tril):
        assert torch.equal(f, f.tril())
    u, v = out.row_scale_tril @ out.row_scale_tril.mT, out.col_scale_tril @ out.col_scale_tril.mT
    _check_against(out.loc.flatten(), torch.kron(u, v), expected, s_red.flatten(), m_red.flatten())


@pytest.mark.parametrize("case", ["single elements", "changed variances"])
def test_matrix_normal_scores_a_non_kronecker_reduction_through_the_dense_covariance(case):
    M, lu, lv, m, s = _matrix_normal()
    m_red, s_red = m.clone(), s.clone()
    if case == "single elements":
        m_red[0, 1], s_red[0, 1], m_red[2, 3], s_red[2, 3] = 0.0, 0.0, 0.2, 0.0
    else:
        s_red = s * torch.linspace(0.1, 1.5, 12, **F64).reshape(3, 4)
    A, R, y = _likelihood_for(
        M.flatten(), torch.kron(lu @ lu.T, lv @ lv.T), m.flatten(), s.flatten()
    )
    expected_df, _, expected = _reference(
        A, R, y, m.flatten(), s.flatten(), m_red.flatten(), s_red.flatten()
    )
    out = matrix_normal_delta_f(M, lu, lv, m, s, m_red, s_red)
    assert out.row_scale_tril is None and out.col_scale_tril is None
    assert out.scale_tril.shape == (12, 12) and out.loc.shape == (3, 4)
    assert abs(out.delta_f.item() - expected_df.item()) < 1e-10
    cov = out.scale_tril @ out.scale_tril.mT
    _check_against(out.loc.flatten(), cov, expected, s_red.flatten(), m_red.flatten())


def test_matrix_normal_too_large_for_the_dense_covariance_raises():
    i, j = 33, 32
    assert i * j > MAX_DENSE_ELEMENTS
    lu, lv = torch.eye(i, **F64), torch.eye(j, **F64)
    M = torch.randn(i, j, **F64)
    s_red = torch.ones(i, j, **F64)
    s_red[3, 4] = 0.0
    with pytest.raises(ValueError, match="score its elements from their marginals"):
        matrix_normal_delta_f(M, lu, lv, 0.0, 1.0, 0.0, s_red)
    # whole rows of the same matrix keep the Kronecker form and are scored
    s_red = torch.ones(i, j, **F64)
    s_red[3] = 0.0
    out = matrix_normal_delta_f(M, lu, lv, 0.0, 1.0, 0.0, s_red)
    assert out.row_scale_tril.shape == (i, i) and torch.isfinite(out.delta_f)


def test_diagonal_covariance_agrees_with_mean_field():
    g = torch.Generator().manual_seed(3)
    n = 8
    mu = torch.randn(n, generator=g, **F64)
    sigma = 0.1 + torch.rand(n, generator=g, **F64)
    m, s = 0.2 * torch.randn(n, generator=g, **F64), 1 + torch.rand(n, generator=g, **F64)
    m_red = torch.tensor([0.0, 0.3, 0.0, -0.1, 0.0, 0.0, 0.5, 0.0], **F64)
    s_red = s * torch.tensor([0.0, 0.0, 0.3, 1.2, 1.0, 0.01, 0.7, 0.0], **F64)
    mf = delta_f(mu, sigma, m, s, m_red, s_red)
    dense = mvn_delta_f(mu, m, s, m_red, s_red, scale_tril=torch.diag(sigma))
    low = lowrank_delta_f(mu, torch.zeros(n, 1, **F64), sigma**2, m, s, m_red, s_red)
    for loc, scale, df in [
        (dense.loc, dense.scale_tril.diagonal(), dense.delta_f),
        (low.loc, low.cov_diag.sqrt(), low.delta_f),
    ]:
        assert torch.allclose(df, mf.delta_f.sum(), rtol=1e-12, atol=1e-12)
        assert torch.allclose(loc, mf.loc, rtol=1e-12, atol=1e-12)
        assert torch.allclose(scale, mf.scale, rtol=1e-12, atol=1e-12)
    off_diagonal = dense.scale_tril - torch.diag(dense.scale_tril.diagonal())
    assert off_diagonal.abs().max() < 1e-14


def test_a_point_mass_moves_the_survivors_means():
    g = torch.Generator().manual_seed(4)
    n = 7
    cov = _spd(n, g)
    mu = torch.randn(n, generator=g, **F64)
    pinned = torch.tensor([0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    s_red = torch.where(pinned, 0.0, 1.5).to(torch.float64)  # unchanged elsewhere
    k, p = ~pinned, pinned
    shift = cov[k][:, p] @ torch.linalg.solve(cov[p][:, p], mu[p])
    expected_cov = cov[k][:, k] - cov[k][:, p] @ torch.linalg.solve(cov[p][:, p], cov[p][:, k])
    assert shift.abs().max() > 0.1  # mean-field BMR would leave mu[k] as it is
    out = mvn_delta_f(mu, 0.0, 1.5, 0.0, s_red, scale_tril=torch.linalg.cholesky(cov))
    assert torch.allclose(out.loc[k], mu[k] - shift, atol=1e-12)
    assert torch.allclose((out.scale_tril @ out.scale_tril.mT)[k][:, k], expected_cov, atol=1e-12)
    w, d = torch.randn(n, 2, generator=g, **F64), 0.2 + torch.rand(n, generator=g, **F64)
    low_cov = w @ w.T + torch.diag(d)
    low_shift = low_cov[k][:, p] @ torch.linalg.solve(low_cov[p][:, p], mu[p])
    low = lowrank_delta_f(mu, w, d, 0.0, 1.5, 0.0, s_red)
    assert torch.allclose(low.loc[k], mu[k] - low_shift, atol=1e-12)


def test_no_reduction_scores_zero_and_keeps_the_posterior():
    M, lu, lv, m, s = _matrix_normal()
    mu, cov = M.flatten(), torch.kron(lu @ lu.T, lv @ lv.T)
    dense = mvn_delta_f(
        mu,
        m.flatten(),
        s.flatten(),
        m.flatten(),
        s.flatten(),
        scale_tril=torch.linalg.cholesky(cov),
    )
    assert dense.delta_f.item() == 0.0 and torch.allclose(dense.loc, mu, atol=1e-14)
    assert torch.allclose(dense.scale_tril @ dense.scale_tril.mT, cov, atol=1e-14)
    w, d = lu.repeat(4, 1), s.flatten()  # any low-rank-plus-diagonal covariance
    low = lowrank_delta_f(mu, w, d, m.flatten(), s.flatten(), m.flatten(), s.flatten())
    assert low.delta_f.item() == 0.0 and torch.allclose(low.loc, mu, atol=1e-14)
    low_cov = low.cov_factor @ low.cov_factor.mT + torch.diag(low.cov_diag)
    assert torch.allclose(low_cov, w @ w.T + torch.diag(d), atol=1e-14)
    mn = matrix_normal_delta_f(M, lu, lv, m, s, m, s)
    assert mn.delta_f.item() == 0.0 and torch.equal(mn.loc, M)
    assert torch.equal(mn.row_scale_tril, lu) and torch.equal(mn.col_scale_tril, lv)


def test_blocks_with_different_point_mass_sets_match_each_block_alone():
    g = torch.Generator().manual_seed(5)
    b, n, r = 4, 6, 2
    mu = torch.randn(b, n, generator=g, **F64)
    tril = torch.linalg.cholesky(torch.stack([_spd(n, g) for _ in range(b)]))
    w, d = torch.randn(b, n, r, generator=g, **F64), 0.2 + torch.rand(b, n, generator=g, **F64)
    s_red = torch.ones(b, n, **F64)
    s_red[0, [0, 3]] = 0.0
    s_red[1, 5] = 0.0
    s_red[2, [1, 2, 4]] = 0.3  # no point mass in this block
    s_red[3] = 0.0
    m_red = torch.linspace(-0.3, 0.3, n, **F64)  # per element, broadcast over blocks
    dense = mvn_delta_f(mu, 0.1, 1.0, m_red, s_red, scale_tril=tril)
    low = lowrank_delta_f(mu, w, d, 0.1, 1.0, m_red, s_red)
    assert dense.delta_f.shape == (b,) and low.delta_f.shape == (b,)
    for k in range(b):
        one = mvn_delta_f(mu[k], 0.1, 1.0, m_red, s_red[k], scale_tril=tril[k])
        torch.testing.assert_close(dense.delta_f[k], one.delta_f, rtol=0, atol=1e-12)
        torch.testing.assert_close(dense.loc[k], one.loc, rtol=0, atol=1e-12)
        torch.testing.assert_close(dense.scale_tril[k], one.scale_tril, rtol=0, atol=1e-12)
        one = lowrank_delta_f(mu[k], w[k], d[k], 0.1, 1.0, m_red, s_red[k])
        torch.testing.assert_close(low.delta_f[k], one.delta_f, rtol=0, atol=1e-12)
        torch.testing.assert_close(low.loc[k], one.loc, rtol=0, atol=1e-12)
        torch.testing.assert_close(low.cov_factor[k], one.cov_factor, rtol=0, atol=1e-12)


def test_matrix_normal_blocks_with_different_pruned_rows_and_columns_match_each_block():
    M, lu, lv, m, s = _matrix_normal()
    Ms = torch.stack([M, -M, 2 * M])
    s_red = s.expand(3, 3, 4).clone()
    m_red = m.expand(3, 3, 4).clone()
    s_red[0, 1], m_red[0, 1] = 0.0, 0.0
    s_red[1, :, [0, 2]], m_red[1, :, [0, 2]] = 0.0, 0.0
    out = matrix_normal_delta_f(Ms, lu, lv, m, s, m_red, s_red)  # shared factors broadcast
    assert out.delta_f.shape == (3,) and out.row_scale_tril.shape == (3, 3, 3)
    for k in range(3):
        one = matrix_normal_delta_f(Ms[k], lu, lv, m, s, m_red[k], s_red[k])
        for got, want in zip(out, one):
            if want is not None:
                torch.testing.assert_close(got[k], want, rtol=0, atol=1e-12)


def test_the_three_families_agree_on_the_same_covariance():
    g = torch.Generator().manual_seed(6)
    n, r = 12, 3
    w, d = torch.randn(n, r, generator=g, **F64), 0.1 + torch.rand(n, generator=g, **F64)
    mu = torch.randn(n, generator=g, **F64)
    s_red = torch.ones(n, **F64)
    s_red[[2, 7]], s_red[[4, 9]], s_red[11] = 0.0, 0.2, 1.05  # widening, still proper
    low = lowrank_delta_f(mu, w, d, 0.0, 1.0, 0.1, s_red)
    cov = w @ w.T + torch.diag(d)
    dense = mvn_delta_f(mu, 0.0, 1.0, 0.1, s_red, scale_tril=torch.linalg.cholesky(cov))
    torch.testing.assert_close(low.delta_f, dense.delta_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low.loc, dense.loc, rtol=1e-12, atol=1e-12)
    low_cov = low.cov_factor @ low.cov_factor.mT + torch.diag(low.cov_diag)
    torch.testing.assert_close(low_cov, dense.scale_tril @ dense.scale_tril.mT, rtol=0, atol=1e-12)

    M, lu, lv, m, s = _matrix_normal()
    m_red, s_red = _prune(m, s, rows=(2,), cols=(1,), at=0.2)
    mn = matrix_normal_delta_f(M, lu, lv, m, s, m_red, s_red)
    tril = torch.kron(lu, lv)  # lower triangular, a factor of kron(U, V)
    dense = mvn_delta_f(
        M.flatten(), m.flatten(), s.flatten(), m_red.flatten(), s_red.flatten(), scale_tril=tril
    )
    torch.testing.assert_close(mn.delta_f, dense.delta_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mn.loc.flatten(), dense.loc, rtol=0, atol=1e-12)
    kron = torch.kron(mn.row_scale_tril, mn.col_scale_tril)
    torch.testing.assert_close(
        kron @ kron.mT, dense.scale_tril @ dense.scale_tril.mT, rtol=0, atol=1e-12
    )


def _tiny_and_collinear():
    """float64 problems with posterior variances of 1e-8 (σ = 1e-4) next to variances of 1,
    correlation 1 − 1e-6 given through the Cholesky factor, and reduced variances of 1e-8."""
    scales = torch.tensor([1e-4, 1e-4, 1.0, 0.5, 1e-4, 2.0], **F64)
    corr = torch.linalg.cholesky(0.5 * torch.eye(6, **F64) + 0.5)
    rho = 1 - 1e-6
    collinear = torch.tensor([[1.0, 0, 0], [rho, (1 - rho**2) ** 0.5, 0], [0.3, 0.2, 0.5]], **F64)
    tiny = (scales[:, None] * corr, torch.tensor([1.0, 0.5, -1.0, 0.3, 2e-4, 1.0], **F64))
    near = (collinear, torch.tensor([1.0, 1.0005, 0.2], **F64))
    reductions = {
        "tiny": [
            [0, 1, 1, 1, 1, 1],
            [1, 1e-4, 1, 1, 1, 1],
            [1, 1, 1, 1e-4, 1, 1],
            [0, 1e-4, 0, 1e-4, 1, 1],
        ],
        "collinear": [[0, 1, 1], [0, 0.01, 1], [1e-4, 1, 0], [0, 0, 1], [1, 1.001, 1]],
    }
    for (tril, mu), name in [(tiny, "tiny"), (near, "collinear")]:
        for s_red in reductions[name]:
            yield tril, mu, torch.tensor(s_red, **F64)


def _close32(got, want, rtol):
    got = got.double()
    assert bool(torch.isfinite(got).all())
    scale = 1 + want.abs().max()
    assert (got - want).abs().max() <= rtol * scale, (got, want)


def _score(family, tril, mu, s_red):
    if family == "mvn":
        return mvn_delta_f(mu, 0.0, 1.0, 0.0, s_red, scale_tril=tril)
    # the factor's columns as a full-rank W, plus a small diagonal
    return lowrank_delta_f(mu, tril, (tril * tril).sum(-1) * 1e-3, 0.0, 1.0, 0.0, s_red)


@pytest.mark.parametrize("family, rtol", [("mvn", 1e-5), ("lowrank", 5e-5)])
def test_float32_tiny_variances_and_near_collinear_posteriors_stay_close_to_float64(family, rtol):
    for tril, mu, s_red in _tiny_and_collinear():
        want = _score(family, tril, mu, s_red)
        got = _score(family, tril.float(), mu.float(), s_red.float())
        assert got.delta_f.dtype == torch.float32
        _close32(got.delta_f, want.delta_f, rtol)
        _close32(got.loc, want.loc, rtol)


@pytest.mark.parametrize(
    "rows, cols, elements", [((0,), (), ()), ((), (1,), ()), ((2,), (0,), ()), ((), (), ((1, 2),))]
)
def test_matrix_normal_float32_stays_close_to_float64(rows, cols, elements):
    # row scales 1e-4 next to 0.5, and columns 0 and 1 correlated 1 − 1e-6
    rho = 1 - 1e-6
    lu = torch.tensor([[1e-4, 0, 0], [0.5e-4, 0.8e-4, 0], [0.3, 0.2, 0.5]], **F64)
    lv = torch.tensor(
        [[1.0, 0, 0, 0], [rho, (1 - rho**2) ** 0.5, 0, 0], [0.1, 0.2, 0.7, 0], [0, 0.3, 0.1, 0.6]],
        **F64,
    )
    M = torch.tensor([[1.0, 0.5, -0.2, 0.1], [0.3, 0.31, 0.2, -0.4], [0.2, 0.1, 0.0, 0.5]], **F64)
    _, s_red = _prune(torch.zeros(3, 4, **F64), torch.ones(3, 4, **F64), rows, cols)
    for e in elements:  # single elements: the dense path
        s_red[e] = 0.0
    want = matrix_normal_delta_f(M, lu, lv, 0.0, 1.0, 0.0, s_red)
    got = matrix_normal_delta_f(M.float(), lu.float(), lv.float(), 0.0, 1.0, 0.0, s_red.float())
    assert (got.scale_tril is None) == (not elements)
    _close32(got.delta_f, want.delta_f, 1e-5)
    _close32(got.loc, want.loc, 1e-5)


def test_improper_reduced_posterior_raises_naming_the_block():
    tril = torch.stack([torch.eye(3, **F64), 2 * torch.eye(3, **F64), torch.eye(3, **F64)])
    s_red = torch.ones(3, 3, **F64)
    s_red[1, 2] = 1e3  # 1/s² − 1/s̃² ≈ 1 > 1/σ² = 1/4 in block 1
    with pytest.raises(ValueError, match=r"not proper .* in block \(1,\)"):
        mvn_delta_f(torch.zeros(3, 3, **F64), 0.0, 1.0, 0.0, s_red, scale_tril=tril)
    with pytest.raises(ValueError, match=r"not proper .* in block \(1,\)"):
        lowrank_delta_f(
            torch.zeros(3, 3, **F64),
            tril[..., :1],
            (tril.diagonal(dim1=-2, dim2=-1)) ** 2,
            0.0,
            1.0,
            0.0,
            s_red,
        )
    # a wider reduced prior that the posterior allows is fine
    s_red[1, 2] = 1.1
    assert torch.isfinite(
        mvn_delta_f(torch.zeros(3, 3, **F64), 0.0, 1.0, 0.0, s_red, scale_tril=tril).delta_f
    ).all()


def test_lowrank_scales_linearly_in_the_number_of_elements():
    g = torch.Generator().manual_seed(7)
    n, r = 20000, 4  # a dense n×n covariance would need 3.2 GB
    mu = torch.randn(n, generator=g)
    w, d = 0.1 * torch.randn(n, r, generator=g), 0.01 + torch.rand(n, generator=g)
    s_red = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, 1.0)
    out = lowrank_delta_f(mu, w, d, 0.0, 1.0, 0.0, s_red)
    assert out.delta_f.shape == () and torch.isfinite(out.delta_f)
    assert out.loc.shape == (n,) and out.cov_factor.shape == (n, r) and out.cov_diag.shape == (n,)
    assert torch.isfinite(out.loc).all() and torch.isfinite(out.cov_factor).all()


_L = torch.eye(3, **F64)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0, scale_tril=torch.eye(4)),
            "scale_tril must have shape",
        ),
        (lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0), "exactly one of scale_tril and precision"),
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0, scale_tril=_L, precision=_L),
            "exactly one",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, -1.0, scale_tril=_L),
            "prior_scale must be finite and positive",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0, 0.0, -0.5, scale_tril=_L),
            "reduced_scale must be finite and non-negative",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(3), torch.zeros(2), 1.0, scale_tril=_L),
            "prior_loc of shape",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0, scale_tril=-_L),
            "scale_tril must have a finite, positive diagonal",
        ),
        (
            lambda: mvn_delta_f(
                torch.zeros(3), 0.0, 1.0, scale_tril=_L.T + torch.ones(3, 3).triu(1)
            ),
            "scale_tril must be lower triangular",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0, precision=-_L),
            "precision must be positive definite",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(3), 0.0, 1.0, precision=_L + torch.ones(3, 3).triu(1)),
            "precision must be symmetric",
        ),
        (
            lambda: mvn_delta_f(torch.zeros(2, 3), 0.0, 1.0, scale_tril=_L.expand(3, 3, 3)),
            "batch shapes",
        ),
        (
            lambda: lowrank_delta_f(torch.zeros(3), torch.zeros(4, 2), torch.ones(3), 0.0, 1.0),
            "cov_factor must have shape",
        ),
        (
            lambda: lowrank_delta_f(torch.zeros(3), torch.zeros(3, 2), -torch.ones(3), 0.0, 1.0),
            "cov_diag must be finite and positive",
        ),
        (
            lambda: matrix_normal_delta_f(torch.zeros(3, 4), torch.eye(4), torch.eye(4), 0.0, 1.0),
            "row_scale_tril must have shape",
        ),
        (
            lambda: matrix_normal_delta_f(
                torch.zeros(3, 4), torch.eye(3), torch.eye(4), 0.0, torch.zeros(3, 4)
            ),
            "prior_scale must be finite and positive",
        ),
        (
            lambda: matrix_normal_delta_f(torch.zeros(3), torch.eye(3), torch.eye(3), 0.0, 1.0),
            "loc must have 2 event dimension",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_dtype_and_device_follow_the_inputs():
    out = mvn_delta_f(torch.zeros(2, 3), 0.0, 1.0, scale_tril=torch.eye(3))
    assert out.delta_f.dtype == torch.float32 and out.delta_f.shape == (2,)
    assert out.scale_tril.shape == (2, 3, 3) and out.loc.device == torch.zeros(1).device
    out = lowrank_delta_f(torch.zeros(3, **F64), torch.zeros(3, 1), 1.0, 0.0, 1.0)
    assert out.delta_f.dtype == torch.float64 and out.cov_factor.dtype == torch.float64
