"""The whole data path on a CUDA device: masks, ΔF and samples stay where the
parameters live. Skipped on machines without CUDA."""

import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from pyro_bmr import BayesianModelReduction, SpikeAndSlabRule, StochasticBMR

from .models import regression_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_stochastic_bmr_on_cuda_matches_cpu_decisions(sparse_regression):
    X, y, w = sparse_regression
    X, y = X.cuda(), y.cuda()
    guide = AutoNormal(regression_model)
    trainer = StochasticBMR(regression_model, guide, Adam({"lr": 0.05}), rule=SpikeAndSlabRule())
    trainer.fit([(X, y)] * 100, num_epochs=4, progress=False)
    keep = trainer.bmr.masks["w"]
    assert keep.device.type == "cuda"
    assert keep[:5].all() and (~keep[5:]).sum() >= 40
    samples = Predictive(trainer.bmr(regression_model), guide=trainer.bmr(guide), num_samples=5)(X)
    assert samples["w"].device.type == "cuda"
    assert (samples["w"].reshape(5, 50)[:, ~keep] == 0).all()


def test_state_saved_on_cuda_loads_on_cpu(sparse_regression, tmp_path):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    guide(X.cuda(), y.cuda())
    bmr = BayesianModelReduction(guide)
    bmr.reduce(X.cuda(), y.cuda())
    torch.save(bmr.state_dict(), tmp_path / "bmr.pt")
    state = torch.load(tmp_path / "bmr.pt", weights_only=True, map_location="cpu")
    assert state["masks"]["w"].device.type == "cpu"
