"""The Lightning callback: a LightningModule over Pyro's ELBOModule, pruned by BMR."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch.utils.data import DataLoader, TensorDataset

from pyro_bmr import BayesianModelReduction, CompiledTrace_ELBO, ThresholdRule, _pyro_compat

pl = pytest.importorskip("lightning.pytorch")
from pyro_bmr.lightning import BMRCallback  # noqa: E402  (after the skip)

N, D = 600, 10
TRUE_W = torch.tensor([2.0, -1.5, 1.0])  # the other weights are zero


class Regression(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = PyroSample(dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        w = self.w
        # the data-parallel pattern of Pyro's example: the plate scales a batch to N
        with pyro.plate("data", N, subsample=torch.arange(len(x))):
            return pyro.sample("y", dist.Normal(x @ w, 0.3), obs=y)


class TrainingPlan(pl.LightningModule):
    def __init__(self, elbo: pyro.infer.elbo.ELBOModule) -> None:
        super().__init__()
        self.elbo = elbo

    def training_step(self, batch, batch_idx):
        return self.elbo(*batch)

    def validation_step(self, batch, batch_idx):
        return self.elbo(*batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.elbo.parameters(), lr=0.1)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    w = torch.zeros(D)
    w[: len(TRUE_W)] = TRUE_W
    return TensorDataset(x, x @ w + 0.3 * torch.randn(N, generator=g))


def test_the_callback_prunes_at_the_end_of_each_epoch():
    with pyro.settings.context(module_local_params=True):
        model = Regression()
        guide = AutoNormal(model)
        data = _data()
        elbo = Trace_ELBO()(model, guide)
        elbo(*data[:50])  # create the guide's parameters before the optimiser is built
        bmr = BayesianModelReduction(guide, ThresholdRule(), model=model)
        seen, validated = [], []

        class Spy(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                # the callback's masks are active while the module runs a batch
                draw = pyro.poutine.trace(guide).get_trace(*batch).nodes["w"]["value"]
                masks = dict(bmr.masks)
                seen.append((draw.detach().clone(), masks.get("w")))

            def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *_):
                draw = pyro.poutine.trace(guide).get_trace(*batch).nodes["w"]["value"]
                validated.append((draw.detach().clone(), dict(bmr.masks).get("w")))

        callback = BMRCallback(bmr)
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            callbacks=[callback, Spy()],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=1,
        )
        trainer.fit(
            TrainingPlan(elbo),
            DataLoader(data, batch_size=50, shuffle=True),
            DataLoader(data, batch_size=50),
        )

    keep = bmr.masks["w"]
    assert [h["epoch"] for h in callback.history] == [0, 1]
    assert keep[: len(TRUE_W)].all(), "a true weight was pruned"
    assert (~keep[len(TRUE_W) :]).sum() >= 5, "the zero weights were not pruned"
    assert callback.history[0]["num_pruned"] > 0
    # the guide's pruned locations are zero; before the first reduction no weight is
    # zero, after it the module's steps draw the pruned ones as exactly zero
    assert (guide.locs.w.detach()[~keep] == 0).all()
    first = [draw for draw, mask in seen if mask is None]
    later = [(draw, mask) for draw, mask in seen if mask is not None]
    assert len(first) == len(later) == 12 and all((draw != 0).all() for draw in first)
    assert all((draw[~mask] == 0).all() and (draw[mask] != 0).all() for draw, mask in later)
    # validation runs before the epoch's reduction (train, evaluate, prune), and in
    # the second epoch it ran the model the first reduction left
    assert len(validated) == 2 and validated[0][1] is None
    draw, mask = validated[1]
    assert (~mask).any() and (draw[~mask] == 0).all()
    assert not pyro.poutine.runtime._PYRO_STACK  # the handler left the stack
    # the masks are the callback's state in Lightning's checkpoints
    state = callback.state_dict()
    other = BMRCallback(BayesianModelReduction(guide, model=model))
    other.load_state_dict(state)
    assert torch.equal(other.bmr.masks["w"], keep) and other.history == callback.history


def test_reduce_every_is_checked():
    with pytest.raises(ValueError, match="reduce_every must be a positive number of epochs"):
        BMRCallback(BayesianModelReduction(AutoNormal(Regression())), reduce_every=0)


def test_a_reduction_makes_the_modules_compiled_elbos_forget_their_graphs():
    model = Regression()
    guide = AutoNormal(model)
    batch = _data()[:50]
    jit = JitTrace_ELBO()(model, guide)
    captured = CompiledTrace_ELBO()(model, guide)
    jit(*batch)  # compiles its loss, with the masks of the time (none) baked in
    assert _pyro_compat.compiled_functions(jit.elbo)
    captured.elbo.compiled[("a structure",)] = "a captured step"
    plan = TrainingPlan(torch.nn.ModuleList([jit, captured]))
    callback = BMRCallback(BayesianModelReduction(guide, model=model))
    with pytest.warns(UserWarning, match="looks unfitted"):
        callback.reduce(plan, batch)
    assert _pyro_compat.compiled_functions(jit.elbo) == []
    assert captured.elbo.compiled == {}
