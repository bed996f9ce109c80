import functools

import pytest
import torch
from pyro.infer import JitTrace_ELBO, JitTraceGraph_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam, PyroOptim
from torch.utils.data import DataLoader, TensorDataset

from pyro_bmr import BayesianModelReduction, SpikeAndSlabRule, StochasticBMR, ThresholdRule

from .models import regression_model


@pytest.mark.parametrize("rule", [ThresholdRule(), SpikeAndSlabRule()], ids=repr)
def test_recovers_the_sparse_support(rule, sparse_regression):
    X, y, w = sparse_regression
    guide = AutoNormal(regression_model)
    trainer = StochasticBMR(regression_model, guide, Adam({"lr": 0.05}), rule=rule)
    history = trainer.fit(lambda: (X, y), num_epochs=8, steps_per_epoch=100, progress=False)
    keep = trainer.bmr.masks["w"]
    signal = w != 0
    pruned_zeros = (~keep & ~signal).sum().item() / (~signal).sum().item()
    assert keep[signal].all(), "a true signal was pruned"
    assert pruned_zeros >= 0.95
    assert len(history) == 8
    assert [h["epoch"] for h in history] == list(range(8))
    assert history[-1]["total_pruned_fraction"] == pytest.approx(1 - keep.float().mean().item())
    assert history[-1]["pruned_fraction"] == {"w": history[-1]["total_pruned_fraction"]}
    assert history[0]["total_delta_f"] > 0
    # the kept coefficients are close to the truth
    assert torch.allclose(guide.locs.w.detach()[signal], w[signal], atol=0.15)


def test_data_loader_reduce_every_and_callback(sparse_regression):
    X, y, _ = sparse_regression
    loader = DataLoader(TensorDataset(X, y), batch_size=100, shuffle=True)
    seen = []
    trainer = StochasticBMR(
        regression_model,
        AutoNormal(regression_model),
        Adam({"lr": 0.05}),
        TraceMeanField_ELBO(),
        reduce_every=2,
    )
    trainer.fit(loader, num_epochs=4, progress=False, callback=lambda e, t: seen.append(e))
    assert seen == [0, 1, 2, 3]
    assert [h["epoch"] for h in trainer.history] == [1, 3]
    trainer.fit(loader, num_epochs=2, progress=False)
    assert trainer.epochs_done == 6 and trainer.history[-1]["epoch"] == 5


def test_any_torch_optimiser_through_pyro_optim(sparse_regression):
    X, y, w = sparse_regression
    guide = AutoNormal(regression_model)
    trainer = StochasticBMR(
        regression_model, guide, PyroOptim(torch.optim.Adam, {"lr": 0.05}), Trace_ELBO()
    )
    trainer.fit([(X, y)] * 100, num_epochs=4, progress=False)
    keep = trainer.bmr.masks["w"]
    assert keep[:5].all() and (~keep[5:]).sum() >= 40
    # a torch optimiser factory is one PyroOptim away, and the error says so
    with pytest.raises(TypeError, match="PyroOptim"):
        StochasticBMR(regression_model, guide, functools.partial(torch.optim.Adam, lr=0.05))


def test_same_seed_same_history(sparse_regression):
    import pyro

    X, y, _ = sparse_regression
    runs = []
    for _ in range(2):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        trainer = StochasticBMR(regression_model, AutoNormal(regression_model), Adam({"lr": 0.05}))
        runs.append(trainer.fit(lambda: (X, y), num_epochs=2, steps_per_epoch=30, progress=False))
    assert runs[0] == runs[1]


def test_bad_arguments_are_rejected(sparse_regression):
    X, y, _ = sparse_regression
    guide = AutoNormal(regression_model)
    with pytest.raises(TypeError, match="optim must be"):
        StochasticBMR(regression_model, guide, torch.optim.SGD([torch.zeros(1)], lr=0.1))
    with pytest.raises(ValueError, match="reduce_every"):
        StochasticBMR(regression_model, guide, Adam({}), reduce_every=0)
    with pytest.raises(ValueError, match="either rule or bmr"):
        StochasticBMR(
            regression_model,
            guide,
            Adam({}),
            rule=ThresholdRule(),
            bmr=BayesianModelReduction(guide),
        )
    with pytest.raises(TypeError, match="loss must be a Pyro ELBO"):
        StochasticBMR(regression_model, guide, Adam({}), loss="elbo")
    trainer = StochasticBMR(regression_model, guide, Adam({}))
    with pytest.raises(ValueError, match="steps_per_epoch is required"):
        trainer.fit(lambda: (X, y), num_epochs=1)
    with pytest.raises(ValueError, match="no batch"):
        trainer.fit([], num_epochs=1, progress=False)


@pytest.mark.parametrize("elbo", [JitTrace_ELBO, JitTraceGraph_ELBO], ids=lambda e: e.__name__)
def test_jit_elbos_compile_again_after_each_reduction(elbo, sparse_regression):
    # JitTraceGraph_ELBO used to crash at its first step after a reduction: forgetting
    # the compiled function shadowed one of its methods with None
    X, y, _ = sparse_regression
    trainer = StochasticBMR(
        regression_model, AutoNormal(regression_model), Adam({"lr": 0.05}), elbo()
    )
    trainer.fit(lambda: (X, y), num_epochs=3, steps_per_epoch=40, progress=False)
    assert len(trainer.history) == 3 and trainer.history[-1]["total_pruned_fraction"] > 0


def test_a_dict_batch_is_passed_as_keyword_arguments(sparse_regression):
    X, y, _ = sparse_regression
    seen = []

    def model(X, y=None):
        seen.append((X.shape, None if y is None else y.shape))
        regression_model(X, y)

    guide = AutoNormal(model)
    trainer = StochasticBMR(model, guide, Adam({"lr": 0.05}))
    trainer.fit([{"X": X, "y": y}] * 5, num_epochs=2, progress=False)
    assert set(seen) == {(X.shape, y.shape)}
    assert trainer.bmr.masks["w"][:5].all()


def test_fit_counts_epochs_and_steps_exactly(sparse_regression):
    X, y, _ = sparse_regression
    calls = []

    def model(X, y=None):
        calls.append(1)
        regression_model(X, y)

    guide = AutoNormal(model)
    rule = SpikeAndSlabRule(num_iterations=3)
    # the plain ELBO runs the model's Python every step (a captured step replays it)
    trainer = StochasticBMR(
        model, guide, Adam({"lr": 0.05}), Trace_ELBO(), rule=rule, reduce_every=2
    )
    assert trainer.bmr.rule is rule
    batches = [(X, y)] * 7
    guide(X, y)  # the guide's parameters exist before counting model runs
    calls.clear()
    # steps_per_epoch caps an iterable exactly, and fit returns the history
    history = trainer.fit(batches, steps_per_epoch=3, progress=False)  # one epoch by default
    assert trainer.epochs_done == 1 and history is trainer.history and history == []
    steps_then = len(calls)
    assert steps_then == 3  # one model run per SVI step, no reduction after epoch 1
    assert trainer.fit(batches, num_epochs=0, progress=False) == [] and len(calls) == steps_then
    trainer.fit(batches, num_epochs=3, steps_per_epoch=3, progress=False)
    assert trainer.epochs_done == 4
    assert [h["epoch"] for h in trainer.history] == [1, 3]  # continues from epoch 1
    with pytest.raises(ValueError, match="num_epochs must be non-negative"):
        trainer.fit(batches, num_epochs=-1)
    # an existing handler is used as it is, masks and all
    bmr = BayesianModelReduction(guide)
    other = StochasticBMR(model, guide, Adam({"lr": 0.05}), bmr=bmr)
    other.fit(batches[:2], progress=False)
    assert other.bmr is bmr and set(bmr.masks) == {"w"}
