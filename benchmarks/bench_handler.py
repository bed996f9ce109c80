"""Time one SVI step with the pruning handler against one without it.

A Bayesian LeNet-300-100 (784-300-100-10, N(0, 1) priors on every weight and bias),
Pyro's stock ``AutoNormal`` guide and ``Trace_ELBO``, batch 128, on random data
(the data do not change the cost of a step). The handler holds masks that prune
half of every site's elements at random. The two SVI steps alternate, so that drift
in the machine's speed cancels, and the script prints the ratio of their medians;
the overhead the handler adds is that ratio minus one. It does so for the whole
step and for the step without the optimiser (the ELBO and its gradients), because
the optimiser's own cost changes with pruning: the pruned elements' gradients are
exactly zero, and so are their Adam moments, and on some CPUs ``torch.sqrt`` of an
exact zero is many times slower than of a positive number (PyTorch's vectorised
square root, not this package), which Adam's step then pays for every pruned
element. A third measurement isolates that: the plain step with the pruned
elements' gradients zeroed before Adam's step. A fourth times both full steps with
torch's fused Adam (``fused=True``), which has no such cost. Pyro's distribution
validation is on, as by default (``--no-validation`` turns it off for all).

Then the fused-Adam comparison again on *independent* setups (each with its own
model, guide, parameters and optimiser), timed as blocks of consecutive steps, as a
measurement of two training loops would time them, on ``Trace_ELBO`` and on
:class:`~pyro_bmr.CompiledTrace_ELBO`.

Run: ``python benchmarks/bench_handler.py [--steps 300] [--threads N] [--device cpu]
[--clock wall|cpu] [--rounds 15] [--block 20] [--backend inductor|fx]``.
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam

from pyro_bmr import BayesianModelReduction

WIDTHS = (784, 300, 100, 10)


class LeNet300100(PyroModule):
    def __init__(self):
        super().__init__()
        layers = []
        for d_in, d_out in zip(WIDTHS[:-1], WIDTHS[1:]):
            layer = PyroModule[torch.nn.Linear](d_in, d_out)
            layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([d_out, d_in]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([d_out]).to_event(1))
            layers.append(layer)
        self.layers = PyroModule[torch.nn.ModuleList](layers)

    def forward(self, x, y=None):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=x), obs=y)
        return x


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(name):
    return time.process_time if name == "cpu" else time.perf_counter


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time, steadier on a busy machine (use with --threads 1)",
    )
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False) for both"
    )
    parser.add_argument("--rounds", type=int, default=15, help="rounds of the independent part")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--backend", choices=("inductor", "fx"), default="inductor")
    args = parser.parse_args()
    now = _clock(args.clock)
    pyro.enable_validation(not args.no_validation)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.set_default_device(device)
    pyro.set_rng_seed(0)
    x = torch.randn(128, WIDTHS[0])
    y = torch.randint(0, WIDTHS[-1], (128,))
    model = LeNet300100()
    guide = AutoNormal(model)
    bmr = BayesianModelReduction(guide)
    sites = bmr.sites(x, y)
    _prune_half(bmr, sites, device)
    numel = sum(site.numel() for site in sites.values())
    pruned = 1 - sum(int(m.sum()) for m in bmr.masks.values()) / numel

    plain = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    reduced = SVI(bmr(model), bmr(guide), Adam({"lr": 1e-3}), Trace_ELBO())
    elbo = Trace_ELBO()
    guide(x, y)  # puts the guide's parameters in the param store
    params = [p.unconstrained() for p in pyro.get_param_store().values()]

    def gradients(model, guide):
        # an SVI step without the optimiser: the ELBO and its gradients
        elbo.loss_and_grads(model, guide, x, y)
        for p in params:
            p.grad = None

    reduced_model, reduced_guide = bmr(model), bmr(guide)
    # the control: the plain model and guide, with the gradients of the pruned
    # elements zeroed before Adam's step, so that Adam sees what it sees with the handler
    control_optim = Adam({"lr": 1e-3})
    keep_of = {}
    for name, keep in bmr.masks.items():
        for kind in ("locs", "scales"):
            keep_of[pyro.param(f"AutoNormal.{kind}.{name}").unconstrained()] = keep.float()

    def control_step():
        with pyro.poutine.trace(param_only=True) as capture:
            elbo.loss_and_grads(model, guide, x, y)
        step_params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        for p in step_params:
            if p in keep_of:
                p.grad.mul_(keep_of[p])
        control_optim(step_params)
        pyro.infer.util.zero_grads(step_params)

    # the same with torch's fused Adam, which does not slow down on zeros
    fused = {"lr": 1e-3, "fused": True}
    plain_fused = SVI(model, guide, Adam(fused), Trace_ELBO())
    reduced_fused = SVI(bmr(model), bmr(guide), Adam(fused), Trace_ELBO())

    runs = {
        "step": (lambda: plain.step(x, y), lambda: reduced.step(x, y), control_step),
        "fused": (lambda: plain_fused.step(x, y), lambda: reduced_fused.step(x, y)),
        "grads": (
            lambda: gradients(model, guide),
            lambda: gradients(reduced_model, reduced_guide),
        ),
    }
    times = {(kind, which): [] for kind, fns in runs.items() for which in range(len(fns))}
    for step in range(args.warmup + args.steps):
        for kind, fns in runs.items():
            order = list(range(len(fns)))
            if step % 2:
                order.reverse()
            for which in order:
                _sync(device)
                start = now()
                fns[which]()
                _sync(device)
                if step >= args.warmup:
                    times[kind, which].append(now() - start)
    med = {key: 1e3 * statistics.median(value) for key, value in times.items()}
    # pruned elements sample exactly zero in the reduced guide and get no gradient
    trace = pyro.poutine.trace(reduced_guide).get_trace(x, y)
    for p in params:
        p.grad = None
    elbo.loss_and_grads(reduced_model, reduced_guide, x, y)
    for name, keep in bmr.masks.items():
        if not bool((trace.nodes[name]["value"][~keep] == 0).all()):
            raise AssertionError(f"pruned elements of {name!r} are not exactly zero")
        for kind in ("locs", "scales"):
            grad = pyro.param(f"AutoNormal.{kind}.{name}").unconstrained().grad
            if not bool((grad[~keep] == 0).all()):
                raise AssertionError(f"pruned elements of {name!r} have a {kind} gradient")
    print(
        f"LeNet-300-100, batch 128, AutoNormal + Trace_ELBO on {device} "
        f"({torch.get_num_threads()} threads), {100 * pruned:.0f}% of {numel} weights pruned, "
        f"{args.clock} clock; medians of {args.steps}:"
    )
    for kind, label in (
        ("step", "SVI step (Adam)"),
        ("fused", "SVI step (fused)"),
        ("grads", "ELBO + gradients"),
    ):
        ratio = med[kind, 1] / med[kind, 0]
        print(
            f"  {label:17s} plain {med[kind, 0]:7.2f} ms, with the handler "
            f"{med[kind, 1]:7.2f} ms: ratio {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)"
        )
    ratio = med["step", 1] / med["step", 2]
    print(
        f"  SVI step against the plain step with the pruned gradients zeroed "
        f"({med['step', 2]:.2f} ms): ratio {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)"
    )
    _independent(args, now, device, x, y)


def _prune_half(bmr, sites, device):
    """Mask half of every site's elements at random (a fixed draw) and zero their locs."""
    g = torch.Generator(device=device).manual_seed(1)
    for name, site in sites.items():
        keep = torch.rand(site.shape, generator=g, device=device) < 0.5
        bmr.set_mask(name, keep)
        bmr.posterior.assign(name, ~keep, torch.zeros(()), None)


def _setup(masked, elbo, x, y, device):
    """A model, guide and fused-Adam SVI of their own (module-local parameters, so no
    state is shared with the other setup), half pruned at random if ``masked``."""
    pyro.set_rng_seed(0)
    model = LeNet300100()
    guide = AutoNormal(model)
    bmr = BayesianModelReduction(guide)
    if masked:
        _prune_half(bmr, bmr.sites(x, y), device)
    wrap = bmr if masked else (lambda fn: fn)
    svi = SVI(wrap(model), wrap(guide), Adam({"lr": 1e-3, "fused": True}), elbo)
    return lambda: svi.step(x, y)


def _independent(args, now, device, x, y):
    """Plain and handler steps on separate parameters, timed as blocks of consecutive
    steps: what a measurement of two training loops sees, garbage collection and
    allocator effects included, which per-step medians leave out."""
    from pyro_bmr import CompiledTrace_ELBO

    print(
        f"independent setups, fused Adam, blocks of {args.block} steps, "
        f"{args.rounds} rounds (ratio of medians of block totals; of all steps' mean; "
        "of per-step medians):"
    )
    with pyro.settings.context(module_local_params=True):
        for label, make_elbo in (
            ("Trace_ELBO", Trace_ELBO),
            ("CompiledTrace_ELBO", lambda: CompiledTrace_ELBO(backend=args.backend)),
        ):
            fns = [_setup(masked, make_elbo(), x, y, device) for masked in (False, True)]
            for fn in fns:
                for _ in range(args.warmup):
                    fn()
            blocks, steps = ([], []), ([], [])
            for round_ in range(args.rounds):
                order = (1, 0) if round_ % 2 else (0, 1)
                for which in order:
                    _sync(device)
                    start = now()
                    for _ in range(args.block):
                        begin = now()
                        fns[which]()
                        _sync(device)
                        steps[which].append(now() - begin)
                    blocks[which].append(now() - start)
            block_ratio = statistics.median(blocks[1]) / statistics.median(blocks[0])
            mean_ratio = sum(blocks[1]) / sum(blocks[0])
            step_ratio = statistics.median(steps[1]) / statistics.median(steps[0])
            plain_ms = 1e3 * statistics.median(blocks[0]) / args.block
            print(
                f"  {label:19s} plain {plain_ms:6.2f} ms/step: handler {block_ratio:.3f} "
                f"(blocks), {mean_ratio:.3f} (mean), {step_ratio:.3f} (per-step medians)"
            )


if __name__ == "__main__":
    main()
