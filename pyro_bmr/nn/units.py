"""The units of a Bayesian network, derived from its ``torch.nn`` layers.

:func:`unit_groups` walks a ``PyroModule`` network and declares, for the structured
reduction of :class:`~pyro_bmr.BayesianModelReduction` (``groups=``), one
:class:`~pyro_bmr.groups.UnitGroup` per hidden layer it recognises:

* in an ``nn.Sequential``, a ``Linear`` or ``Conv1d``/``Conv2d``/``Conv3d`` layer
  followed (through activations, pooling, dropout and ``Flatten``) by another such
  layer: its neurons or output channels, read by the next layer's input columns
  (a flattened channel feeds ``H·W`` of them);
* a transformer MLP (timm's ``Mlp``: ``fc1``, ``act``, ``fc2``): its hidden units;
* a self-attention layer (timm's ``Attention``: a fused ``qkv`` projection, ``proj``
  and ``num_heads``): its heads, each one's query, key and value rows, read by the
  head's columns of ``proj``.

A layer's own output units (the last layer, a residual stream) are never grouped.
The readers are declared only where a pruned unit certainly outputs zero: the
layers between map 0 to 0 (ReLU, GELU, SiLU, tanh, pooling, dropout, ...); after a
sigmoid or a normalisation the unit is still grouped, but its readers are not.
"""

from pyro.nn import PyroModule
from torch import nn

from pyro_bmr import _pyro_compat
from pyro_bmr.groups import Member, UnitGroup

from .convert import BayesianModule, _site_name

__all__ = ["unit_groups"]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# modules between two layers that map a zero unit to zero, channel by channel
_ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Tanhshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
# modules between two layers that keep the channels apart (the unit is still a unit)
_CHANNELWISE = _ZERO_PRESERVING + (
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardsigmoid,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


def unit_groups(module: nn.Module, *, site_suffix: str | None = None) -> list[UnitGroup]:
    """One :class:`~pyro_bmr.groups.UnitGroup` per hidden layer of ``module``, from
    input to output (see the module's description).

    .. code-block:: python

        bnn = BayesianClassifier(LeNet5((1, 28, 28), 10))
        bmr = BayesianModelReduction(guide, groups=unit_groups(bnn))

    :param module: a ``PyroModule`` network whose weights are ``PyroSample`` s (a
        :class:`~pyro_bmr.nn.BayesianModule`, a model holding one, or your own).
    :param site_suffix: appended to the parameter sites' names; default
        ``"_decentered"`` where ``module`` is or holds a :class:`BayesianModule`
        with a decentered prior (whose latent sites are the standardised weights),
        else none.
    :returns: the groups; a layer whose weight is not random has none.
    :raises TypeError: if ``module`` is not a ``PyroModule``.
    """
    if not isinstance(module, PyroModule):
        raise TypeError(
            f"unit_groups needs the PyroModule whose weights are sampled, got "
            f"{type(module).__name__}; make the network Bayesian first (BayesianModule)"
        )
    if site_suffix is None:
        bayesian = [m for m in module.modules() if isinstance(m, BayesianModule)]
        site_suffix = "_decentered" if bayesian and bayesian[0].prior.decentered else ""
    groups: list[UnitGroup] = []
    for sub in module.modules():
        if isinstance(sub, nn.Sequential) and type(sub).forward is nn.Sequential.forward:
            groups += _sequential(sub, site_suffix)
        elif _is_attention(sub):
            groups += _attention(sub, site_suffix)
        elif _is_mlp(sub):
            groups += _mlp(sub, site_suffix)
    return groups


def _site(layer: nn.Module, attr: str, suffix: str) -> str | None:
    if not isinstance(layer, PyroModule):
        return None
    if attr not in _pyro_compat.random_attributes(layer):
        return None
    return _site_name(layer, attr) + suffix


def _group(
    layer: nn.Module, reader: nn.Module | None, suffix: str, size: int = 1, period=None
) -> UnitGroup | None:
    """The units of ``layer`` (rows of its weight, entries of its bias), read by
    ``reader``'s input columns, ``size`` per unit."""
    weight = _site(layer, "weight", suffix)
    if weight is None:
        return None
    members = [Member(weight, 0, size if period else 1, period)]
    bias = _site(layer, "bias", suffix)
    if bias is not None:
        members.append(Member(bias, 0, size if period else 1, period))
    readers = []
    read = None if reader is None else _site(reader, "weight", suffix)
    if read is not None:
        readers.append(Member(read, 1, size))
    name = _pyro_compat.module_prefix(layer)
    return UnitGroup(name, tuple(members), tuple(readers))


def _sequential(seq: nn.Sequential, suffix: str) -> list[UnitGroup]:
    groups, children = [], list(seq)
    for i, layer in enumerate(children):
        if not isinstance(layer, _PRODUCERS) or _groups_of_convolution(layer):
            continue
        between, reader = [], None
        for later in children[i + 1 :]:
            if isinstance(later, _PRODUCERS):
                reader = later
                break
            between.append(later)
        if reader is None or not all(_passes(m) for m in between):
            continue  # the outputs of the sequence, or mixed by what follows
        units = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        width = reader.in_features if isinstance(reader, nn.Linear) else reader.in_channels
        if _groups_of_convolution(reader) or width % units:
            continue
        zero = all(isinstance(m, _ZERO_PRESERVING + (nn.Flatten,)) for m in between)
        group = _group(layer, reader if zero else None, suffix, size=width // units)
        if group is not None:
            groups.append(group)
    return groups


def _groups_of_convolution(layer: nn.Module) -> bool:
    return getattr(layer, "groups", 1) != 1


def _passes(module: nn.Module) -> bool:
    """Whether a unit stays one block of channels through ``module``."""
    if isinstance(module, nn.Flatten):
        return (module.start_dim, module.end_dim) == (1, -1)
    return isinstance(module, _CHANNELWISE)


def _is_mlp(module: nn.Module) -> bool:
    names = ("fc1", "act", "fc2")
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names) and all(
        isinstance(getattr(module, n), nn.Linear) for n in ("fc1", "fc2")
    )


def _mlp(mlp: nn.Module, suffix: str) -> list[UnitGroup]:
    between = [getattr(mlp, n, nn.Identity()) for n in ("act", "drop1", "norm")]
    zero = all(isinstance(m, _ZERO_PRESERVING) for m in between)
    group = _group(mlp.fc1, mlp.fc2 if zero else None, suffix)
    return [] if group is None else [group]


def _is_attention(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "qkv", None), nn.Linear)
        and isinstance(getattr(module, "proj", None), nn.Linear)
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
    )


def _attention(attention: nn.Module, suffix: str) -> list[UnitGroup]:
    heads, width = attention.num_heads, attention.head_dim
    if attention.qkv.out_features != 3 * heads * width:
        return []
    # a head whose values are zero outputs zero (its attention averages them)
    zero = isinstance(getattr(attention, "norm", nn.Identity()), nn.Identity) and (
        getattr(attention, "gate", None) is None
    )
    group = _group(
        attention.qkv, attention.proj if zero else None, suffix, size=width, period=heads * width
    )
    if group is None:
        return []
    name = _pyro_compat.module_prefix(attention)
    return [UnitGroup(name, group.members, group.readers)]
