"""Pruning rules: which elements to prune, given their ΔF.

Each rule is a small class with one decision method, :meth:`PruningRule.keep`,
called once per site (in the spirit of ``torch.nn.utils.prune``'s
``compute_mask``). Rules only read ΔF and the current mask; they never touch the
model, the guide or the host (no ``.item()``), so a reduction stays on the device.
"""

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable

import torch

from pyro_bmr._masks import float_mask

__all__ = ["PruningRule", "ThresholdRule", "SpikeAndSlabRule"]


class PruningRule(ABC):
    """Decides, per site, which elements survive a reduction.

    A rule has one decision method, :meth:`keep`. A rule that keeps exactly the
    elements whose ΔF is at most a threshold τ may also say what τ is, through one
    of two optional methods; the reduction then compares ΔF with τ in the pass that
    computes ΔF instead of calling :meth:`keep`:

    * :meth:`fixed_threshold`: one τ for every site, known before any ΔF;
    * :meth:`site_threshold`: τ computed from a site's ΔF.

    Whoever overrides :meth:`keep` must keep these in agreement with it, or return
    ``None`` from them (the default), which makes the reduction call :meth:`keep`.

    Two options say which sites the rule looks at together and which it leaves alone:

    :param exclude: sites never pruned (they are still scored): site names, or a
        predicate ``name -> bool``. The paper never prunes its output layer.
    :param groups: site name → group key; the sites of one group share one
        :meth:`site_threshold`, computed from their ΔF together (the paper's
        spike-and-slab rule learns one sparsity per layer, its weight and bias
        together). ``None`` (default): each site on its own.
    """

    def __init__(
        self,
        *,
        exclude: Iterable[str] | Callable[[str], bool] | None = None,
        groups: Callable[[str], Hashable] | None = None,
    ) -> None:
        if exclude is not None and not callable(exclude):
            exclude = frozenset(exclude)
        if groups is not None and not callable(groups):
            raise TypeError(f"groups must map a site name to a group key, got {groups!r}")
        self.exclude = exclude
        self.groups = groups

    def prunes(self, site: str) -> bool:
        """Whether the rule may prune site ``site`` at all (see ``exclude``)."""
        exclude = getattr(self, "exclude", None)
        if exclude is None:
            return True
        return not (exclude(site) if callable(exclude) else site in exclude)

    def excluding(self, sites: Iterable[str]) -> "PruningRule":
        """A copy of the rule that also leaves ``sites`` alone."""
        more, rule = frozenset(sites), copy.copy(self)
        if more:
            rule.exclude = lambda site: site in more or not self.prunes(site)
        return rule

    def group(self, site: str) -> Hashable:
        """The group whose sites share one :meth:`site_threshold` (see ``groups``)."""
        groups = getattr(self, "groups", None)
        return ("site", site) if groups is None else ("group", groups(site))

    @abstractmethod
    def keep(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Elements to keep.

        :param torch.Tensor delta_f: ΔF of pruning each element of one site (positive
            where the reduced model has more evidence).
        :param torch.BoolTensor mask: current mask of the site (True = kept); elements
            already pruned stay pruned whatever is returned.
        :returns: a bool tensor of the shape of ``delta_f``, True = keep.
        """

    def fixed_threshold(self) -> float | None:
        """Optional: τ such that :meth:`keep` is ``delta_f <= τ`` at every site.

        :returns: τ, or ``None`` (the default) where the rule is not such a threshold.
        """
        return None

    def site_threshold(
        self, delta_f: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Optional: τ such that :meth:`keep` is ``delta_f <= τ`` at this site.

        :param torch.Tensor delta_f: the site's ΔF, flat and finite.
        :param mask: the site's current mask as 0/1 in ΔF's dtype, flat; ``None``
            where nothing is pruned yet.
        :returns: τ as a 0-dim tensor on ΔF's device, computed without reading it
            on the host; or ``None`` (the default).
        """
        return None

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if not (k in ("exclude", "groups") and v is None)
        )
        return f"{type(self).__name__}({args})"


class ThresholdRule(PruningRule):
    """Prune where :math:`\\Delta F > \\tau`.

    :param float threshold: :math:`\\tau`; 0 (the default) prunes wherever the reduced
        model has more evidence than the full one.
    :param exclude: see :class:`PruningRule`.
    :param groups: see :class:`PruningRule`.
    """

    def __init__(
        self,
        threshold: float = 0.0,
        *,
        exclude: Iterable[str] | Callable[[str], bool] | None = None,
        groups: Callable[[str], Hashable] | None = None,
    ) -> None:
        super().__init__(exclude=exclude, groups=groups)
        threshold = float(threshold)
        if threshold != threshold:
            raise ValueError("ThresholdRule: threshold must not be NaN")
        self.threshold = threshold

    def keep(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return delta_f <= self.threshold

    def fixed_threshold(self) -> float | None:
        return self.threshold


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
    :math:`q = 0`. With ``groups``, the sites of a group share one :math:`\\zeta`.

    :param float alpha0: prior pseudo-count of kept elements.
    :param float beta0: prior pseudo-count of pruned elements.
    :param int num_iterations: fixed-point iterations (the authors use 4).
    :param exclude: see :class:`PruningRule`.
    :param groups: see :class:`PruningRule`.
    """

    def __init__(
        self,
        alpha0: float = 1.0,
        beta0: float = 1.0,
        num_iterations: int = 10,
        *,
        exclude: Iterable[str] | Callable[[str], bool] | None = None,
        groups: Callable[[str], Hashable] | None = None,
    ) -> None:
        super().__init__(exclude=exclude, groups=groups)
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
        return self.site_threshold(
            delta_f.reshape(-1), float_mask(mask.expand(delta_f.shape), delta_f.dtype).reshape(-1)
        )

    def keep(self, delta_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return delta_f <= self.log_odds(delta_f, mask)

    def site_threshold(self, delta_f: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        full = dict(dtype=delta_f.dtype, device=delta_f.device)  # no host-to-device copies
        alpha0 = torch.full((), self.alpha0, **full)
        beta0 = torch.full((), self.beta0, **full)
        zeta = torch.digamma(alpha0) - torch.digamma(beta0)
        n = torch.full((), delta_f.numel(), **full)
        # q = σ(ζ − ΔF) = 1 / (1 + e^ΔF e^−ζ): with e^ΔF computed once, an iteration
        # costs a multiply-add and a reciprocal per element (e^ΔF = inf gives q = 0
        # and e^ΔF = 0 gives q = 1, the limits of σ); the mask enters as a product
        exp_df = torch.exp(delta_f)
        for _ in range(self.num_iterations):
            q = (exp_df * torch.exp(-zeta)).add_(1).reciprocal_()
            kept = (q if mask is None else q.mul_(mask)).sum()
            zeta = torch.digamma(alpha0 + kept) - torch.digamma(beta0 + n - kept)
        return zeta
