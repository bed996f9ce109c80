"""The file behind :meth:`StochasticBMR.save_checkpoint
<pyro_bmr.StochasticBMR.save_checkpoint>` (private).

A checkpoint is one ``torch.save`` file of tensors and plain Python values, so that
``torch.load(path, weights_only=True)`` reads it: the unconstrained values of Pyro's
param store by name, the optimiser's state (``PyroOptim.get_state``), the
reduction's ``state_dict``, the epochs done and the history, and the random
generators (torch's on the CPU and on the parameters' CUDA device, Python's
``random``, NumPy's where it is installed). Everything in it is the same on every
rank of a data-parallel run, so a run resumes with any number of processes.
"""

import os
import pickle
import random
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyro
import torch

__all__ = ["FORMAT", "VERSION", "CheckpointError"]

#: What the ``"format"`` entry of a checkpoint says.
FORMAT = "pyro_bmr.StochasticBMR"
#: The layout written; a reader refuses a newer one.
VERSION = 1
_ENTRIES = {
    "epochs_done": int,
    "history": list,
    "params": dict,
    "optim": dict,
    "bmr": dict,
    "rng": dict,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded
    into; the message names the file and what is wrong with it."""


def write(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: to a temporary file beside it, then
    renamed over it, so that a reader (or a run killed while writing) sees the old
    checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be one (tensors on the CPU).

    :raises FileNotFoundError: if there is no such file.
    :raises CheckpointError: for a file that is not a readable checkpoint of this
        format, naming it and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not zipfile.is_zipfile(path):  # what torch.save writes
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is not a file torch.save wrote, or "
            "it was cut short (a run killed while writing to it directly?)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(
            r"(Unsupported global: GLOBAL \S+|WeightsUnpickler error: [^\n]*)", str(error)
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds more than tensors and plain Python values, so "
            "torch.load(weights_only=True) refuses it: it was not written by save_checkpoint"
            + (f" ({found.group(1)})" if found else "")
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read (truncated, or not written by "
            f"torch.save): {type(error).__name__}: {first}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint of StochasticBMR.save_checkpoint (its format "
            f"entry is {found!r}, expected {FORMAT!r})"
        )
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has layout version {version!r}; this pyro_bmr reads "
            f"up to {VERSION}: upgrade pyro_bmr to resume it"
        )
    for key, kind in _ENTRIES.items():
        if not isinstance(state.get(key), kind):
            got = "missing" if key not in state else type(state[key]).__name__
            raise CheckpointError(
                f"checkpoint {str(path)!r}: entry {key!r} should be a {kind.__name__}, got {got}"
            )
    rng = state["rng"]
    if not (
        isinstance(rng.get("torch"), torch.Tensor)
        and isinstance(rng.get("random"), (tuple, list))
        and len(rng["random"]) == 3
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: entry 'rng' should hold the states of torch's and "
            f"Python's generators, got keys {sorted(rng)}"
        )
    bad = [name for name, value in state["params"].items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r}: parameters {bad} are not tensors")
    return state


# -- Pyro's param store -----------------------------------------------------------------


def store_state() -> dict[str, torch.Tensor]:
    """Name → a CPU copy of the unconstrained value, for every parameter in the store."""
    return {
        name: value.detach().to("cpu", copy=True)
        for name, value in pyro.get_param_store().named_parameters()
    }


def missing_from_store(params: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``params`` that the store does not hold (yet)."""
    held = dict(pyro.get_param_store().named_parameters())
    return sorted(name for name in params if name not in held)


def load_store(params: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy ``params`` into the store's parameters, in place (so that optimisers and
    captured steps keep their tensors); the names, shapes and dtypes must match."""
    held = dict(pyro.get_param_store().named_parameters())
    missing = sorted(set(held) - set(params))
    unexpected = sorted(set(params) - set(held))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model's parameters: "
            + "; ".join(
                part
                for part in (
                    f"the model has {missing}, which the checkpoint lacks" if missing else "",
                    f"the checkpoint has {unexpected}, which the model and guide do not create"
                    if unexpected
                    else "",
                )
                if part
            )
            + ". Build the same model and guide as the run that saved it"
        )
    for name in sorted(params):
        value, target = params[name], held[name]
        if value.shape != target.shape or value.dtype != target.dtype:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: parameter {name!r} is {value.dtype} of shape "
                f"{tuple(value.shape)}, the model's is {target.dtype} of shape "
                f"{tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, value in params.items():
            held[name].copy_(value)


# -- random generators ---------------------------------------------------------------------


def rng_state(device: torch.device | None) -> dict[str, Any]:
    """The state of torch's CPU generator, of ``device``'s where it is a CUDA
    device, of Python's ``random`` and of NumPy's global generator (if installed)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    numpy = sys.modules.get("numpy") or _import_numpy()
    if numpy is not None:
        name, keys, position, has_gauss, gauss = numpy.random.get_state()
        # an ndarray would need numpy's globals to load under weights_only
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), position, has_gauss, gauss)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None) -> None:
    """Restore what :func:`rng_state` saved; the CUDA state goes to ``device``."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    numpy = sys.modules.get("numpy") or _import_numpy()
    if "numpy" in state and numpy is not None:
        name, keys, position, has_gauss, gauss = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, gauss))


def rng_device() -> torch.device | None:
    """The CUDA device whose generator a checkpoint holds: that of the param store's
    parameters, else the current one; ``None`` without CUDA in use."""
    for _, value in pyro.get_param_store().named_parameters():
        if value.device.type == "cuda":
            return value.device
        break
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextmanager
def generators_kept() -> Iterator[None]:
    """Put the generators :func:`rng_state` knows (the CUDA one of
    :func:`rng_device`) back as they were once the block ends."""
    device = rng_device()
    state = rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
