"""Seconds per epoch of Tiered-FF (regularised horseshoe) and BMR on LeNet-300-100.

Both methods run through :func:`pyro_bmr.paper.fit_method` on the same MNIST subset,
batch size, learning rate and seed: ``tiered-ff`` is the regularised horseshoe prior
with ``AutoNormal`` over every latent site; ``bmr`` is the per-layer scale prior
with ``AutoNormal``, trained by ``StochasticBMR`` and reduced after every epoch
(the reduction is inside the timed epoch). The methods cannot run interleaved
(each clears Pyro's param store), so they alternate per repeat, in the order
ABAB...; every repeat trains ``--epochs`` epochs from scratch. Printed: the epoch
times side by side, their medians, the median over repeats of the ratio
``tiered-ff / bmr`` of the per-repeat median epoch times, and the final loss,
sparsity and test accuracy of the last repeat.

Run from the repository root::

    python benchmarks/bench_tiered_vs_bmr.py [--data-dir ../shared/data] [--train-size 10000]
        [--epochs 2] [--repeats 3] [--threads N]
"""

import argparse
import statistics

import torch

from pyro_bmr.paper import fit_method
from pyro_bmr.paper.data import load_dataset, make_loaders

METHODS = ("tiered-ff", "bmr")


def run(method, loaders, data, args):
    train, _ = loaders
    seconds, last = [], None
    for record in fit_method(
        method,
        "lenet300100",
        train,
        num_classes=data.num_classes,
        num_epochs=args.epochs,
        lr=args.lr,
        num_samples=10,
        seed=args.seed,
    ):
        seconds.append(record.seconds)
        last = record
    x_test, y_test = data.test.tensors
    probs = last.predict_proba(x_test)
    accuracy = (probs.argmax(-1) == y_test).float().mean().item()
    sparsity = last.sparsity.total if last.sparsity is not None else 0.0
    return seconds, last.loss, sparsity, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_dataset(
        "mnist", args.data_dir, train_size=args.train_size, test_size=args.test_size
    )
    loaders = make_loaders(data, args.batch_size, seed=args.seed)
    print(
        f"LeNet-300-100 on {args.train_size} MNIST images, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) x {args.repeats} repeat(s), {torch.get_num_threads()} threads"
    )
    epochs = {method: [] for method in METHODS}
    finals = {}
    for _ in range(args.repeats):
        for method in METHODS:
            seconds, loss, sparsity, accuracy = run(method, loaders, data, args)
            epochs[method].append(seconds)
            finals[method] = (loss, sparsity, accuracy)

    print(f"\n{'repeat':>6}{'epoch':>6}{'tiered-ff s':>13}{'bmr s':>9}")
    for r in range(args.repeats):
        for e in range(args.epochs):
            tiered, bmr = epochs["tiered-ff"][r][e], epochs["bmr"][r][e]
            print(f"{r:>6}{e + 1:>6}{tiered:>13.2f}{bmr:>9.2f}")
    medians = {m: [statistics.median(s) for s in epochs[m]] for m in METHODS}
    ratio = statistics.median(t / b for t, b in zip(medians["tiered-ff"], medians["bmr"]))
    print(
        f"\nmedian seconds per epoch: tiered-ff {statistics.median(medians['tiered-ff']):.2f}, "
        f"bmr {statistics.median(medians['bmr']):.2f}; tiered-ff / bmr = {ratio:.2f}"
    )
    print(f"\n{'method':<10}{'loss':>12}{'pruned':>9}{'test acc':>10}")
    for method, (loss, sparsity, accuracy) in finals.items():
        print(f"{method:<10}{loss:>12.1f}{100 * sparsity:>8.1f}%{accuracy:>10.4f}")


if __name__ == "__main__":
    main()
