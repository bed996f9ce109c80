"""Find the latent sites of a model whose prior is Gaussian.

The first stage of the data path (model trace → Gaussian sites → ΔF → rule →
masks → handler): trace the model once and, for every latent sample site, either
read its prior as an elementwise :math:`\\mathcal N(m, s^2)` over the site's full
(unsubsampled) shape or record why it cannot be reduced.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Distribution, Independent, Normal

from pyro_bmr.distributions import PrunedNormal

__all__ = [
    "GaussianSite",
    "find_gaussian_sites",
    "innermost_normal",
    "is_real_support",
    "normal_params",
]


@dataclass(frozen=True)
class GaussianSite:
    """A latent site with an elementwise Gaussian prior.

    :ivar str name: the sample site's name.
    :ivar torch.Tensor prior_loc: prior mean, broadcastable to ``shape``.
    :ivar torch.Tensor prior_scale: prior standard deviation, broadcastable to ``shape``.
    :ivar torch.Size shape: the site's full value shape (subsampled plates at full size).
    :ivar int event_dim: number of rightmost dimensions that form one event.
    """

    name: str
    prior_loc: torch.Tensor
    prior_scale: torch.Tensor
    shape: torch.Size
    event_dim: int

    def numel(self) -> int:
        return self.shape.numel()


def innermost_normal(fn: Distribution) -> tuple[Distribution, int] | None:
    """The :class:`~torch.distributions.Normal` (or :class:`~pyro_bmr.PrunedNormal`)
    inside a distribution's :class:`~torch.distributions.Independent` (``.to_event``)
    and Pyro ``ExpandedDistribution`` wrappers.

    :param fn: a distribution.
    :returns: ``(base, event_dim)``, with the event dimensions the wrappers add, or
        ``None`` where ``fn`` is not an elementwise Normal.
    """
    event_dim = 0
    while True:
        if isinstance(fn, (PrunedNormal, Normal)):
            return fn, event_dim
        if isinstance(fn, Independent):
            event_dim += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
            continue
        base = getattr(fn, "base_dist", None)
        if type(fn).__name__ == "ExpandedDistribution" and base is not None:
            fn = base
            continue
        return None


def normal_params(fn: Distribution) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Read an elementwise Normal out of a (possibly wrapped) distribution.

    Looks through the wrappers :func:`innermost_normal` knows.

    :param fn: a distribution.
    :returns: ``(loc, scale, event_dim)`` with ``loc`` and ``scale`` expanded to the
        distribution's full ``batch_shape + event_shape``, or ``None`` where ``fn``
        is not an elementwise Normal.
    """
    found = innermost_normal(fn)
    if found is None:
        return None
    base, event_dim = found
    if isinstance(base, PrunedNormal):
        event_dim += base.event_dim
    shape = fn.batch_shape + fn.event_shape
    return base.loc.expand(shape), base.scale.expand(shape), event_dim


def is_real_support(support: constraints.Constraint) -> bool:
    """Whether ``support`` is the real line (elementwise, under any ``independent``)."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _full_size_param(
    param: torch.Tensor, site: dict, event_dim: int
) -> tuple[torch.Tensor | None, torch.Size]:
    """Undo plate subsampling of a prior parameter, which is only possible where
    the parameter does not vary along the subsampled dimension."""
    shape = list(param.shape)
    for frame in site["cond_indep_stack"]:
        full = frame.full_size if frame.full_size is not None else frame.size
        if frame.dim is None or full == frame.size:
            continue
        dim = frame.dim - event_dim
        if param.stride(dim) != 0 and param.shape[dim] != 1:
            return None, torch.Size(shape)
        param = param.narrow(dim, 0, 1)
        shape[dim] = full
    return param, torch.Size(shape)


def find_gaussian_sites(
    model: Callable, *args, **kwargs
) -> tuple[dict[str, GaussianSite], dict[str, str]]:
    """Trace ``model`` and sort its latent sites into reducible and not.

    A site is reducible when its prior is an elementwise Normal on the real line
    whose parameters do not depend on other latent variables. Dependence is found
    by autograd: the model is run again with every latent value made a leaf
    tensor, and a prior whose parameters reach one of those leaves is hierarchical
    (reparameterise it, e.g. with ``LocScaleReparam(centered=0.0)``, so that the
    standardised site has a fixed prior).

    :param model: a Pyro model.
    :returns: ``(sites, skipped)``: reducible sites by name, and the reason for
        every latent site that is not.
    """
    first = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    latent_names = [
        name
        for name, site in first.iter_stochastic_nodes()
        if not site["infer"].get("is_auxiliary")
    ]
    leaves = {
        name: first.nodes[name]["value"].detach().clone().requires_grad_()
        for name in latent_names
        if torch.is_floating_point(first.nodes[name]["value"])
    }
    with torch.enable_grad():
        trace = poutine.trace(poutine.condition(model, data=leaves)).get_trace(*args, **kwargs)
    trace = prune_subsample_sites(trace)
    sites: dict[str, GaussianSite] = {}
    skipped: dict[str, str] = {}
    for name in latent_names:
        site = trace.nodes[name]
        fn = site["fn"]
        with torch.enable_grad():  # reduce() runs under no_grad
            params = normal_params(fn)
        if params is None:
            skipped[name] = f"prior {type(fn).__name__} is not an elementwise Normal"
            continue
        if not is_real_support(fn.support):
            skipped[name] = f"support {fn.support} is constrained"
            continue
        loc, scale, event_dim = params
        if _depends_on(loc, scale, [leaf for other, leaf in leaves.items() if other != name]):
            skipped[name] = (
                "prior parameters depend on other latent variables; reparameterise the "
                "site (e.g. LocScaleReparam(centered=0.0)) so its prior is fixed"
            )
            continue
        loc, shape = _full_size_param(loc.detach(), site, event_dim)
        scale, _ = _full_size_param(scale.detach(), site, event_dim)
        if loc is None or scale is None:
            skipped[name] = "per-element prior inside a subsampled plate"
            continue
        sites[name] = GaussianSite(name, loc, scale, shape, event_dim)
    return sites, skipped


def _depends_on(loc: torch.Tensor, scale: torch.Tensor, leaves: list) -> bool:
    """Whether loc or scale changes with any leaf. A zero gradient counts as no
    dependence, as for ``LocScaleReparam(centered=0.0)``, whose standardised prior
    is computed as ``scale ** 0``."""
    if not leaves:
        return False
    with torch.enable_grad():
        for t in (loc, scale):
            if not t.requires_grad:
                continue
            grads = torch.autograd.grad(t.sum(), leaves, allow_unused=True, retain_graph=True)
            if any(g is not None and bool((g != 0).any()) for g in grads):
                return True
    return False
