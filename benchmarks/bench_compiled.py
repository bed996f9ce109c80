"""One SVI step on the plain ELBO and on the captured, compiled one, against one Adam
step of the deterministic network.

Networks (issue 12's): the MLP 784 -> 4 x 500 -> 10 (swish) at batch 120, and
LeNet-300-100 at batch 128, both on a data set of 60,000. Variants, each an SVI step
through the pruning handler (no element pruned) with torch's fused Adam (lr 1e-3):

* ``bmr local``: ``fit_method``'s ``bmr`` (``LayerScalePrior``, whose scale is a latent,
  so local reparameterisation finds no layer it can take over and the weights are
  sampled), :class:`~pyro_bmr.MeanFieldGuide` inside ``local_reparameterization``;
* ``bmr local, N(0, 1)``: the same guide on a fixed ``GaussianPrior(1.0)``, where every
  layer is locally reparameterised (pre-activations sampled, KL in closed form);
* ``bmr AutoNormal``: ``fit_method``'s ``bmr`` with Pyro's ``AutoNormal``;
* ``tiered-ff AutoNormal``: the regularised horseshoe (``HorseshoePrior``).

Each on ``Trace_ELBO`` (``plain``) and on :class:`~pyro_bmr.CompiledTrace_ELBO`
(``compiled``, backend ``--backend``, default inductor). ``deterministic`` is
``zero_grad``, cross-entropy forward and backward and fused ``Adam.step`` of the plain
network. Each round times every variant for ``--steps`` steps after two untimed ones;
printed: the median over rounds of the per-step time and of the per-round ratio to
``deterministic``; then the time the compiled ELBO took to capture and compile each
variant (its first three steps). Random inputs (the time does not depend on the
values).

Run from the repository root::

    python benchmarks/bench_compiled.py [--rounds 5] [--steps 10] [--threads 1]
        [--clock cpu|wall] [--networks mlp lenet300100] [--backend inductor|fx]
"""

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_bmr import BayesianModelReduction, CompiledTrace_ELBO
from pyro_bmr.guides import make_guide
from pyro_bmr.nn import BayesianClassifier, GaussianPrior
from pyro_bmr.paper.methods import method_prior
from pyro_bmr.paper.networks import build_network

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
NETWORKS = {
    "mlp": (dict(name="mlp", hidden=(500,) * 4, activation="swish"), 120),
    "lenet300100": (dict(name="lenet300100"), 128),
}
VARIANTS = {
    "bmr local": ("bmr", "local"),
    "bmr local, N(0, 1)": ("gaussian", "local"),
    "bmr AutoNormal": ("bmr", "auto"),
    "tiered-ff AutoNormal": ("tiered-ff", "auto"),
}
DATASET_SIZE = 60_000


def _network(network: str) -> nn.Module:
    kwargs = dict(NETWORKS[network][0])
    return build_network(kwargs.pop("name"), (1, 28, 28), 10, **kwargs)


def _deterministic(network, x, y):
    torch.manual_seed(0)
    net = _network(network)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def _svi_step(network, variant, elbo, x, y):
    method, guide_kind = VARIANTS[variant]
    torch.manual_seed(0)
    prior = GaussianPrior(1.0) if method == "gaussian" else method_prior(method)
    model = BayesianClassifier(_network(network), DATASET_SIZE, prior)
    guide, training = make_guide(model, guide_kind, init_scale=1e-2)
    bmr = BayesianModelReduction(guide, model=model)
    svi = SVI(bmr(model), bmr(guide), pyro.optim.Adam({"lr": 1e-3, "fused": True}), elbo)

    def step():
        with training:
            svi.step(x, y)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=CLOCKS, default="cpu")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--backend", choices=("inductor", "fx"), default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    pyro.settings.set(module_local_params=True)  # many guides in one process
    clock = CLOCKS[args.clock]
    print(f"threads {args.threads}, clock {args.clock}, backend {args.backend}")
    for network in args.networks:
        batch = NETWORKS[network][1]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        fns = {"deterministic": _deterministic(network, x, y)}
        warmup = {}
        for variant in VARIANTS:
            fns[f"{variant}, plain"] = _svi_step(network, variant, Trace_ELBO(), x, y)
            compiled = _svi_step(network, variant, CompiledTrace_ELBO(backend=args.backend), x, y)
            start = time.perf_counter()
            for _ in range(3):  # eager, capture, first replay (compiles)
                compiled()
            warmup[variant] = time.perf_counter() - start
            fns[f"{variant}, compiled"] = compiled
        times = {name: [] for name in fns}
        ratios = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                for _ in range(2):
                    fn()
                start = clock()
                for _ in range(args.steps):
                    fn()
                times[name].append((clock() - start) / args.steps)
            for name in fns:
                ratios[name].append(times[name][-1] / times["deterministic"][-1])
        print(f"\n{network}, batch {batch}")
        print(f"{'variant':36s} {'ms/step':>8s} {'x deterministic':>16s}")
        for name in fns:
            ms = 1000 * statistics.median(times[name])
            print(f"{name:36s} {ms:8.1f} {statistics.median(ratios[name]):16.2f}")
        for variant in VARIANTS:
            print(f"{variant}: compiled ELBO's first three steps (eager, capture, "
                  f"compile) {warmup[variant]:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
