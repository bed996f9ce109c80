"""Make any ``torch.nn.Module`` Bayesian.

:class:`BayesianModule` copies a network, converts every submodule to a
:class:`~pyro.nn.module.PyroModule` in place (:func:`pyro.nn.module.to_pyro_module_`)
and asks a :class:`~pyro_bmr.nn.priors.Prior` to replace the chosen
``nn.Parameter`` s by :class:`~pyro.nn.module.PyroSample` s, layer by layer, as
TyXe does. Calling the result runs the network with freshly sampled parameters;
parameters that were not chosen stay ordinary parameters and are fitted as
point estimates through Pyro's param store.

Priors that are decentered (:attr:`Prior.decentered`) are sampled through
:class:`~pyro.infer.reparam.LocScaleReparam` with ``centered=0``, applied inside
:meth:`BayesianModule.forward`, so every trace of the model -- and hence every
guide and every Bayesian model reduction -- sees the standardised
``<site>_decentered`` sites with their fixed :math:`\\mathcal N(0, 1)` prior.
"""

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.reparam import LocScaleReparam
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from pyro_bmr import _pyro_compat

from .priors import ANCHOR, GaussianPrior, Prior

__all__ = ["BayesianModule", "Predicate", "exclude_normalization", "to_bayesian"]

#: ``predicate(qualified_name, module) -> bool`` chooses the parameters that become
#: random; ``qualified_name`` is the parameter's name in the original network
#: (e.g. ``"0.weight"``) and ``module`` the submodule that owns it.
Predicate = Callable[[str, nn.Module], bool]

_NORMALIZATION = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def exclude_normalization(qualified_name: str, module: nn.Module) -> bool:
    """A predicate that keeps the parameters of normalisation layers deterministic.

    Batch, instance, layer, group and RMS normalisation gains and shifts stay point
    estimates; every other parameter becomes random.
    """
    return not isinstance(module, _NORMALIZATION)


class _Random(NamedTuple):
    module: PyroModule
    name: str
    initial: torch.Tensor


class _Hyper(NamedTuple):
    module: PyroModule
    name: str
    initial: float


def _site_name(module: PyroModule, name: str) -> str:
    # The same rule PyroModule uses for its sample sites (a module's prefix is its
    # path from the outermost PyroModule, kept current when modules are nested).
    prefix = _pyro_compat.module_prefix(module)
    return f"{prefix}.{name}" if prefix else name


def _add_anchor(module: nn.Module, like: torch.Tensor) -> None:
    if ANCHOR not in module._buffers:
        anchor = torch.zeros((), dtype=like.dtype, device=like.device)
        module.register_buffer(ANCHOR, anchor, persistent=False)


class BayesianModule(PyroModule):
    """A copy of a network whose chosen parameters are random under a prior.

    The network is deep-copied (the argument is left untouched) and kept as the
    submodule ``net``, so a parameter ``0.weight`` of the original becomes the
    sample site ``net.0.weight``; network-wide hyper-parameter sites sit on this
    module itself (e.g. ``horseshoe_global_scale``).

    Example::

        net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 2))
        bnn = BayesianModule(net, LayerScalePrior(), predicate=exclude_normalization)
        guide = AutoNormal(bnn, init_loc_fn=bnn.init_loc_fn)

    :param torch.nn.Module module: any network.
    :param Prior prior: the prior; defaults to ``GaussianPrior(1.0)``.
    :param predicate: ``predicate(qualified_name, module) -> bool`` chooses which
        parameters become random; default: all of them.
    :raises TypeError: if ``module`` is not an ``nn.Module`` or ``prior`` not a
        :class:`Prior`.
    :raises ValueError: if no parameter is chosen, or a chosen parameter is shared
        by two modules.
    """

    def __init__(
        self, module: nn.Module, prior: Prior | None = None, predicate: Predicate | None = None
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        prior = GaussianPrior() if prior is None else prior
        if not isinstance(prior, Prior):
            raise TypeError(f"expected a pyro_bmr.nn.Prior, got {type(prior).__name__}")
        super().__init__()
        net = copy.deepcopy(module)
        to_pyro_module_(net)
        self.prior = prior
        self._random, self._hyper = self._convert(net, prior, predicate)
        self.net = net

    def _convert(
        self, net: PyroModule, prior: Prior, predicate: Predicate | None
    ) -> tuple[list[_Random], list[_Hyper]]:
        layers, owners = [], {}
        for module_name, module in net.named_modules():
            chosen = {}
            for name, param in module._parameters.items():
                if param is None:
                    continue
                qualified = f"{module_name}.{name}" if module_name else name
                owners.setdefault(id(param), []).append(qualified)
                if predicate is None or predicate(qualified, module):
                    chosen[name] = param
            if chosen:
                layers.append((module, chosen))
        for _, chosen in layers:
            for param in chosen.values():
                if len(owners[id(param)]) > 1:
                    raise ValueError(
                        f"parameters {owners[id(param)]} are one shared tensor; "
                        "tied parameters cannot be made random"
                    )
        if not layers:
            raise ValueError(f"no parameter of {type(net).__name__} was chosen to be random")

        first = next(
            (
                module
                for module, chosen in layers
                if "weight" in chosen and chosen["weight"].dim() >= 2
            ),
            None,
        )
        _add_anchor(self, next(iter(layers[0][1].values())))
        hyper = [_Hyper(self, name, value) for name, value in prior.setup_(self).items()]
        random = []
        last = layers[-1][0]
        for module, chosen in layers:
            _add_anchor(module, next(iter(chosen.values())))
            random += [_Random(module, name, p.detach().clone()) for name, p in chosen.items()]
            added = prior.apply_(
                module, dict(chosen), root=self, first=module is first, last=module is last
            )
            missing = [
                name for name in chosen if name not in _pyro_compat.random_attributes(module)
            ]
            if missing:
                raise TypeError(
                    f"{prior!r} did not replace parameters {missing} of {type(module).__name__}"
                )
            hyper += [_Hyper(module, name, value) for name, value in added.items()]
        return random, hyper

    def random_sites(self) -> list[str]:
        """Names of the sites that hold the network's random parameters.

        For a decentered prior these sites are deterministic functions of the
        ``<site>_decentered`` latent sites; their values are the parameters the
        network uses.
        """
        return [_site_name(r.module, r.name) for r in self._random]

    def hyper_sites(self) -> list[str]:
        """Names of the prior's hyper-parameter sites (scales, precisions)."""
        return [_site_name(h.module, h.name) for h in self._hyper]

    def latent_sites(self) -> list[str]:
        """Names of the latent sites a guide must cover: parameters, then hypers."""
        suffix = "_decentered" if self.prior.decentered else ""
        return [name + suffix for name in self.random_sites()] + self.hyper_sites()

    def reparam_config(self) -> dict[str, LocScaleReparam]:
        """The ``poutine.reparam`` config that :meth:`forward` applies.

        Empty unless the prior is decentered; then every parameter site maps to
        ``LocScaleReparam(centered=0.0)``.
        """
        if not self.prior.decentered:
            return {}
        return {name: LocScaleReparam(centered=0.0) for name in self.random_sites()}

    def init_loc_fn(self, site: dict[str, Any]) -> torch.Tensor:
        """Initialise a guide at the deterministic network.

        Pass as ``init_loc_fn`` to an autoguide: parameter sites start at the copied
        network's initial values, hyper-parameter sites at the prior's starting
        values, and any other site at its prior median
        (:func:`~pyro.infer.autoguide.initialization.init_to_median`). For a
        decentered prior Pyro's ``poutine.reparam`` asks for the value of the
        original parameter site and derives the ``_decentered`` start from it, so
        the network's parameters start at their initial values there too.
        """
        name = site["name"]
        for entry in self._random:
            if _site_name(entry.module, entry.name) == name:
                return entry.initial.to(getattr(entry.module, ANCHOR))
        for entry in self._hyper:
            if _site_name(entry.module, entry.name) == name:
                anchor = getattr(entry.module, ANCHOR)
                shape = site["fn"].batch_shape + site["fn"].event_shape
                return torch.full(shape, entry.initial, dtype=anchor.dtype, device=anchor.device)
        return init_to_median(site)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the network with parameters drawn from the prior (or a guide)."""
        config = self.reparam_config()
        if not config:
            return self.net(*args, **kwargs)
        with poutine.reparam(config=config):
            return self.net(*args, **kwargs)


def to_bayesian(
    module: nn.Module, prior: Prior | None = None, predicate: Predicate | None = None
) -> BayesianModule:
    """Functional form of :class:`BayesianModule`: a Bayesian copy of ``module``."""
    return BayesianModule(module, prior, predicate)
