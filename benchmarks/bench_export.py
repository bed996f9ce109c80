"""Latency and saved size of an exported 98%-pruned LeNet-300-100 against the dense network.

A Bayesian LeNet-300-100 (``GaussianPrior(1.0)``) is fitted briefly on MNIST with
:class:`pyro_bmr.MeanFieldGuide` and local reparameterisation, then reduced by
Bayesian model reduction of the 98% of all weights and biases with the highest ΔF
(a stand-in for many epochs of stochastic BMR) and fitted as much again with the
masks in place. Compared, in this process:

* ``dense``: the plain ``LeNet300100`` holding the posterior-mean weights (pruned
  ones zero), i.e. ``export(..., compress=False)``;
* ``exported``: ``pyro_bmr.export(model, guide, x, bmr=bmr)`` (dead units removed,
  very sparse layers in CSR form with ``torch.sparse`` kernels).

Printed: the layers of the export, the largest difference between its predictions
and the posterior-mean predictions of the reduced model, the median latency at
batch 1 and batch 256 (``torch.inference_mode``, interleaved rounds of 1000 and 20
calls, median of the per-round ratios) and the bytes of ``torch.save(state_dict())``. First, the dense
and CSR products of a 300x784 layer are timed at several densities, which is where
``pyro_bmr.deterministic.SPARSE_DENSITY`` comes from.

Run from the repository root::

    python benchmarks/bench_export.py [--data-dir ../shared/data] [--rounds 7] [--threads N]
        [--clock wall|cpu]
"""

import argparse
import io
import statistics
import time
import warnings

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_bmr import BayesianModelReduction, ThresholdRule
from pyro_bmr.deterministic import export, guide_means
from pyro_bmr.guides import MeanFieldGuide
from pyro_bmr.nn import BayesianClassifier, GaussianPrior
from pyro_bmr.paper.data import load_dataset
from pyro_bmr.paper.networks import LeNet300100
from pyro_bmr.poutine import local_reparameterization

KEEP = 0.02


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _mean_time(fn, repeats, clock):
    start = clock()
    for _ in range(repeats):
        fn()
    return (clock() - start) / repeats


def interleaved(fns, rounds, repeats, clock=time.perf_counter):
    """Median over rounds of each function's mean time per call (s) in the round, and
    the median over rounds of each one's ratio to the first."""
    per_round = {name: [] for name in fns}
    for fn in fns.values():
        _mean_time(fn, repeats, clock)  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(_mean_time(fn, repeats, clock))
    base = next(iter(per_round.values()))
    return {
        name: (statistics.median(t), statistics.median(b / a for a, b in zip(t, base)))
        for name, t in per_round.items()
    }


def kernel_table(rounds, clock):
    print("dense vs CSR product of a 300x784 layer (us); CSR faster where ratio > 1")
    print(f"{'density':>8}{'batch':>7}{'dense':>9}{'csr':>9}{'dense/csr':>11}")
    gen = torch.Generator().manual_seed(0)
    for density in (0.01, 0.02, 0.05, 0.1, 0.2):
        w = torch.randn(300, 784, generator=gen) * (torch.rand(300, 784, generator=gen) < density)
        b = torch.randn(300, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csr = w.to_sparse_csr()
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape
            )
        for batch in (1, 256):
            x = torch.randn(batch, 784, generator=gen)
            with torch.inference_mode():
                if batch == 1:
                    fns = {
                        "dense": lambda b=b, w=w, x=x: torch.addmv(b, w, x[0]),
                        "csr": lambda b=b, c=csr, x=x: torch.addmv(b, c, x[0]),
                    }
                else:
                    fns = {
                        "dense": lambda b=b, w=w, x=x: torch.addmm(b, x, w.t()),
                        "csr": lambda b=b, c=csr, x=x: torch.addmm(b.unsqueeze(1), c, x.t()).t(),
                    }
                result = interleaved(fns, rounds, 200 if batch == 1 else 10, clock)
            dense_t, csr_t = result["dense"][0], result["csr"][0]
            print(
                f"{density:>8.2f}{batch:>7}{dense_t * 1e6:>9.1f}{csr_t * 1e6:>9.1f}"
                f"{result['csr'][1]:>11.2f}"
            )


def fit_and_reduce(data, epochs, seed):
    """Fit for ``epochs``, prune the 98% of all elements with the highest ΔF, then
    fit the reduced model for ``epochs`` more."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x_train, y_train = data.train.tensors
    model = BayesianClassifier(LeNet300100((1, 28, 28), 10), len(x_train), GaussianPrior(1.0))
    guide = MeanFieldGuide(model, init_loc_fn=model.init_loc_fn, init_scale=1e-2)
    bmr = BayesianModelReduction(guide, ThresholdRule(float("inf")))
    svi = SVI(bmr(model), bmr(guide), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    generator = torch.Generator().manual_seed(seed)
    handler = local_reparameterization()

    def train():
        with handler:
            for _ in range(epochs):
                order = torch.randperm(len(x_train), generator=generator)
                for i in range(0, len(order), 128):
                    idx = order[i : i + 128]
                    svi.step(x_train[idx], y_train[idx])

    train()
    report = bmr.reduce(x_train[:128], y_train[:128])  # keeps everything: only scores
    scores = torch.cat([df.flatten() for df in report.delta_f.values()])
    bmr.rule = ThresholdRule(scores.kthvalue(int(KEEP * len(scores))).values.item())
    bmr.reduce(x_train[:128], y_train[:128])
    train()
    return model, guide, bmr


def saved_bytes(module):
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="time.perf_counter, or time.process_time (CPU time of all threads)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock\n")
    clock = CLOCKS[args.clock]
    kernel_table(args.rounds, clock)

    data = load_dataset("mnist", args.data_dir, train_size=args.train_size)
    model, guide, bmr = fit_and_reduce(data, args.epochs, args.seed)
    x_test, y_test = data.test.tensors
    x = x_test[:256]
    dense = export(model, guide, x, bmr=bmr, compress=False)
    exported = export(model, guide, x, bmr=bmr)
    print(
        f"\nLeNet-300-100 fitted {args.epochs} epoch(s) on {args.train_size} MNIST images, "
        f"{100 * bmr.sparsity().total:.1f}% of weights and biases pruned by BMR"
    )
    print(f"exported: {exported}")

    with torch.no_grad():
        means = guide_means(guide, x, bmr=bmr)
        reference = poutine.condition(model, data=means)(x)
        diff = (exported(x) - reference).abs().max().item()
        diff1 = (exported(x[:1]) - reference[:1]).abs().max().item()
        acc_dense = (dense(x_test).argmax(-1) == y_test).float().mean().item()
        acc_exported = (exported(x_test).argmax(-1) == y_test).float().mean().item()
    print(
        f"max |exported - posterior-mean prediction of the reduced model|: {max(diff, diff1):.2e}"
    )
    print(f"test accuracy: dense {acc_dense:.4f}, exported {acc_exported:.4f}\n")

    print(f"latency, medians of {args.rounds} rounds")
    print(f"{'batch':>6}{'dense us':>11}{'exported us':>13}{'speed-up':>10}")
    with torch.inference_mode():
        for batch, repeats in ((1, 1000), (256, 20)):
            xb = x[:batch].clone()
            result = interleaved(
                {"dense": lambda xb=xb: dense(xb), "exported": lambda xb=xb: exported(xb)},
                args.rounds,
                repeats,
                clock,
            )
            print(
                f"{batch:>6}{result['dense'][0] * 1e6:>11.1f}{result['exported'][0] * 1e6:>13.1f}"
                f"{result['exported'][1]:>10.2f}"
            )
    dense_bytes, exported_bytes = saved_bytes(dense), saved_bytes(exported)
    print(
        f"\nsaved state_dict: dense {dense_bytes} bytes, exported {exported_bytes} bytes, "
        f"{dense_bytes / exported_bytes:.1f}x smaller"
    )


if __name__ == "__main__":
    main()
