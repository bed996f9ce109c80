"""Sparse recovery: 50 coefficients of which 5 are non-zero, n = 500.

StochasticBMR with a stock AutoNormal guide, 8 epochs of 100 steps, reducing after
every epoch, under the threshold and the spike-and-slab rule, for three seeds.

Run from the repository root: ``python benchmarks/recovery.py``
"""

import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_bmr import SpikeAndSlabRule, StochasticBMR, ThresholdRule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import regression_model  # noqa: E402


def main() -> None:
    truth = torch.zeros(50)
    truth[:5] = torch.tensor([2.0, -1.5, 1.0, 3.0, -2.0])
    for rule in (ThresholdRule(), SpikeAndSlabRule()):
        for seed in range(3):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            g = torch.Generator().manual_seed(seed)
            X = torch.randn(500, 50, generator=g)
            y = X @ truth + 0.5 * torch.randn(500, generator=g)
            trainer = StochasticBMR(
                regression_model, AutoNormal(regression_model), Adam({"lr": 0.05}), rule=rule
            )
            start = time.perf_counter()
            trainer.fit([(X, y)] * 100, num_epochs=8, progress=False)
            keep = trainer.bmr.masks["w"]
            print(
                f"{type(rule).__name__:17s} seed {seed}: "
                f"true zeros pruned {int((~keep[5:]).sum())}/45, "
                f"signals kept {int(keep[:5].sum())}/5, "
                f"fit {time.perf_counter() - start:.1f} s"
            )


if __name__ == "__main__":
    main()
