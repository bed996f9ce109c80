"""One SVI step of the Bayesian LeNet-300-100 against one Adam step of the plain network.

The network is LeNet-300-100 (784-300-100-10) with a ``GaussianPrior(1.0)`` on every
weight and bias (``pyro_bmr.nn.BayesianClassifier``), batch 128 of MNIST, ``Trace_ELBO``
and Adam (lr 1e-3) throughout. Timed, interleaved in this process, on the same batch:

* ``deterministic``: ``zero_grad``, cross-entropy forward and backward, ``Adam.step`` of
  ``LeNet300100``;
* ``floor (torch, no Pyro)``: the local guide's step written out in plain torch (flat
  loc and log-scale, mean and variance of every layer, closed-form KL, Adam): the cost
  of the arithmetic alone, a lower bound for any Pyro guide of this family;
* ``AutoNormal``: ``svi.step`` with Pyro's ``AutoNormal``;
* ``MeanFieldGuide``: ``svi.step`` with :class:`pyro_bmr.MeanFieldGuide`;
* ``MeanFieldGuide+local``: the same inside :func:`pyro_bmr.poutine.local_reparameterization`
  (pre-activations sampled, KL in closed form);
* ``...+local+BMR``: the same through ``bmr(model), bmr(guide)`` with 90% of every site
  pruned (masks reach the pre-activation mean and variance).

Each round times every variant for ``--steps`` steps; the printed time is the median
over rounds of the per-round median step, and the ratio the median over rounds of the
per-round ratio to ``deterministic``. Guides keep their parameters on the module
(``pyro.settings`` ``module_local_params``), so that several can live in one process.
Then both guides train for ``--epochs`` epochs
on ``--train-size`` MNIST images from the same initialisation (the deterministic
network's, ``init_scale`` 0.01) and the test accuracy of the posterior predictive
(``--num-samples`` weight draws) is printed side by side.

Run from the repository root::

    python benchmarks/bench_guide.py [--data-dir ../shared/data] [--rounds 7] [--steps 20]
        [--epochs 1] [--train-size 20000] [--threads N] [--no-validation] [--fused-adam]
        [--clock wall|cpu]
"""

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_bmr import BayesianModelReduction, PruningRule
from pyro_bmr.guides import MeanFieldGuide
from pyro_bmr.nn import BayesianClassifier, GaussianPrior, predict_proba
from pyro_bmr.paper.data import load_dataset
from pyro_bmr.paper.networks import LeNet300100
from pyro_bmr.poutine import local_reparameterization

BATCH = 128
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
LR = 1e-3
#: Adam's settings for every variant (``--fused-adam`` adds ``fused=True``)
ADAM = {"lr": LR}
INIT_SCALE = 1e-2


def _bayesian(dataset_size, seed):
    pyro.set_rng_seed(seed)
    return BayesianClassifier(LeNet300100((1, 28, 28), 10), dataset_size, GaussianPrior(1.0))


def _guide(kind, model):
    cls = AutoNormal if kind == "AutoNormal" else MeanFieldGuide
    return cls(model, init_loc_fn=model.init_loc_fn, init_scale=INIT_SCALE)


class QuantileRule(PruningRule):
    """Prune all but the fraction ``keep`` of each site with the lowest ΔF (a stand-in
    for a network that BMR has reduced over many epochs)."""

    def __init__(self, keep: float) -> None:
        self.fraction = keep

    def keep(self, delta_f, mask):
        return delta_f <= delta_f.flatten().quantile(self.fraction)


def _step_fns(x, y, n):
    torch.manual_seed(0)
    net = LeNet300100((1, 28, 28), 10)
    opt = torch.optim.Adam(net.parameters(), **ADAM)

    def deterministic():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    fns = {"deterministic": deterministic, "floor (torch, no Pyro)": _floor_step(x, y, n)}
    pyro.clear_param_store()
    for kind in (
        "AutoNormal",
        "MeanFieldGuide",
        "MeanFieldGuide+local",
        "MeanFieldGuide+local+BMR",
    ):
        model = _bayesian(n, 0)
        guide = _guide(kind, model)
        if kind.endswith("BMR"):
            bmr = BayesianModelReduction(guide, QuantileRule(0.1))
            svi = SVI(bmr(model), bmr(guide), pyro.optim.Adam(dict(ADAM)), Trace_ELBO())
            svi.step(x, y)
            bmr.reduce(x, y)
        else:
            svi = SVI(model, guide, pyro.optim.Adam(dict(ADAM)), Trace_ELBO())
        if "local" in kind:
            handler = local_reparameterization()

            def step(svi=svi, handler=handler):
                with handler:
                    svi.step(x, y)

            fns[kind] = step
        else:
            fns[kind] = lambda svi=svi: svi.step(x, y)
    return fns


def _floor_step(x, y, n):
    """The step the local guide computes, written in plain torch without Pyro: a flat
    loc and log-scale, the three layers from the weights' means and variances, the
    cross-entropy scaled to the data set and the closed-form KL from N(0, 1), then
    Adam: what is left of a Bayesian step when all of Pyro's bookkeeping is gone."""
    torch.manual_seed(0)
    net = LeNet300100((1, 28, 28), 10)
    shapes = [p.shape for p in net.parameters()]
    sizes = [shape.numel() for shape in shapes]
    loc = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    log_scale = nn.Parameter(torch.full_like(loc, INIT_SCALE).log())
    opt = torch.optim.Adam([loc, log_scale], **ADAM)
    inputs = x.flatten(1)

    def step():
        opt.zero_grad()
        var = log_scale.exp().square()
        means, variances = loc.split(sizes), var.split(sizes)
        h = inputs
        for i in range(0, len(shapes), 2):
            mean = nn.functional.linear(h, means[i].view(shapes[i]), means[i + 1])
            v = nn.functional.linear(h.square(), variances[i].view(shapes[i]), variances[i + 1])
            h = torch.addcmul(mean, v.clamp_min(1e-30).sqrt(), torch.randn_like(mean))
            if i + 2 < len(shapes):
                h = h.relu()
        nll = nn.functional.cross_entropy(h, y, reduction="sum") * (n / len(y))
        kl = 0.5 * (var.sum() + loc.square().sum() - loc.numel()) - log_scale.sum()
        (nll + kl).backward()
        opt.step()

    return step


def time_steps(x, y, n, rounds, steps, clock=time.perf_counter):
    fns = _step_fns(x, y, n)
    for fn in fns.values():
        for _ in range(5):
            fn()
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times = []
            for _ in range(steps):
                start = clock()
                fn()
                times.append(clock() - start)
            per_round[name].append(statistics.median(times))
    base = per_round["deterministic"]
    return {
        name: (
            statistics.median(times) * 1e3,
            statistics.median(t / b for t, b in zip(times, base)),
        )
        for name, times in per_round.items()
    }


def train_accuracy(kind, data, epochs, num_samples, seed):
    pyro.clear_param_store()
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    model = _bayesian(len(x_train), seed)
    guide = _guide(kind, model)
    svi = SVI(model, guide, pyro.optim.Adam(dict(ADAM)), Trace_ELBO())
    handler = local_reparameterization() if "local" in kind else None
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            if handler is None:
                svi.step(x_train[idx], y_train[idx])
            else:
                with handler:
                    svi.step(x_train[idx], y_train[idx])
    seconds = time.perf_counter() - start
    correct = 0
    for i in range(0, len(x_test), 1000):
        probs = predict_proba(model, guide, x_test[i : i + 1000], num_samples)
        correct += int((probs.argmax(-1) == y_test[i : i + 1000]).sum())
    return correct / len(x_test), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-validation", action="store_true", help="pyro.enable_validation(False) for all"
    )
    parser.add_argument(
        "--fused-adam", action="store_true", help="torch's fused Adam (fused=True) for all"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time.perf_counter, or time.process_time (CPU time of all threads: "
        "robust to other processes on a loaded machine)",
    )
    args = parser.parse_args()
    if args.no_validation:
        pyro.enable_validation(False)
    if args.fused_adam:
        ADAM["fused"] = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # every guide keeps its own parameters (all MeanFieldGuides share a name)
    pyro.settings.set(module_local_params=True)
    data = load_dataset("mnist", args.data_dir, train_size=args.train_size)
    x_train, y_train = data.train.tensors
    x, y = x_train[:BATCH], y_train[:BATCH]

    validation = "off" if args.no_validation else "on"
    print(
        f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} threads, "
        f"Pyro validation {validation}, {'fused' if args.fused_adam else 'for-loop'} Adam"
    )
    print(
        f"one step, LeNet-300-100, batch {BATCH}, Trace_ELBO; medians of {args.rounds} rounds, "
        f"{args.clock} clock"
    )
    print(f"{'variant':<28}{'ms/step':>10}{'x deterministic':>18}")
    for name, (ms, ratio) in time_steps(
        x, y, len(x_train), args.rounds, args.steps, CLOCKS[args.clock]
    ).items():
        print(f"{name:<28}{ms:>10.2f}{ratio:>18.2f}")

    if args.epochs < 1:
        return
    print(
        f"\naccuracy on the {len(data.test.tensors[0])} MNIST test images after {args.epochs} "
        f"epoch(s) on {len(x_train)} training images ({args.num_samples} posterior samples)"
    )
    print(f"{'guide':<28}{'accuracy':>10}{'train s':>10}")
    for kind in ("AutoNormal", "MeanFieldGuide+local"):
        acc, seconds = train_accuracy(kind, data, args.epochs, args.num_samples, args.seed)
        print(f"{kind:<28}{acc:>10.4f}{seconds:>10.1f}")


if __name__ == "__main__":
    main()
