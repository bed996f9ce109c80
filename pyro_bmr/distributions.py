"""The distribution a pruned Gaussian site takes in the reduced model and guide."""

import math
import weakref

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import Normal, kl_divergence, register_kl

from pyro_bmr._masks import float_mask
from pyro_bmr._tensors import compact

__all__ = ["PrunedNormal"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


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
        validate_args: bool | None = None,
    ) -> None:
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor, got {keep.dtype}")
        shape = torch.broadcast_shapes(loc.shape, scale.shape, keep.shape)
        if len(shape) < event_dim:
            raise ValueError(f"event_dim {event_dim} exceeds the {len(shape)} dims of loc")
        self._setup(loc, scale, _Mask(keep), shape, event_dim, validate_args)

    @classmethod
    def _masked(
        cls,
        loc: torch.Tensor,
        scale: torch.Tensor,
        mask: "_Mask",
        shape: torch.Size,
        event_dim: int,
    ) -> "PrunedNormal":
        """For the handler, which has checked the arguments, keeps a :class:`_Mask`
        for many steps, and replaces a distribution that was validated."""
        self = cls.__new__(cls)
        self._setup(loc, scale, mask, shape, event_dim, False)
        return self

    def _setup(self, loc, scale, mask, shape, event_dim, validate_args) -> None:
        self.loc = loc.expand(shape)
        self.scale = scale.expand(shape)
        self.keep = mask.keep.expand(shape)
        # arithmetic runs on the parameters as given: a prior broadcast from one value
        # costs one element, not the site's size
        self._loc, self._scale = compact(loc), compact(scale)
        self._mask = mask
        split = len(shape) - event_dim
        super().__init__(shape[:split], shape[split:], validate_args=validate_args)

    @property
    def keep_float(self) -> torch.Tensor:
        """``keep`` as 0/1 in the dtype of ``loc`` (not expanded)."""
        return self._mask.as_float(self.loc.dtype)

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
        return PrunedNormal._masked(self._loc, self._scale, self._mask, shape, self.event_dim)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        # a product with the 0/1 mask, not a select: exact zeros (and zero gradients)
        # where pruned, without a branch per element
        value = torch.addcmul(self._loc, self._scale, eps).mul_(self.keep_float)
        self._mask.drawn(value)
        return value

    def _sum_event(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(tuple(range(-self.event_dim, 0))) if self.event_dim else x

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self._loc) / self._scale
        log_scale = torch.log(self._scale)
        if not self.event_dim:
            lp = -0.5 * z * z - log_scale - _HALF_LOG_2PI
            off_spike = torch.where(value == 0, 0.0, -float("inf")).to(lp.dtype)
            return torch.where(self.keep, lp, off_spike)
        # the sum over kept elements of −½z² − ln σ − ½ ln 2π, as a product with the
        # 0/1 mask
        half_sq = torch.addcmul(log_scale, z, z, value=0.5)
        lp = -(self._event_dot(half_sq) + _HALF_LOG_2PI * self._event_dot(None))
        if not self._mask.zero_where_pruned(value):
            off = self._event_count(value * (1 - self.keep_float))
            lp = torch.where(off > 0, torch.full_like(lp, -float("inf")), lp)
        return lp

    def _event_dot(self, x: torch.Tensor | None) -> torch.Tensor:
        """Σ over each event of ``x`` times the mask (of 1 where ``x`` is ``None``)."""
        keep = self.keep_float
        event = self.event_shape
        batch = self.batch_shape if x is None else self._batch_of(x)
        if not torch.jit.is_tracing() and _event_only(keep, self.event_dim):
            keep = keep.reshape(keep.shape[-self.event_dim :] if keep.dim() else ())
            if x is None:
                return self._mask.count(self.loc.dtype, event).expand(batch)
            if keep.shape == event:
                flat = x.expand(batch + event).reshape(-1, event.numel())
                return (flat @ keep.reshape(-1)).reshape(batch)
        return self._sum_event((keep if x is None else x * keep).expand(batch + event))

    def _event_count(self, x: torch.Tensor) -> torch.Tensor:
        """Non-zero elements of each event of ``x``."""
        x = x.expand(self._batch_of(x) + self.event_shape)
        return torch.count_nonzero(x, dim=tuple(range(-self.event_dim, 0)))

    def _batch_of(self, x: torch.Tensor) -> torch.Size:
        """The batch shape of a per-element ``x`` (with any sample dimensions)."""
        return torch.broadcast_shapes(x.shape[: x.dim() - self.event_dim], self.batch_shape)

    def entropy(self) -> torch.Tensor:
        h = Normal(self.loc, self.scale).entropy()
        return self._sum_event(torch.where(self.keep, h, torch.zeros_like(h)))


class _Mask:
    """A pruning mask and what the distributions derive from it: the mask as 0/1
    floats, the number of kept elements per event, and the latest draw. The handler
    keeps one per mask for many steps, shared by the model's and the guide's
    distributions of a site.

    The draw lets the model skip checking that the guide's sample is zero where
    pruned (``rsample`` made it so): a value is that draw if the draw is alive and
    the value has its memory, shape and strides (a view such as ``Delta``'s
    ``expand`` of it) and was not changed in place since.
    """

    def __init__(self, keep: torch.Tensor, keep_float: torch.Tensor | None = None) -> None:
        self.keep = keep
        self._float = {} if keep_float is None else {keep_float.dtype: keep_float}
        self._count: dict = {}
        self._draw: tuple | None = None

    def as_float(self, dtype: torch.dtype) -> torch.Tensor:
        out = self._float.get(dtype)
        if out is None:
            out = self._float[dtype] = float_mask(self.keep, dtype)
        return out

    def count(self, dtype: torch.dtype, event: torch.Size) -> torch.Tensor:
        """Kept elements per event, as a 0-dim tensor of ``dtype``."""
        out = self._count.get((dtype, event))
        if out is None:
            out = self._count[(dtype, event)] = self.as_float(dtype).expand(event).sum()
        return out

    def drawn(self, value: torch.Tensor) -> None:
        self._draw = (weakref.ref(value), value._version)

    def zero_where_pruned(self, value: torch.Tensor) -> bool:
        if self._draw is None or torch.jit.is_tracing():
            return False
        ref, version = self._draw
        drawn = ref()
        return (
            drawn is not None
            and value.data_ptr() == drawn.data_ptr()
            and value.shape == drawn.shape
            and value.stride() == drawn.stride()
            and value._version == version
        )


def _event_only(keep: torch.Tensor, event_dim: int) -> bool:
    """Whether a mask is the same for every batch element (varies over events only)."""
    return keep.dim() <= event_dim or all(d == 1 for d in keep.shape[:-event_dim])


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
