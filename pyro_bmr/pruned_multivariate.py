"""The distribution a pruned correlated Gaussian takes in the reduced guide."""

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal
from torch.distributions.utils import lazy_property

__all__ = ["PrunedMultivariateNormal"]


class PrunedMultivariateNormal(TorchDistribution):
    """A (low-rank) multivariate Normal whose pruned elements are a point mass at zero.

    The kept elements :math:`K` follow the marginal of ``base``,
    :math:`\\mathcal N(\\mu_K, \\Sigma_{KK})`; the pruned ones are exactly zero when sampled
    and add nothing to :meth:`log_prob` at zero (:math:`-\\infty` anywhere else). A draw is
    the base's draw with the pruned elements set to zero, so the kept ones keep their
    reparameterised gradients.

    :param base: a :class:`~torch.distributions.MultivariateNormal` or
        :class:`~torch.distributions.LowRankMultivariateNormal` with event shape ``(n,)``.
    :param torch.BoolTensor keep: True where an element is kept, shape ``(n,)``.
    :raises TypeError: for another ``base``.
    :raises ValueError: for a ``keep`` that is not a bool tensor of shape ``(n,)``.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        base: MultivariateNormal | LowRankMultivariateNormal,
        keep: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if not isinstance(base, (MultivariateNormal, LowRankMultivariateNormal)):
            raise TypeError(
                f"PrunedMultivariateNormal: base must be a (LowRank)MultivariateNormal, got "
                f"{type(base).__name__}"
            )
        if keep.dtype != torch.bool or keep.shape != base.event_shape:
            raise ValueError(
                f"PrunedMultivariateNormal: keep must be a bool tensor of shape "
                f"{tuple(base.event_shape)}, got {keep.dtype} of shape {tuple(keep.shape)}"
            )
        self.base, self.keep = base, keep
        self._kept = keep.nonzero().squeeze(-1)
        self._pruned = (~keep).nonzero().squeeze(-1)
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @lazy_property
    def marginal(self) -> MultivariateNormal | LowRankMultivariateNormal | None:
        """The distribution of the kept elements; ``None`` where every element is pruned."""
        base, index = self.base, self._kept
        if not self._pruned.numel():
            return base
        if not index.numel():
            return None
        loc = base.loc.index_select(-1, index)
        if isinstance(base, LowRankMultivariateNormal):
            factor = base.cov_factor.index_select(-2, index)
            return LowRankMultivariateNormal(loc, factor, base.cov_diag.index_select(-1, index))
        rows = base.scale_tril.index_select(-2, index)
        return MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(rows @ rows.mT))

    def expand(self, batch_shape, _instance=None) -> "PrunedMultivariateNormal":
        return PrunedMultivariateNormal(self.base.expand(batch_shape), self.keep)

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.keep, self.base.mean, 0.0)

    @property
    def variance(self) -> torch.Tensor:
        return torch.where(self.keep, self.base.variance, 0.0)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return torch.where(self.keep, self.base.rsample(sample_shape), 0.0)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        marginal = self.marginal
        if marginal is None:
            lp = torch.zeros(value.shape[:-1], dtype=value.dtype, device=value.device)
        else:
            lp = marginal.log_prob(value.index_select(-1, self._kept))
        off = (value.index_select(-1, self._pruned) != 0).any(-1)
        return torch.where(off, -float("inf"), lp)

    def entropy(self) -> torch.Tensor:
        marginal = self.marginal
        if marginal is None:
            return self.base.loc.new_zeros(self.batch_shape)
        return marginal.entropy()
