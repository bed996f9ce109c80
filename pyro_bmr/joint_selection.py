"""Joint decisions under a posterior with correlations: which set to prune, and its ΔF.

Under :math:`q(w) = \\mathcal N(\\mu, \\Sigma)` and a diagonal prior
:math:`\\mathcal N(m, \\operatorname{diag} s^2)`, the ΔF of pruning one element (a point mass at
:math:`\\tilde m`) depends on its marginal alone, and is exact. That of pruning a set :math:`S`
is the generalised Savage–Dickey ratio

.. math:: \\Delta F(S) = \\ln q_S(\\tilde m_S) - \\ln p_S(\\tilde m_S),

with :math:`q_S` the marginal of the set (:func:`~pyro_bmr.correlated_free_energy.mvn_delta_f`),
and it is not the sum of the elements' ΔF: pruning an element moves the others' means by
:math:`-\\Sigma_{KS}\\Sigma_{SS}^{-1}(\\mu_S - \\tilde m_S)`. Two collinear inputs may each be
worth pruning, but not both. By the chain rule of densities, one element :math:`c` more
changes ΔF by :math:`c`'s own ΔF under the posterior conditioned on :math:`w_S = \\tilde m_S`,

.. math::

    \\Delta F(S \\cup c) - \\Delta F(S) = \\ln s_c + \\tfrac12\\Bigl(\\frac{\\tilde m_c - m_c}{s_c}
    \\Bigr)^2 - \\tfrac12\\ln v_c - \\frac{(\\mu'_c - \\tilde m_c)^2}{2v_c},

where :math:`\\mu'_c = \\mu_c - \\Sigma_{cS}\\Sigma_{SS}^{-1}(\\mu_S - \\tilde m_S)` and
:math:`v_c = \\Sigma_{cc} - \\Sigma_{cS}\\Sigma_{SS}^{-1}\\Sigma_{Sc}`; the contribution of an
:math:`e \\in S`, given the rest of :math:`S`, is the same expression with, for
:math:`P = \\Sigma_{SS}^{-1}` and :math:`b = P(\\mu_S - \\tilde m_S)`, :math:`v_e = 1/P_{ee}` and
:math:`\\mu'_e - \\tilde m_e = b_e/P_{ee}`.

:func:`select_greedily` uses these to improve a rule's proposal, and :func:`reduce_jointly`
puts together what a reduction needs: the set, its joint ΔF and the reduced posterior.
"""

import math
from typing import NamedTuple

import torch

from pyro_bmr.correlated_posteriors import JointGaussian

__all__ = ["JointReduction", "reduce_jointly", "select_greedily", "set_delta_f"]

#: Below this fraction of its marginal variance, an element's variance given the set is
#: taken as zero: the set determines it, and the greedy pass does not add it.
DETERMINED = 1e-9


def set_delta_f(
    joint: JointGaussian,
    pruned: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    reduced_loc: torch.Tensor,
) -> torch.Tensor:
    """ΔF of pruning the set ``pruned`` together (point masses at ``reduced_loc``), from its
    marginal :math:`q_S`: :math:`O(n|S|^2)` for a ``scale_tril``, :math:`O(|S|r^2)` low rank.

    :param joint: the posterior.
    :param pruned: bool, shape ``(n,)``.
    :param prior_loc: :math:`m`, shape ``(n,)``; likewise ``prior_scale`` and ``reduced_loc``.
    :returns: ΔF, a 0-dim tensor (0 for the empty set).
    """
    if not bool(pruned.any()):
        return torch.zeros((), dtype=joint.loc.dtype, device=joint.loc.device)
    marginal = joint.restrict(pruned)
    zero = torch.zeros_like(marginal.loc)
    df, _ = marginal.reduce(prior_loc[pruned], prior_scale[pruned], reduced_loc[pruned], zero)
    return df


def select_greedily(
    joint: JointGaussian,
    proposal: torch.Tensor,
    candidates: torch.Tensor,
    delta_f: torch.Tensor,
    threshold: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    reduced_loc: torch.Tensor,
) -> torch.Tensor:
    """A set to prune together, found greedily from a rule's element-wise proposal.

    Two passes, each visiting elements in the order of their own (marginal) ΔF:

    1. *drop*, weakest first: an element of the proposal leaves the set where its
       contribution given the rest of the set is at most its threshold :math:`\\tau`;
    2. *add*, strongest first: every other element joins where its ΔF given the set
       exceeds :math:`\\tau`.

    Where the posterior is diagonal, the contributions are the elements' own ΔF, and the
    set is the proposal of a threshold rule. With :math:`\\tau = 0` (the default
    :class:`~pyro_bmr.ThresholdRule`) every step raises the joint ΔF, so the set's joint ΔF
    is at least the proposal's. It is a local search: not the best of the :math:`2^n` sets.

    Cost: the dense covariance of the elements considered, :math:`n \\times n` in float64 on
    the CPU (:math:`O(n^2)` memory), a Cholesky factorisation of the proposal's block, and
    :math:`O(n^2)` per element added: :math:`O(n^3)` in all, for up to a few thousand
    elements.

    :param joint: the posterior, shape ``(n,)``.
    :param proposal: bool, shape ``(n,)``: the rule's set.
    :param candidates: bool, shape ``(n,)``: the elements that may join.
    :param delta_f: the elements' own ΔF, shape ``(n,)`` (their order of visit).
    :param threshold: :math:`\\tau` per element, shape ``(n,)``.
    :param prior_loc: :math:`m`, shape ``(n,)``; likewise ``prior_scale`` and ``reduced_loc``.
    :returns: bool, shape ``(n,)``: the set.
    """
    consider = proposal | candidates
    chosen = proposal.clone()
    index = consider.nonzero().squeeze(-1)
    if not index.numel():
        return chosen
    f64 = dict(dtype=torch.float64, device="cpu")
    sub = joint.restrict(consider)

    def take(x: torch.Tensor) -> torch.Tensor:
        return x[index].to(**f64)

    cov = sub.covariance().to(**f64)
    gap = sub.loc.to(**f64) - take(reduced_loc)  # μ − m̃
    z = (take(reduced_loc) - take(prior_loc)) / take(prior_scale)
    prior_term = take(prior_scale).log() + 0.5 * z * z
    key, tau = take(delta_f), take(threshold)
    picked = _drop(cov, gap, prior_term, key, tau, proposal[index].cpu())
    picked = _add(cov, gap, prior_term, key, tau, picked)
    chosen[index] = picked.to(chosen.device)
    return chosen


def _drop(cov, gap, prior_term, key, tau, picked) -> torch.Tensor:
    """Pass 1 of :func:`select_greedily`, on the precision of the set, downdated in place."""
    members = picked.nonzero().squeeze(-1)
    if not members.numel():
        return picked
    prec = torch.cholesky_inverse(torch.linalg.cholesky(cov[members][:, members]))
    b = prec @ gap[members]
    for j in torch.argsort(key[members]).tolist():
        p, bj, e = float(prec[j, j]), float(b[j]), int(members[j])
        if float(prior_term[e]) + 0.5 * math.log(p) - 0.5 * bj * bj / p <= float(tau[e]):
            picked[e] = False
            col = prec[:, j].clone()
            b.sub_(col, alpha=bj / p)
            prec.addr_(col, col, alpha=-1 / p)  # the set without e: row and column j vanish
    return picked


def _add(cov, gap, prior_term, key, tau, picked) -> torch.Tensor:
    """Pass 2 of :func:`select_greedily`, on the posterior conditioned on the set."""
    members = picked.nonzero().squeeze(-1)
    cond, dev = cov.clone(), gap.clone()  # covariance and μ' − m̃ given w_set = m̃_set
    if members.numel():
        chol = torch.linalg.cholesky(cov[members][:, members])
        g = torch.linalg.solve_triangular(chol, cov[members], upper=False)
        y = torch.linalg.solve_triangular(chol, gap[members].unsqueeze(-1), upper=False)
        cond.sub_(g.mT @ g)
        dev.sub_((g.mT @ y).squeeze(-1))
    for i in torch.argsort(key, descending=True).tolist():
        v, d = float(cond[i, i]), float(dev[i])
        if picked[i] or not v > DETERMINED * float(cov[i, i]):
            continue
        if float(prior_term[i]) - 0.5 * math.log(v) - 0.5 * d * d / v > float(tau[i]):
            picked[i] = True
            col = cond[:, i].clone()
            dev.sub_(col, alpha=d / v)
            cond.addr_(col, col, alpha=-1 / v)
    return picked


class JointReduction(NamedTuple):
    """What :func:`reduce_jointly` decided.

    :ivar torch.Tensor pruned: bool, shape ``(n,)``: the elements pruned now.
    :ivar torch.Tensor delta_f: their joint ΔF (0-dim).
    :ivar kept: bool, shape ``(n,)``: the elements kept after the reduction, where
        ``posterior`` is to be written; ``None`` without an update.
    :ivar posterior: the reduced posterior of the ``kept`` elements, or ``None``.
    """

    pruned: torch.Tensor
    delta_f: torch.Tensor
    kept: torch.Tensor | None = None
    posterior: JointGaussian | None = None


def reduce_jointly(
    joint: JointGaussian,
    *,
    kept: torch.Tensor,
    proposal: torch.Tensor,
    candidates: torch.Tensor,
    delta_f: torch.Tensor,
    threshold: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    reduced_loc: torch.Tensor,
    soft: torch.Tensor | None = None,
    reduced_scale: float = 0.0,
    greedy: bool = False,
    update: bool = False,
    soft_loc: torch.Tensor | None = None,
) -> JointReduction:
    """One reduction of a posterior with correlations, all vectors of shape ``(n,)``.

    The set pruned now is the ``proposal``, or with ``greedy`` what
    :func:`select_greedily` makes of it; its joint ΔF is :func:`set_delta_f`. With
    ``update``, the reduced posterior of the current model (the marginal of the ``kept``
    elements) under point masses on that set, and :math:`\\mathcal N(\\tilde m, \\tilde s^2)`
    with :math:`\\tilde s` = ``reduced_scale`` on the ``soft`` elements if it is positive,
    centred at ``soft_loc``.

    :param joint: the posterior.
    :param kept: bool: the elements kept before this reduction.
    :param proposal: bool: the rule's set, within ``kept``.
    :param candidates: bool: the other elements the greedy pass may add, within ``kept``.
    :param delta_f: the elements' own ΔF.
    :param threshold: the rule's :math:`\\tau` per element.
    :param prior_loc: the full prior's :math:`m` (0 where the prior is not Gaussian);
        likewise ``prior_scale`` (1 there) and ``reduced_loc`` (:math:`m` there).
    :param soft: bool: where the soft reduced prior applies in the update.
    :param reduced_scale: :math:`\\tilde s` of the soft reduced prior (0: none).
    :param greedy: select the set by :func:`select_greedily`.
    :param update: compute the reduced posterior.
    :param soft_loc: :math:`\\tilde m` of the soft reduced prior on the soft survivors
        (default ``reduced_loc``): the point masses of a handler that prunes to 0 are at
        0 while its soft prior may be centred elsewhere.
    :returns: :class:`JointReduction`.
    """
    pruned = proposal
    if greedy:
        priors = (prior_loc, prior_scale, reduced_loc)
        pruned = select_greedily(joint, proposal, candidates, delta_f, threshold, *priors)
    df = set_delta_f(joint, pruned, prior_loc, prior_scale, reduced_loc)
    if not update:
        return JointReduction(pruned, df)
    after = kept & ~pruned
    if not bool(after.any()):
        return JointReduction(pruned, df, after, joint.restrict(after))
    point = pruned[kept]
    m, s = prior_loc[kept], prior_scale[kept]
    m_red, s_red = torch.where(point, reduced_loc[kept], m), torch.where(point, 0.0, s)
    if soft is not None and reduced_scale > 0:
        shrink = soft[kept] & ~point
        centre = reduced_loc if soft_loc is None else soft_loc.expand_as(reduced_loc)
        m_red = torch.where(shrink, centre[kept], m_red)
        s_red = torch.where(shrink, reduced_scale, s_red)
    _, posterior = joint.restrict(kept).reduce(m, s, m_red, s_red)
    return JointReduction(pruned, df, after, posterior.restrict(~point))
