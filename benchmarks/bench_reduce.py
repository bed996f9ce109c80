"""Time :meth:`BayesianModelReduction.reduce` on a model with 10 M Gaussian weights.

An MLP 2500-2000-2000-500 with N(0, 1) priors (10.0 M weights, 4500 biases) and a
stock ``AutoNormal`` guide (or, with ``--guide mean-field``, a
:class:`~pyro_bmr.MeanFieldGuide`) whose locs are spread as after training. Prints, for the
default :class:`~pyro_bmr.ThresholdRule` and for :class:`~pyro_bmr.SpikeAndSlabRule`,
the median time of one ``reduce`` over all sites against the median time of cloning
every site's guide loc and scale once (the memory-bound floor of reading the
posterior), measured in this process with the two interleaved, and their ratio. It
also times, the same way, the two calls ``reduce`` makes to the guide's posterior
(:mod:`pyro_bmr.posteriors`): reading loc and scale (for ``AutoNormal`` a softplus
of every unconstrained scale) and zeroing the pruned locs. A ``MeanFieldGuide`` stores
σ = exp(ρ), and ``reduce`` then scores its large sites straight off loc and ρ and
zeroes their pruned locs in the same pass, making neither call; the two are timed
all the same, for comparison.

Every timed ``reduce`` starts from the same state (the fitted guide parameters, no
masks), so each one scores, prunes, writes masks and zeroes the pruned locs, as the
first reduction after an epoch of training does. Before timing, the script checks
``reduce`` against the plain formula, :func:`pyro_bmr.delta_f` on the same tensors,
and the rule applied to it, for a first reduction and for a second one on top of
existing masks. The first ``reduce`` traces the model and compiles the fused kernels
(unless ``PYRO_BMR_COMPILE=0``); it is not timed.

Run: ``python benchmarks/bench_reduce.py [--guide auto|mean-field] [--repeats 9]
[--threads N] [--device cpu] [--clock wall|cpu]``; ``PYRO_BMR_COMPILE=0`` times the
eager kernels.
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_bmr import BayesianModelReduction, SpikeAndSlabRule, ThresholdRule, delta_f
from pyro_bmr.guides import MeanFieldGuide
from pyro_bmr.posteriors import mean_field_posterior

WIDTHS = (2500, 2000, 2000, 500)
GUIDES = {"auto": AutoNormal, "mean-field": MeanFieldGuide}


def model(x):
    h = x
    for i, (d_in, d_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        w = pyro.sample(f"fc{i}.weight", dist.Normal(0.0, 1.0).expand([d_out, d_in]).to_event(2))
        b = pyro.sample(f"fc{i}.bias", dist.Normal(0.0, 1.0).expand([d_out]).to_event(1))
        h = torch.relu(h @ w.transpose(-1, -2) + b)
    return h


def _timer(device, clock):
    now = time.process_time if clock == "cpu" else time.perf_counter

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return now() - start

    return timed


def _check(bmr, x, rule):
    """reduce() against delta_f and the rule on the same tensors, twice."""
    sites = bmr.sites(x)
    masks = {}
    for step in range(2):
        expected = {}
        for name, site in sites.items():
            loc, scale = (t.clone() for t in bmr.posterior.loc_scale(name))
            df = delta_f(loc, scale, site.prior_loc, site.prior_scale).delta_f
            old = masks.get(name, torch.ones_like(df, dtype=torch.bool))
            expected[name] = (df, rule.keep(df, old) & old)
        report = bmr.reduce(x)
        worst = 0.0
        for name, (df, keep) in expected.items():
            # compiled kernels may differ from the eager formula by an ulp or two
            err = (report.delta_f[name] - df).abs() / (1 + df.abs())
            worst = max(worst, err.max().item())
            if worst > 1e-5:
                raise AssertionError(f"reduce disagrees with delta_f at site {name!r}")
            near = (df - rule.threshold).abs() < 1e-4 if isinstance(rule, ThresholdRule) else 0
            if not bool(((bmr.masks[name] == keep) | near).all()):
                raise AssertionError(f"reduce disagrees with the rule at site {name!r}")
            masks[name] = bmr.masks[name]
        if step == 0:
            with torch.no_grad():  # move the posterior, as more training would
                for name in sites:
                    loc, _ = bmr.posterior.loc_scale(name)  # a view of the parameter
                    loc.add_(0.05 * torch.randn_like(loc))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--guide",
        choices=tuple(GUIDES),
        default="auto",
        help="auto: AutoNormal (scales stored through softplus); mean-field: "
        "pyro_bmr.MeanFieldGuide (one flat loc and scale, scales through exp)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time, steadier on a busy machine (use with --threads 1)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.set_default_device(device)
    timed = _timer(device, args.clock)
    pyro.set_rng_seed(0)
    x = torch.randn(8, WIDTHS[0])
    guide = GUIDES[args.guide](model, init_scale=0.05)
    guide(x)
    names = [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
    with torch.no_grad():  # a posterior as after training: most weights near zero
        posterior = mean_field_posterior(guide)
        for name in names:
            loc, _ = posterior.loc_scale(name)  # a view of the parameter
            loc.copy_(torch.randn_like(loc) * torch.rand_like(loc) * 0.3)
    saved = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    def restore(bmr):
        bmr.reset()
        with torch.no_grad():
            for k, v in pyro.get_param_store().items():
                v.unconstrained().copy_(saved[k])

    print(
        f"reduce over {len(names)} sites, 10.00 M weights + 4500 biases, "
        f"{type(guide).__name__}, on "
        f"{device} ({torch.get_num_threads()} threads), {args.clock} clock; "
        f"medians of {args.repeats}:"
    )
    for rule in (ThresholdRule(), SpikeAndSlabRule()):
        bmr = BayesianModelReduction(guide, rule)
        worst = _check(bmr, x, rule)
        ms = _measure(bmr, x, names, restore, timed, args.repeats)
        fused = bool(bmr._scoring(1 << 30).storage(bmr.sites(x)))
        share = (
            "(it reads and writes the guide's storage in place: neither call is made)"
            if fused
            else f"the rest {(ms['reduce'] - ms['loc_scale'] - ms['assign']) / ms['clone']:.2f}x"
        )
        print(
            f"  {rule!r}: reduce {ms['reduce']:.1f} ms, clone loc+scale {ms['clone']:.1f} ms: "
            f"ratio {ms['reduce'] / ms['clone']:.2f}x (max rel. ΔF error vs delta_f {worst:.1e})\n"
            f"    the posterior's loc_scale {ms['loc_scale']:.1f} ms "
            f"({ms['loc_scale'] / ms['clone']:.2f}x), assign of the pruned locs "
            f"{ms['assign']:.1f} ms ({ms['assign'] / ms['clone']:.2f}x); {share}"
        )


def _measure(bmr, x, names, restore, timed, repeats):
    """Median ms of reduce, of cloning loc and scale, and of the posterior's calls."""
    restore(bmr)
    bmr.reduce(x)
    pruned = {name: ~mask for name, mask in bmr.masks.items()}  # what reduce zeroes
    restore(bmr)
    posterior = bmr.posterior
    tensors = [posterior.loc_scale(name) for name in names]
    zero = torch.zeros(())
    runs = {
        "reduce": lambda: bmr.reduce(x),
        "clone": lambda: [(loc.clone(), scale.clone()) for loc, scale in tensors],
        "loc_scale": lambda: [posterior.loc_scale(name) for name in names],
        "assign": lambda: [posterior.assign(n, pruned[n], zero, None) for n in names],
    }
    times = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            restore(bmr)
            times[key].append(timed(fn))
    return {key: 1e3 * statistics.median(value) for key, value in times.items()}


if __name__ == "__main__":
    main()
