import functools

import pyro
import pytest
import torch
from pyro.infer import JitTrace_ELBO, JitTraceGraph_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam, PyroOptim
from torch.utils.data import DataLoader, TensorDataset

from pyro_bmr import BayesianModelReduction, SpikeAndSlabRule, StochasticBMR, ThresholdRule

from .models import counted, regression_model


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
    trainer.fit(
        loader, num_epochs=4, progress=False, callback=lambda e, t: seen.append((e, t is trainer))
    )
    assert seen == [(0, True), (1, True), (2, True), (3, True)]
    assert trainer.bmr.model is regression_model  # the model given, not the guide's copy
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
    with pytest.raises(
        TypeError, match=r"^optim must be a Pyro optimiser, e\.g\. pyro\.optim\.Adam\(.*got SGD"
    ):
        StochasticBMR(regression_model, guide, torch.optim.SGD([torch.zeros(1)], lr=0.1))
    with pytest.raises(ValueError, match="reduce_every"):
        StochasticBMR(regression_model, guide, Adam({}), reduce_every=0)
    with pytest.raises(ValueError, match=r"^pass either rule or bmr, not both"):
        StochasticBMR(
            regression_model,
            guide,
            Adam({}),
            rule=ThresholdRule(),
            bmr=BayesianModelReduction(guide),
        )
    with pytest.raises(TypeError, match="^loss must be a Pyro ELBO, got str$"):
        StochasticBMR(regression_model, guide, Adam({}), loss="elbo")
    trainer = StochasticBMR(regression_model, guide, Adam({}))
    with pytest.raises(ValueError, match="^steps_per_epoch is required when data is a callable$"):
        trainer.fit(lambda: (X, y), num_epochs=1)
    with pytest.raises(
        TypeError, match="^a data callable must take no arguments and return one batch$"
    ):
        trainer.fit(lambda epoch: (X, y), num_epochs=1, steps_per_epoch=1)
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
    model, calls = counted(regression_model)
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


# -- checkpoints ----------------------------------------------------------------------


def _trainer(seed=0, model=regression_model, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return StochasticBMR(model, AutoNormal(model), Adam({"lr": 0.05}), **kwargs)


def _run(X, y, epochs, *, resume=None, checkpoint=None, prepare=False):
    trainer = _trainer()
    # a loader that shuffles with the global generator: its order must resume too
    loader = DataLoader(TensorDataset(X, y), batch_size=100, shuffle=True)
    if prepare:  # the guide's parameters exist before loading
        trainer.guide(X, y)
    if resume is not None:
        trainer.load_checkpoint(resume)
    trainer.fit(loader, epochs - trainer.epochs_done, progress=False, checkpoint=checkpoint)
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return trainer, params


@pytest.mark.parametrize("prepare", [False, True], ids=["fresh", "guide-run-first"])
def test_a_resumed_run_is_the_uninterrupted_run(prepare, sparse_regression, tmp_path):
    X, y, _ = sparse_regression
    full, full_params = _run(X, y, 4)
    path = tmp_path / "run.pt"
    _run(X, y, 2, checkpoint=path)
    resumed, params = _run(X, y, 4, resume=path, prepare=prepare)
    assert resumed.epochs_done == 4 and resumed.history == full.history
    assert params.keys() == full_params.keys()
    for name, value in params.items():
        assert torch.equal(value, full_params[name]), name
    assert torch.equal(resumed.bmr.masks["w"], full.bmr.masks["w"])
    assert (~full.bmr.masks["w"]).sum() >= 40


def test_a_checkpoint_holds_tensors_and_plain_values(sparse_regression, tmp_path):
    X, y, _ = sparse_regression
    trainer, _ = _run(X, y, 1)
    path = tmp_path / "sub" / "run.pt"
    assert trainer.save_checkpoint(path) == path
    state = torch.load(path, weights_only=True)
    assert state["format"] == "pyro_bmr.StochasticBMR" and state["epochs_done"] == 1
    assert set(state["params"]) == {"AutoNormal.locs.w", "AutoNormal.scales.w"}
    assert set(state["optim"]) == set(state["params"])
    assert torch.equal(state["bmr"]["masks"]["w"], trainer.bmr.masks["w"])
    assert state["history"] == trainer.history and state["world_size"] == 1
    assert state["reduce_every"] == trainer.reduce_every
    assert {"torch", "random", "numpy"} <= set(state["rng"])
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]  # no temporary file


def test_a_failed_write_leaves_the_old_checkpoint(sparse_regression, tmp_path, monkeypatch):
    X, y, _ = sparse_regression
    trainer, _ = _run(X, y, 1)
    path = tmp_path / "run.pt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    trainer.epochs_done += 1
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["run.pt"]


def test_only_rank_0_writes(sparse_regression, tmp_path, monkeypatch):
    import pyro_bmr.stochastic as stochastic

    X, y, _ = sparse_regression
    trainer, _ = _run(X, y, 1)
    monkeypatch.setattr(stochastic, "world", lambda group=None: (1, 2))
    assert trainer.save_checkpoint(tmp_path / "run.pt") is None
    assert not (tmp_path / "run.pt").exists()


def test_bad_checkpoints_are_clear_errors(sparse_regression, tmp_path):
    from pyro_bmr.stochastic import CheckpointError

    X, y, _ = sparse_regression
    trainer, _ = _run(X, y, 1)
    good = tmp_path / "good.pt"
    trainer.save_checkpoint(good)
    state = torch.load(good, weights_only=True)

    def written(name, content):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        return path

    cases = [
        (written("garbage.pt", b"not a checkpoint"), "garbage.pt' cannot be read"),
        (written("cut.pt", good.read_bytes()[:2000]), "cut.pt' cannot be read.*cut short"),
        (written("list.pt", [1, 2]), "list.pt' is not a checkpoint of StochasticBMR"),
        (written("other.pt", {"format": "x"}), "its format entry is 'x'"),
        (written("newer.pt", {**state, "version": 99}), "layout version 99; .* upgrade"),
        (written("no-optim.pt", {k: v for k, v in state.items() if k != "optim"}), "'optim'"),
        (written("bad-rng.pt", {**state, "rng": {}}), "entry 'rng' should hold"),
        (written("object.pt", {**state, "extra": functools.partial(int)}), "more than tensors"),
    ]
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match):
            _trainer().load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        _trainer().load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        _trainer().load_checkpoint(tmp_path)

    # a checkpoint of another model: its parameters do not fit, named with the file
    wrong = {**state, "params": {**state["params"]}}
    wrong["params"]["AutoNormal.locs.w"] = torch.zeros(7)
    path = written("shape.pt", wrong)
    trainer = _trainer()
    trainer.load_checkpoint(path)
    with pytest.raises(
        CheckpointError, match=r"shape.pt'.*'AutoNormal.locs.w' is .*\(7,\).*\(50,\)"
    ):
        trainer.fit([(X, y)], progress=False)
    # masks of another model
    path = written(
        "masks.pt",
        {**state, "bmr": {**state["bmr"], "masks": {"w": torch.ones(7, dtype=torch.bool)}}},
    )
    trainer = _trainer()
    trainer.load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"masks.pt'.*its masks do not fit the model"):
        trainer.step(X, y)
    extra = {**state, "params": {**state["params"], "other.loc": torch.zeros(2)}}
    trainer = _trainer()
    trainer.load_checkpoint(written("extra.pt", extra))
    with pytest.raises(CheckpointError, match=r"\['other.loc'\], which the model and guide"):
        trainer.step(X, y)


def test_a_model_with_keyword_only_arguments_resumes(sparse_regression, tmp_path):
    X, y, _ = sparse_regression

    def model(X, *, y):
        regression_model(X, y)

    path = tmp_path / "run.pt"
    first = _trainer(model=model)
    first.step(X, y=y)
    first.save_checkpoint(path)
    first.step(X, y=y)
    expected = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    resumed = _trainer(model=model)
    resumed.load_checkpoint(path)  # the parameters are made at the first step, with y
    resumed.step(X, y=y)
    params = dict(pyro.get_param_store().named_parameters())
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(params[name].detach(), value), name


def test_a_resumed_run_may_reduce_first(sparse_regression, tmp_path):
    X, y, _ = sparse_regression
    path = tmp_path / "run.pt"
    saved, _ = _run(X, y, 1, checkpoint=path)
    expected = saved.reduce(X, y=y)
    resumed = _trainer()
    resumed.load_checkpoint(path)  # the parameters are made by the reduction
    report = resumed.reduce(X, y=y)
    assert report.total_delta_f == expected.total_delta_f
    assert torch.equal(resumed.bmr.masks["w"], saved.bmr.masks["w"])


class _CallableBatches(list):
    """Batches that can also be called (as some data wrappers can): iterated, not called."""

    def __call__(self):
        raise AssertionError("an iterable is iterated, never called")


def test_data_that_is_iterable_is_iterated_even_if_callable(sparse_regression, capsys):
    X, y, _ = sparse_regression
    trainer = _trainer()
    trainer.fit(_CallableBatches([(X, y)] * 3), num_epochs=2)  # progress shown by default
    assert trainer.epochs_done == 2
    bar = capsys.readouterr().err
    assert "6/6" in bar and "step/s" in bar  # tqdm's bar: 3 steps in each of 2 epochs
    trainer.fit(_CallableBatches([(X, y)] * 3), num_epochs=2, steps_per_epoch=2)
    assert "4/4" in capsys.readouterr().err  # steps_per_epoch caps the epoch and the bar
    trainer.fit(_CallableBatches([(X, y)] * 3), num_epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    # an iterable of unknown length: the bar counts steps without a total
    trainer.fit(iter([(X, y)] * 5), num_epochs=1)
    assert "5step" in capsys.readouterr().err


class _EpochSampler(torch.utils.data.SequentialSampler):
    """A sampler that, like ``DistributedSampler``, is told each epoch's number."""

    def __init__(self, data):
        super().__init__(data)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_fit_tells_the_sampler_each_epoch_and_resumes_its_count(sparse_regression):
    X, y, _ = sparse_regression
    dataset = TensorDataset(X, y)
    sampler = _EpochSampler(dataset)
    trainer = _trainer()
    trainer.fit(DataLoader(dataset, batch_size=250, sampler=sampler), 2, progress=False)
    trainer.fit(DataLoader(dataset, batch_size=250, sampler=sampler), 1, progress=False)
    assert sampler.epochs == [0, 1, 2]


def test_history_records_each_reduction_with_the_epochs_mean_loss(sparse_regression):
    X, y, _ = sparse_regression
    trainer = _trainer(reduce_every=3)
    losses, reports = [], []
    step, reduce = trainer.step, trainer.reduce
    trainer.step = lambda *a, **k: losses.append(step(*a, **k)) or losses[-1]
    trainer.reduce = lambda *a, **k: reports.append(reduce(*a, **k)) or reports[-1]
    halves = [(X[:250], y[:250]), (X[250:], y[250:])]
    history = trainer.fit(halves, num_epochs=6, progress=False)
    assert [h["epoch"] for h in history] == [2, 5]  # after the 3rd and the 6th epoch
    for record, epoch, report in zip(history, (2, 5), reports):
        assert set(record) == {
            "epoch",
            "loss",
            "pruned_fraction",
            "total_pruned_fraction",
            "num_pruned",
            "total_delta_f",
        }
        assert record["loss"] == pytest.approx(sum(losses[2 * epoch : 2 * epoch + 2]) / 2)
        assert record["num_pruned"] == report.num_pruned
        assert record["total_delta_f"] == report.total_delta_f
    assert history[0]["num_pruned"] > 0
