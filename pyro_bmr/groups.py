"""Structured reduction: whole units (neurons, channels, heads) pruned at once.

A *unit* is a set of elements that a network uses together: a neuron is a row of
a weight matrix and its bias entry, a convolution channel is a filter and its bias,
an attention head is its query, key and value rows. A :class:`UnitGroup` declares
the units of one layer: its :attr:`~UnitGroup.members` are the parameters whose
slices make up the units, its :attr:`~UnitGroup.readers` the parameters of the
next layer that read them (a dead unit's outgoing weights).

The reduced model of unit :math:`u` sets every element :math:`i \\in u` to zero.
Under a mean-field posterior the elements are independent a posteriori as well as
a priori, so the reduced evidence factorises and the ΔF of the unit is the sum of
its elements' ΔF (those still kept; an element already pruned is at zero in both
models):

.. math::

    \\Delta F_u = \\sum_{i \\in u,\\ i \\text{ kept}} \\Delta F_i .

Where single elements are pruned too, "kept" means kept by the same reduction's
element decisions: the unit is compared with its best element-reduced form, not
with the whole unit (see :func:`prune_units`). A rule then decides per group, on
the vector of its units' ΔF, exactly as it does per site on elements (a threshold,
or the spike-and-slab rule learning one keep probability per layer). A unit whose
every element is pruned outputs :math:`\\phi(0)`, zero for the activations of
:func:`pyro_bmr.nn.unit_groups` (ReLU, GELU, SiLU, tanh; attention with zero
values): the readers' slices for it then multiply zero, the likelihood no longer
depends on them, and they are pruned too ("dead units propagate").
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pyro_bmr._caller import warn
from pyro_bmr._masks import MaskError
from pyro_bmr.correlated_posteriors import JointGaussian
from pyro_bmr.rules import PruningRule

__all__ = [
    "Member",
    "UnitCount",
    "UnitDeltaF",
    "UnitGroup",
    "check_groups",
    "joint_delta_f",
    "prune_units",
    "summed_delta_f",
    "unit_counts",
]


@dataclass(frozen=True)
class Member:
    """The slices of one site that belong to the units of a group.

    Position :math:`p` along dimension ``dim`` belongs to unit
    :math:`\\lfloor (p \\bmod \\text{period}) / \\text{unit\\_size} \\rfloor`: rows
    of a weight (``dim=0``), input columns of the next layer (``dim=1``), the
    ``unit_size = H·W`` columns a flattened channel feeds, or the query, key and
    value rows of a head in a fused projection (``unit_size`` = head width,
    ``period`` = heads × head width).

    :param str site: the sample site's name.
    :param int dim: the dimension along which the units lie.
    :param int unit_size: consecutive positions per unit.
    :param period: positions after which the units repeat; ``None``: they do not.
    """

    site: str
    dim: int = 0
    unit_size: int = 1
    period: int | None = None

    def __post_init__(self) -> None:
        if self.unit_size < 1:
            raise ValueError(f"Member {self.site!r}: unit_size must be >= 1, got {self.unit_size}")
        if self.period is not None and (self.period < 1 or self.period % self.unit_size):
            raise ValueError(
                f"Member {self.site!r}: period {self.period} must be a positive multiple "
                f"of unit_size {self.unit_size}"
            )

    def num_units(self, shape: torch.Size) -> int:
        """Units in a site of ``shape``.

        :raises ValueError: where ``dim`` is out of range or the units do not tile it.
        """
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(
                f"site {self.site!r} of shape {tuple(shape)} has no dimension {self.dim}"
            )
        length = shape[self.dim]
        span = self.unit_size if self.period is None else self.period
        if length % span:
            raise ValueError(
                f"dimension {self.dim} of site {self.site!r} (length {length}) is not a "
                f"whole number of units of {span}"
            )
        return (length if self.period is None else self.period) // self.unit_size

    def unit_index(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The unit of each position along ``dim`` (a long tensor)."""
        positions = torch.arange(shape[self.dim], device=device)
        if self.period is not None:
            positions = positions % self.period
        return positions // self.unit_size

    def expand(self, unit_values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Per-unit values broadcast over a site of ``shape``."""
        along = unit_values[self.unit_index(shape, unit_values.device)]
        view = [1] * len(shape)
        view[self.dim] = shape[self.dim]
        return along.view(view).expand(shape)

    def per_unit_sum(self, values: torch.Tensor, num_units: int) -> torch.Tensor:
        """Sum of ``values`` (a site's shape) over each unit's slice."""
        dim = self.dim % values.dim()
        moved = values.movedim(dim, 0).reshape(values.shape[dim], -1).sum(dim=1, dtype=values.dtype)
        out = torch.zeros(num_units, dtype=values.dtype, device=values.device)
        return out.index_add_(0, self.unit_index(values.shape, values.device), moved)


@dataclass(frozen=True)
class UnitGroup:
    """The units of one layer, pruned whole by a structured reduction.

    :param str name: the layer's name (in reports, and for the rule's ``exclude``).
    :param members: the slices that make up the units (the layer's weight rows and
        bias entries); every member must have the same number of units.
    :param readers: the slices of the next layer that read the units (its input
        columns): pruned with a dead unit.
    """

    name: str
    members: tuple[Member, ...]
    readers: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "readers", tuple(self.readers))
        if not self.members:
            raise ValueError(f"unit group {self.name!r} has no members")
        for member in self.members + self.readers:
            if not isinstance(member, Member):
                raise TypeError(
                    f"unit group {self.name!r}: members and readers must be Member s, "
                    f"got {type(member).__name__}"
                )

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites of the members and the readers, in order, once each."""
        return tuple(dict.fromkeys(m.site for m in self.members + self.readers))


class UnitCount(NamedTuple):
    """Units of one layer kept after a reduction (or an export).

    :ivar int kept: units with at least one element kept.
    :ivar int total: units in the layer.
    """

    kept: int
    total: int


def check_groups(groups: Sequence[UnitGroup], shapes: Mapping[str, torch.Size]) -> None:
    """Check ``groups`` against the reducible sites' ``shapes``.

    :raises MaskError: (a ``ValueError``) naming the group and the site, for a site
        that is not reducible, a dimension out of range, units that do not tile a
        dimension, or members and readers with different numbers of units; or
        for two groups of one name.
    """
    names = [group.name for group in groups]
    for name in set(names):
        if names.count(name) > 1:
            raise MaskError(f"two unit groups are named {name!r}")
    for group in groups:
        counts = {}
        for member in group.members + group.readers:
            if member.site not in shapes:
                raise MaskError(
                    f"unit group {group.name!r}: site {member.site!r} is not a reducible "
                    f"site; reducible sites are {sorted(shapes)}"
                )
            try:
                counts[member] = member.num_units(shapes[member.site])
            except ValueError as error:
                raise MaskError(f"unit group {group.name!r}: {error}") from None
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{m.site} (dim {m.dim}): {n}" for m, n in counts.items())
            raise MaskError(f"unit group {group.name!r}: members disagree on units: {listed}")


def _alive(group: UnitGroup, masks: Mapping[str, torch.Tensor], num_units: int) -> torch.Tensor:
    """Units with at least one member element kept."""
    kept = [m.per_unit_sum(masks[m.site].to(torch.int32), num_units) for m in group.members]
    return torch.stack(kept).sum(dim=0) > 0


#: ``unit_delta_f(group, masks, num_units)``: the ΔF of pruning each unit of ``group``
#: whole, from the model with ``masks``: a float64 vector.
UnitDeltaF = Callable[[UnitGroup, Mapping[str, torch.Tensor], int], torch.Tensor]


def summed_delta_f(delta_f: Mapping[str, torch.Tensor]) -> UnitDeltaF:
    """Units' ΔF under a mean-field posterior: the sum of their kept elements' ΔF.

    :param delta_f: site name → element ΔF (the site's shape).
    """

    def unit_delta_f(group, masks, num_units):
        sums = []
        for member in group.members:
            df = delta_f[member.site]
            kept = torch.where(masks[member.site], df, torch.zeros_like(df))
            sums.append(member.per_unit_sum(kept.to(torch.float64), num_units))
        return torch.stack(sums).sum(dim=0)

    return unit_delta_f


def joint_delta_f(
    joint: JointGaussian,
    layout: Mapping[str, tuple[slice, torch.Size]],
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
    reduced_loc: float = 0.0,
    pruned_now: torch.Tensor | None = None,
) -> UnitDeltaF:
    """Units' ΔF under a correlated posterior: the ΔF of pruning a unit's kept
    elements together, from their joint marginal (the posterior of the current
    model, from which earlier pruned elements are marginalised out), conditioned on
    the elements ``pruned_now`` at the point mass: the ΔF of the unit against its
    best element-reduced form, :math:`\\Delta F(u \\cup P) - \\Delta F(P)`.

    :param joint: the posterior over the flat latent vector.
    :param layout: site name → its slice of the flat vector and its shape.
    :param prior_loc: the prior means over the flat vector.
    :param prior_scale: the prior scales over the flat vector.
    :param float reduced_loc: where the reduced prior puts its point mass.
    :param pruned_now: bool over the flat vector: the elements that the same
        reduction prunes one by one (default: none).
    """
    full = dict(dtype=joint.loc.dtype, device=joint.loc.device)
    m_red = torch.full((), reduced_loc, **full)
    zero = torch.zeros((), **full)
    support = torch.ones_like(joint.loc, dtype=torch.bool)
    if pruned_now is not None and bool(pruned_now.any()):
        # the reduced posterior under point masses on pruned_now and the prior
        # unchanged elsewhere is the joint conditioned on them
        point_loc = torch.where(pruned_now, m_red, prior_loc)
        point_scale = torch.where(pruned_now, zero, prior_scale)
        _, conditioned = joint.reduce(prior_loc, prior_scale, point_loc, point_scale)
        joint, support = conditioned.restrict(~pruned_now), ~pruned_now

    def unit_delta_f(group, masks, num_units):
        out = torch.zeros(num_units, dtype=torch.float64, device=joint.loc.device)
        units = torch.arange(num_units, device=joint.loc.device)
        for unit in range(num_units):
            keep = torch.zeros_like(support)
            for member in group.members:
                part, shape = layout[member.site]
                mine = member.expand(units == unit, shape) & masks[member.site]
                keep[part] |= mine.reshape(-1)
            if bool(keep.any()):
                marginal = joint.restrict(keep[support])
                df, _ = marginal.reduce(prior_loc[keep], prior_scale[keep], m_red, zero)
                out[unit] = df.to(torch.float64)
        return out

    return unit_delta_f


def prune_units(
    groups: Sequence[UnitGroup],
    rule: PruningRule,
    unit_delta_f: UnitDeltaF,
    masks: dict[str, torch.Tensor],
    before: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One structured reduction: each group's units decided by ``rule`` on their ΔF,
    then dead units' readers pruned.

    A unit is scored against its best element-reduced form: the model that the
    elements' decisions of the same reduction leave (``masks``), so that its ΔF
    sums the elements those decisions keep. Pruning the unit then beats keeping
    what they kept of it, which is the choice left; its elements that they prune
    add the same evidence to both. (Scored against the unit as it was before, the
    many inputs whose posteriors are still narrow at zero, each worth pruning on
    its own, would vote out a unit whose few informative inputs they outweigh.)
    Without element decisions on the grouped sites (``prune_elements=False``)
    ``masks`` are the masks from before, and a unit is compared with the whole unit.

    Groups are taken in order, each seeing what the ones before it pruned (list them
    from input to output, so that a unit whose inputs died is scored without them).
    A group the rule excludes (``exclude`` names the group) is only cut by
    propagation.

    :param groups: checked unit groups (:func:`check_groups`).
    :param rule: decides on a vector of unit ΔF with the units' current mask.
    :param unit_delta_f: the units' ΔF (:func:`summed_delta_f` for a mean-field
        posterior).
    :param masks: site name → bool mask (True = kept) of every site the groups
        touch, after the elements' decisions; updated in place (new tensors).
    :param before: the same masks before the reduction (default ``masks``): which
        units were alive, to warn when a reduction empties a whole group.
    :returns: ``masks``.
    """
    before = masks if before is None else before
    for group in groups:
        first = group.members[0]
        num_units = first.num_units(masks[first.site].shape)
        was_alive = _alive(group, before, num_units)
        if rule.prunes(group.name):
            in_play = _alive(group, masks, num_units)
            unit_df = unit_delta_f(group, masks, num_units)
            # a NaN unit (opposite infinities in it) is kept: no evidence for either
            unit_df = torch.where(unit_df.isnan(), -torch.inf, unit_df)
            keep = in_play & rule.keep(unit_df, in_play)
            for member in group.members:
                cut = member.expand(keep, masks[member.site].shape)
                masks[member.site] = masks[member.site] & cut
        alive = _alive(group, masks, num_units)  # dead by units or by all their elements
        if bool(was_alive.any()) and not bool(alive.any()):
            _warn_layer_dead(group, int(was_alive.count_nonzero()))
        for reader in group.readers:
            cut = reader.expand(alive, masks[reader.site].shape)
            masks[reader.site] = masks[reader.site] & cut
    return masks


def _warn_layer_dead(group: UnitGroup, lost: int) -> None:
    # Each unit's ΔF assumes the others stay: a whole layer gone is a decision that
    # no unit's ΔF scored, and it leaves a network whose output ignores its input.
    warn(
        f"this reduction pruned every unit of group {group.name!r} (the last {lost}): "
        f"what follows it no longer depends on the input. Pruned by units only "
        f"(prune_elements=False), a unit is compared with the whole unit, and many "
        f"inputs whose posteriors are still narrow can outweigh a few informative ones; "
        f"prune single weights too (prune_elements=True), reduce later in training, or "
        f"exclude the group",
    )


def unit_counts(
    groups: Sequence[UnitGroup], masks: Mapping[str, torch.Tensor]
) -> dict[str, UnitCount]:
    """Group name → :class:`UnitCount` under ``masks`` (a site without a mask keeps all)."""
    counts = {}
    for group in groups:
        first = group.members[0]
        shape = masks[first.site].shape if first.site in masks else None
        if shape is None:
            continue
        num_units = first.num_units(shape)
        present = {m.site: masks[m.site] for m in group.members if m.site in masks}
        if len(present) < len(group.members):  # a member without a mask keeps all its units
            counts[group.name] = UnitCount(num_units, num_units)
            continue
        alive = _alive(group, present, num_units)
        counts[group.name] = UnitCount(int(alive.count_nonzero()), num_units)
    return counts
