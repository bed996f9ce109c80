"""Where Pyro's correlated Gaussian guides keep their posterior.

:class:`~pyro.infer.autoguide.AutoMultivariateNormal` and
:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` draw every latent site at once,
as one vector :math:`z \\sim \\mathcal N(\\mu, \\Sigma)` on the unconstrained space (the guide
site ``_<prefix>_latent``), cut into the sites in the order of the model's trace. A site on
the real line is its own slice of :math:`z`; a constrained site is a transform of its slice
and cannot be reduced (it is listed with the reason, and stays in the joint).

A :class:`CorrelatedPosterior` answers, per site, as a
:class:`~pyro_bmr.MeanFieldPosterior` does, with the **marginals** :math:`\\mu_i` and
:math:`\\sqrt{\\Sigma_{ii}}`: the ΔF of pruning one element depends on its marginal alone
(:math:`\\ln\\int q(w)\\,\\tilde p(w)/p(w)\\,dw` integrates out every element whose prior is
unchanged), so every rule scores single elements exactly as for a mean-field guide. For
sets it also gives the joint, :meth:`~CorrelatedPosterior.joint`, a :class:`JointGaussian`
scored by :mod:`pyro_bmr.correlated_free_energy`, and writes a reduced joint back with
:meth:`~CorrelatedPosterior.assign_joint`.

The parameterisations (Pyro ≥ 1.9), with :math:`s` the guide's ``scale``:

* ``AutoMultivariateNormal``: :math:`\\Sigma = FF^\\top`, :math:`F = \\operatorname{diag}(s)L`,
  :math:`L` = ``scale_tril`` (unit lower triangular);
* ``AutoLowRankMultivariateNormal``: :math:`\\Sigma = WW^\\top + \\operatorname{diag}(s^2)`,
  :math:`W = \\operatorname{diag}(s)C`, :math:`C` = ``cov_factor``.
"""

from abc import abstractmethod
from typing import NamedTuple

import torch
from pyro.infer import autoguide
from torch.distributions import transform_to

from pyro_bmr import _pyro_compat
from pyro_bmr.correlated_free_energy import _lower_factor, lowrank_delta_f, mvn_delta_f
from pyro_bmr.posteriors import (
    MeanFieldPosterior,
    _parameter,
    _prototype_sites,
    register_posterior,
)

__all__ = [
    "AutoLowRankMultivariateNormalPosterior",
    "AutoMultivariateNormalPosterior",
    "CorrelatedPosterior",
    "JointGaussian",
]


class JointGaussian(NamedTuple):
    """A Gaussian :math:`\\mathcal N(\\mu, \\Sigma)` over a flat vector, in one of two forms:
    :math:`\\Sigma = LL^\\top` (``scale_tril``, lower triangular) or
    :math:`\\Sigma = WW^\\top + \\operatorname{diag} D` (``cov_factor`` and ``cov_diag``).

    :ivar torch.Tensor loc: :math:`\\mu`, shape ``(n,)``.
    :ivar scale_tril: :math:`L`, shape ``(n, n)``, or ``None``.
    :ivar cov_factor: :math:`W`, shape ``(n, r)``, or ``None``.
    :ivar cov_diag: :math:`D`, shape ``(n,)``, or ``None``.
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor | None = None
    cov_factor: torch.Tensor | None = None
    cov_diag: torch.Tensor | None = None

    @property
    def low_rank(self) -> bool:
        return self.scale_tril is None

    def marginal_scale(self) -> torch.Tensor:
        """:math:`\\sqrt{\\Sigma_{ii}}`, the norms of the factor's rows."""
        if self.low_rank:
            return (self.cov_factor.square().sum(-1) + self.cov_diag).sqrt()
        return torch.linalg.vector_norm(self.scale_tril, dim=-1)

    def covariance(self) -> torch.Tensor:
        """The dense :math:`\\Sigma`."""
        if self.low_rank:
            return self.cov_factor @ self.cov_factor.mT + torch.diag_embed(self.cov_diag)
        return self.scale_tril @ self.scale_tril.mT

    def restrict(self, keep: torch.Tensor) -> "JointGaussian":
        """The marginal of the elements ``keep`` (a bool vector), in their order. Where the
        factor's kept rows are zero in the other columns, they are the marginal's factor
        as they are; else it is recomputed from them by a QR (no covariance formed)."""
        if bool(keep.all()):
            return self
        loc = self.loc[keep]
        if self.low_rank:
            return JointGaussian(
                loc, cov_factor=self.cov_factor[keep], cov_diag=self.cov_diag[keep]
            )
        rows = self.scale_tril[keep]
        if not bool(rows[:, ~keep].any()):
            return JointGaussian(loc, scale_tril=rows[:, keep])
        return JointGaussian(loc, scale_tril=_lower_factor(rows))

    def reduce(
        self,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        reduced_loc: torch.Tensor,
        reduced_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, "JointGaussian"]:
        """ΔF of replacing the diagonal prior :math:`\\mathcal N(m, s^2)` by
        :math:`\\mathcal N(\\tilde m, \\tilde s^2)` (0: point mass), and the reduced posterior,
        in the same form, zero on point masses (:func:`~pyro_bmr.correlated_free_energy.mvn_delta_f`,
        :func:`~pyro_bmr.correlated_free_energy.lowrank_delta_f`)."""
        priors = (prior_loc, prior_scale, reduced_loc, reduced_scale)
        if self.low_rank:
            out = lowrank_delta_f(self.loc, self.cov_factor, self.cov_diag, *priors)
            return out.delta_f, JointGaussian(
                out.loc, cov_factor=out.cov_factor, cov_diag=out.cov_diag
            )
        out = mvn_delta_f(self.loc, *priors, scale_tril=self.scale_tril)
        return out.delta_f, JointGaussian(out.loc, scale_tril=out.scale_tril)


def _write(guide, attr: str, value: torch.Tensor) -> None:
    """Set the guide's (constrained) parameter ``attr`` to ``value``."""
    param, constraint = _parameter(guide, attr)
    with torch.no_grad():
        param.copy_(transform_to(constraint).inv(value.to(param.dtype)))


class CorrelatedPosterior(MeanFieldPosterior):
    """Reads and writes the joint Gaussian posterior of an ``AutoContinuous`` guide over
    the flat vector of all its latent sites.

    Per site it is a :class:`~pyro_bmr.MeanFieldPosterior` of the marginals; the handler
    also reads the joint (:meth:`joint`) to score sets and, with ``update_posterior``,
    writes the reduced joint back (:meth:`assign_joint`). Pruned elements are masked at
    the guide's site ``_<prefix>_latent``, where they draw exactly 0 and the kept ones
    follow their marginal (:class:`~pyro_bmr.pruned_multivariate.PrunedMultivariateNormal`).

    :param guide: the guide, already run once (or prepared by :meth:`prepare`).
    """

    def layout(self) -> dict[str, tuple[slice, torch.Size]]:
        """Latent site name → its slice of the flat vector and its (unconstrained) shape."""
        out, pos = {}, 0
        shapes = _pyro_compat.unconstrained_shapes(self.guide)
        for name, _ in self.guide.prototype_trace.iter_stochastic_nodes():
            size = shapes[name].numel()
            out[name] = (slice(pos, pos + size), shapes[name])
            pos += size
        return out

    @abstractmethod
    def joint(self) -> JointGaussian:
        """The guide's posterior over the flat vector, detached."""

    @abstractmethod
    def _write_covariance(self, kept: torch.Tensor, posterior: JointGaussian) -> None:
        """Write ``posterior``'s covariance on ``kept`` and make the others uncorrelated."""

    def sites(self) -> dict[str, str | None]:
        return _prototype_sites(self.guide)

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        part, shape = self._part(name)
        joint = self.joint()
        return joint.loc[part].reshape(shape), joint.marginal_scale()[part].reshape(shape)

    def _part(self, name: str) -> tuple[slice, torch.Size]:
        found = self.layout().get(name)
        if found is None:
            raise ValueError(
                f"{type(self.guide).__name__} has no latent site {name!r}; its sites are "
                f"{sorted(self.layout())}"
            )
        return found

    def check_assign(self, name: str, *, scale: bool) -> None:
        if scale:
            raise ValueError(
                f"site {name!r}: {type(self.guide).__name__} holds a joint posterior, so the "
                "scales of single elements cannot be written; BayesianModelReduction(guide, "
                "update_posterior=True) writes the reduced joint posterior instead"
            )

    def assign(self, name, where, loc, scale) -> None:
        self.check_assign(name, scale=scale is not None)
        part, shape = self._part(name)
        param, constraint = _parameter(self.guide, "loc")
        with torch.no_grad():
            target = param[part]
            new = transform_to(constraint).inv(loc.to(param.dtype)).expand(shape).reshape(-1)
            target.copy_(torch.where(where.expand(shape).reshape(-1), new, target))

    def assign_joint(self, kept: torch.Tensor, posterior: JointGaussian) -> None:
        """Make the guide's posterior ``posterior`` on the elements ``kept`` (a bool vector
        over the flat latent), with mean 0 and no correlation elsewhere.

        :param kept: bool, shape ``(n,)``.
        :param posterior: over the kept elements, in their order (a ``scale_tril`` lower
            triangular with a positive diagonal, or a ``cov_diag`` that is positive).
        """
        loc = torch.zeros_like(self.guide.loc.detach())
        loc[kept] = posterior.loc.to(loc.dtype)
        _write(self.guide, "loc", loc)
        self._write_covariance(kept, posterior)

    def guide_masks(self, masks):
        if not masks:
            return {}
        pieces = []
        device = self.guide.loc.device
        for name, (_, shape) in self.layout().items():
            mask = masks.get(name)
            if mask is None:
                mask = torch.ones(shape, dtype=torch.bool, device=device)
            pieces.append(mask.expand(shape).reshape(-1))
        return {f"_{_pyro_compat.autoguide_prefix(self.guide)}_latent": torch.cat(pieces)}


@register_posterior(autoguide.AutoMultivariateNormal)
class AutoMultivariateNormalPosterior(CorrelatedPosterior):
    """:class:`~pyro.infer.autoguide.AutoMultivariateNormal`: ``loc``, and the covariance
    factor ``scale[:, None] * scale_tril``."""

    def joint(self) -> JointGaussian:
        with torch.no_grad():
            factor = self.guide.scale.detach()[:, None] * self.guide.scale_tril.detach()
        return JointGaussian(self.guide.loc.detach(), scale_tril=factor)

    def _write_covariance(self, kept, posterior) -> None:
        index = kept.nonzero().squeeze(-1)
        factor = posterior.scale_tril
        diag = factor.diagonal()
        scale = self.guide.scale.detach().clone()
        scale[index] = diag.to(scale.dtype)
        tril = torch.eye(len(kept), dtype=scale.dtype, device=scale.device)
        tril[index[:, None], index] = (factor / diag[:, None]).to(scale.dtype)
        _write(self.guide, "scale", scale)
        _write(self.guide, "scale_tril", tril)


@register_posterior(autoguide.AutoLowRankMultivariateNormal)
class AutoLowRankMultivariateNormalPosterior(CorrelatedPosterior):
    """:class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`: ``loc``, and the
    covariance ``W Wᵀ + diag(scale²)`` with ``W = scale[:, None] * cov_factor``."""

    def joint(self) -> JointGaussian:
        with torch.no_grad():
            scale = self.guide.scale.detach()
            factor = self.guide.cov_factor.detach() * scale[:, None]
        return JointGaussian(self.guide.loc.detach(), cov_factor=factor, cov_diag=scale * scale)

    def _write_covariance(self, kept, posterior) -> None:
        root = posterior.cov_diag.sqrt()
        scale = self.guide.scale.detach().clone()
        scale[kept] = root.to(scale.dtype)
        factor = torch.zeros_like(self.guide.cov_factor.detach())
        factor[kept] = (posterior.cov_factor / root[:, None]).to(factor.dtype)
        _write(self.guide, "scale", scale)
        _write(self.guide, "cov_factor", factor)
