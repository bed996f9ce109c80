"""Pruning rules: which elements to prune, given their ΔF.

Each rule is a small class with one decision method, :meth:`PruningRule.keep`,
called once per site (in the spirit of ``torch.nn.utils.prune``'s
``compute_mask``). Rules only read ΔF and the current mask; they never touch the
model, the guide or the host (no ``.item()``), so a reduction stays on the device.
"""

from abc import ABC, abstractmethod
from typing import Optional

import torch

from pyro_bmr import _kernels

__all__ = ["PruningRule", "ThresholdRule", "SpikeAndSlabRule"]


class PruningRule(ABC):
    """Decides, per site, which elements survive a reduction."""

    @abstractmethod
    def keep(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Elements to keep.

        :param torch.Tensor delta_f: ΔF of pruning each element of one site (positive
            where the reduced model has more evidence).
        :param torch.BoolTensor mask: current mask of the site (True = kept); elements
            already pruned stay pruned whatever is returned.
        :returns: a bool tensor of the shape of ``delta_f``, True = keep.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    # Rules that keep exactly the elements with ΔF ≤ τ, one τ per site, say so through
    # these hooks, and the handler then fuses the comparison and its counts into the
    # pass that computes ΔF. A subclass that overrides ``keep`` is asked nothing.

    def _static_threshold(self) -> Optional[float]:
        """τ for every site, known before ΔF is; ``None`` if there is none."""
        return None

    def _site_threshold(
        self, delta_f: torch.Tensor, mask: Optional[torch.Tensor], work: Optional[int] = None
    ) -> Optional[torch.Tensor]:
        """τ (0-dim) for one site from its ΔF and its current mask as 0/1 floats
        (``None``: nothing pruned yet); ``None`` if the rule is not a threshold.
        ``work`` is the size of the whole reduction (see :mod:`pyro_bmr._kernels`)."""
        return None


class ThresholdRule(PruningRule):
    """Prune where :math:`\\Delta F > \\tau`.

    :param float threshold: :math:`\\tau`; 0 (the default) prunes wherever the reduced
        model has more evidence than the full one.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        threshold = float(threshold)
        if threshold != threshold:
            raise ValueError("ThresholdRule: threshold must not be NaN")
        self.threshold = threshold

    def keep(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return delta_f <= self.threshold

    def _static_threshold(self) -> Optional[float]:
        return self.threshold if type(self).keep is ThresholdRule.keep else None


class SpikeAndSlabRule(PruningRule):
    """The spike-and-slab rule of Marković, Friston & Kiebel (2024).

    Each element of a site is kept with an unknown probability :math:`\\rho` that
    has a :math:`\\mathrm{Beta}(\\alpha_0, \\beta_0)` prior shared by the site.
    With :math:`\\zeta = \\psi(\\alpha) - \\psi(\\beta)` the prior log-odds of
    keeping, the posterior keep probability of an element is
    :math:`q = \\sigma(\\zeta - \\Delta F)`; iterating

    .. math::

        \\alpha = \\alpha_0 + \\textstyle\\sum q, \\quad
        \\beta = \\beta_0 + \\textstyle\\sum (1 - q), \\quad
        \\zeta = \\psi(\\alpha) - \\psi(\\beta)

    learns the site's sparsity, and an element is kept where
    :math:`\\Delta F \\le \\zeta`. Elements already pruned enter the sums with
    :math:`q = 0`.

    :param float alpha0: prior pseudo-count of kept elements.
    :param float beta0: prior pseudo-count of pruned elements.
    :param int num_iterations: fixed-point iterations.
    """

    def __init__(self, alpha0: float = 1.0, beta0: float = 1.0, num_iterations: int = 10) -> None:
        for name, value in (("alpha0", alpha0), ("beta0", beta0)):
            if not value > 0:
                raise ValueError(f"SpikeAndSlabRule: {name} must be positive, got {value}")
        if int(num_iterations) < 1:
            raise ValueError(f"SpikeAndSlabRule: num_iterations must be >= 1, got {num_iterations}")
        self.alpha0 = float(alpha0)
        self.beta0 = float(beta0)
        self.num_iterations = int(num_iterations)

    def log_odds(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The learned prior log-odds :math:`\\zeta` of keeping an element (a 0-dim tensor)."""
        return self._log_odds(
            delta_f, _kernels.float_mask(mask.expand(delta_f.shape), delta_f.dtype)
        )

    def _log_odds(
        self, delta_f: torch.Tensor, mask: Optional[torch.Tensor], work: Optional[int] = None
    ) -> torch.Tensor:
        full = dict(dtype=delta_f.dtype, device=delta_f.device)  # no host-to-device copies
        alpha0 = torch.full((), self.alpha0, **full)
        beta0 = torch.full((), self.beta0, **full)
        zeta = torch.digamma(alpha0) - torch.digamma(beta0)
        n = torch.full((), delta_f.numel(), **full)
        # the mask is 0/1 floats: a product, not a select (no branch per element)
        exp_df = torch.exp(delta_f.reshape(-1))
        for _ in range(self.num_iterations):
            kept = _kernels.keep_probability_sum(zeta, exp_df, mask, work)
            zeta = torch.digamma(alpha0 + kept) - torch.digamma(beta0 + n - kept)
        return zeta

    def keep(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return delta_f <= self.log_odds(delta_f, mask)

    def _site_threshold(
        self, delta_f: torch.Tensor, mask: Optional[torch.Tensor], work: Optional[int] = None
    ) -> Optional[torch.Tensor]:
        cls = type(self)
        if cls.keep is not SpikeAndSlabRule.keep or cls.log_odds is not SpikeAndSlabRule.log_odds:
            return None
        return self._log_odds(delta_f, mask, work)
