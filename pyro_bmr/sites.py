"""Find the latent sites of a model whose prior is Gaussian.

The first stage of the data path (model trace → Gaussian sites → ΔF → rule →
masks → handler): trace the model and, for every latent sample site, either read
its prior as an elementwise :math:`\\mathcal N(m, s^2)` over the site's full
(unsubsampled) shape or record why it cannot be reduced.

The prior read is the one the model runs with. A site under ``poutine.scale``
(a tempered prior, :math:`\\beta \\ln p(w)`) has the effective prior
:math:`\\mathcal N(m, s^2/\\beta)`, which is what the ELBO fits the posterior
against, so that is its ``prior_scale``. A prior whose parameters are learned
(``pyro.param``) or computed from the model's arguments is marked ``dynamic``, and
:func:`read_priors` reads it again.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from pyro import poutine
from pyro.distributions import Delta, constraints
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Distribution, Independent, Normal

from pyro_bmr._dependence import depends_on_latents
from pyro_bmr.distributions import PrunedNormal

__all__ = [
    "GaussianSite",
    "StructureError",
    "arguments_signature",
    "check_same_structure",
    "find_gaussian_sites",
    "innermost_normal",
    "is_real_support",
    "normal_params",
    "read_priors",
]


class StructureError(ValueError):
    """The model's sites differ from those the handler found (and the guide was
    built for): another shape, or a site gone."""


@dataclass(frozen=True)
class GaussianSite:
    """A latent site with an elementwise Gaussian prior.

    :ivar str name: the sample site's name.
    :ivar torch.Tensor prior_loc: prior mean, broadcastable to ``shape``.
    :ivar torch.Tensor prior_scale: prior standard deviation, broadcastable to
        ``shape`` (that of the tempered prior under ``poutine.scale``).
    :ivar torch.Size shape: the site's full value shape (subsampled plates at full size).
    :ivar int event_dim: number of rightmost dimensions that form one event.
    :ivar bool local: the site is local to the data: inside a subsampled plate, or a
        plate that also holds an observed site.
    :ivar bool dynamic: the prior's parameters are learned or computed from the
        model's arguments, so they are read again at every reduction.
    """

    name: str
    prior_loc: torch.Tensor
    prior_scale: torch.Tensor
    shape: torch.Size
    event_dim: int
    local: bool = False
    dynamic: bool = False

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


def _subsampling(site: dict) -> float:
    """The factor by which subsampled plates scale the site (full size over size)."""
    factor = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            factor *= frame.full_size / frame.size
    return factor


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


def _prior(site: dict) -> tuple[torch.Tensor, torch.Tensor, int, torch.Size] | str:
    """``(loc, scale, event_dim, full shape)`` of the prior a site runs with, the
    tempering of ``poutine.scale`` included; or why there is none."""
    fn = site["fn"]
    params = normal_params(fn)
    if params is None:
        return f"prior {type(fn).__name__} is not an elementwise Normal"
    if not is_real_support(fn.support):
        return f"support {fn.support} is constrained"
    mask = site["mask"]
    if (
        mask is not None
        and mask is not True
        and not (isinstance(mask, torch.Tensor) and bool(mask.all()))
    ):
        return "its prior's log density is masked (poutine.mask), so its prior is not Normal"
    loc, scale, event_dim = params
    beta = site["scale"]
    subsampling = _subsampling(site)
    if not isinstance(beta, torch.Tensor) and beta == subsampling:
        beta = None
    else:
        beta = torch.as_tensor(beta, dtype=scale.dtype, device=scale.device) / subsampling
        if not bool((torch.isfinite(beta) & (beta > 0)).all()):
            return "it is scaled (poutine.scale) by a factor that is not positive and finite"
        scale = scale / beta.sqrt()  # β ln N(w; m, s²) = ln N(w; m, s²/β) + const
    loc, shape = _full_size_param(loc, site, event_dim)
    scale, _ = _full_size_param(scale, site, event_dim)
    if loc is None or scale is None:
        return "per-element prior (or scale) inside a subsampled plate"
    return loc, scale, event_dim, shape


def _data_plates(trace) -> set[str]:
    """Plates that hold observed data: an observed site that is not a deterministic
    one (``pyro.deterministic``, or a reparameterised site, both point masses)."""
    return {
        frame.name
        for site in trace.nodes.values()
        if site["type"] == "sample" and site["is_observed"] and not _is_point_mass(site["fn"])
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    }


def _is_point_mass(fn: Distribution) -> bool:
    while not isinstance(fn, Delta) and getattr(fn, "base_dist", None) is not None:
        fn = fn.base_dist
    return isinstance(fn, Delta)


def _is_local(site: dict, data_plates: set[str]) -> bool:
    return any(
        frame.name in data_plates or (frame.full_size or frame.size) != frame.size
        for frame in site["cond_indep_stack"]
    )


def _latent_names(trace) -> list[str]:
    return [
        name
        for name, site in trace.iter_stochastic_nodes()
        if not site["infer"].get("is_auxiliary")
    ]


def find_gaussian_sites(
    model: Callable, *args, **kwargs
) -> tuple[dict[str, GaussianSite], dict[str, str]]:
    """Trace ``model`` and sort its latent sites into reducible and not.

    A site is reducible when its prior is an elementwise Normal on the real line
    whose parameters do not depend on other latent variables, and whose log
    density is not masked. Dependence is looked for three ways
    (:mod:`pyro_bmr._dependence`): by autograd, with every latent value made a
    leaf tensor; by Pyro's provenance tracking, for discrete latents; and by
    running the model again with every continuous latent moved elsewhere in its
    support, for dependence that neither sees (``.item()``, ``.detach()``, a
    comparison). A prior whose parameters depend on other latents is hierarchical:
    reparameterise it (e.g. ``LocScaleReparam(centered=0.0)``) so that the
    standardised site has a fixed prior.

    :param model: a Pyro model.
    :returns: ``(sites, skipped)``: reducible sites by name, and the reason for
        every latent site that is not.
    """
    first = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    names = _latent_names(first)
    data_plates = _data_plates(first)
    leaves = {
        name: first.nodes[name]["value"].detach().clone().requires_grad_()
        for name in names
        if torch.is_floating_point(first.nodes[name]["value"])
    }
    arg_leaves, leaf_args, leaf_kwargs = _arguments_as_leaves(args, kwargs)
    with torch.enable_grad():
        trace = poutine.trace(poutine.condition(model, data=leaves)).get_trace(
            *leaf_args, **leaf_kwargs
        )
        trace = prune_subsample_sites(trace)
        priors = {name: _prior(trace.nodes[name]) for name in names}
    candidates = [name for name in names if not isinstance(priors[name], str)]
    dependent = depends_on_latents(
        model, args, kwargs, first, trace, leaves, {n: priors[n][:2] for n in candidates}
    )
    inputs = arg_leaves + _params(trace)  # what makes a prior learned or argument-driven
    sites: dict[str, GaussianSite] = {}
    skipped: dict[str, str] = {}
    for name in names:
        prior = priors[name]
        if isinstance(prior, str):
            skipped[name] = prior
            continue
        if name in dependent:
            skipped[name] = (
                f"prior parameters depend on other latent variables ({dependent[name]}); "
                "reparameterise the site (e.g. LocScaleReparam(centered=0.0)) so its "
                "prior is fixed"
            )
            continue
        loc, scale, event_dim, shape = prior
        dynamic = _reaches(loc, scale, inputs)
        site = trace.nodes[name]
        sites[name] = GaussianSite(
            name,
            loc.detach(),
            scale.detach(),
            shape,
            event_dim,
            local=_is_local(site, data_plates),
            dynamic=dynamic,
        )
    return sites, skipped


def _params(trace) -> list[torch.Tensor]:
    """The leaf tensors behind the ``pyro.param`` statements of a run."""
    return [
        node["value"].unconstrained()
        for node in trace.nodes.values()
        if node["type"] == "param" and hasattr(node["value"], "unconstrained")
    ]


def _reaches(loc: torch.Tensor, scale: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    """Whether loc or scale is computed from any of ``inputs``."""
    inputs = [t for t in inputs if t.requires_grad]
    if not inputs:
        return False
    with torch.enable_grad():
        for t in (loc, scale):
            if t.requires_grad:
                grads = torch.autograd.grad(t.sum(), inputs, allow_unused=True, retain_graph=True)
                if any(g is not None for g in grads):
                    return True
    return False


def read_priors(
    model: Callable,
    sites: dict[str, GaussianSite],
    values: dict[str, torch.Tensor],
    *args,
    **kwargs,
) -> dict[str, GaussianSite]:
    """``sites`` with their priors read again from one run of ``model``, in which
    each site takes ``values[name]`` (so nothing is drawn there).

    :raises StructureError: where a site is gone, has another shape, or can no
        longer be reduced, naming it.
    """
    conditioned = poutine.condition(model, data=values)
    # an autoguide's InitMessenger sits inside the condition and draws its initial
    # values before the condition replaces them: the run must leave the RNG as it was
    cuda = sorted({v.device.index for v in values.values() if v.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        try:
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        except Exception as error:
            # the values may not fit a model whose shapes changed: say which site did
            _check_structure(model, sites, *args, **kwargs)
            raise error
    trace = prune_subsample_sites(trace)
    fresh = {}
    for name, site in sites.items():
        node = trace.nodes.get(name)
        prior = _prior(node) if node is not None else "it is not in the model's trace"
        if isinstance(prior, str):
            raise StructureError(f"site {name!r} can no longer be reduced: {prior}")
        loc, scale, _, shape = prior
        if shape != site.shape:
            raise StructureError(_shape_message(name, shape, site.shape))
        fresh[name] = replace(site, prior_loc=loc, prior_scale=scale)
    return fresh


def _check_structure(model: Callable, sites: dict[str, GaussianSite], *args, **kwargs) -> None:
    """Raise :class:`StructureError` if ``model`` run on these arguments has sites
    of other shapes than ``sites``."""
    try:
        trace = prune_subsample_sites(poutine.trace(model).get_trace(*args, **kwargs))
    except Exception:
        return
    for name, site in sites.items():
        node = trace.nodes.get(name)
        if node is None:
            raise StructureError(f"site {name!r} is not in the model's trace with these arguments")
        prior = _prior(node)
        if not isinstance(prior, str) and prior[3] != site.shape:
            raise StructureError(_shape_message(name, prior[3], site.shape))


def check_same_structure(old: dict[str, GaussianSite], new: dict[str, GaussianSite]) -> None:
    """Raise :class:`StructureError` where a site of ``old`` is missing from ``new``
    or has another shape there."""
    for name, site in old.items():
        now = new.get(name)
        if now is None:
            raise StructureError(
                f"site {name!r} is not reducible with these arguments, but was when the "
                "handler found its sites; use a new guide and handler for a model of "
                "another structure"
            )
        if now.shape != site.shape:
            raise StructureError(_shape_message(name, now.shape, site.shape))


def arguments_signature(args: tuple, kwargs: dict) -> tuple:
    """What of a model's arguments can change its structure: tensor shapes and
    dtypes, and the other values' types."""

    def of(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype)
        if isinstance(value, (tuple, list)):
            return tuple(of(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, of(v)) for k, v in value.items()))
        return type(value).__name__

    return of(args), of(kwargs)


def _shape_message(name: str, now: torch.Size, then: torch.Size) -> str:
    return (
        f"site {name!r} has shape {tuple(now)} with these arguments, but {tuple(then)} when "
        "the handler found its sites (and the guide was built for them); use a new guide "
        "and handler for a model of another structure"
    )


def _arguments_as_leaves(args: tuple, kwargs: dict) -> tuple[list, tuple, dict]:
    """The model's floating-point tensor arguments as leaf tensors that require
    grad, so that a prior computed from them shows it (``dynamic``)."""
    leaves = []

    def leaf(value):
        if isinstance(value, torch.Tensor) and torch.is_floating_point(value):
            value = value.detach().requires_grad_()
            leaves.append(value)
        return value

    return leaves, tuple(leaf(a) for a in args), {k: leaf(v) for k, v in kwargs.items()}
