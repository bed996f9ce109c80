"""pyro_bmr.joint_selection, against a slow reference that scores every set it visits
with mvn_delta_f, against brute force over all sets, and against Gaussian conditioning."""

import itertools

import pytest
import torch

from pyro_bmr.correlated_free_energy import mvn_delta_f
from pyro_bmr.correlated_posteriors import JointGaussian
from pyro_bmr.free_energy import delta_f
from pyro_bmr.joint_selection import reduce_jointly, select_greedily, set_delta_f

F64 = dict(dtype=torch.float64)
N = 6


def problem(seed):
    """A posterior with strong correlations (a rank-2 part), its elements' ΔF and priors."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, N, generator=g, **F64)
    b = torch.randn(N, 2, generator=g, **F64)
    tril = torch.linalg.cholesky(0.05 * a @ a.T / N + 0.3 * b @ b.T)
    loc = 0.4 * torch.randn(N, generator=g, **F64)
    m, s = 0.1 * torch.randn(N, generator=g, **F64), 1 + torch.rand(N, generator=g, **F64)
    joint = JointGaussian(loc, scale_tril=tril)
    df = delta_f(loc, joint.marginal_scale(), m, s).delta_f
    return joint, df, m, s, torch.zeros(N, **F64)


def score(joint, pruned, m, s, m_red):
    """ΔF of a set from mvn_delta_f on the whole vector, the others unchanged."""
    scale = torch.where(pruned, 0.0, s)
    return float(
        mvn_delta_f(
            joint.loc, m, s, torch.where(pruned, m_red, m), scale, scale_tril=joint.scale_tril
        ).delta_f
    )


def reference(joint, proposal, df, tau, m, s, m_red):
    """select_greedily, written with a full ΔF per set visited."""
    chosen = proposal.clone()
    for e in sorted(proposal.nonzero().flatten().tolist(), key=lambda i: float(df[i])):
        without = chosen.clone()
        without[e] = False
        if score(joint, chosen, m, s, m_red) - score(joint, without, m, s, m_red) <= tau[e]:
            chosen = without
    for c in sorted(range(N), key=lambda i: -float(df[i])):
        if chosen[c]:
            continue
        more = chosen.clone()
        more[c] = True
        if score(joint, more, m, s, m_red) - score(joint, chosen, m, s, m_red) > tau[c]:
            chosen = more
    return chosen


def test_the_greedy_passes_are_those_of_the_joint_delta_f():
    changed = {"dropped": 0, "added": 0}
    for seed in range(20):
        joint, df, m, s, m_red = problem(seed)
        tau = 0.3 * torch.randn(N, generator=torch.Generator().manual_seed(seed), **F64)
        proposal = df > tau
        everyone = torch.ones(N, dtype=torch.bool)
        chosen = select_greedily(joint, proposal, everyone, df, tau, m, s, m_red)
        assert torch.equal(chosen, reference(joint, proposal, df, tau, m, s, m_red))
        changed["dropped"] += bool((proposal & ~chosen).any())
        changed["added"] += bool((chosen & ~proposal).any())
    assert changed["dropped"] >= 3 and changed["added"] >= 3


def test_greedy_with_threshold_zero_never_loses_evidence():
    for seed in range(20):
        joint, df, m, s, m_red = problem(seed)
        proposal, zero = df > 0, torch.zeros(N, **F64)
        chosen = select_greedily(joint, proposal, ~proposal, df, zero, m, s, m_red)
        gained = float(set_delta_f(joint, chosen, m, s, m_red))
        assert gained >= float(set_delta_f(joint, proposal, m, s, m_red)) - 1e-12
        best = max(
            score(joint, torch.tensor(bits, dtype=torch.bool), m, s, m_red)
            for bits in itertools.product([False, True], repeat=N)
        )
        assert gained <= best + 1e-9


def test_greedy_on_a_diagonal_posterior_is_the_threshold_rule():
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(40, generator=g, **F64), 0.05 + torch.rand(40, generator=g, **F64)
    joint = JointGaussian(loc, scale_tril=torch.diag(scale))
    zero, one = torch.zeros(40, **F64), torch.ones(40, **F64)
    df = delta_f(loc, scale, 0.0, 1.0).delta_f
    for tau in (-0.5, 0.0, 1.0):
        proposal = df > tau
        chosen = select_greedily(joint, proposal, ~proposal, df, zero + tau, zero, one, zero)
        assert 0 < int(proposal.sum()) < 40 and torch.equal(chosen, proposal)


def test_set_delta_f_is_the_same_in_both_forms():
    joint, _, m, s, m_red = problem(0)
    cov = joint.covariance()
    diag = torch.full((N,), 0.5 * float(torch.linalg.eigvalsh(cov)[0]), **F64)
    factor = torch.linalg.cholesky(cov - torch.diag(diag))
    low_rank = JointGaussian(joint.loc, cov_factor=factor, cov_diag=diag)
    pruned = torch.tensor([True, False, True, True, False, False])
    expected = score(joint, pruned, m, s, m_red)
    assert float(set_delta_f(joint, pruned, m, s, m_red)) == pytest.approx(expected, rel=1e-10)
    assert float(set_delta_f(low_rank, pruned, m, s, m_red)) == pytest.approx(expected, rel=1e-10)
    assert float(set_delta_f(joint, torch.zeros(N, dtype=torch.bool), m, s, m_red)) == 0.0


@pytest.mark.parametrize("soft_scale", [0.0, 0.3])
def test_the_update_conditions_the_current_model(soft_scale):
    joint, df, m, s, m_red = problem(1)
    kept = torch.tensor([False, True, True, True, True, True])  # element 0 pruned before
    proposal = torch.tensor([False, False, True, False, False, True])
    soft = torch.tensor([False, True, True, False, True, True])  # element 3: not reduced
    out = reduce_jointly(
        joint,
        kept=kept,
        proposal=proposal,
        candidates=kept & ~proposal,
        delta_f=df,
        threshold=torch.zeros(N, **F64),
        prior_loc=m,
        prior_scale=s,
        reduced_loc=m_red,
        soft=soft,
        reduced_scale=soft_scale,
        update=True,
    )
    assert torch.equal(out.pruned, proposal) and torch.equal(out.kept, kept & ~proposal)
    # textbook: the marginal of the kept, conditioned on the point masses, then the soft
    # prior's precision added on the soft survivors
    mu, cov = joint.loc[kept], joint.covariance()[kept][:, kept]
    point, rest = proposal[kept], (kept & ~proposal)[kept]
    gain = cov[rest][:, point] @ torch.linalg.inv(cov[point][:, point])
    mu_c = mu[rest] - gain @ (mu[point] - m_red[kept][point])
    cov_c = cov[rest][:, rest] - gain @ cov[point][:, rest]
    if soft_scale:
        on = soft[kept][rest]
        m_r, s_r = m[kept][rest], s[kept][rest]
        extra = torch.where(on, soft_scale**-2 - s_r**-2, 0.0)
        shift = torch.where(on, m_red[kept][rest] / soft_scale**2 - m_r / s_r**2, 0.0)
        prec = torch.linalg.inv(cov_c) + torch.diag(extra)
        cov_c = torch.linalg.inv(prec)
        mu_c = cov_c @ (
            torch.linalg.solve(cov[rest][:, rest] - gain @ cov[point][:, rest], mu_c) + shift
        )
    torch.testing.assert_close(out.posterior.loc, mu_c)
    torch.testing.assert_close(out.posterior.covariance(), cov_c)
    assert float(out.delta_f) == pytest.approx(score(joint, proposal, m, s, m_red), rel=1e-10)
