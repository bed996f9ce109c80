"""Fused elementwise kernels behind :meth:`BayesianModelReduction.reduce` (private).

Scoring the spike reduced prior, comparing with a threshold and counting what was
pruned are a handful of elementwise operations per weight. Run one at a time, each
is a full pass over memory, and on CPU ATen's selects and arithmetic with bool masks
are slow (the selects branch per element, several times slower than a pass on a
random mask). So masks travel as uint8 (a free view of a bool tensor) or 0/1 floats,
decisions are products rather than selects, and the whole chain is one expression
that ``torch.compile`` fuses into a single pass with its reductions.

Compilation is lazy (the first time a big enough reduction calls a kernel, then
cached per process) and guarded: if compiling or running a compiled kernel fails, a
warning is issued and the eager kernels are used on that device from then on. The
eager kernels compute the same expressions; :func:`spike_delta_f` in eager mode is
bitwise equal to the general formula of :mod:`pyro_bmr.free_energy` at
:math:`\\tilde s = 0`, and compiled kernels agree with it to a few ulps.

The environment variable ``PYRO_BMR_COMPILE`` chooses: ``0`` never compiles, ``1``
compiles whatever the size, ``auto`` (default) compiles when a reduction covers at
least :data:`COMPILE_MIN_NUMEL` elements, and then for its sites of at least
:data:`COMPILE_MIN_SITE`: there a first compilation (seconds) is soon repaid, and
small models (and unit tests) never compile.
"""

import math
import os
from collections.abc import Callable, Sequence

import torch

from pyro_bmr._caller import warn
from pyro_bmr._masks import float_mask
from pyro_bmr.free_energy import spike_delta_f
from pyro_bmr.rules import PruningRule

ENV_VAR = "PYRO_BMR_COMPILE"
#: in ``auto`` mode, compile when a reduction covers at least this many elements...
COMPILE_MIN_NUMEL = 1 << 20
#: ...and then for its sites of at least this many (biases are not worth a call)
COMPILE_MIN_SITE = 1 << 16

_compiled: dict[Callable, Callable] = {}
_failed: set[str] = set()  # device types where compiling failed


def compile_mode() -> str:
    """``"never"``, ``"always"`` or ``"auto"``, from ``PYRO_BMR_COMPILE``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("0", "false", "off", "no", "never"):
        return "never"
    if value in ("1", "true", "on", "yes", "always"):
        return "always"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"{ENV_VAR} must be 0, 1 or auto, got {value!r}")


def compiles(numel: int, work: int, device: torch.device) -> bool:
    """Whether a site of ``numel`` elements, in a reduction of ``work``, runs
    compiled kernels."""
    mode = compile_mode()
    if mode == "never":
        return False
    if mode == "auto" and (work < COMPILE_MIN_NUMEL or numel < COMPILE_MIN_SITE):
        return False
    return device.type not in _failed and not torch.compiler.is_compiling()


def _run(fn: Callable, eager: Callable, work: int | None, like: torch.Tensor, *args):
    """``fn(*args)`` compiled where worthwhile, else ``eager(*args)`` (same result).
    ``like`` is a flat input, ``work`` the elements of the whole reduction (default:
    those of ``like``)."""
    numel, device = like.numel(), like.device
    if compiles(numel, numel if work is None else work, device):
        compiled = _compiled.get(fn)
        if compiled is None:
            # a few small kernels: compiling in this process beats starting workers
            compiled = _compiled[fn] = torch.compile(
                fn, dynamic=True, options={"compile_threads": 1}
            )
        try:
            return compiled(*args)
        except Exception as error:  # a missing compiler, an unsupported backend, ...
            _failed.add(device.type)
            warn(
                f"pyro_bmr: torch.compile failed on {device.type} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                f"using eager kernels. Set {ENV_VAR}=0 to skip compiling.",
                RuntimeWarning,
            )
    return eager(*args)


# ---------------------------------------------------------------------------
# ΔF of the spike (:func:`~pyro_bmr.free_energy.spike_delta_f`) in two buffers


def _spike_inplace(mu, sigma, log_s, d_priors_sq, reduced_loc) -> torch.Tensor:
    """:func:`spike_delta_f` for ``mu`` and ``sigma`` of the full shape, in two buffers."""
    d = torch.sub(mu, reduced_loc).div_(sigma)
    d.mul_(d).sub_(d_priors_sq).mul_(0.5)
    out = torch.log(sigma)
    return torch.sub(log_s, out, out=out).sub_(d)


# ---------------------------------------------------------------------------
# ΔF, the threshold decision and its counts in one pass. Masks go in and out as
# uint8 0/1 (a bool tensor's ``view(torch.uint8)`` and back, free): compiled CPU code
# stores bytes fast but bools slowly. ``old`` is the current mask, ``None`` where
# nothing is pruned yet; ``keep`` the new mask and ``pruned`` its complement.
# ``stats`` (float64) is [kept before, kept after, ΔF summed over the newly pruned,
# Σ 0·ΔF]; the last is 0 exactly when every ΔF is finite, and the others are only
# used then.


def _spike_threshold(mu, sigma, log_s, d_priors_sq, reduced_loc, threshold, old):
    df = spike_delta_f(mu, sigma, log_s, d_priors_sq, reduced_loc)
    return (df,) + _decide(df, threshold, old)


def _spike_threshold_first(mu, sigma, log_s, d_priors_sq, reduced_loc, threshold):
    df = spike_delta_f(mu, sigma, log_s, d_priors_sq, reduced_loc)
    return (df,) + _decide_first(df, threshold)


def _decide(df, threshold, old):
    old = old.to(df.dtype)
    keep = torch.where(df <= threshold, old, torch.zeros_like(old))
    return _outputs(df, old, keep)


def _decide_first(df, threshold, old=None):
    keep = (df <= threshold).to(df.dtype)
    return _outputs(df, torch.ones_like(keep), keep)


def _outputs(df, old, keep):
    f64 = torch.float64
    drop = old - keep
    stats = torch.stack(
        [
            old.sum(dtype=f64),
            keep.sum(dtype=f64),
            (drop * df).sum(dtype=f64),
            (df * 0).sum(dtype=f64),
        ]
    )
    return keep.to(torch.uint8), (1 - keep).to(torch.uint8), stats


def _spike_probe(mu, sigma, log_s, d_priors_sq, reduced_loc):
    df = spike_delta_f(mu, sigma, log_s, d_priors_sq, reduced_loc)
    return df, (df * 0).sum(dtype=torch.float64)


def _eager_spike_threshold(mu, sigma, log_s, d_priors_sq, reduced_loc, threshold, old=None):
    df = _spike_inplace(mu, sigma, log_s, d_priors_sq, reduced_loc)
    return (df,) + _eager_decide(df, threshold, old)


def _eager_decide(df, threshold, old):
    # bool ops and counts are fast eagerly; selects on bools are what to avoid
    f64 = torch.float64
    keep = df <= threshold
    if old is None:
        drop = ~keep
        old_count = torch.full((), df.numel(), dtype=f64, device=df.device)
    else:
        old = old.view(torch.bool)
        keep &= old
        drop = old ^ keep
        old_count = old.count_nonzero().to(f64)
    stats = torch.stack(
        [
            old_count,
            keep.count_nonzero().to(f64),
            (df * float_mask(drop, df.dtype)).sum(dtype=f64),  # as the compiled kernel
            df.sum().mul_(0).to(f64),
        ]
    )
    return keep.view(torch.uint8), (~keep).view(torch.uint8), stats


def _eager_spike_probe(mu, sigma, log_s, d_priors_sq, reduced_loc):
    df = _spike_inplace(mu, sigma, log_s, d_priors_sq, reduced_loc)
    return df, df.sum().mul_(0).to(torch.float64)


def spike_threshold(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    log_s: torch.Tensor,
    d_priors_sq: torch.Tensor,
    reduced_loc: torch.Tensor,
    threshold: torch.Tensor,
    old: torch.Tensor | None,
    work: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ΔF, keep, pruned, stats)`` for the flat tensors ``mu`` and ``sigma`` of one
    site, ``keep = (ΔF ≤ threshold) ∧ old`` (masks as uint8; see above)."""
    args = (mu, sigma, log_s, d_priors_sq, reduced_loc, threshold)
    if old is None:
        return _run(_spike_threshold_first, _eager_spike_threshold, work, mu, *args)
    return _run(_spike_threshold, _eager_spike_threshold, work, mu, *args, old)


def spike_probe(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    log_s: torch.Tensor,
    d_priors_sq: torch.Tensor,
    reduced_loc: torch.Tensor,
    work: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔF of the flat tensors of one site and ``Σ 0·ΔF`` (0 exactly when all finite)."""
    args = (mu, sigma, log_s, d_priors_sq, reduced_loc)
    return _run(_spike_probe, _eager_spike_probe, work, mu, *args)


def decide(
    df: torch.Tensor,
    threshold: torch.Tensor,
    old: torch.Tensor | None,
    work: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keep, pruned, stats)`` as in :func:`spike_threshold`, for a flat, finite ΔF."""
    if old is None:
        return _run(_decide_first, _eager_decide, work, df, df, threshold, None)
    return _run(_decide, _eager_decide, work, df, df, threshold, old)


# ---------------------------------------------------------------------------
# The same pass straight off the storage of a guide that keeps σ = exp(ρ) (as
# MeanFieldGuide does): ln σ is ρ itself, so an element costs one exponential, and
# the pruned locs are zeroed in place, so no copy of the posterior is made. ``reduce``
# takes this path only once every site's scale is known to be valid, so that bad
# input raises with the guide untouched. Only elements pruned with a finite ΔF (and
# those pruned before) are zeroed: a non-finite ΔF is repaired and decided by
# ``reduce`` afterwards, from the untouched μ.

_EXACT_FLOAT32_COUNT = 1 << 24


def _valid(loc, rho, low, high):
    return ((rho >= low) & (rho <= high)).all() & torch.isfinite(loc).all()


def storage_safe(
    storage: Sequence[tuple[torch.Tensor, torch.Tensor]], work: int | None = None
) -> torch.Tensor:
    """Whether every ``(loc, ρ)`` pair holds finite locs and scales σ = exp(ρ) that
    are certainly normal, finite numbers (0-dim bool, no sync): ρ within a margin of
    the logarithms of the dtype's smallest normal and largest values. False for NaN
    or infinite locs, NaN ρ, and the absurd scales near those limits, which the plain
    path then checks exactly (and names the site)."""
    checks = []
    for loc, rho in storage:
        if rho.numel():
            info = torch.finfo(rho.dtype)
            low, high = math.log(info.tiny) + 1, math.log(info.max) - 1
            checks.append(_run(_valid, _valid, work, rho, loc, rho, low, high))
    return torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool)


def _spike_prune(loc, log_sigma, log_s, d_priors_sq, reduced_loc, threshold, old, count):
    d_red = (loc - reduced_loc) / torch.exp(log_sigma)  # spike_delta_f, ln σ given
    df = (log_s - log_sigma) - 0.5 * (d_red * d_red - d_priors_sq)
    zeros = torch.zeros_like(df)
    # masks go out through floats (compiled CPU code converts bool to uint8 slowly)
    if old is None:
        keep = (df <= threshold).to(df.dtype)
        drop = df > threshold
        zero = drop & (df < float("inf"))
    else:
        keep = torch.where(df <= threshold, old.to(df.dtype), zeros)
        drop = (old != 0) & (df > threshold)
        zero = ((df > threshold) & (df < float("inf"))) | (old == 0)
    loc.copy_(torch.where(zero, zeros, loc))
    gained = torch.where(drop, df, zeros).sum(dtype=torch.float64)
    probe = (df * 0).sum().to(torch.float64)  # NaN unless every ΔF is finite; exact
    counts = None
    if count:  # sums of 0/1 in float32: exact below 2**24 elements
        kept_before = df.numel() * torch.ones_like(probe) if old is None else old.sum()
        counts = torch.stack([kept_before.to(torch.float64), keep.sum().to(torch.float64)])
    return df, keep.to(torch.uint8), gained, probe, counts


def spike_prune(
    loc: torch.Tensor,
    log_scale: torch.Tensor,
    log_s: torch.Tensor,
    d_priors_sq: torch.Tensor,
    reduced_loc: torch.Tensor,
    threshold: torch.Tensor,
    old: torch.Tensor | None,
    work: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(ΔF, keep, stats)`` as :func:`spike_threshold` for the flat ``loc`` and
    σ = exp(``log_scale``), zeroing the pruned elements of ``loc`` in place; ``None``
    (nothing done) for a site not worth compiling for."""
    if not compiles(loc.numel(), loc.numel() if work is None else work, loc.device):
        return None
    count = loc.numel() <= _EXACT_FLOAT32_COUNT
    args = (loc, log_scale, log_s, d_priors_sq, reduced_loc, threshold, old, count)
    df, keep, gained, probe, counts = _run(_spike_prune, _spike_prune, work, loc, *args)
    if counts is None:
        f64 = torch.float64
        kept_before = (
            torch.full((), loc.numel(), dtype=f64, device=loc.device)
            if old is None
            else old.count_nonzero().to(f64)
        )
        counts = torch.stack([kept_before, keep.count_nonzero().to(f64)])
    return df, keep, torch.cat([counts, torch.stack([gained, probe])])


# ---------------------------------------------------------------------------
# A rule's threshold from a site's ΔF (PruningRule.site_threshold, such as the
# spike-and-slab rule's fixed point): a few elementwise passes and sums per
# iteration, which compile into one pass each.


def site_threshold(
    rule: PruningRule, delta_f: torch.Tensor, mask: torch.Tensor | None, work: int | None = None
) -> torch.Tensor | None:
    """``rule.site_threshold(delta_f, mask)``, compiled where worthwhile."""
    method = type(rule).site_threshold
    return _run(method, method, work, delta_f, rule, delta_f, mask)
