"""ELBOs whose gradient step is captured once per model structure and replayed.

A Pyro SVI step spends much of its time in Python: two traces, a messenger stack,
a distribution object per site, the ELBO's sums. :class:`CompiledTrace_ELBO` runs
the model and guide once the ordinary way, to learn which parameters the step
reads, then captures the whole computation of the loss *and its gradients* with
``torch.fx``'s ``make_fx``: every tensor operation Pyro, the handlers and the
network perform (the random draws included) is recorded as one flat graph whose
inputs are the unconstrained parameters and the tensors among the arguments. Later
steps replay that graph: the same operations in the same order, so the same random
draws, the same loss and the same gradients as :class:`~pyro.infer.Trace_ELBO`,
without the Python around them.

A step is captured again when anything the graph baked in may have changed: the
arguments' shapes, dtypes and devices or their non-tensor values, the modules'
``training`` flags, the effect handlers around the step, which parameter tensors
the store holds, and the masks of a :class:`~pyro_bmr.BayesianModelReduction`
(which makes every ELBO it saw capturing forget its graphs). State the key cannot
see is frozen at capture (a model branching on a Python global or on Python's
``random``): call :meth:`forget` after changing it. A model whose Python code reads
tensor values (``.item()``, ``if tensor:``, data-dependent shapes) cannot be
captured; its step runs the plain ELBO, with one logged warning per structure.
"""

import logging
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message, effectful
from pyro.util import warn_if_nan
from torch.distributions import transform_to
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from pyro_bmr import _pyro_compat

__all__ = ["BACKENDS", "CompiledTraceMeanField_ELBO", "CompiledTrace_ELBO", "ENV_VAR"]

_logger = logging.getLogger(__name__)

#: How captured steps run: ``"inductor"`` compiles the graph with ``torch.compile``
#: (fused kernels; tens of seconds to compile a large network on CPU, once per model
#: structure), ``"fx"`` replays it as captured (no compile wait), ``"eager"`` runs
#: the plain ELBO (no capture).
BACKENDS = ("inductor", "fx", "eager")
#: Environment variable giving the default backend (default ``"inductor"``).
ENV_VAR = "PYRO_BMR_ELBO_BACKEND"
_FAILED = "failed"


class _Substitution(Messenger):
    """Answers ``pyro.param`` statements with the tensors being traced, and hides
    them from the handlers outside the step (SVI's own parameter capture)."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values
        self.used: set[str] = set()

    def _pyro_param(self, msg: Message) -> None:
        name = msg["args"][0]
        if name in self.values:
            msg["value"] = self.values[name]
            msg["done"] = True
            msg["stop"] = True
            self.used.add(name)


class _Param:
    """One parameter of a captured step: its unconstrained leaf and constraint."""

    def __init__(self, name: str, unconstrained: torch.Tensor, constraint) -> None:
        self.name = name
        self.leaf = weakref.ref(unconstrained)
        self.constraint = constraint
        self.in_store = _pyro_compat.stored_unconstrained(name) is unconstrained

    def current(self) -> torch.Tensor | None:
        """The leaf, or ``None`` if it is gone or the store now holds another."""
        leaf = self.leaf()
        if leaf is None or (
            self.in_store and _pyro_compat.stored_unconstrained(self.name) is not leaf
        ):
            return None
        return leaf


class _Step:
    """A captured step: the graph, what runs it, and the parameters it reads."""

    def __init__(
        self,
        graph: torch.fx.GraphModule,
        params: list[_Param],
        backend: str,
        cuda: bool,
        holds: list[bool],
    ) -> None:
        self.graph, self.params, self.backend = graph, params, backend
        self.holds = holds  # which parameters held a gradient at the capture
        self._run: Callable = graph
        # on CUDA, the compiled step is replayed as a CUDA graph: its outputs live in
        # memory the next replay overwrites, so the gradients handed out are copies
        self._cuda_graphs = backend == "inductor" and cuda
        if backend == "inductor":
            # eager random draws: the same numbers as the plain ELBO's, and faster on CPU
            options = {"fallback_random": True, "triton.cudagraphs": self._cuda_graphs}
            self._run = torch.compile(graph, dynamic=False, options=options)
        self._first = True

    def run(self, tensors: list[torch.Tensor]) -> float | None:
        leaves = [param.current() for param in self.params]
        if any(leaf is None for leaf in leaves):
            return None
        held, outside = [], []
        for leaf, holds in zip(leaves, self.holds):
            grad = leaf.grad
            if holds:  # accumulated by the graph
                held.append(torch.zeros_like(leaf) if grad is None else grad)
                outside.append(None)
            else:
                held.append(None)
                outside.append(grad)
        with torch.no_grad():
            if self._cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss, constrained, grads = self._call(leaves, tensors, held)
            if self._cuda_graphs:
                loss, constrained, grads = _copies((loss, constrained, grads))
        for param, leaf, value, grad, before in zip(
            self.params, leaves, constrained, grads, outside
        ):
            if grad is not None:
                leaf.grad = grad if before is None else before + grad
            value.unconstrained = weakref.ref(leaf)
            # what pyro.param would have said, for SVI's parameter capture
            effectful(lambda *_, value=value, **__: value, type="param")(
                param.name, name=param.name
            )
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss

    def _call(self, leaves: list[torch.Tensor], tensors: list[torch.Tensor], held: list):
        if not self._first:
            return self._run(leaves, tensors, held)
        self._first = False
        if self._run is self.graph:
            return self.graph(leaves, tensors, held)
        state = _random_state(tensors + leaves)
        try:
            return self._run(leaves, tensors, held)
        except Exception as error:  # noqa: BLE001 -- a compiler that fails falls back, logged
            _set_random_state(state)
            _logger.warning(
                "torch.compile failed on a captured ELBO step (%s: %s); replaying the "
                "captured graph uncompiled",
                type(error).__name__,
                str(error).split("\n")[0],
            )
            self._run, self.backend = self.graph, "fx"
            return self.graph(leaves, tensors, held)


class _CompiledELBO:
    """Captures the step of the ELBO it is mixed into (see the module's docstring)."""

    def __init__(self, *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        backend = os.environ.get(ENV_VAR, "inductor") if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        #: structure key → parameters seen in an eager step, a captured step, or
        #: "failed" (the name is what BayesianModelReduction clears on new masks)
        self.compiled: dict[tuple, Any] = {}

    def forget(self) -> None:
        """Drop every captured step: the next steps run eagerly, then capture again."""
        self.compiled.clear()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss, with its gradients accumulated into the parameters' ``.grad``."""
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        key = _structure_key(model, guide, leaves, spec)
        entry = self.compiled.get(key)
        if isinstance(entry, _Step):
            loss = entry.run(tensors)
            if loss is not None:
                return loss
            entry = None  # a parameter was replaced: learn the parameters again
        if entry is None:
            with pyro.poutine.trace(param_only=True) as seen:
                loss = super().loss_and_grads(model, guide, *args, **kwargs)
            self.compiled[key] = _params_of(seen.trace)
            return loss
        if entry == _FAILED or self.backend == "eager":
            return super().loss_and_grads(model, guide, *args, **kwargs)
        try:
            step = self._capture(entry, model, guide, leaves, spec)
        except Exception as error:  # noqa: BLE001 -- any failure falls back, logged
            _logger.warning(
                "%s: could not capture the step of %s (%s: %s); running the plain ELBO "
                "for arguments of this structure",
                type(self).__name__,
                getattr(model, "__name__", type(model).__name__),
                type(error).__name__,
                str(error).split("\n")[0],
            )
            self.compiled[key] = _FAILED
            return super().loss_and_grads(model, guide, *args, **kwargs)
        self.compiled[key] = step
        return step.run(tensors)

    def _capture(self, params: list[_Param], model, guide, leaves: list, spec) -> _Step:
        at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        eager_loss = super().differentiable_loss
        substituted: list[_Substitution] = []

        def step(unconstrained: list[torch.Tensor], tensors: list[torch.Tensor], held: list):
            values = list(leaves)
            for i, tensor in zip(at, tensors):
                values[i] = tensor
            args, kwargs = tree_unflatten(values, spec)
            constrained = [
                transform_to(param.constraint)(value) for param, value in zip(params, unconstrained)
            ]
            for value, leaf in zip(constrained, unconstrained):
                # what a subsampled plate looks up (it marks the leaf with the indices
                # for DCTAdam, which replays therefore do not refresh)
                value.unconstrained = weakref.ref(leaf)
            substitution = _Substitution({p.name: c for p, c in zip(params, constrained)})
            substituted.append(substitution)
            with substitution:
                loss = eager_loss(model, guide, *args, **kwargs)
            grads = torch.autograd.grad(loss, unconstrained, allow_unused=True)
            # accumulating into the gradients already held, inside the graph, is fused
            # into the kernels that compute them (outside, it is one more pass each)
            grads = [g if h is None or g is None else h + g for g, h in zip(grads, held)]
            return loss.detach(), [c.detach() for c in constrained], grads

        current = [param.current() for param in params]
        inputs = [leaf.detach().requires_grad_() for leaf in current]
        tensors = [leaves[i] for i in at]
        held = [leaf.grad for leaf in current]
        with _random_state_kept(tensors + current), _tracing(self, type(self).__mro__):
            graph = make_fx(step)(inputs, tensors, held)
        missed = [p.name for p in params if p.name not in substituted[0].used]
        if missed:
            raise RuntimeError(f"parameters {missed} were read around the substitution")
        graph.graph.eliminate_dead_code()
        graph.recompile()
        _check_constants(graph, current)
        cuda = any(t.is_cuda for t in tensors + current)
        return _Step(graph, params, self.backend, cuda, [h is not None for h in held])


def _copies(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([x.clone() if isinstance(x, torch.Tensor) else x for x in leaves], spec)


def _params_of(trace) -> list[_Param]:
    params = []
    for name, site in trace.nodes.items():
        # the trace holds what the step read, which a subsampled plate slices: the
        # store (or the value's own reference, for a module-local one) has the whole
        unconstrained = _pyro_compat.stored_unconstrained(name)
        if unconstrained is None:
            unconstrained = site["value"].unconstrained()
        constraint = _pyro_compat.stored_constraint(name, unconstrained)
        if constraint is None:
            constraint = site["kwargs"].get("constraint", torch.distributions.constraints.real)
        params.append(_Param(name, unconstrained, constraint))
    return params


def _structure_key(model, guide, leaves: list, spec) -> tuple:
    arguments = tuple(
        (leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad)
        if isinstance(leaf, torch.Tensor)
        else _hashable(leaf)
        for leaf in leaves
    )
    return (
        id(model),
        id(guide),
        str(spec),
        arguments,
        torch.is_grad_enabled(),
        _pyro_compat.handler_types(),
        _training_flags(model) + _training_flags(guide),
    )


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value), value)


def _modules(fn: Any) -> Iterator[torch.nn.Module]:
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if isinstance(fn, torch.nn.Module):
            yield fn
        fn = getattr(fn, "__wrapped__", None)


def _training_flags(fn: Any) -> tuple[bool, ...]:
    return tuple(m.training for module in _modules(fn) for m in module.modules())


def _check_constants(graph: torch.fx.GraphModule, leaves: list[torch.Tensor]) -> None:
    """A parameter baked in as a constant would get no gradient: refuse the capture."""
    pointers = {leaf.untyped_storage().data_ptr() for leaf in leaves}
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = getattr(graph, node.target)
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in pointers:
                raise RuntimeError(f"a parameter was read as a constant ({node.target})")


def _random_state(tensors: list[torch.Tensor]) -> tuple:
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.random.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}


def _set_random_state(state: tuple) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    for device, device_state in cuda.items():
        torch.cuda.set_rng_state(device_state, device)


@contextmanager
def _random_state_kept(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Capturing draws random numbers: put the generators back so that the first
    replay draws what the plain ELBO would have."""
    state = _random_state(tensors)
    try:
        yield
    finally:
        _set_random_state(state)


@contextmanager
def _tracing(elbo: Any, classes: tuple[type, ...]) -> Iterator[None]:
    """While capturing: no validation (its checks read tensor values), Pyro's
    ``torch_item`` and NaN warnings made tensor-only, and the ELBO announced to the
    handlers that bake state into the graph."""
    with pyro.validation_enabled(False), _pyro_compat.elbo_without_items(classes):
        with _pyro_compat.capturing(elbo), _samples_unchecked():
            yield


@contextmanager
def _samples_unchecked() -> Iterator[None]:
    """Distributions built while validation was on (a ``PyroSample`` prior made with
    the module) check each value they score, which reads the value: not while
    capturing (the eager step before the capture checked them)."""
    distribution = torch.distributions.Distribution
    check = distribution._validate_sample
    distribution._validate_sample = lambda self, value: None
    try:
        yield
    finally:
        distribution._validate_sample = check


class CompiledTrace_ELBO(_CompiledELBO, Trace_ELBO):
    """:class:`~pyro.infer.Trace_ELBO` with its step captured and replayed.

    Same arguments, same loss and gradients for the same random draws; a drop-in
    objective for :class:`~pyro.infer.SVI`, :class:`~pyro_bmr.StochasticBMR` and any
    training loop that calls ``loss_and_grads``. The first step of each model
    structure runs eagerly, the second captures the graph (about one eager step's
    time plus the tracing), the rest replay it. ``loss`` and
    ``differentiable_loss`` are Pyro's.
    """


class CompiledTraceMeanField_ELBO(_CompiledELBO, TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL terms where they
    exist) with its step captured and replayed, as :class:`CompiledTrace_ELBO`."""
