"""An effect handler that shrinks Gaussian sites by a factor per element, non-centred."""

from collections.abc import Callable, Mapping
from types import MappingProxyType

import pyro
import torch
from pyro.distributions import Delta
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

from pyro_bmr.distributions import PrunedNormal
from pyro_bmr.sites import innermost_normal, normal_params

__all__ = ["PriorScaleMessenger", "prior_scale"]


class PriorScaleMessenger(Messenger):
    """Given a factor :math:`\\gamma` per element of some Gaussian sample sites, runs
    the model under the reduced prior :math:`\\mathcal N(m, (\\gamma s)^2)` of each
    such site, written non-centred: the site keeps its prior
    :math:`\\mathcal N(m, s^2)` and its draw :math:`z` (so a guide and the ELBO's
    log densities see the same variable as before), and the model computes with
    :math:`w = m + \\gamma (z - m)`, which is :math:`\\mathcal N(m, (\\gamma s)^2)`.
    A guide's steps then keep their size whatever :math:`\\gamma` is, where a prior
    of scale :math:`\\gamma s` on the draw itself would make an optimiser's steps,
    of a fixed size, huge where :math:`\\gamma` is small.

    Only the value the sample statement returns changes, after the site is recorded:
    use the handler inside ``trace`` (as an ELBO, ``Predictive`` and
    ``poutine.trace(handled_model)`` do). At a :class:`~pyro_bmr.PrunedNormal` (under
    :class:`~pyro_bmr.poutine.PruneMessenger`) pruned elements stay exactly zero. A
    guide's ``Delta`` at a site name (``AutoNormal``'s copy of its auxiliary draw)
    is left alone; a guide that draws a Normal at the model's site name (such as
    :class:`~pyro_bmr.MeanFieldGuide`) must not run under this handler. Factors
    cover a site's full shape or broadcast to it; inside a subsampled
    :class:`~pyro.plate` they are subsampled like the plate's parameters, and extra
    leading (particle) dimensions broadcast. The returned value is a new tensor, so
    :func:`~pyro_bmr.poutine.local_reparameterization`, which follows a weight by
    identity, does not apply to a scaled site (it raises if it did before).

    :param dict scales: site name → non-negative, finite floating-point tensor
        :math:`\\gamma`, broadcastable to the site's shape.
    :raises ValueError: for a factor that is not a non-negative, finite
        floating-point tensor, naming the site; at a scaled site whose distribution
        is not an elementwise Normal, or whose shape the factor does not fit.
    """

    def __init__(self, scales: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.scales = scales or {}

    @property
    def scales(self) -> Mapping[str, torch.Tensor]:
        """Site name → factor (a read-only view; assign a new mapping to replace them all)."""
        return MappingProxyType(self._scales)

    @scales.setter
    def scales(self, scales: Mapping[str, torch.Tensor]) -> None:
        self._scales = {name: _check_factor(name, f) for name, f in dict(scales).items()}

    def _pyro_post_sample(self, msg: Message) -> None:
        factor = self._scales.get(msg["name"])
        if factor is None or msg["is_observed"]:
            return
        fn = msg["fn"]
        if isinstance(getattr(fn, "base_dist", fn), Delta):
            return  # a guide's deterministic copy of an auxiliary site
        params = normal_params(fn)
        if params is None:
            raise ValueError(
                f"site {msg['name']!r} has a prior scale factor but its distribution "
                f"{type(fn).__name__} is not an elementwise Normal"
            )
        loc, _, event_dim = params
        shape = fn.batch_shape + fn.event_shape
        factor = factor.to(device=loc.device, dtype=loc.dtype)
        if any(
            f.dim is not None and f.full_size is not None and f.full_size != f.size
            for f in msg["cond_indep_stack"]
        ):
            factor = pyro.subsample(factor, event_dim=event_dim)
        try:
            fits = torch.broadcast_shapes(factor.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"prior scale factor of shape {tuple(factor.shape)} does not fit site "
                f"{msg['name']!r} of shape {tuple(shape)}"
            )
        value = msg["value"]
        scaled = torch.addcmul(loc, factor, value - loc)
        base, _ = innermost_normal(fn)
        if isinstance(base, PrunedNormal):
            scaled = torch.where(base.keep, scaled, value)
        msg["value"] = scaled


def _check_factor(name: str, factor: object) -> torch.Tensor:
    if not isinstance(factor, torch.Tensor) or not factor.dtype.is_floating_point:
        got = factor.dtype if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise ValueError(
            f"prior scale factor of site {name!r} must be a floating-point tensor, got {got}"
        )
    ok = torch.isfinite(factor) & (factor >= 0)
    if not bool(ok.all()):
        bad = factor[~ok].flatten()[0].item()
        raise ValueError(
            f"prior scale factor of site {name!r} must be non-negative and finite, got {bad}"
        )
    return factor


def prior_scale(
    fn: Callable | None = None, scales: Mapping[str, torch.Tensor] | None = None
) -> PriorScaleMessenger | Callable:
    """Functional form of :class:`PriorScaleMessenger`: ``prior_scale(model, scales)``.

    :param fn: a model.
    :param dict scales: site name → factor :math:`\\gamma` of the prior scale.
    """
    messenger = PriorScaleMessenger(scales)
    return messenger if fn is None else messenger(fn)
