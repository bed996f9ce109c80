"""Make a structurally sparse network smaller: remove the units that do nothing.

A structured reduction zeroes whole units: a neuron (a row of a ``Linear`` weight
and its bias entry), a convolution channel (a filter and its bias), an attention
head (its query, key and value rows), and the next layer's weights reading a
pruned unit. :func:`shrink` turns such a network into one with smaller dense
layers that computes the same function (in ``eval`` mode): fewer output features,
channels or heads, the next layer's inputs cut to match. A unit goes when

* no later layer reads it (the reading weights are all zero), which is always
  exact; or
* its own weights are all zero, so that it outputs a constant: nothing where the
  modules after it map its bias to zero (no bias, ReLU, GELU, SiLU, tanh, ...);
  else the constant is folded into the next layer's bias where that is exact (a
  ``Linear``, an unpadded convolution), and the unit is otherwise kept.

Layers are recognised where their wiring is known (``pyro_bmr._unit_slicing``
holds the arithmetic):

* in an ``nn.Sequential`` (one that runs its children in order): an ``nn.Linear``
  or ``nn.Conv1d``/``2d``/``3d`` (``groups=1``), then modules that keep the units
  apart (elementwise activations, dropout, ``nn.Identity``; after a convolution
  also pooling and ``nn.BatchNorm*``, whose channels are sliced too), at most one
  ``nn.Flatten()``, then the next such layer (a flattened channel is a block of its
  input columns). Repeated until nothing changes, so that dead units propagate.
* timm's ``Mlp`` (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``, as in ViT and both
  MLPs of MLP-Mixer) when ``norm`` is the identity: its hidden units.
* timm's ``Attention`` without ``norm`` before the output projection and without
  ``gate``: its heads. A head goes when its value rows are zero (its output is its
  value bias, averaged by the attention: folded into ``proj``'s bias) or when
  ``proj`` reads none of it; its query, key and value rows go with it, and
  ``num_heads`` and ``attn_dim`` shrink. Query and key norms act per head.

A layer keeps at least one unit: where every unit may go, one stays with zero
weights, read by nothing, so that it contributes nothing (zero-width layers run in
eager PyTorch on CPU, but not in every kernel, compiler or export format).

timm's modules are recognised by their ``forward`` (a subclass with its own, or a
look-alike such as ``GluMlp``, is left alone). A module whose parameters are also
used elsewhere is left alone, and so is everything else.
"""

import copy
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

from pyro_bmr._unit_slicing import (
    BATCH_NORM,
    LAYERS,
    POOLING,
    UnitLink,
    is_elementwise,
    set_tensor,
)
from pyro_bmr.groups import UnitCount

__all__ = ["Shrunk", "shrink"]


class Shrunk(NamedTuple):
    """What :func:`shrink` returns.

    :ivar network: the smaller network.
    :ivar units: for every layer whose units it could remove (a ``Linear``, a
        convolution, an ``Mlp``'s ``fc1``, an ``Attention`` for its heads), its name
        in the network → :class:`~pyro_bmr.groups.UnitCount` (units kept, units before).
    """

    network: nn.Module
    units: dict[str, UnitCount]


def shrink(module: nn.Module, *, inplace: bool = False) -> Shrunk:
    """Remove the units of ``module`` that do nothing (see the module's description).

    The result computes what ``module`` computes, in ``eval`` mode, up to floating
    point rounding where constants are folded into a bias; its layers are ordinary
    ``torch.nn`` layers of smaller sizes, with the same names.

    .. code-block:: python

        small, units = shrink(net)
        print(units)  # {'0': (4, 6), '3': (14, 16), ...}: (kept, before) per layer

    :param module: a plain ``torch.nn`` network, e.g. one that
        :func:`~pyro_bmr.export` returned with ``compress=False``.
    :param bool inplace: change ``module`` itself rather than a copy.
    :returns: the network and the units kept per layer, a :class:`Shrunk`.
    """
    network = module if inplace else copy.deepcopy(module)
    shared = _shared(network)
    units: dict[str, UnitCount] = {}
    with torch.no_grad():
        for path, sub in network.named_modules():
            if _is_timm_attention(sub) and not {id(sub.qkv), id(sub.proj)} & shared:
                units[path] = UnitCount(*_shrink_heads(sub))
                continue
            if isinstance(sub, nn.Sequential) and type(sub).forward is nn.Sequential.forward:
                links = _sequential_links(sub, shared)
            elif _is_timm_mlp(sub) and not {id(sub.fc1), id(sub.fc2)} & shared:
                links = [("fc1", UnitLink(sub.fc1, _mlp_between(sub), sub.fc2))]
            else:
                continue
            before = [link.width for _, link in links]
            while any([link.step() for _, link in links]):  # every link, every round
                pass
            for (name, link), total in zip(links, before):
                units[f"{path}.{name}" if path else name] = UnitCount(link.width, total)
    return Shrunk(network, units)


def _shared(network: nn.Module) -> set[int]:
    """Ids of the modules used in more than one place, or with a tensor that is."""
    places: defaultdict[int, set] = defaultdict(set)
    owners: defaultdict[int, set] = defaultdict(set)
    for parent in network.modules():
        for name, child in parent._modules.items():
            if child is not None:
                places[id(child)].add((id(parent), name))
        for tensor in [*parent._parameters.values(), *parent._buffers.values()]:
            if tensor is not None:
                owners[id(tensor)].add(id(parent))
    shared = {module for module, where in places.items() if len(where) > 1}
    for modules in owners.values():
        if len(modules) > 1:
            shared |= modules
    return shared


# -- nn.Sequential ---------------------------------------------------------------------


def _sequential_links(seq: nn.Sequential, shared: set[int]) -> list[tuple[str, UnitLink]]:
    names, items = list(seq._modules), list(seq)
    links = []
    for i, producer in enumerate(items):
        if type(producer) not in LAYERS:
            continue
        j = next((j for j in range(i + 1, len(items)) if type(items[j]) in LAYERS), None)
        if j is None:
            continue  # the sequence's outputs
        between, consumer = items[i + 1 : j], items[j]
        parametrised = [producer, consumer, *(m for m in between if isinstance(m, BATCH_NORM))]
        if any(id(m) in shared for m in parametrised):
            continue
        if _wired(producer, between, consumer):
            links.append((names[i], UnitLink(producer, between, consumer)))
    return links


def _wired(producer: nn.Module, between: list[nn.Module], consumer: nn.Module) -> bool:
    """Whether unit ``i`` of ``producer`` reaches ``consumer`` alone, as its input
    column ``i`` or block of columns ``i``, or its input channel ``i``."""
    if getattr(producer, "groups", 1) != 1 or getattr(consumer, "groups", 1) != 1:
        return False
    width = producer.weight.shape[0]
    conv = not isinstance(producer, nn.Linear)
    flat = [m for m in between if type(m) is nn.Flatten]
    if len(flat) > 1 or any((m.start_dim, m.end_dim) != (1, -1) for m in flat):
        return False
    cut = between.index(flat[0]) if flat else len(between)
    for module in between[:cut]:
        # a Linear's units are its last dimension: pooling and batch norm see another
        spatial = conv and (
            type(module) in POOLING or (type(module) in BATCH_NORM and module.num_features == width)
        )
        if not (is_elementwise(module) or spatial):
            return False
    if not all(is_elementwise(m) for m in between[cut + 1 :]):
        return False
    if isinstance(consumer, nn.Linear):
        if conv:  # (N, C, ...) flattened: channel c is a block of columns
            return bool(flat) and consumer.in_features % width == 0
        return consumer.in_features == width
    return conv and not flat and consumer.in_channels == width


# -- timm ------------------------------------------------------------------------------


def _runs(module: nn.Module, where: str, qualname: str) -> bool:
    """Whether ``module``'s forward is the function ``where.qualname``."""
    forward = getattr(type(module), "forward", None)
    return (
        getattr(forward, "__module__", None) == where
        and getattr(forward, "__qualname__", None) == qualname
    )


def _is_timm_mlp(module: nn.Module) -> bool:
    return (
        _runs(module, "timm.layers.mlp", "Mlp.forward")
        and type(getattr(module, "fc1", None)) is nn.Linear
        and type(getattr(module, "fc2", None)) is nn.Linear
        and module.fc2.in_features == module.fc1.out_features
        and all(is_elementwise(m) for m in _mlp_between(module))
        and type(module.norm) is nn.Identity  # a LayerNorm would mix the units
    )


def _mlp_between(mlp: nn.Module) -> list[nn.Module]:
    return [mlp.act, mlp.drop1, mlp.norm]


def _per_head(norm: nn.Module, head_dim: int) -> bool:
    if type(norm) is nn.Identity:
        return True
    shape = getattr(norm, "normalized_shape", None)  # LayerNorm, RMSNorm, timm's
    return shape is not None and tuple(shape) == (head_dim,)


def _is_timm_attention(module: nn.Module) -> bool:
    if not _runs(module, "timm.layers.attention", "Attention.forward"):
        return False
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int)):
        return False
    if type(qkv) is not nn.Linear or type(proj) is not nn.Linear:
        return False
    attn_dim = heads * head_dim
    return (
        getattr(module, "attn_dim", None) == attn_dim
        and qkv.out_features == 3 * attn_dim
        and proj.in_features == attn_dim
        and type(getattr(module, "norm", None)) is nn.Identity
        and getattr(module, "gate", None) is None
        and _per_head(module.q_norm, head_dim)
        and _per_head(module.k_norm, head_dim)
    )


def _shrink_heads(attention: nn.Module) -> tuple[int, int]:
    """Remove the heads that output a constant or that ``proj`` does not read.

    :returns: (heads kept, heads before).
    """
    heads, head_dim = attention.num_heads, attention.head_dim
    qkv, proj = attention.qkv, attention.proj
    weight = qkv.weight.reshape(3, heads, head_dim, -1)  # q, k, v; head; row; input
    bias = None if qkv.bias is None else qkv.bias.reshape(3, heads, head_dim)
    reads = proj.weight.reshape(-1, heads, head_dim)
    dead = (weight[2].reshape(heads, -1) == 0).all(dim=1)
    unused = (reads.transpose(0, 1).reshape(heads, -1) == 0).all(dim=1)
    # a head with zero values outputs its value bias: the attention weights sum to one
    value = bias[2] if bias is not None else weight.new_zeros(heads, head_dim)
    fold = dead & ~unused & (value != 0).any(dim=1)
    if bool(fold.any()):
        delta = torch.einsum("ohd,hd->o", reads[:, fold], value[fold])
        set_tensor(proj, "bias", delta if proj.bias is None else proj.bias + delta)
    drop = dead | unused
    if not bool(drop.any()):
        return heads, heads
    if bool(drop.all()):
        # keep one head, empty: its values zero and proj reading none of it
        weight, reads = weight.clone(), reads.clone()
        weight[:, 0], reads[:, 0] = 0, 0
        if bias is not None:
            bias = bias.clone()
            bias[:, 0] = 0
        drop[0] = False
    keep = ~drop
    kept = int(keep.sum())
    set_tensor(qkv, "weight", weight[:, keep].reshape(3 * kept * head_dim, -1))
    if bias is not None:
        set_tensor(qkv, "bias", bias[:, keep].reshape(-1))
    set_tensor(proj, "weight", reads[:, keep].reshape(reads.shape[0], -1))
    attention.num_heads, attention.attn_dim = kept, kept * head_dim
    qkv.out_features, proj.in_features = 3 * kept * head_dim, kept * head_dim
    return kept, heads
