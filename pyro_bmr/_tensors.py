"""Small tensor helpers shared by the math and the handlers (private)."""

import functools

import torch


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast (stride-0) dimensions, which stay as size 1, so
    that arithmetic on a prior like ``Normal(0, 1).expand(shape)`` costs one
    element, not ``shape``. Under ``torch.jit`` tracing shapes are traced values,
    so ``t`` is returned as it is."""
    if torch.jit.is_tracing():
        return t
    for dim in range(t.dim()):
        if t.stride(dim) == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def as_tensors(*values: float | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``values`` as tensors of one floating dtype (the promotion of the tensors',
    else the default) on the device of the first tensor (else the CPU)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        device = tensors[0].device
    else:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    return tuple(torch.as_tensor(v, dtype=dtype, device=device) for v in values)
