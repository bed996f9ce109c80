"""Whether a prior depends on other latent variables (private to :mod:`pyro_bmr.sites`).

BMR scores a site against its prior, so that prior must be fixed: not a function
of other latents. No single test sees every dependence, so three are combined:

* autograd: in a run where every floating-point latent is a leaf tensor, a prior
  parameter with a non-zero gradient with respect to another latent depends on
  it. A zero gradient counts as none, as for ``LocScaleReparam(centered=0.0)``,
  whose standardised prior is computed as ``scale ** 0``;
* provenance (``pyro.infer.inspect.get_dependencies``): a prior that a *discrete*
  latent reaches through any torch operation (``torch.where(z > 0, ...)``), where
  autograd sees nothing;
* a second run in which every continuous latent is moved to another point of its
  support (:math:`u \\mapsto -2u - 1` on the unconstrained scale, which changes its
  sign and size) and every discrete latent is drawn afresh: a prior that changes
  depends on something, through whatever path (``.item()``, ``.detach()``).

What none of them can see: a dependence through Python state outside the model's
run (a global variable changed between calls), and one on a discrete latent that
happens to keep its value in the second run and flows through a path that
provenance tracking does not follow (``.item()`` of a discrete latent).
"""

from collections.abc import Callable

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to


def depends_on_latents(
    model: Callable,
    args: tuple,
    kwargs: dict,
    first,
    trace,
    leaves: dict[str, torch.Tensor],
    priors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, str]:
    """Site name → which latents (or "a run with other latent values") its prior
    depends on, for the sites in ``priors`` ((loc, scale) of the run ``trace``, in
    which the latents took the values ``leaves`` drawn in ``first``)."""
    found: dict[str, str] = {}
    for name, (loc, scale) in priors.items():
        others = {n: leaf for n, leaf in leaves.items() if n != name}
        hit = _gradient_parents(loc, scale, others)
        if hit:
            found[name] = ", ".join(hit)
    for name, parents in _discrete_parents(model, args, kwargs, first, priors).items():
        found.setdefault(name, ", ".join(sorted(parents)))
    moved = _moved_priors(model, args, kwargs, first)
    if moved is not None:
        for name, (loc, scale) in priors.items():
            if name in found or name not in moved:
                continue
            if not _same(moved[name], (loc, scale)):
                found[name] = "its parameters change when other latents take other values"
    return found


def _gradient_parents(
    loc: torch.Tensor, scale: torch.Tensor, leaves: dict[str, torch.Tensor]
) -> list[str]:
    """The latents in ``leaves`` with a non-zero gradient of loc or scale (one
    backward pass per parameter for all of them)."""
    names, tensors = list(leaves), list(leaves.values())
    hit: set[str] = set()
    with torch.enable_grad():
        for t in (loc, scale):
            if not t.requires_grad or not tensors:
                continue
            grads = torch.autograd.grad(t.sum(), tensors, allow_unused=True, retain_graph=True)
            hit |= {n for n, g in zip(names, grads) if g is not None and bool((g != 0).any())}
    return [n for n in names if n in hit]


def _discrete_parents(model, args, kwargs, first, priors) -> dict[str, set[str]]:
    discrete = {
        name for name, site in first.iter_stochastic_nodes() if site["fn"].support.is_discrete
    }
    if not discrete:
        return {}
    from pyro.infer.inspect import get_dependencies

    try:
        deps = get_dependencies(model, args, kwargs)["prior_dependencies"]
    except Exception:  # provenance tracking does not run every model
        return {}
    return {
        name: parents for name in priors if (parents := set(deps.get(name, ())) & discrete - {name})
    }


def _moved_priors(model, args, kwargs, first) -> dict[str, tuple] | None:
    """(loc, scale) of every site's prior in a run with the continuous latents
    moved; ``None`` if the model does not run there."""
    from pyro_bmr.sites import _prior  # the same reading of a prior as for the sites

    moved = {}
    for name, site in first.iter_stochastic_nodes():
        value = site["value"]
        if site["infer"].get("is_auxiliary") or site["fn"].support.is_discrete:
            continue
        try:
            transform = biject_to(site["fn"].support)
            moved[name] = transform(-2 * transform.inv(value.detach()) - 1)
        except (NotImplementedError, ValueError, RuntimeError):
            continue
    try:
        with torch.no_grad():
            trace = poutine.trace(poutine.condition(model, data=moved)).get_trace(*args, **kwargs)
    except Exception:  # the model cannot run there: this test says nothing
        return None
    trace = prune_subsample_sites(trace)
    out = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name not in first.nodes:
            continue
        prior = _prior(site)
        if not isinstance(prior, str):
            out[name] = prior[:2]
    return out


def _same(a: tuple, b: tuple) -> bool:
    return all(x.shape == y.shape and torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))
