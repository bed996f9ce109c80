"""What a reduction found, and how sparse a model is."""

from dataclasses import dataclass, field
from typing import Dict

import torch

__all__ = ["ReductionReport", "Sparsity"]


@dataclass
class Sparsity:
    """Fraction of elements pruned.

    :ivar dict per_site: site name → fraction of the site's elements pruned.
    :ivar float total: fraction pruned over all masked sites together.
    """

    per_site: Dict[str, float]
    total: float


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
    :ivar float total_delta_f: the evidence gained by this reduction, the sum of ΔF
        over the newly pruned elements (ΔF adds up over independent elements).
    :ivar dict skipped: latent site name → why it was not reduced.
    """

    delta_f: Dict[str, torch.Tensor]
    num_pruned: int
    num_newly_pruned: int
    num_elements: int
    total_delta_f: float
    skipped: Dict[str, str] = field(default_factory=dict)

    @property
    def pruned_fraction(self) -> float:
        """Fraction of all reduced elements pruned after this reduction."""
        return self.num_pruned / self.num_elements if self.num_elements else 0.0

    def __str__(self) -> str:
        lines = [
            f"pruned {self.num_pruned}/{self.num_elements} elements "
            f"({100 * self.pruned_fraction:.1f}%), {self.num_newly_pruned} new, "
            f"ΔF gained {self.total_delta_f:.4g}"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)
