"""How sparse, and how accurate, does BMR make LeNet-300-100 and LeNet-5-Caffe on MNIST?

The sparsity record to beat is Sparse Variational Dropout's (Molchanov et al. 2017):
LeNet-300-100 at 1.92 % error with 1.47 % of its weights kept (68x), LeNet-5-Caffe
at 0.75 % with 0.36 % kept (280x); the dense networks reach 1.64 % and 0.80 %
(Han et al. 2015). Our goals: LeNet-300-100 at most 1.65 % error with at least
98.6 % of the weights pruned, LeNet-5-Caffe at most 0.70 % with at least 99.6 %.

It trains BMR (``pyro_bmr.paper.fit_method("bmr", ...)``, train → evaluate → prune)
on the MNIST files under ``--data-dir`` (never downloads), exports the network at
its posterior means (pruned weights exactly 0) and measures that deterministic
network's test error, the network one would deploy. It prints, per layer, weights
(and biases) kept / total and the compression, in Sparse VD's format, then one
line ``NETWORK: error E %, pruned P %, compression Cx``.

    python benchmarks/sparsity_record.py --network lenet300100 [--epochs 20]
"""

import argparse
import time

import torch

from pyro_bmr import SpikeAndSlabRule, ThresholdRule, export
from pyro_bmr.paper import fit_method, load_dataset, make_loaders
from pyro_bmr.paper.methods import bmr_rule

RECORDS = {  # Sparse VD's error and kept fraction; the goals
    "lenet300100": {"sparse_vd": (1.92, 1.47), "goal": (1.65, 98.6)},
    "lenet5-caffe": {"sparse_vd": (0.75, 0.36), "goal": (0.70, 99.6)},
}


def _rule(name, prune_output):
    def make(model):
        paper = bmr_rule(model)
        exclude = None if prune_output else paper.exclude
        if name == "spike-and-slab":
            return SpikeAndSlabRule(num_iterations=4, groups=paper.groups, exclude=exclude)
        return ThresholdRule(0.0, exclude=exclude)

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=sorted(RECORDS), default="lenet300100")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rule", choices=("spike-and-slab", "threshold"), default="spike-and-slab")
    parser.add_argument("--guide", choices=("auto", "mean-field", "local"), default="local")
    parser.add_argument(
        "--prune-output",
        action="store_true",
        help="let the rule prune the output layer too (the authors never do; Sparse VD does)",
    )
    parser.add_argument("--init-scale", type=float, default=1e-2)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_dataset("mnist", args.data_dir, train_size=args.train_size)
    train, test = make_loaders(data, args.batch_size, test_batch_size=1000, seed=args.seed)
    start = time.perf_counter()
    records = fit_method(
        "bmr",
        args.network,
        train,
        num_classes=data.num_classes,
        num_epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        init_scale=args.init_scale,
        guide=args.guide,
        rule=_rule(args.rule, args.prune_output),
        progress=False,
    )
    for record in records:
        print(
            f"epoch {record.epoch:3d}: loss {record.loss:.4g}, "
            f"pruned {100 * record.sparsity.total:.2f} % (before this epoch's training), "
            f"{record.seconds:.1f} s",
            flush=True,
        )
    minutes = (time.perf_counter() - start) / 60

    x, _ = data.train[:2]
    net = export(record.model, record.guide, x, bmr=record.bmr, compress=False)
    errors, count = 0, 0
    with torch.no_grad():
        for xb, yb in test:
            errors += int((net(xb).argmax(-1) != yb).sum())
            count += len(yb)
    error = 100 * errors / count

    masks = record.bmr.masks
    output = "output layer pruned too" if args.prune_output else "output layer kept"
    print(f"\n{args.network} on MNIST, BMR ({args.rule} rule, {output}, {args.guide} guide), "
          f"{args.epochs} epochs, {minutes:.1f} min")  # fmt: skip
    print(f"{'layer':<28} {'kept / total':>20} {'compression':>12}")
    kept_all = total_all = 0
    for name, mask in masks.items():
        kept, total = int(mask.sum()), mask.numel()
        kept_all, total_all = kept_all + kept, total_all + total
        ratio = total / kept if kept else float("inf")
        print(f"{name.removesuffix('_decentered'):<28} {kept:>9} / {total:<9} {ratio:>11.1f}x")
    pruned = 100 * (1 - kept_all / total_all)
    compression = total_all / max(kept_all, 1)
    svd_error, svd_kept = RECORDS[args.network]["sparse_vd"]
    goal_error, goal_pruned = RECORDS[args.network]["goal"]
    print(
        f"(Sparse VD: error {svd_error} %, kept {svd_kept} %; goal: error <= {goal_error} % "
        f"with >= {goal_pruned} % pruned: "
        f"{'met' if error <= goal_error and pruned >= goal_pruned else 'not met'})"
    )
    print(
        f"{args.network}: error {error:.2f} %, pruned {pruned:.2f} %, compression {compression:.1f}x"
    )


if __name__ == "__main__":
    main()
