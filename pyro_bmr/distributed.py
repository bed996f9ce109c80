"""Data-parallel SVI across processes with ``torch.distributed``.

Every process (rank) runs the same model and guide, with the same parameters and
the **same random seed**, on its own shard of each global batch: the guide's global
latents are drawn identically on every rank, as one process holding the whole
global batch would draw them, and only the data differ. After each step's gradients
are computed and before the optimiser steps, :class:`DataParallelOptimizer`
averages them across the ranks with one ``all_reduce`` of a flat buffer, the
pattern of Pyro's :class:`~pyro.optim.horovod.HorovodOptimizer`. With ``W`` ranks
of ``b = B / W`` examples each and a likelihood scaled by ``N / b`` (a
``pyro.plate`` of size ``N`` over the rank's ``b`` examples), the mean of the
ranks' gradients of the loss :math:`L_r = \\log q(z) - \\log p(z) - \\frac{N}{b}
\\sum_{i \\in \\mathrm{shard}_r} \\log p(y_i \\mid z)` is

.. math::

    \\frac1W \\sum_r \\nabla L_r = \\nabla \\Bigl[\\log q(z) - \\log p(z)
    - \\frac{N}{B} \\sum_{i \\in \\mathrm{batch}} \\log p(y_i \\mid z)\\Bigr],

the gradient of one process on the union of the shards, for the same draw of
:math:`z`. The optimiser then takes the same step on every rank, so the parameters
stay equal without being sent again.

Why not :class:`torch.nn.parallel.DistributedDataParallel` over Pyro's
``ELBOModule``: DDP averages gradients in autograd hooks that ``loss.backward()``
fires, whereas :class:`~pyro_bmr.compiled_elbo.CompiledTrace_ELBO`, the default
ELBO, computes its gradients with ``torch.autograd.grad`` inside a captured graph
and adds them into ``param.grad`` itself; DDP's hooks would never fire, and the
ranks would drift apart silently. Averaging in the optimiser works with every
ELBO, and with parameters that live in Pyro's param store rather than in one
module.

The equal seeds have a consequence for draws that are *not* global. A local latent
or a local reparameterisation (:class:`~pyro_bmr.poutine.LocalReparameterizationMessenger`
draws one noise per example and unit), and dropout, draw the same numbers on every
rank: example ``j`` of each shard gets the same noise. The gradient is still
unbiased, but these draws are not independent across the shards as they would be in
one process, so its variance is somewhat higher and the run is not the
single-process run; only global latents (``AutoNormal`` over a network's weights)
match it exactly.

After a reduction, :func:`synchronize_reduction` gives every rank rank 0's masks and
parameters, so that they never diverge (:class:`~pyro_bmr.StochasticBMR` does it);
:func:`init_from_environment` starts the process group that ``torchrun`` describes;
:func:`set_sampler_epoch` gives a ``DistributedSampler`` its epoch.
"""

import hashlib
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro.optim import PyroOptim

__all__ = [
    "DataParallelOptimizer",
    "average_gradients",
    "broadcast_tensors",
    "init_from_environment",
    "is_distributed",
    "local_batch_size",
    "mean_over_ranks",
    "set_sampler_epoch",
    "synchronize_reduction",
    "world",
]

Group = Any  # torch.distributed.ProcessGroup, whose import path moves between releases


def world(group: Group | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (default: the default
    group); ``(0, 1)`` where no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_distributed(group: Group | None = None) -> bool:
    """Whether a process group with more than one process is initialised."""
    return world(group)[1] > 1


def local_batch_size(global_batch_size: int, group: Group | None = None) -> int:
    """The batch of one rank: ``global_batch_size`` divided among the ranks.

    :raises ValueError: if it does not divide, naming both numbers.
    """
    size = world(group)[1]
    if global_batch_size % size:
        raise ValueError(
            f"the global batch size {global_batch_size} does not divide among {size} "
            f"processes; choose a multiple of {size}"
        )
    return global_batch_size // size


def init_from_environment(
    device: str | torch.device | None = None, *, timeout: timedelta | None = None
) -> torch.device:
    """Initialise the default process group from the environment ``torchrun`` sets
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), and
    return this rank's device.

    On CUDA (``device`` of type ``"cuda"``, or ``None`` where CUDA is available) the
    rank trains on ``cuda:LOCAL_RANK``, made the current device, and the group uses
    NCCL; on the CPU it uses gloo. Without ``WORLD_SIZE``, or with a world of one
    process, no group is initialised; a group already initialised is kept.

    :param device: ``"cpu"``, ``"cuda"`` or a ``torch.device``; under torchrun the
        index of a CUDA device is ``LOCAL_RANK``'s.
    :param timeout: how long a collective may wait for the other ranks (torch's
        default where ``None``).
    :raises ValueError: for a malformed or incomplete environment, or more processes
        on this node than it has CUDA devices.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    size = _environment_int("WORLD_SIZE", default=1)
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be positive, got {size}")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        local, count = _environment_int("LOCAL_RANK", default=0), torch.cuda.device_count()
        if not 0 <= local < count:
            raise ValueError(
                f"LOCAL_RANK is {local}, but this node has {count} CUDA device(s): start at "
                f"most {count} processes per node (torchrun --nproc-per-node {count})"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE is {size}, but this torch has no torch.distributed")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {size}, but {', '.join(missing)} is not set: start the processes "
            "with torchrun (torchrun --nproc-per-node N ...), which sets them"
        )
    options: dict[str, Any] = {"backend": "nccl" if device.type == "cuda" else "gloo"}
    if timeout is not None:
        options["timeout"] = timeout
    if device.type == "cuda":
        options["device_id"] = device  # connects eagerly, and binds the rank to its GPU
    dist.init_process_group(**options)
    return device


def _environment_int(name: str, *, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


class DataParallelOptimizer(PyroOptim):
    """Average the gradients across the ranks, then step ``optim``.

    A Pyro optimiser for :class:`~pyro.infer.SVI` and
    :class:`~pyro_bmr.StochasticBMR` in a data-parallel run: each call orders the
    parameters by their name in Pyro's param store (the same order on every rank),
    averages their gradients with :func:`average_gradients`, and hands them to
    ``optim``, whose state is the optimiser's state (``get_state``, ``set_state``,
    ``save`` and ``load`` are ``optim``'s). A parameter seen for the first time is
    first made equal on every rank, with rank 0's value, as DDP does when it wraps a
    module (with the same seed everywhere, the values are equal already). Clipping,
    if ``optim`` has it, clips the averaged gradients.

    .. code-block:: python

        optim = DataParallelOptimizer(pyro.optim.Adam({"lr": 1e-3}))
        svi = SVI(model, guide, optim, Trace_ELBO())

    :param PyroOptim optim: the optimiser to step; a learning-rate scheduler
        (``pyro.optim.ExponentialLR`` ...) keeps its ``step()``.
    :param group: the process group (default: the default group).
    :raises TypeError: if ``optim`` is not a Pyro optimiser.
    """

    def __init__(self, optim: PyroOptim, group: Group | None = None) -> None:
        if not isinstance(optim, PyroOptim):
            raise TypeError(f"optim must be a Pyro optimiser (PyroOptim), got {optim!r}")
        if isinstance(optim, DataParallelOptimizer):
            raise TypeError("optim is already a DataParallelOptimizer")
        # every attribute PyroOptim would set lives in ``optim`` (see __getattr__)
        self.optim = optim
        self.group = group
        # id → weak reference of the parameters seen (a WeakSet would compare tensors
        # with ==, elementwise, on a hash collision)
        self._seen: dict[int, weakref.ref] = {}

    def __getattr__(self, name: str) -> Any:
        if name in ("optim", "group", "_seen"):  # not yet set: unpickling, copying
            raise AttributeError(name)
        return getattr(self.optim, name)

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        params = _by_name(params)
        new = [p for p in params if (ref := self._seen.get(id(p))) is None or ref() is not p]
        if new:
            with torch.no_grad():
                broadcast_tensors(new, group=self.group, names=_names(new))
            self._seen.update((id(p), weakref.ref(p)) for p in new)
        average_gradients(params, self.group)
        self.optim(params, *args, **kwargs)

    def step(self, *args, **kwargs) -> None:
        """A scheduler's ``step`` (``pyro.optim.PyroLRScheduler``), forwarded."""
        self.optim.step(*args, **kwargs)

    def get_state(self) -> dict:
        return self.optim.get_state()

    def set_state(self, state_dict: dict) -> None:
        self.optim.set_state(state_dict)

    def save(self, filename: str) -> None:
        self.optim.save(filename)

    def load(self, filename: str, map_location=None) -> None:
        self.optim.load(filename, map_location=map_location)


def _names(params: Sequence[torch.Tensor]) -> list[str]:
    store = pyro.get_param_store()
    return [store.param_name(p) for p in params]


def _by_name(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` ordered by their param-store names: SVI hands a set, whose order
    follows memory addresses and differs between processes."""
    params = list(params)
    names = _names(params)
    unnamed = [tuple(p.shape) for p, name in zip(params, names) if name is None]
    if unnamed:
        raise ValueError(
            f"{len(unnamed)} parameter(s) (shapes {unnamed[:5]}) are not in Pyro's param "
            "store, so they have no name to order them by across processes; a data-parallel "
            "run needs the store (pyro.settings.set(module_local_params=False), the default)"
        )
    return [p for _, p in sorted(zip(names, params), key=lambda pair: pair[0])]


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` by device and dtype: one flat buffer each."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return buckets


def average_gradients(params: Sequence[torch.Tensor], group: Group | None = None) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in place.

    One ``all_reduce`` per device and dtype (one, for most models) of a flat buffer
    holding every gradient and, after them, one count per parameter of the ranks
    that have a gradient. A rank without a gradient for a parameter (the parameter
    did not reach its loss) adds zeros, and gets the mean if any rank had one; a
    parameter no rank has a gradient for keeps ``grad = None``, so the optimiser
    skips it as it would in one process. ``params`` must be in the same order on
    every rank. Nothing happens outside a multi-process group.

    :raises ValueError: for a sparse gradient.
    """
    if world(group)[1] == 1:
        return
    size = world(group)[1]
    params = list(params)
    for (device, dtype), indices in _buckets(params).items():
        bucket = [params[i] for i in indices]
        parts, has = [], []
        for p in bucket:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"sparse gradients are not averaged (shape {tuple(p.shape)})")
            has.append(p.grad is not None)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append(grad.reshape(-1).to(dtype))
        parts.append(torch.tensor(has, dtype=dtype, device=device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        means = flat[: -len(bucket)].split([p.numel() for p in bucket])
        # the counts are read on the host only where this rank lacks a gradient
        # (rarely), so that a GPU step does not wait for them otherwise
        counts = flat[-len(bucket) :].tolist() if not all(has) else None
        for i, (p, mean) in enumerate(zip(bucket, means)):
            if has[i]:
                p.grad.copy_(mean.view_as(p.grad))
            elif counts[i] > 0:
                p.grad = mean.view_as(p).clone()


def broadcast_tensors(
    tensors: Sequence[torch.Tensor],
    src: int = 0,
    group: Group | None = None,
    *,
    names: Sequence[str | None] | None = None,
) -> None:
    """Overwrite ``tensors``, in place, with rank ``src``'s.

    One ``broadcast`` per device and dtype of a flat buffer (bool tensors travel as
    bytes). First, every rank checks, with one small ``all_reduce``, that all of them
    hold the same names, shapes and dtypes, so that a mismatch is an error on every
    rank instead of scrambled values or a hang. Call it under ``torch.no_grad()`` for
    tensors that require gradients. Nothing happens outside a multi-process group.

    :param tensors: the tensors, in the same order on every rank.
    :param int src: the rank (in ``group``) whose values are sent.
    :param names: optional names of the tensors, checked too and shown in errors.
    :raises RuntimeError: if the ranks' tensors differ in names, shapes or dtypes.
    """
    if world(group)[1] == 1 or not tensors:
        return
    tensors = list(tensors)
    names = [None] * len(tensors) if names is None else list(names)
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in zip(names, tensors)]
    _check_same_everywhere(layout, tensors[0].device, group)
    for (_, dtype), indices in _buckets(tensors).items():
        wire = torch.uint8 if dtype == torch.bool else dtype
        flat = torch.cat([tensors[i].detach().reshape(-1).to(wire) for i in indices])
        dist.broadcast(flat, group=group, group_src=src)
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            tensors[i].copy_(part.view(tensors[i].shape).to(dtype))


def _check_same_everywhere(layout: list, device: torch.device, group: Group | None) -> None:
    digest = hashlib.blake2b(repr(layout).encode(), digest_size=8).digest()
    fingerprint = int.from_bytes(digest, "little") >> 2  # fits an int64 with its negative
    device = _collective_device(device, group)
    both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if both.tolist() != [fingerprint, -fingerprint]:
        shown = ", ".join(f"{n or '?'} {list(s)} {d}" for n, s, d in layout[:8])
        more = f" and {len(layout) - 8} more" if len(layout) > 8 else ""
        raise RuntimeError(
            f"rank {world(group)[0]}: the processes hold different tensors to synchronise "
            f"(names, shapes or dtypes); this rank has {len(layout)}: {shown}{more}. Every "
            "rank must build the same model and guide"
        )


def _collective_device(device: torch.device, group: Group | None) -> torch.device:
    """Where a small tensor of a collective must live: NCCL reduces CUDA tensors only."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def mean_over_ranks(value: float, group: Group | None = None) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in one process): e.g.
    the epoch's loss, each rank's an estimate on its shard."""
    size = world(group)[1]
    if size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(_collective_device(t.device, group))
    dist.all_reduce(t, group=group)
    return float(t) / size


def synchronize_reduction(
    bmr: Any,
    src: int = 0,
    group: Group | None = None,
    *,
    parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> None:
    """Give every rank rank ``src``'s masks, reduction state and parameters.

    Call it on every rank after each rank has reduced: the reductions see the same
    parameters and should agree, and this makes sure they do, so that the masks never
    diverge. Sends ``bmr.state_dict()`` (the masks, and a
    :class:`~pyro_bmr.horseshoe_reduction.HorseshoeReduction`'s factors), loaded on
    the other ranks with ``bmr.load_state_dict``, and the parameters (what a reduction
    writes: pruned locations set to zero, posteriors updated).

    :param bmr: a :class:`~pyro_bmr.BayesianModelReduction` or anything with
        ``state_dict`` and ``load_state_dict`` of tensors.
    :param int src: the rank (in ``group``) whose state is sent.
    :param parameters: ``(name, tensor)`` pairs to send, e.g. a module's
        ``named_parameters()``; default every parameter of Pyro's param store.
    :raises TypeError: for a handler without ``state_dict``.
    :raises RuntimeError: if the ranks' masks or parameters differ in names or shapes.
    """
    rank, size = world(group)
    if size == 1:
        return
    if not (hasattr(bmr, "state_dict") and hasattr(bmr, "load_state_dict")):
        raise TypeError(
            f"{type(bmr).__name__} has no state_dict/load_state_dict: its reductions cannot "
            "be made the same on every rank"
        )
    state = bmr.state_dict()
    paths = sorted(_tensor_paths(state))
    tensors = [_get(state, path) for path in paths]
    if parameters is None:
        parameters = pyro.get_param_store().named_parameters()
    named = sorted(parameters, key=lambda pair: pair[0])
    with torch.no_grad():
        broadcast_tensors(tensors, src, group, names=["/".join(p) for p in paths])
        if rank != src:
            bmr.load_state_dict(state)
        broadcast_tensors([p for _, p in named], src, group, names=[n for n, _ in named])


def _tensor_paths(state: Mapping, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in state.items():
        if isinstance(value, Mapping):
            paths += _tensor_paths(value, prefix + (str(key),))
        elif isinstance(value, torch.Tensor):
            paths.append(prefix + (str(key),))
    return paths


def _get(state: Mapping, path: tuple) -> torch.Tensor:
    for key in path:
        state = state[key]
    return state


def set_sampler_epoch(data: Any, epoch: int) -> bool:
    """Call ``set_epoch(epoch)`` on the sampler of ``data`` (a ``DataLoader`` whose
    sampler, batch sampler, or their inner sampler has it, as
    :class:`~torch.utils.data.distributed.DistributedSampler` does), so that each
    epoch has its own order, the same on every rank and in a resumed run.

    :returns: whether a sampler took the epoch.
    """
    holders = [data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)]
    holders += [getattr(holder, "sampler", None) for holder in holders[1:]]
    called: set[int] = set()
    for sampler in holders:
        if sampler is not None and id(sampler) not in called:
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)
                called.add(id(sampler))
    return bool(called)
