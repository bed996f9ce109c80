"""Every use of Pyro's private API, in one place (private).

Pyro does not promise these names across releases. Each function here names what
it reads, and ``tests/test_pyro_compat.py`` checks each against the installed Pyro,
so a release that moves one breaks this file and that test, not the library.
(:class:`~pyro_bmr.guides.MeanFieldGuide` also overrides ``AutoGuide._setup_prototype``,
the hook Pyro's own autoguides override; it is called only through here.)
"""

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro.infer import ELBO
from pyro.nn import PyroModule
from torch.distributions import constraints

__all__ = [
    "autocallable_guide",
    "captures_under_way",
    "capturing",
    "elbo_without_items",
    "handler_types",
    "stored_constraint",
    "stored_unconstrained",
    "autoguide_plates",
    "autoguide_prefix",
    "converted_from",
    "forget_compiled",
    "has_run",
    "make_deterministic_",
    "module_prefix",
    "param_attributes",
    "param_constraint",
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


def is_prepared(guide: Any) -> bool:
    """Whether an autoguide has created its parameters (``prototype_trace``);
    ``False`` for anything that is not an autoguide."""
    return getattr(guide, "prototype_trace", None) is not None


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


def autocallable_guide(part: Any) -> Callable:
    """The guide function an ``AutoCallable`` wraps (``_guide``): what
    ``AutoGuideList.append`` makes of a plain callable."""
    return part._guide


# -- the param store -------------------------------------------------------------------


def param_constraint(name: str) -> constraints.Constraint:
    """The constraint of the param store's parameter ``name`` (``_constraints``); the
    store's ``get_state`` would also strip the ``unconstrained`` weakrefs of the
    constrained values handed out."""
    return pyro.get_param_store()._constraints[name]


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


def has_run(module: PyroModule) -> bool:
    """Whether a ``PyroModule`` has run, so that its site names are defined
    (``_pyro_context.used``)."""
    return module.__dict__["_pyro_context"].used


def converted_from(cls: type) -> type | None:
    """The ``torch.nn`` class that ``PyroModule[...]`` turned into ``cls``
    (``_PyroModuleMeta._pyro_mixin_cache``): ``nn.Module`` for ``PyroModule``
    itself, ``None`` for any other class, such as a user's own ``PyroModule``
    subclass (even one derived from a ``PyroModule[...]`` class)."""
    if cls is PyroModule:
        return torch.nn.Module
    for torch_cls, pyro_cls in type(PyroModule)._pyro_mixin_cache.items():
        if pyro_cls is cls:
            return torch_cls
    return None


def to_torch_module_(module: PyroModule, cls: type, params: dict[str, torch.Tensor]) -> None:
    """Turn ``module`` back into the ``torch.nn`` class ``cls`` in place, with
    ``params`` as its plain parameters (the reverse of ``to_pyro_module_``)."""
    _drop_random_attributes(module)
    for key in ("_pyro_name", "_pyro_context", "_pyro_params", "_pyro_samples"):
        module.__dict__.pop(key, None)
    module.__class__ = cls
    _register_parameters(module, params)


def make_deterministic_(module: PyroModule, params: dict[str, torch.Tensor]) -> None:
    """Keep ``module`` in its class (a ``PyroModule``) but stop it sampling or
    constraining attributes: empty its ``_pyro_samples`` and ``_pyro_params``
    (dropping the ``<attr>_unconstrained`` parameters), then set ``params`` as
    plain parameters. Its ``_pyro_name`` and ``_pyro_context`` stay, so it still
    runs as a ``PyroModule``."""
    _drop_random_attributes(module)
    module.__dict__["_pyro_params"].clear()
    module.__dict__["_pyro_samples"].clear()
    _register_parameters(module, params)


def _drop_random_attributes(module: PyroModule) -> None:
    for attr in param_attributes(module):
        module._parameters.pop(attr + "_unconstrained", None)


def _register_parameters(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
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


def jit_functions_compiling() -> list:
    """The ``pyro.ops.jit.CompiledFunction`` objects (what JIT ELBOs compile) whose
    compilation is under way on the current call stack (``CompiledFunction.__call__``
    frames)."""
    import sys

    from pyro.ops.jit import CompiledFunction

    code = CompiledFunction.__call__.__code__
    found, frame = [], sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and isinstance(frame.f_locals.get("self"), CompiledFunction):
            found.append(frame.f_locals["self"])
        frame = frame.f_back
    return found


def forget_compiled_function(function: Any) -> None:
    """Make a ``pyro.ops.jit.CompiledFunction`` compile again at its next call
    (``compiled``, its cache of traced graphs)."""
    function.compiled.clear()


# -- captured ELBO steps (pyro_bmr.compiled_elbo) ------------------------------------

_CAPTURES: list = []


@contextmanager
def capturing(elbo: Any) -> Iterator[None]:
    """Announce, for the duration, that ``elbo`` is capturing its step."""
    _CAPTURES.append(elbo)
    try:
        yield
    finally:
        _CAPTURES.remove(elbo)


def captures_under_way() -> list:
    """The ELBOs capturing a step now (their graphs bake in what the model reads);
    each holds its graphs in a dict ``compiled``, like Pyro's ``CompiledFunction``."""
    return list(_CAPTURES)


def handler_types() -> tuple[type, ...]:
    """The types of the effect handlers active now (``_PYRO_STACK``), outermost first."""
    from pyro.poutine.runtime import _PYRO_STACK

    return tuple(type(frame) for frame in _PYRO_STACK)


def stored_unconstrained(name: str) -> torch.Tensor | None:
    """The unconstrained tensor Pyro's global param store holds under ``name``."""
    return pyro.get_param_store()._params.get(name)


def stored_constraint(name: str, unconstrained: torch.Tensor) -> constraints.Constraint | None:
    """The constraint of ``name`` in the global store, if the store holds this very
    tensor (``None`` for a module-local parameter)."""
    store = pyro.get_param_store()
    if store._params.get(name) is not unconstrained:
        return None
    return store._constraints[name]


def _tensor_item(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _no_warning(value: Any, *args, **kwargs) -> Any:
    return value


@contextmanager
def elbo_without_items(classes: Iterable[type]) -> Iterator[None]:
    """In the modules defining ``classes`` (an ELBO's MRO), make ``torch_item`` return
    a detached tensor and ``warn_if_nan`` do nothing, so that the ELBO's loss is
    computed without reading a tensor's value (Pyro's ELBOs call both on every step)."""
    patched = []
    for module in {sys.modules[cls.__module__] for cls in classes}:
        for attr, replacement in (("torch_item", _tensor_item), ("warn_if_nan", _no_warning)):
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)
