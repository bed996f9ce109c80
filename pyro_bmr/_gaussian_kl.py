"""Closed-form KL divergence of a mean-field Gaussian from a Gaussian prior.

For :math:`q = \\mathcal N(\\mu, \\sigma^2)` and :math:`p = \\mathcal N(m, s^2)`, elementwise,

.. math::

    \\mathrm{KL}(q\\,\\|\\,p) = \\ln\\frac{s}{\\sigma} + \\frac{\\sigma^2 + (\\mu - m)^2}{2 s^2}
      - \\frac12,

summed over the elements kept in both (a pruned element is a point mass at zero in
guide and prior alike and contributes nothing; one kept in only one of them makes
the KL infinite). :func:`kl_sum` evaluates it for a prior with one loc and one
scale, the common case of a Bayesian network, with a hand-written backward pass;
:func:`kl_elementwise` for any prior. Used by :mod:`pyro_bmr.local_reparam`.
"""

import torch

from pyro_bmr._masks import float_mask

__all__ = ["kl_elementwise", "kl_sum", "mask_and_count", "shared_masks"]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two masks are views of the same memory (BMR hands the model and the
    guide the same mask tensor)."""
    return a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


def shared_masks(
    keep_q: torch.Tensor | None, keep_p: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(kept, mixed)``: elements kept by both guide and prior, and elements kept
    by only one of them (infinite KL); ``None`` stands for all and none."""
    if keep_q is None and keep_p is None:
        return None, None
    if keep_q is not None and keep_p is not None and _same(keep_q, keep_p):
        return keep_q, None
    keep_q = keep_q if keep_q is not None else torch.ones_like(keep_p)
    keep_p = keep_p if keep_p is not None else torch.ones_like(keep_q)
    return keep_q & keep_p, keep_q ^ keep_p


def mask_and_count(keep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool mask as 0/1 floats, and its number of ones."""
    mask = float_mask(keep, dtype)
    return mask, mask.sum()


def kl_sum(
    loc: torch.Tensor,
    scale: torch.Tensor,
    var: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_kept: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The KL summed over the kept elements, for a prior with one loc and one scale.

    :param loc: :math:`\\mu`.
    :param scale: :math:`\\sigma`.
    :param var: :math:`\\kappa\\sigma^2`, the variance times the mask (passed in so
        that it can be shared with whoever else needs it).
    :param prior_loc: :math:`m`, one element.
    :param prior_scale: :math:`s`, one element.
    :param mask: :math:`\\kappa`, 0/1 in the dtype of ``loc``; ``None`` keeps all.
    :param num_kept: the number of ones in ``mask`` (default: all elements).
    :returns: a 0-dim tensor.
    """
    n = loc.numel() if num_kept is None else num_kept
    m, s = prior_loc, prior_scale
    if m.requires_grad or s.requires_grad:
        d = loc - m if mask is None else (loc - m) * mask
        log_sigma = scale.log() if mask is None else scale.log() * mask
        quad = var.sum() + d.square().sum()
        kl = quad / (2 * s.square()) - log_sigma.sum() + n * (s.log() - 0.5)
    else:
        kl = _ScalarPriorKL.apply(loc, scale, var, m, s, mask, n)
    return kl.reshape(())


def kl_elementwise(
    loc: torch.Tensor,
    scale: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    keep: torch.Tensor | None = None,
    mixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The KL of every element (zero where not ``keep``, infinite where ``mixed``)."""
    m, s = prior_loc, prior_scale
    kl = (scale.square() + (loc - m).square()) / (2 * s.square()) - scale.log()
    kl = kl + (s.log() - 0.5)
    if keep is not None:
        kl = torch.where(keep, kl, torch.zeros_like(kl))
    if mixed is not None:
        kl = torch.where(mixed, torch.full_like(kl, float("inf")), kl)
    return kl


class _ScalarPriorKL(torch.autograd.Function):
    """:math:`\\sum_i \\kappa_i\\bigl[(v_i + (\\mu_i - m)^2) / 2s^2 - \\ln\\sigma_i\\bigr]
    + n(\\ln s - \\tfrac12)` with :math:`v = \\kappa\\sigma^2` the masked variance
    (shared with the layers) and :math:`\\kappa` the 0/1 mask, for a fixed prior
    :math:`\\mathcal N(m, s^2)`; forward and backward written out, so that they cost a
    few passes over the weights instead of the dozen of the composed operations."""

    @staticmethod
    def forward(ctx, mu, sigma, var, m, s, mask, n):
        d = mu - m
        log_sigma = sigma.log()
        if mask is not None:
            d.mul_(mask)
            log_sigma.mul_(mask)
        inv_s2 = s.square().reciprocal()
        flat = d.reshape(-1)
        quad = var.sum() + torch.dot(flat, flat)
        ctx.save_for_backward(d, sigma, var, inv_s2, mask)
        return 0.5 * inv_s2 * quad - log_sigma.sum() + n * (s.log() - 0.5)

    @staticmethod
    def backward(ctx, grad):
        d, sigma, var, inv_s2, mask = ctx.saved_tensors
        scale = (grad * inv_s2).reshape(())
        grad_mu = d * scale
        grad_sigma = -grad.reshape(()) / sigma  # d/dσ of -ln σ; the σ² part flows via var
        if mask is not None:
            grad_sigma.mul_(mask)
        grad_var = (0.5 * scale).expand_as(var)
        return grad_mu, grad_sigma, grad_var, None, None, None, None
