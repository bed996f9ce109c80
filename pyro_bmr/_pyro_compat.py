"""Every use of Pyro's private API, in one place (private).

Pyro does not promise these names across releases. Each function here names what
it reads, and ``tests/test_pyro_compat.py`` checks each against the installed Pyro,
so a release that moves one breaks this file and that test, not the library.
(:class:`~pyro_bmr.guides.MeanFieldGuide` also overrides ``AutoGuide._setup_prototype``,
the hook Pyro's own autoguides override; it is called only through here.)
"""

from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.nn import PyroModule
from torch.distributions import constraints

__all__ = [
    "autoguide_plates",
    "autoguide_prefix",
    "forget_compiled",
    "module_prefix",
    "param_attributes",
    "random_attributes",
    "random_site_name",
    "setup_prototype",
    "to_torch_module_",
    "unconstrained_parameter",
    "unconstrained_shapes",
]

#: Attributes in which Pyro's JIT ELBOs keep their compiled functions.
JIT_ELBO_CACHES = (
    "_loss_and_surrogate_loss",
    "_jit_loss_and_surrogate_loss",
    "_differentiable_loss",
)


# -- autoguides ----------------------------------------------------------------------


def setup_prototype(guide: Any, *args, **kwargs) -> None:
    """Create an autoguide's parameters if it has never run (``_setup_prototype``)."""
    if getattr(guide, "prototype_trace", None) is None:
        guide._setup_prototype(*args, **kwargs)


def autoguide_plates(guide: Any, *args, **kwargs) -> dict:
    """The plates an autoguide draws its sites in (``_create_plates``), ``{}`` where
    the model has none (``_prototype_frames``)."""
    if guide._prototype_frames or guide.create_plates is not None:
        return guide._create_plates(*args, **kwargs)
    return {}


def unconstrained_shapes(guide: Any) -> dict[str, torch.Size]:
    """Site name → unconstrained shape of an ``AutoContinuous`` guide
    (``_unconstrained_shapes``)."""
    return guide._unconstrained_shapes


def autoguide_prefix(guide: Any) -> str:
    """The prefix of an autoguide's own sites, as in ``_<prefix>_latent``
    (``_pyro_name``)."""
    return guide._pyro_name


# -- PyroModule ------------------------------------------------------------------------


def module_prefix(module: PyroModule) -> str:
    """The site-name prefix of a ``PyroModule`` (``_pyro_name``)."""
    return module.__dict__["_pyro_name"]


def random_attributes(module: PyroModule) -> tuple[str, ...]:
    """Names of a ``PyroModule``'s ``PyroSample`` attributes (``_pyro_samples``)."""
    return tuple(module.__dict__.get("_pyro_samples", {}))


def random_site_name(module: PyroModule, attr: str) -> str:
    """The sample site of a ``PyroSample`` attribute (``_pyro_get_fullname``)."""
    return module._pyro_get_fullname(attr)


def param_attributes(module: PyroModule) -> dict[str, constraints.Constraint]:
    """A ``PyroModule``'s ``PyroParam`` attributes and their constraints
    (``_pyro_params``)."""
    return {name: spec[0] for name, spec in module.__dict__.get("_pyro_params", {}).items()}


def unconstrained_parameter(module: PyroModule, attr: str) -> torch.nn.Parameter:
    """The unconstrained leaf tensor behind a ``PyroParam`` attribute
    (``<attr>_unconstrained``)."""
    return module._parameters[attr + "_unconstrained"]


def to_torch_module_(module: PyroModule, cls: type, params: dict[str, torch.Tensor]) -> None:
    """Turn ``module`` back into the ``torch.nn`` class ``cls`` in place, with
    ``params`` as its plain parameters (the reverse of ``to_pyro_module_``)."""
    for attr in param_attributes(module):
        module._parameters.pop(attr + "_unconstrained", None)
    for key in ("_pyro_name", "_pyro_context", "_pyro_params", "_pyro_samples"):
        module.__dict__.pop(key, None)
    module.__class__ = cls
    for attr, value in params.items():
        module.register_parameter(attr, torch.nn.Parameter(value.clone()))


# -- ELBOs ------------------------------------------------------------------------------


def forget_compiled(loss: ELBO) -> None:
    """Make a JIT ELBO (``JitTrace_ELBO`` and kin) compile again at its next step:
    they bake tensors such as pruning masks into the compiled graph as constants.
    Only what the instance holds is cleared: ``TraceGraph_ELBO`` has a *method*
    named like ``JitTrace_ELBO``'s cache."""
    for attr in JIT_ELBO_CACHES:
        if vars(loss).get(attr) is not None:
            setattr(loss, attr, None)


def compiled_functions(loss: ELBO) -> list[Callable]:
    """The compiled functions a JIT ELBO holds now (empty before its first step)."""
    return [fn for attr in JIT_ELBO_CACHES if (fn := vars(loss).get(attr)) is not None]
