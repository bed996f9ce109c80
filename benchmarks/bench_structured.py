"""Structured against element BMR on MNIST: units kept, accuracy, exported latency.

For LeNet-5 and a small ViT, the paper's BMR (the ``bmr`` method of
:mod:`pyro_bmr.paper.methods`: ``LayerScalePrior``, ``AutoNormal``, fused Adam,
the spike-and-slab rule of :func:`~pyro_bmr.paper.methods.bmr_rule` per layer,
the output layer never pruned, a reduction before every epoch after the first) is
trained twice from the same seed:

* ``element``: single weights pruned;
* ``structured``: whole units only (the groups of :func:`pyro_bmr.nn.unit_groups`:
  neurons, convolution channels, attention heads, MLP hidden units), decided by the
  same rule on their ΔF, dead units' inputs pruned (``prune_elements=False``; the
  output layer is never pruned, as in ``element``);
* ``combined``: both, single weights and whole units (``prune_elements=True``): a
  unit whose weights are pruned one by one loses the evidence they carried, and
  goes when its remaining ΔF turns positive or its last weight is pruned.

Printed per network and variant: the units each layer kept (for ``element``, the
units left whole by chance), the test accuracy of the posterior-mean network, the
largest difference between the exported network's logits and the reduced model's
posterior-mean logits, and the median latency of the dense network (the
architecture as built, posterior-mean weights) and of the exported one
(``pyro_bmr.export``: pruned units removed, smaller dense layers) at batch 1 and
256, timed in this process in interleaved rounds (``bench_export.interleaved``).

Run from the repository root::

    python benchmarks/bench_structured.py [--networks lenet5 lenet5-caffe vit]
        [--variants element structured combined] [--epochs 5] [--train-size N]
        [--rounds 7] [--threads 1] [--clock wall|cpu] [--bounds]

``--bounds`` adds, per network, what structured pruning could buy at best: the
dense network with each convolution cut to its first k channels (``shrink`` of the
network with the other channels zeroed; no training, so no accuracy), timed against
the whole network at batch 256. It tells whether a speed-up goal is within reach of
any structured reduction of that architecture.
"""

import argparse
import copy
import time

import pyro
import torch
from bench_export import CLOCKS, interleaved
from pyro import poutine

from pyro_bmr import BayesianModelReduction, CompiledTrace_ELBO, StochasticBMR, export
from pyro_bmr.deterministic import guide_means
from pyro_bmr.groups import unit_counts
from pyro_bmr.guides import make_guide
from pyro_bmr.nn import BayesianClassifier, unit_groups
from pyro_bmr.paper.data import load_dataset, make_loader
from pyro_bmr.paper.methods import bmr_rule, method_prior
from pyro_bmr.paper.networks import build_network
from pyro_bmr.unit_removal import shrink

NETWORK_KWARGS = {
    "lenet5": {},
    "lenet5-caffe": {},
    "vit": {"patch_size": 4, "dim": 64, "depth": 2, "heads": 8, "mlp_ratio": 2.0},
}


VARIANTS = ("element", "structured", "combined")


def fit(network, variant, data, epochs, batch_size, seed, progress):
    """Train the ``bmr`` method, pruning as ``variant`` says."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x_train, y_train = data.train.tensors
    net = build_network(network, x_train.shape[1:], 10, **NETWORK_KWARGS[network])
    model = BayesianClassifier(net, len(x_train), method_prior("bmr"))
    guide, _ = make_guide(model, "auto", init_loc_fn=model.init_loc_fn, init_scale=1e-2)
    groups = None if variant == "element" else unit_groups(model)
    bmr = BayesianModelReduction(
        guide, bmr_rule(model), groups=groups, prune_elements=variant != "structured"
    )
    optim = pyro.optim.Adam({"lr": 1e-3, "fused": True})
    trainer = StochasticBMR(model, guide, optim, CompiledTrace_ELBO(), bmr=bmr)
    loader = make_loader(data.train, batch_size, seed=seed)
    start, batch = time.perf_counter(), None
    for epoch in range(epochs):
        if batch is not None:
            trainer.reduce(*batch)
        for batch in loader:
            trainer.step(*batch)
        if progress:
            print(
                f"  {network} {variant} epoch {epoch + 1}: "
                f"{100 * bmr.sparsity().total:.1f}% pruned, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    model.eval()
    return model, guide, bmr


def accuracy(net, x, y):
    with torch.no_grad():
        return sum(
            (net(x[i : i + 1000]).argmax(-1) == y[i : i + 1000]).sum().item()
            for i in range(0, len(x), 1000)
        ) / len(x)


def layer_shares(net, x, rounds, clock):
    """Where a sequential network's time goes: each layer's median share, timed
    interleaved on the input it sees."""
    inputs, h = [], x
    with torch.inference_mode():
        for layer in net:
            inputs.append(h)
            h = layer(h)
        timed = interleaved(
            {
                f"{i} {type(layer).__name__}": lambda layer=layer, h=h: layer(h)
                for i, (layer, h) in enumerate(zip(net, inputs))
            },
            rounds,
            10,
            clock,
        )
    total = sum(t for t, _ in timed.values())
    return {name: t / total for name, (t, _) in timed.items()}


def report(network, variant, model, guide, bmr, data, rounds, clock):
    x_test, y_test = data.test.tensors
    x = x_test[:256]
    dense = export(model, guide, x, bmr=bmr, compress=False)
    exported = export(model, guide, x, bmr=bmr)
    with torch.no_grad():
        reference = poutine.condition(model, data=guide_means(guide, x, bmr=bmr))(x)
        diff = (exported(x) - reference).abs().max().item()
    units = unit_counts(unit_groups(model), bmr.masks)
    print(f"\n{network} / {variant}: {100 * bmr.sparsity().total:.1f}% of elements pruned")
    print("  units kept: " + ", ".join(f"{n} {c.kept}/{c.total}" for n, c in units.items()))
    dense_accuracy = accuracy(dense, x_test, y_test)
    print(
        f"  test accuracy {dense_accuracy:.4f} (exported "
        f"{accuracy(exported, x_test, y_test):.4f}); max |exported - reduced model| {diff:.1e}"
    )
    print(f"  exported: {exported}" if network.startswith("lenet") else "", end="")
    with torch.inference_mode():
        for batch, repeats in ((1, 200), (256, 10)):
            xb = x[:batch].clone()
            timed = interleaved(
                {"dense": lambda xb=xb: dense(xb), "exported": lambda xb=xb: exported(xb)},
                rounds,
                repeats,
                clock,
            )
            print(
                f"\n  batch {batch:>3}: dense {timed['dense'][0] * 1e6:9.1f} us, exported "
                f"{timed['exported'][0] * 1e6:9.1f} us, speed-up {timed['exported'][1]:.2f}x",
                end="",
            )
    print()
    if isinstance(dense, torch.nn.Sequential):
        shares = layer_shares(dense, x, rounds, clock)
        print(
            "  dense network's time at batch 256 by layer: "
            + ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())
        )
    return dense_accuracy


def width_bounds(dense, x, rounds, clock, fractions=(1 / 2, 1 / 3, 1 / 6, 0)):
    """The speed-up at batch ``len(x)`` of ``dense`` with every convolution cut to
    its first ``max(1, round(f * channels))`` channels, for each ``f``."""
    convs = [m for m in dense.modules() if isinstance(m, torch.nn.Conv2d)]
    nets = {}
    for f in fractions:
        cut = copy.deepcopy(dense)
        widths = []
        with torch.no_grad():
            for conv in (m for m in cut.modules() if isinstance(m, torch.nn.Conv2d)):
                k = max(1, round(f * conv.out_channels))
                conv.weight[k:] = 0
                if conv.bias is not None:
                    conv.bias[k:] = 0
                widths.append(f"{k}/{conv.out_channels}")
        nets[", ".join(widths)] = shrink(cut).network.eval()
    whole = ", ".join(f"{c.out_channels}/{c.out_channels}" for c in convs)
    with torch.inference_mode():
        timed = interleaved(
            {whole: lambda: dense(x), **{k: lambda n=n: n(x) for k, n in nets.items()}},
            rounds,
            10,
            clock,
        )
    return {k: ratio for k, (_, ratio) in timed.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--networks", nargs="+", default=["lenet5", "vit"])
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument(
        "--bounds", action="store_true", help="speed-ups with the convolutions cut, untrained"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    data = load_dataset("mnist", args.data_dir, train_size=args.train_size)
    for network in args.networks:
        if args.bounds:
            x = data.test.tensors[0][:256]
            net = build_network(network, x.shape[1:], 10, **NETWORK_KWARGS[network]).eval()
            print(f"\n{network}: at best, at batch 256, convolution channels kept -> speed-up")
            for widths, ratio in width_bounds(net, x, args.rounds, CLOCKS[args.clock]).items():
                print(f"  {widths:>16}: {ratio:.2f}x")
        accuracies = {}
        for variant in args.variants:
            fitted = fit(
                network, variant, data, args.epochs, args.batch_size, args.seed, not args.quiet
            )
            accuracies[variant] = report(
                network, variant, *fitted, data, args.rounds, CLOCKS[args.clock]
            )
        for variant in accuracies:
            if variant != "element" and "element" in accuracies:
                lost = 100 * (accuracies["element"] - accuracies[variant])
                print(f"\n{network}: {variant} loses {lost:.2f} points of accuracy to element BMR")


if __name__ == "__main__":
    main()
