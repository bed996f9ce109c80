"""Scoring the sites of one reduction (private to :mod:`pyro_bmr.reduction`).

For every site, ΔF, the rule's decision and the counts, computed on the parameters'
device with the fused kernels of :mod:`pyro_bmr._kernels` where they apply, and with
no host synchronisation until :meth:`Scoring.check` reads every site's flags at
once. The rare paths (bad input, a ΔF out of the dtype's range, a rule that is not a
threshold) are sorted out there and in :meth:`Scoring.decide`.
"""

from collections.abc import Callable, Mapping, Sequence

import torch

from pyro_bmr import _kernels
from pyro_bmr._masks import check_mask, float_mask
from pyro_bmr._tensors import as_tensors
from pyro_bmr.correlated_posteriors import CorrelatedPosterior
from pyro_bmr.free_energy import _direct, _repair, spike_constants
from pyro_bmr.groups import UnitGroup, check_groups, joint_delta_f, prune_units, summed_delta_f
from pyro_bmr.joint_selection import JointReduction, reduce_jointly
from pyro_bmr.posteriors import MeanFieldPosterior
from pyro_bmr.rules import PruningRule
from pyro_bmr.sites import GaussianSite


class Scoring:
    """One reduction of ``posterior`` under ``rule``, over ``work`` elements in all.

    :param posterior: where the guide keeps the posterior of every site.
    :param masks: the current masks, site name → bool tensor (True = kept).
    :param rule: the pruning rule.
    :param reduced_loc: mean of the reduced prior.
    :param reduced_scale: its scale, 0 for the point mass.
    :param update_posterior: whether the reduced posterior of kept elements is wanted.
    :param work: elements in all the reduced sites (decides what is compiled).
    :param joint: ``"greedy"`` to choose the set to prune jointly (see
        :meth:`decide_jointly`), or ``None``.
    """

    def __init__(
        self,
        posterior: MeanFieldPosterior,
        masks: Mapping[str, torch.Tensor],
        rule: PruningRule,
        *,
        reduced_loc: float,
        reduced_scale: float,
        update_posterior: bool,
        work: int,
        joint: str | None = None,
    ) -> None:
        self.posterior, self.masks, self.rule = posterior, masks, rule
        self.reduced_loc, self.reduced_scale = reduced_loc, reduced_scale
        self.update_posterior, self.work, self.joint = update_posterior, work, joint

    def _old_mask(self, site: GaussianSite, device: torch.device) -> torch.Tensor | None:
        old = self.masks.get(site.name)
        if old is not None:
            old = check_mask(site.name, old, site.shape).to(device)
        return old

    def storage(self, sites: dict[str, GaussianSite]) -> dict[str, tuple]:
        """Every site's ``posterior.loc_log_scale(name)``, where the reduction can
        score and prune in place (the point mass, a threshold known in advance, the
        priors' dtype, a site big enough to compile for, and every scale certainly
        valid); else ``{}``. All sites or none, because all their locs and scales are checked,
        in one host sync, before any loc is written: bad input then takes the plain
        path, which names the site."""
        if self.reduced_scale != 0 or self.rule.fixed_threshold() is None:
            return {}
        storage, worth = {}, False
        for name, site in sites.items():
            found = self.posterior.loc_log_scale(name)
            if found is None:
                return {}
            loc, rho = found
            dtype = as_tensors(loc, rho, site.prior_loc, site.prior_scale)[0].dtype
            if not (
                dtype == loc.dtype == rho.dtype
                and loc.shape == rho.shape == site.shape
                and loc.is_contiguous()
            ):
                return {}
            worth = worth or _kernels.compiles(loc.numel(), self.work, loc.device)
            storage[name] = found
        if not worth:
            return {}
        safe = _kernels.storage_safe(list(storage.values()), self.work)
        return storage if bool(safe) else {}

    def _score_in_place(self, site: GaussianSite, storage: tuple) -> "Scored | None":
        """:meth:`score` on the guide's storage, zeroing the pruned locs in the same
        pass; ``None`` for a site too small to compile for."""
        loc, rho = storage
        m, s = as_tensors(loc, rho, site.prior_loc, site.prior_scale)[2:]
        full = dict(dtype=loc.dtype, device=loc.device)
        m_red = torch.full((), self.reduced_loc, **full)
        tau = torch.full((), self._fixed_threshold(site.name), **full)
        out = Scored(site.name, site.shape, self._old_mask(site, loc.device))
        terms = spike_constants(m, s, m_red, site.shape)
        done = _kernels.spike_prune(
            loc.view(-1), rho.reshape(-1), *terms, m_red, tau, out.old_bytes(), self.work
        )
        if done is None:
            return None
        s_red = torch.zeros_like(m_red)
        out.lazy_inputs = lambda: (loc, torch.exp(rho), m, s, m_red, s_red)
        out.df, keep, stats = done
        out.keep, out.zeroed = keep.view(torch.bool).view(site.shape), True
        out.flags = _spike_flags(stats[3], stats)
        return out

    def score(self, name: str, site: GaussianSite, storage: tuple | None = None) -> "Scored":
        """ΔF of one site, with the rule's decision where it can be fused; no sync."""
        if storage is not None:
            out = self._score_in_place(site, storage)
            if out is not None:
                return out
        loc, scale = self.posterior.loc_scale(name)
        mu, sigma, m, s = as_tensors(loc, scale, site.prior_loc, site.prior_scale)
        full = dict(dtype=mu.dtype, device=mu.device)
        m_red = torch.full((), self.reduced_loc, **full)
        out = Scored(name, site.shape, self._old_mask(site, mu.device))
        nan = torch.full((4,), float("nan"), dtype=torch.float64, device=mu.device)
        if self.reduced_scale == 0:
            out.inputs = (mu, sigma, m, s, m_red, torch.zeros((), **full))
            terms = spike_constants(m, s, m_red, site.shape)
            flat = (mu.reshape(-1), sigma.reshape(-1)) + terms + (m_red,)
            tau = self._fixed_threshold(name)
            if tau is None:
                out.df, probe = _kernels.spike_probe(*flat, self.work)
                stats = nan
            else:
                tau = torch.full((), tau, **full)
                out.df, keep, pruned, stats = _kernels.spike_threshold(
                    *flat, tau, out.old_bytes(), self.work
                )
                out.set_masks(keep, pruned)
                probe = stats[3]
            out.flags = _spike_flags(probe, stats)
            return out
        out.inputs = (mu, sigma, m, s, m_red, torch.full((), self.reduced_scale, **full))
        df, post_loc, post_scale, invalid, unsafe = _direct(
            *out.inputs, posterior=self.update_posterior
        )
        out.df, out.unsafe = df.reshape(-1), unsafe
        if self.update_posterior:
            out.post = (post_loc, post_scale)
        bad_scale = ~(torch.isfinite(sigma) & (sigma > 0)).all()
        flags = torch.stack([bad_scale | unsafe.any(), invalid.any()]).to(torch.float64)
        out.flags = torch.cat([flags, nan])
        return out

    def check(self, site: "Scored", flag: list) -> None:
        """Raise for bad input, and redo in the log domain the elements whose ΔF left
        the dtype's range (a rare path: syncs freely)."""
        suspect, too_wide = flag[0], flag[1]
        if suspect:
            mu, sigma = site.inputs[:2]
            if not bool(torch.isfinite(mu).all()):
                raise ValueError(f"guide location of site {site.name!r} has NaN or infinite values")
            if not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
                raise ValueError(
                    f"guide scale of site {site.name!r} has NaN, inf or non-positive values"
                )
        if too_wide:
            raise ValueError(
                f"reduced prior (scale {self.reduced_scale}) is too wide for site "
                f"{site.name!r}: the reduced posterior precision is not positive"
            )
        if not suspect:
            site.finite = True
            if site.keep is not None:
                site.stats = flag[2:]
            return
        df = site.df.view(site.shape)
        unsafe = site.unsafe if site.unsafe is not None else ~torch.isfinite(df)
        values = (df,) if site.post is None else (df,) + site.post
        repaired = _repair(values, unsafe, site.inputs)
        site.df = repaired[0].reshape(-1)
        if site.post is not None:
            site.post = repaired[1:]
        site.finite = bool(torch.isfinite(site.df).all())
        site.keep = site.pruned = site.stats = None
        site.zeroed = False

    def _fixed_threshold(self, name: str) -> float | None:
        """The rule's threshold known in advance for site ``name``: +inf (keep every
        finite ΔF) where the rule excludes the site."""
        tau = self.rule.fixed_threshold()
        if tau is not None and not self.rule.prunes(name):
            return float("inf")
        return tau

    def decide(self, scored: list["Scored"]) -> None:
        """The rule's decisions and the counts of the sites not decided in the ΔF
        pass; the sites of one of the rule's groups share one site threshold."""
        groups: dict = {}
        for site in scored:
            groups.setdefault(self.rule.group(site.name), []).append(site)
        for members in groups.values():
            tau = self._group_threshold([s for s in members if s.finite])
            for site in members:
                self._decide_site(site, tau if site.finite else None)

    def _group_threshold(self, members: list["Scored"]) -> torch.Tensor | None:
        if not members:
            return None
        df = members[0].df
        full = dict(dtype=df.dtype, device=df.device)
        tau = self.rule.fixed_threshold()
        if tau is not None:
            return torch.full((), tau, **full)
        pruning = [s for s in members if self.rule.prunes(s.name)]
        if not pruning:
            return None
        old_f = None
        if any(s.old is not None for s in pruning):
            old_f = torch.cat(
                [
                    torch.ones(s.numel, **full)
                    if s.old is None
                    else float_mask(s.old, df.dtype).reshape(-1)
                    for s in pruning
                ]
            )
        # one site's ΔF as it is; a group's, concatenated
        flat = pruning[0].df if len(pruning) == 1 else torch.cat([s.df for s in pruning])
        return _kernels.site_threshold(self.rule, flat, old_f, self.work)

    def _decide_site(self, site: "Scored", tau: torch.Tensor | None) -> None:
        if not self.rule.prunes(site.name):
            if site.finite or tau is not None:
                tau = torch.full((), float("inf"), dtype=site.df.dtype, device=site.df.device)
        site.tau = tau
        if tau is not None:
            keep, pruned, site.stats = _kernels.decide(site.df, tau, site.old_bytes(), self.work)
            site.set_masks(keep, pruned)
            return
        # any other rule, or ΔF with infinities: the rule's own keep, counted exactly
        df = site.df.view(site.shape)
        old = site.old
        if old is None:
            old = torch.ones(site.shape, dtype=torch.bool, device=df.device)
        site.replace_keep(self.rule.keep(df, old) if self.rule.prunes(site.name) else old)

    def prune_units(
        self,
        groups: Sequence[UnitGroup],
        rule: PruningRule,
        scored: list["Scored"],
        sites: Mapping[str, GaussianSite],
    ) -> None:
        """The structured step, after the elements' decisions: ``rule`` decides on
        the units of ``groups`` (:func:`~pyro_bmr.groups.prune_units`) against what
        those decisions keep of them, and the sites' decisions lose the pruned units."""
        by_name = {site.name: site for site in scored}
        check_groups(groups, {name: site.shape for name, site in by_name.items()})
        touched = {name for group in groups for name in group.sites}
        if isinstance(self.posterior, CorrelatedPosterior):
            joint, layout = self.posterior.joint(), self.posterior.layout()
            m, s = torch.zeros_like(joint.loc), torch.ones_like(joint.loc)
            pruned_now = torch.zeros_like(joint.loc, dtype=torch.bool)
            for name, site in sites.items():
                part, shape = layout[name]
                m[part] = site.prior_loc.to(m).expand(shape).reshape(-1)
                s[part] = site.prior_scale.to(s).expand(shape).reshape(-1)
            for site in scored:
                part, _ = layout[site.name]
                newly = site.pruned if site.old is None else site.old & site.pruned
                pruned_now[part] = newly.reshape(-1)
            unit_delta_f = joint_delta_f(joint, layout, m, s, self.reduced_loc, pruned_now)
        else:
            delta_f = {name: by_name[name].df.view(by_name[name].shape) for name in touched}
            unit_delta_f = summed_delta_f(delta_f)
        masks = {name: by_name[name].keep for name in touched}
        before = {name: by_name[name].old for name in touched}
        before = {
            name: torch.ones_like(masks[name]) if old is None else old
            for name, old in before.items()
        }
        masks = prune_units(groups, rule, unit_delta_f, dict(masks), before)
        for name in touched:
            site = by_name[name]
            if masks[name] is not site.keep:
                site.replace_keep(masks[name])
                site.zeroed = False  # the locs of the units' elements are zeroed too

    def decide_jointly(
        self, scored: list["Scored"], sites: Mapping[str, GaussianSite]
    ) -> JointReduction | None:
        """For a :class:`~pyro_bmr.correlated_posteriors.CorrelatedPosterior` (else
        ``None``): the rule's decisions read as one set over the joint latent, which
        ``joint="greedy"`` replaces by :func:`~pyro_bmr.joint_selection.select_greedily`'s
        (each element against its site's threshold: the rule's, else 0), the set's joint
        ΔF, and with ``update_posterior`` the reduced joint posterior to write. Elements
        pruned before are outside the current model: its posterior is the marginal of
        the others. The other latent sites of the joint keep their prior (they move only
        by their correlations)."""
        if not isinstance(self.posterior, CorrelatedPosterior):
            return None
        joint, layout = self.posterior.joint(), self.posterior.layout()
        n, full = joint.loc.shape[-1], dict(dtype=joint.loc.dtype, device=joint.loc.device)
        kept = torch.ones(n, dtype=torch.bool, device=full["device"])
        proposal, candidates, soft = (torch.zeros_like(kept) for _ in range(3))
        df, tau, m = (torch.zeros(n, **full) for _ in range(3))
        s = torch.ones(n, **full)
        for site in scored:
            part, shape = layout[site.name]
            old = kept[part] if site.old is None else site.old.reshape(-1)
            kept[part], soft[part] = old, old
            proposal[part] = old & site.pruned.reshape(-1)
            if self.rule.prunes(site.name):
                candidates[part] = old & torch.isfinite(site.df)
            df[part] = site.df.to(df.dtype)
            fixed = self._fixed_threshold(site.name)
            tau[part] = fixed if fixed is not None else (0.0 if site.tau is None else site.tau)
            prior = sites[site.name]
            m[part] = prior.prior_loc.to(**full).expand(shape).reshape(-1)
            s[part] = prior.prior_scale.to(**full).expand(shape).reshape(-1)
        # pruning fixes elements at 0; a soft reduced prior shrinks the rest to m̃
        m_red = torch.where(soft, torch.zeros((), **full), m)
        out = reduce_jointly(
            joint,
            kept=kept,
            proposal=proposal,
            candidates=candidates,
            delta_f=df,
            threshold=tau,
            prior_loc=m,
            prior_scale=s,
            reduced_loc=m_red,
            soft=soft,
            reduced_scale=self.reduced_scale,
            greedy=self.joint == "greedy",
            update=self.update_posterior,
            soft_loc=torch.full((), self.reduced_loc, **full),
        )
        if self.joint == "greedy":
            for site in scored:
                part, shape = layout[site.name]
                site.replace_keep(~out.pruned[part].view(shape))
        return out


def _spike_flags(probe: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """A spike site's flags for :meth:`Scoring.check`: [suspect, 0, *stats]. A
    non-finite ΔF (from a bad guide scale, or a value to evaluate in the log domain)
    shows as a NaN probe; ``check`` sorts out which."""
    bad = torch.isnan(probe).to(torch.float64)
    return torch.cat([torch.stack([bad, torch.zeros_like(bad)]), stats])


class Scored:
    """What a reduction knows about one site as it goes: flat ΔF, the new mask and
    its complement (bool, the site's shape), and ``stats`` = [kept before, kept
    after, ΔF summed over the newly pruned, ...]."""

    def __init__(self, name: str, shape: torch.Size, old: torch.Tensor | None) -> None:
        self.name, self.shape, self.old = name, shape, old
        self.numel = shape.numel()
        self.df: torch.Tensor
        self.flags: torch.Tensor
        self._inputs: tuple = ()
        self.lazy_inputs: Callable[[], tuple] | None = None
        self.zeroed = False  # pruned locs already zeroed by the fused pass
        self.keep: torch.Tensor | None = None
        self.pruned: torch.Tensor | None = None
        self.stats = None
        self.post: tuple | None = None
        self.unsafe: torch.Tensor | None = None
        self.finite = False
        self.tau: torch.Tensor | None = None  # the site's threshold, where decided by one

    @property
    def inputs(self) -> tuple:
        """``(μ, σ, m, s, m̃, s̃)`` as tensors (σ computed on demand)."""
        if self.lazy_inputs is not None:
            self._inputs, self.lazy_inputs = self.lazy_inputs(), None
        return self._inputs

    @inputs.setter
    def inputs(self, value: tuple) -> None:
        self._inputs, self.lazy_inputs = value, None

    def old_bytes(self) -> torch.Tensor | None:
        """The current mask as flat uint8 (a view), as the kernels take it."""
        return None if self.old is None else self.old.reshape(-1).view(torch.uint8)

    def set_masks(self, keep: torch.Tensor, pruned: torch.Tensor) -> None:
        self.keep = keep.view(torch.bool).view(self.shape)
        self.pruned = pruned.view(torch.bool).view(self.shape)

    def replace_keep(self, keep: torch.Tensor) -> None:
        """Take ``keep`` (bool, the site's shape) as the decision, within the current
        mask, and count again (on the device: no sync)."""
        old = self.old
        if old is None:
            old = torch.ones(self.shape, dtype=torch.bool, device=keep.device)
        self.keep = keep & old
        self.pruned = ~self.keep
        drop = float_mask(old & self.pruned, self.df.dtype).reshape(-1)
        f64 = torch.float64
        self.stats = torch.stack(
            [
                old.count_nonzero().to(f64),
                self.keep.count_nonzero().to(f64),
                (self.df * drop).nansum().to(f64),  # 0·inf is NaN: not pruned now
                torch.zeros((), dtype=f64, device=keep.device),
            ]
        )
