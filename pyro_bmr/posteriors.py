"""Where a guide keeps its mean-field Gaussian posterior.

BMR needs, for every latent site, the fitted :math:`q(w) = \\mathcal N(\\mu, \\sigma^2)`
and the names of the guide's own sample sites that draw it, so that pruned
elements can be pinned to zero there too. A :class:`MeanFieldPosterior` answers
both for one kind of guide; :func:`mean_field_posterior` picks the right one and
:func:`register_posterior` adds support for a custom guide. Pyro's
``AutoGuideList`` and guides written by hand as functions are read by
:mod:`pyro_bmr.guide_list_posterior` and :mod:`pyro_bmr.guide_function_posterior`,
and its guides with correlations (``AutoMultivariateNormal``,
``AutoLowRankMultivariateNormal``), through their marginals and their joint, by
:mod:`pyro_bmr.correlated_posteriors`.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from operator import attrgetter

import torch
from pyro.distributions import constraints
from pyro.infer import autoguide
from torch.distributions import biject_to

from pyro_bmr import _pyro_compat
from pyro_bmr.sites import is_real_support

__all__ = [
    "MeanFieldPosterior",
    "AutoNormalPosterior",
    "AutoDiagonalNormalPosterior",
    "mean_field_posterior",
    "register_posterior",
]

_REGISTRY: list[tuple[type, type["MeanFieldPosterior"]]] = []
#: posteriors registered for one guide object (a guide function), by equality
_BY_GUIDE: dict[Callable, type["MeanFieldPosterior"]] = {}
_NOT_GAUSSIAN = (autoguide.AutoDelta,)
_SUPPORTED = (
    "AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal or AutoLowRankMultivariateNormal"
)


class MeanFieldPosterior(ABC):
    """Reads and writes the mean-field Gaussian posterior held by a guide.

    :param guide: the guide, already run once (or prepared by :meth:`prepare`).
    """

    def __init__(self, guide: Callable) -> None:
        self.guide = guide

    @property
    def model(self) -> Callable:
        """The model the guide approximates."""
        return self.guide.model

    def prepare(self, *args, **kwargs) -> None:
        """Create the guide's parameters if it has never been run."""
        _pyro_compat.setup_prototype(self.guide, *args, **kwargs)

    @abstractmethod
    def sites(self) -> dict[str, str | None]:
        """Model sites the guide covers: ``None`` where a Gaussian posterior on the
        real line can be read, else the reason it cannot."""

    @abstractmethod
    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and standard deviation of model site ``name`` over its
        full shape, detached from the autograd graph."""

    @abstractmethod
    def assign(
        self, name: str, where: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor | None
    ) -> None:
        """Overwrite the posterior of site ``name`` at the elements ``where``."""

    @abstractmethod
    def guide_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Translate masks on model sites to masks on the guide's sample sites."""

    def loc_log_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional: for a guide that stores σ as ``exp`` of a tensor, the tensors it
        stores for site ``name``, ``(loc, log_scale)``, each of the site's shape and
        writable in place (``loc`` contiguous). Then
        :meth:`~pyro_bmr.BayesianModelReduction.reduce` may read and prune the site
        straight from that storage, without a copy (see :doc:`/howto/gpu`). The
        default, ``None``, makes ``reduce`` use :meth:`loc_scale` and :meth:`assign`."""
        return None

    def check_assign(self, name: str, *, scale: bool) -> None:
        """Optional: raise, before anything changes, where :meth:`assign` of site
        ``name`` would fail (with ``scale`` given, if ``scale``). The default passes."""
        return None


def register_posterior(
    guide_type: type | Callable,
) -> Callable[[type[MeanFieldPosterior]], type[MeanFieldPosterior]]:
    """Class decorator registering a :class:`MeanFieldPosterior` for ``guide_type``
    (and its subclasses); later registrations take precedence.

    ``guide_type`` may also be one guide object, such as a guide function: the
    posterior is then used for that guide (and guides equal to it) alone, before any
    registration by type.

    .. code-block:: python

        @register_posterior(MyGuide)  # every MyGuide
        class MyGuidePosterior(MeanFieldPosterior): ...

        register_posterior(my_guide)(MyGuidePosterior)  # this guide function only

    :raises TypeError: for a ``guide_type`` that is neither a type nor a callable.
    """
    if not isinstance(guide_type, type) and not callable(guide_type):
        raise TypeError(
            f"register_posterior takes a guide type or a guide callable, got "
            f"{type(guide_type).__name__}"
        )

    def decorate(cls: type[MeanFieldPosterior]) -> type[MeanFieldPosterior]:
        if isinstance(guide_type, type):
            _REGISTRY.insert(0, (guide_type, cls))
        else:
            _BY_GUIDE[guide_type] = cls
        return cls

    return decorate


def _registered_for(guide: Callable) -> type[MeanFieldPosterior] | None:
    try:
        return _BY_GUIDE.get(guide)
    except TypeError:  # an unhashable callable cannot have been registered
        return None


def mean_field_posterior(guide: Callable) -> MeanFieldPosterior:
    """The :class:`MeanFieldPosterior` for ``guide``.

    Looked up in this order: a posterior registered for this guide object, then by
    type (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoGuideList``,
    :class:`~pyro_bmr.MeanFieldGuide`, ``AutoMultivariateNormal`` and
    ``AutoLowRankMultivariateNormal`` (a
    :class:`~pyro_bmr.correlated_posteriors.CorrelatedPosterior`), registered types);
    a plain callable that is no ``AutoGuide`` is read as a guide written by hand
    (:class:`~pyro_bmr.guide_function_posterior.GuideFunctionPosterior`).

    :raises TypeError: for what :func:`~pyro_bmr.make_guide` returns (a tuple), for
        something not callable, and for a guide that is not Gaussian (``AutoDelta``)
        or an ``AutoGuide`` of a type nobody registered.
    """
    if isinstance(guide, tuple):
        if len(guide) == 2 and callable(guide[0]) and isinstance(guide[1], AbstractContextManager):
            raise TypeError(
                "make_guide returns (guide, training_context): pass the guide, e.g. "
                "`guide, training = make_guide(model, 'local')`"
            )
        raise TypeError(f"a guide must be callable, got a tuple of {len(guide)}")
    if not callable(guide):
        raise TypeError(f"a guide must be callable, got {type(guide).__name__}")
    cls = _registered_for(guide)
    if cls is not None:
        return cls(guide)
    if isinstance(guide, _NOT_GAUSSIAN):
        raise TypeError(
            f"{type(guide).__name__} is not a Gaussian guide, so BMR cannot score its sites; "
            f"use {_SUPPORTED}"
        )
    for guide_type, cls in _REGISTRY:
        if isinstance(guide, guide_type):
            return cls(guide)
    if isinstance(guide, autoguide.AutoGuide):
        raise TypeError(
            f"unsupported guide type {type(guide).__name__}: use {_SUPPORTED}, or "
            "register a MeanFieldPosterior with pyro_bmr.register_posterior"
        )
    return _guide_function.GuideFunctionPosterior(guide)


def _parameter(module: torch.nn.Module, dotted: str) -> tuple[torch.Tensor, constraints.Constraint]:
    """The leaf tensor behind a (possibly constrained) PyroModule attribute."""
    path, _, leaf = dotted.rpartition(".")
    owner = attrgetter(path)(module) if path else module
    constraint = _pyro_compat.param_attributes(owner).get(leaf)
    if constraint is not None:
        return _pyro_compat.unconstrained_parameter(owner, leaf), constraint
    return getattr(owner, leaf), constraints.real


def _assign(param: torch.Tensor, constraint, where: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        unconstrained = biject_to(constraint).inv(value.to(param.dtype))
        if unconstrained.dim() == 0:  # pruning: one in-place pass, no copy
            param.masked_fill_(where.to(param.device), unconstrained)
        else:
            param.copy_(torch.where(where, unconstrained.expand_as(param), param))


def _prototype_sites(guide) -> dict[str, str | None]:
    """:meth:`MeanFieldPosterior.sites` of an autoguide, read off its prototype trace."""
    return {
        name: None
        if is_real_support(site["fn"].support)
        else (f"support {site['fn'].support} is constrained")
        for name, site in guide.prototype_trace.iter_stochastic_nodes()
    }


@register_posterior(autoguide.AutoNormal)
class AutoNormalPosterior(MeanFieldPosterior):
    """:class:`~pyro.infer.autoguide.AutoNormal`: ``locs.<site>`` and ``scales.<site>``,
    drawn at the auxiliary site ``<site>_unconstrained``."""

    def sites(self) -> dict[str, str | None]:
        return _prototype_sites(self.guide)

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            attrgetter(name)(self.guide.locs).detach(),
            attrgetter(name)(self.guide.scales).detach(),
        )

    def assign(self, name, where, loc, scale) -> None:
        _assign(*_parameter(self.guide.locs, name), where, loc)
        if scale is not None:
            _assign(*_parameter(self.guide.scales, name), where, scale)

    def guide_masks(self, masks):
        return {name + "_unconstrained": mask for name, mask in masks.items()}


@register_posterior(autoguide.AutoDiagonalNormal)
class AutoDiagonalNormalPosterior(MeanFieldPosterior):
    """:class:`~pyro.infer.autoguide.AutoDiagonalNormal`: one flat ``loc`` and
    ``scale`` vector over all sites, drawn at the site ``_<name>_latent``."""

    def _slices(self) -> dict[str, tuple[slice, torch.Size]]:
        out, pos = {}, 0
        for name, _ in self.guide.prototype_trace.iter_stochastic_nodes():
            shape = _pyro_compat.unconstrained_shapes(self.guide)[name]
            size = shape.numel()
            out[name] = (slice(pos, pos + size), shape)
            pos += size
        return out

    def sites(self) -> dict[str, str | None]:
        return _prototype_sites(self.guide)

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        part, shape = self._slices()[name]
        return (
            self.guide.loc.detach()[part].reshape(shape),
            self.guide.scale.detach()[part].reshape(shape),
        )

    def assign(self, name, where, loc, scale) -> None:
        part, shape = self._slices()[name]
        flat_where = where.expand(shape).reshape(-1)
        for attr, value in (("loc", loc), ("scale", scale)):
            if value is None:
                continue
            param, constraint = _parameter(self.guide, attr)
            with torch.no_grad():
                target = param[part]
                new = biject_to(constraint).inv(value.to(param.dtype)).expand(shape).reshape(-1)
                target.copy_(torch.where(flat_where, new, target))

    def guide_masks(self, masks):
        if not masks:
            return {}
        pieces = []
        for name, (_, shape) in self._slices().items():
            mask = masks.get(name)
            if mask is None:
                device = self.guide.loc.device
                mask = torch.ones(shape, dtype=torch.bool, device=device)
            pieces.append(mask.expand(shape).reshape(-1))
        return {f"_{_pyro_compat.autoguide_prefix(self.guide)}_latent": torch.cat(pieces)}


# guides written by hand, AutoGuideList and the guides with correlations; imported
# last, as they build on the above
from pyro_bmr import guide_function_posterior as _guide_function  # noqa: E402, F401, I001
from pyro_bmr import guide_list_posterior as _guide_list  # noqa: E402, F401
from pyro_bmr import correlated_posteriors as _correlated  # noqa: E402, F401
