"""The posterior of a guide written by hand as a function.

:class:`GuideFunctionPosterior` reads a guide whose latent sites are drawn from
``dist.Normal(loc, scale)`` (``.to_event`` allowed) with ``loc = pyro.param(...)``.
It traces the guide with the arguments of every reduction, reads each site's
Normal, and prunes an element by writing 0 into the ``pyro.param`` that *is* the
loc. :func:`~pyro_bmr.posteriors.mean_field_posterior` picks it for any callable
that is neither an autoguide nor registered, so ``BayesianModelReduction(guide)``
takes such a guide as it takes ``AutoNormal``.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import transform_to

from pyro_bmr import _pyro_compat
from pyro_bmr.posteriors import MeanFieldPosterior
from pyro_bmr.sites import innermost_normal

__all__ = ["GuideFunctionPosterior"]

_REGISTER = "register a MeanFieldPosterior with pyro_bmr.register_posterior"


def _label(guide: Callable) -> str:
    name = getattr(guide, "__qualname__", None) or type(guide).__name__
    return f"{name!r}"


@contextmanager
def _quietly() -> Iterator[None]:
    """Run a guide for inspection: no gradients, and the random streams left as they
    were, so a reduction does not change what training samples next."""
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        yield


# -- guide functions ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Drawn:
    """A guide site drawn from a Normal whose loc is a ``pyro.param``."""

    shape: torch.Size  # the site's shape
    loc: str  # the param that is the loc
    scale: str | None  # the param that is the scale, if any


def _same_elements(view: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``view`` holds exactly the elements of ``value``, in the same order."""
    if (view.data_ptr(), view.dtype, view.device) != (value.data_ptr(), value.dtype, value.device):
        return False
    if view.shape == value.shape and view.stride() == value.stride():
        return True
    return view.numel() == value.numel() and view.is_contiguous() and value.is_contiguous()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _param_named(tensor: torch.Tensor, shape: torch.Size, params: dict) -> str | None:
    """The param of the trace whose constrained value is ``tensor`` (or a view of it
    with the same elements), where ``tensor`` has the site's ``shape``."""
    if tensor.shape != shape:
        return None
    return next((name for name, value in params.items() if _same_elements(tensor, value)), None)


def _writable(name: str, store: dict, zero: bool) -> str | None:
    """Why the param store's param ``name`` cannot be written elementwise (with 0 in
    its support, if ``zero``), or ``None``."""
    if name not in store:
        return f"pyro.param {name!r} is not in Pyro's param store"
    constraint = _pyro_compat.param_constraint(name)
    if constraint.event_dim != 0:
        return f"pyro.param {name!r} has the non-elementwise constraint {constraint}"
    if zero and not bool(constraint.check(torch.zeros(()))):
        return f"pyro.param {name!r} is constrained to {constraint}, which excludes 0"
    return None


def _read_site(name: str, site: dict, params: dict, store: dict) -> _Drawn | str:
    """What a guide site draws from, or why BMR cannot prune it."""
    fn = site["fn"]
    fix = f"; write loc = pyro.param(...) or {_REGISTER}"
    found = innermost_normal(fn)
    if found is None:
        return (
            f"guide site {name!r}: {type(fn).__name__} is not an elementwise Normal, so there "
            f"is no Gaussian posterior to read; draw it from dist.Normal or {_REGISTER}"
        )
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            return (
                f"guide site {name!r} is drawn inside the subsampled plate {frame.name!r}, so "
                "the trace holds only a batch of its posterior: not supported for a guide "
                f"function; {_REGISTER}"
            )
    base, _ = found
    shape = fn.batch_shape + fn.event_shape
    if base.loc.shape != shape:
        return (
            f"guide site {name!r}: its Normal loc has shape {tuple(base.loc.shape)}, broadcast "
            f"to the site's {tuple(shape)}, so its elements cannot be pruned one by one; "
            "give the loc pyro.param the site's shape"
        )
    loc = _param_named(base.loc, shape, params)
    part_of = next((n for n, v in params.items() if _same_storage(base.loc, v)), None)
    if loc is None and part_of is not None:
        return (
            f"guide site {name!r}: its Normal loc is a slice or broadcast of pyro.param "
            f"{part_of!r}, not the whole param, so its elements cannot be pruned one by one; "
            "give the site a loc pyro.param of its own, of the site's shape"
        )
    if loc is None:
        return (
            f"guide site {name!r}: its Normal loc is not a pyro.param, so pruned elements "
            f"cannot be pinned to zero{fix}"
        )
    why = _writable(loc, store, zero=True)
    if why is not None:
        return f"guide site {name!r}: its Normal loc {why}, so pruned elements cannot be zero"
    scale = _param_named(base.scale, shape, params)
    if scale is not None and _writable(scale, store, zero=False) is not None:
        scale = None
    return _Drawn(shape, loc, scale)


def _write(name: str, shape: torch.Size, where: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` (constrained) into param ``name`` at ``where`` (site-shaped)."""
    param = dict(pyro.get_param_store().named_parameters())[name]
    constraint = _pyro_compat.param_constraint(name)
    with torch.no_grad():
        new = transform_to(constraint).inv(value.to(param.device, param.dtype))
        where = where.to(param.device).expand(shape).reshape(param.shape)
        if new.dim() == 0:
            param.masked_fill_(where, new)
        else:
            param.copy_(torch.where(where, new.expand(shape).reshape(param.shape), param))


class GuideFunctionPosterior(MeanFieldPosterior):
    """A guide written by hand as a function (any callable that is no ``AutoGuide``).

    Each latent site must be drawn at the model site's name from
    ``dist.Normal(loc, scale)``, optionally ``.to_event(k)``, with ``loc`` a
    ``pyro.param`` of the site's full shape (or a view of one with the same
    elements), unconstrained or constrained to a set that contains 0; ``scale`` may
    be computed from params (``softplus(pyro.param(...))``) or be a param itself.

    .. code-block:: python

        def guide(X, y=None):
            loc = pyro.param("w_loc", torch.zeros(X.shape[-1]))
            scale = F.softplus(pyro.param("w_rho", torch.full((X.shape[-1],), -3.0)))
            pyro.sample("w", dist.Normal(loc, scale).to_event(1))

        bmr = BayesianModelReduction(guide, model=model)  # a function knows no model

    :meth:`prepare` traces the guide with the arguments of each reduction (without
    gradients, leaving the random streams as they were); :meth:`sites` gives the
    reason for every site that cannot be pruned this way. :meth:`assign` writes into
    the params through the param store's constraint transform. Writing scales
    (``update_posterior``) needs the scale to be a ``pyro.param``.

    :raises TypeError: from :meth:`prepare`, when the guide cannot be run as
        ``guide(*args, **kwargs)`` with the reduction's arguments.
    """

    def __init__(self, guide: Callable) -> None:
        super().__init__(guide)
        self._call: tuple[tuple, dict] | None = None
        self._trace = None
        self._versions: dict[str, tuple[torch.Tensor, int]] = {}
        self._sites: dict[str, _Drawn | str] = {}

    @property
    def model(self) -> Callable:
        raise TypeError(
            f"the guide {_label(self.guide)} is a function, which does not know its model: "
            "pass it, BayesianModelReduction(guide, model=model)"
        )

    @property
    def traced(self) -> bool:
        """Whether :meth:`prepare` has traced the guide."""
        return self._trace is not None

    def prepare(self, *args, **kwargs) -> None:
        """Trace the guide with these arguments (every time) and read its sites."""
        self._trace_guide(args, kwargs)

    def _trace_guide(self, args: tuple, kwargs: dict) -> None:
        with _quietly():
            try:
                trace = poutine.block(poutine.trace(self.guide).get_trace)(*args, **kwargs)
            except Exception as exc:
                raise TypeError(
                    f"BMR could not trace the guide {_label(self.guide)} as guide(*args, "
                    f"**kwargs) with the arguments of reduce() ({type(exc).__name__}: {exc}); "
                    "a guide function must run with the model's arguments, else "
                    f"{_REGISTER}"
                ) from exc
            params = {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "param"}
            store = dict(pyro.get_param_store().named_parameters())
            sites: dict[str, _Drawn | str] = {}
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                    continue
                sites[name] = _read_site(name, site, params, store)
        owners: dict[str, list[str]] = {}
        for name, drawn in sites.items():
            if isinstance(drawn, _Drawn):
                owners.setdefault(drawn.loc, []).append(name)
        for param, names in owners.items():
            if len(names) > 1:
                for name in names:
                    others = ", ".join(repr(n) for n in names if n != name)
                    sites[name] = (
                        f"guide site {name!r}: its Normal loc pyro.param {param!r} is also the "
                        f"loc of {others}, so pruning one would change the other"
                    )
        self._call, self._trace, self._sites = (args, kwargs), trace, sites
        self._versions = {n: (store[n], store[n]._version) for n in params if n in store}

    def _current(self) -> None:
        """Trace again where a param changed (training, or an assign) since the trace,
        so that what is read is never stale."""
        if self._call is None:
            raise ValueError(
                f"the guide {_label(self.guide)} has not been traced: call prepare(*args, "
                "**kwargs) with the model's arguments first"
            )
        store = dict(pyro.get_param_store().named_parameters())
        for name, (param, version) in self._versions.items():
            if store.get(name) is not param or param._version != version:
                self._trace_guide(*self._call)
                return

    def _drawn(self, name: str) -> _Drawn:
        self._current()
        drawn = self._sites.get(name)
        if drawn is None:
            raise ValueError(
                f"the guide {_label(self.guide)} has no latent site {name!r}; its sites are "
                f"{sorted(self._sites)}"
            )
        if isinstance(drawn, str):
            raise ValueError(drawn)
        return drawn

    def sites(self) -> dict[str, str | None]:
        if self._call is None:
            self._current()  # raises
        return {n: d if isinstance(d, str) else None for n, d in self._sites.items()}

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        drawn = self._drawn(name)
        base, _ = innermost_normal(self._trace.nodes[name]["fn"])
        return base.loc.detach().expand(drawn.shape), base.scale.detach().expand(drawn.shape)

    def check_assign(self, name: str, *, scale: bool) -> None:
        drawn = self._drawn(name)
        if scale and drawn.scale is None:
            raise ValueError(
                f"guide site {name!r}: update_posterior writes the reduced posterior's scale, "
                "which needs the Normal scale to be a pyro.param (e.g. pyro.param("
                f"'{name}_scale', init, constraint=constraints.positive)); here it is computed "
                "(e.g. softplus of a param) or a constant. Write the scale as a pyro.param, or "
                "reduce without update_posterior"
            )

    def assign(self, name, where, loc, scale) -> None:
        self.check_assign(name, scale=scale is not None)  # before anything changes
        drawn = self._drawn(name)
        _write(drawn.loc, drawn.shape, where, loc)
        if scale is not None:
            _write(drawn.scale, drawn.shape, where, scale)

    def guide_masks(self, masks):
        # the guide draws the model's sites under their own names
        return dict(masks)
