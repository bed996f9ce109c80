"""What a reduction found, and how sparse a model is."""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["ReductionReport", "Sparsity", "sparsity"]


@dataclass(frozen=True)
class Sparsity:
    """How much of a model is pruned, per site and in total.

    :ivar dict per_site: site name → fraction of the site's elements pruned.
    :ivar float total: fraction pruned over all sites together,
        ``num_pruned / num_elements`` (large sites weigh more); 0 with no sites.
    :ivar int num_pruned: pruned elements over all sites.
    :ivar int num_elements: elements over all sites.
    """

    per_site: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    num_pruned: int = 0
    num_elements: int = 0

    @property
    def compression(self) -> float:
        """Elements over kept elements, at least 1; ``math.inf`` when all are pruned."""
        kept = self.num_elements - self.num_pruned
        if kept == 0:
            return math.inf if self.num_elements else 1.0
        return self.num_elements / kept


def sparsity(masks: Mapping[str, torch.Tensor]) -> Sparsity:
    """The :class:`Sparsity` of ``masks``.

    .. math::

        f_k = 1 - \\frac{\\#\\{\\text{kept in } k\\}}{\\#\\{\\text{elements in } k\\}},
        \\qquad
        f = 1 - \\frac{\\sum_k \\#\\{\\text{kept in } k\\}}{\\sum_k \\#\\{\\text{elements in } k\\}}

    :param masks: site name → bool tensor, True where an element is kept (such as
        :attr:`BayesianModelReduction.masks <pyro_bmr.BayesianModelReduction.masks>`).
    :raises TypeError: if ``masks`` is not a mapping of bool tensors, naming the site.
    :raises ValueError: for a mask without elements, naming the site.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of site name to bool tensor, got {type(masks)}")
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask of site {name!r} must be a bool tensor (True = kept), got {got}")
        if mask.numel() == 0:
            raise ValueError(f"mask of site {name!r} has no elements")
    if not masks:
        return Sparsity()
    sizes = [mask.numel() for mask in masks.values()]
    kept = torch.stack([mask.count_nonzero().cpu() for mask in masks.values()]).tolist()
    pruned = [n - k for n, k in zip(sizes, kept)]
    per_site = {name: p / n for name, p, n in zip(masks, pruned, sizes)}
    return Sparsity(per_site, sum(pruned) / sum(sizes), sum(pruned), sum(sizes))


@dataclass
class ReductionReport:
    """The result of :meth:`~pyro_bmr.BayesianModelReduction.reduce`.

    :ivar dict delta_f: site name → ΔF of pruning each element (a tensor of the
        site's shape, on the parameters' device). Elements pruned by an earlier
        reduction are scored too, but their guide location was reset to 0 then, so
        their value means nothing: read it through the mask.
    :ivar int num_pruned: elements pruned in total after this reduction.
    :ivar int num_newly_pruned: elements this reduction pruned.
    :ivar int num_elements: elements in all reduced sites.
    :ivar float total_delta_f: the sum of ΔF over the newly pruned elements: the
        evidence gained by this reduction where they are independent (ΔF adds up over
        independent elements).
    :ivar dict skipped: latent site name → why it was not reduced.
    :ivar dict units: unit group name → :class:`~pyro_bmr.groups.UnitCount`, the
        units each group kept, for a structured reduction (see
        :class:`~pyro_bmr.groups.UnitGroup`); empty otherwise.
    :ivar joint_delta_f: for a guide with correlations, the evidence gained by this
        reduction: the ΔF of pruning the newly pruned elements together, from their
        joint posterior (which ``total_delta_f`` is not); ``None`` for a mean-field
        guide, where it is ``total_delta_f``.
    """

    delta_f: dict[str, torch.Tensor]
    num_pruned: int
    num_newly_pruned: int
    num_elements: int
    total_delta_f: float
    skipped: dict[str, str] = field(default_factory=dict)
    joint_delta_f: float | None = None
    units: dict = field(default_factory=dict)

    @property
    def pruned_fraction(self) -> float:
        """Fraction of all reduced elements pruned after this reduction."""
        return self.num_pruned / self.num_elements if self.num_elements else 0.0

    def __str__(self) -> str:
        lines = [
            f"pruned {self.num_pruned}/{self.num_elements} elements "
            f"({100 * self.pruned_fraction:.1f}%), {self.num_newly_pruned} new, "
            f"ΔF gained {self.total_delta_f:.4g}"
            + ("" if self.joint_delta_f is None else f" (jointly {self.joint_delta_f:.4g})")
        ]
        lines += [f"  {name}: kept {c.kept}/{c.total} units" for name, c in self.units.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)
