"""The distribution a pruned Gaussian site takes in the reduced model and guide."""

from typing import Optional

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Normal, kl_divergence, register_kl

__all__ = ["PrunedNormal"]


class PrunedNormal(TorchDistribution):
    """An elementwise Normal whose pruned elements are a point mass at zero.

    Kept elements (``keep`` True) follow :math:`\\mathcal N(\\text{loc}, \\text{scale}^2)`;
    pruned elements are exactly zero when sampled and contribute nothing to
    :meth:`log_prob` at zero (the density of a point mass with respect to counting
    measure), and :math:`-\\infty` anywhere else. The rightmost ``event_dim``
    dimensions are summed as one event, as with ``.to_event(event_dim)``.

    :param torch.Tensor loc: mean of the kept elements.
    :param torch.Tensor scale: standard deviation of the kept elements.
    :param torch.BoolTensor keep: True where an element is kept; broadcastable to
        the shape of ``loc``.
    :param int event_dim: number of rightmost dimensions forming one event.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    has_rsample = True

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        keep: torch.Tensor,
        event_dim: int = 0,
        validate_args: Optional[bool] = None,
    ) -> None:
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor, got {keep.dtype}")
        shape = torch.broadcast_shapes(loc.shape, scale.shape, keep.shape)
        if len(shape) < event_dim:
            raise ValueError(f"event_dim {event_dim} exceeds the {len(shape)} dims of loc")
        self.loc = loc.expand(shape)
        self.scale = scale.expand(shape)
        self.keep = keep.expand(shape)
        split = len(shape) - event_dim
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self.event_dim)

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.keep, self.loc, torch.zeros_like(self.loc))

    @property
    def variance(self) -> torch.Tensor:
        return torch.where(self.keep, self.scale.pow(2), torch.zeros_like(self.scale))

    def expand(self, batch_shape, _instance=None) -> "PrunedNormal":
        shape = torch.Size(batch_shape) + self.event_shape
        return PrunedNormal(
            self.loc.expand(shape),
            self.scale.expand(shape),
            self.keep.expand(shape),
            self.event_dim,
        )

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + self.scale * eps
        return torch.where(self.keep, value, torch.zeros_like(value))

    def _sum_event(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(tuple(range(-self.event_dim, 0))) if self.event_dim else x

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lp = Normal(self.loc, self.scale).log_prob(value)
        off_spike = torch.where(value == 0, 0.0, -float("inf")).to(lp.dtype)
        return self._sum_event(torch.where(self.keep, lp, off_spike))

    def entropy(self) -> torch.Tensor:
        h = Normal(self.loc, self.scale).entropy()
        return self._sum_event(torch.where(self.keep, h, torch.zeros_like(h)))


@register_kl(PrunedNormal, PrunedNormal)
def _kl_pruned_pruned(q: PrunedNormal, p: PrunedNormal) -> torch.Tensor:
    """Elementwise KL: Gaussian where both keep, zero where both prune, and
    infinite where one is a point mass and the other is not."""
    kl = kl_divergence(Normal(q.loc, q.scale), Normal(p.loc, p.scale))
    both_pruned = ~q.keep & ~p.keep
    mixed = q.keep ^ p.keep
    kl = torch.where(both_pruned, torch.zeros_like(kl), kl)
    kl = torch.where(mixed, torch.full_like(kl, float("inf")), kl)
    return q._sum_event(kl)
