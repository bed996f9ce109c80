"""Data-parallel training: two gloo processes on the CPU against one process.

The runs are those of :mod:`tests.distributed_worker`: stochastic BMR with
``AutoNormal`` (global latents only) on 256 examples in global batches of 32, four
epochs of eight steps, a reduction after each, ``CompiledTrace_ELBO`` (whose
gradients are computed inside its captured graph), float64.
"""

import json
import signal
from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data.distributed import DistributedSampler

from pyro_bmr import StochasticBMR
from pyro_bmr import distributed as parallel
from pyro_bmr.distributed import DataParallelOptimizer

from . import distributed_worker as worker
from .models import regression_model
from .processes import launch


def _launch(tmp_path: Path, name: str, **config) -> tuple[list[int], list[str]]:
    """Two ranks of the worker, as torchrun would start them: return codes, stderr."""
    config["out"] = str(tmp_path / name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    done = launch(["-m", "tests.distributed_worker", str(path)])
    return [p.returncode for p in done], [p.stderr for p in done]


def _results(tmp_path: Path, name: str, world_size: int = 2) -> list[dict]:
    return [
        torch.load(tmp_path / f"{name}.rank{r}.pt", weights_only=True) for r in range(world_size)
    ]


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two ranks: one averaged gradient, a full run, then a reduction after rank 1
    diverged."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    codes, errors = _launch(tmp_path, "full", gradients=True, diverge=True)
    assert codes == [0, 0], errors
    return _results(tmp_path, "full")


def test_averaged_gradients_are_the_gradient_on_the_union_of_the_shards(uninterrupted):
    single = worker.gradients(torch.arange(worker.BATCH))
    first, second = (r["gradients"] for r in uninterrupted)
    _assert_equal(first, second)
    _assert_close(first, single)
    # not trivially: each shard's own gradient is far from the whole batch's
    shard = worker.gradients(torch.arange(worker.BATCH)[0::2])
    assert not torch.allclose(shard["AutoNormal.locs.w"], single["AutoNormal.locs.w"], rtol=1e-2)


def test_ranks_end_with_the_same_masks_and_parameters(uninterrupted):
    first, second = (r["trained"] for r in uninterrupted)
    _assert_equal(first["masks"], second["masks"])
    _assert_equal(first["params"], second["params"])
    assert first["history"] == second["history"]
    keep = first["masks"]["w"]
    assert keep[: len(worker.TRUE_W)].all() and not keep[len(worker.TRUE_W) :].any()
    assert [h["epoch"] for h in first["history"]] == list(range(worker.EPOCHS))


def test_two_processes_train_as_one_with_the_global_batch(uninterrupted):
    single = worker.state(worker.train(1, 0))
    first = uninterrupted[0]["trained"]
    _assert_equal(first["masks"], single["masks"])
    _assert_close(first["params"], single["params"])
    # the same losses: each rank's estimate on its shard, averaged over the ranks
    for two, one in zip(first["history"], single["history"]):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-9)
        assert two["num_pruned"] == one["num_pruned"]


def test_a_reduction_gives_every_rank_rank_0s_masks_and_parameters(uninterrupted):
    first, second = (r["diverged"] for r in uninterrupted)
    trained = uninterrupted[0]["trained"]
    # rank 1 had zeroed and pruned w[0]; rank 0's kept value and mask won
    assert second["masks"]["w"][0] and first["masks"]["w"][0]
    _assert_equal(first["masks"], second["masks"])
    _assert_equal(first["params"], second["params"])
    assert first["params"]["AutoNormal.locs.w"][0] == trained["params"]["AutoNormal.locs.w"][0]


def test_a_killed_run_resumes_as_if_never_interrupted(uninterrupted, tmp_path):
    checkpoint = tmp_path / "run.pt"
    codes, errors = _launch(tmp_path, "killed", checkpoint=str(checkpoint), kill_after=1)
    assert codes == [-signal.SIGKILL] * 2, errors
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epochs_done"] == 2 and saved["world_size"] == 2
    assert not list(tmp_path.glob(".run.pt.*"))  # no temporary file left behind

    codes, errors = _launch(tmp_path, "resumed", resume=str(checkpoint))
    assert codes == [0, 0], errors
    full = uninterrupted[0]["trained"]
    for rank in _results(tmp_path, "resumed"):
        resumed = rank["trained"]
        _assert_equal(resumed["masks"], full["masks"])
        _assert_equal(resumed["params"], full["params"])
        assert resumed["history"] == full["history"]

    # and with one process instead of two
    alone = worker.state(worker.train(1, 0, resume=str(checkpoint)))
    _assert_equal(alone["masks"], full["masks"])
    _assert_close(alone["params"], full["params"])
    assert [h["epoch"] for h in alone["history"]] == list(range(worker.EPOCHS))


# -- one process: what needs no process group ------------------------------------------


def test_outside_a_process_group_everything_is_the_one_process_case(sparse_regression):
    assert parallel.world() == (0, 1) and not parallel.is_distributed()
    assert parallel.local_batch_size(30) == 30
    assert parallel.mean_over_ranks(2.5) == 2.5
    X, y, _ = sparse_regression
    # the wrapper steps its optimiser as it is, which holds the state
    runs = []
    for wrap in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        optim = Adam({"lr": 0.05})
        trainer = StochasticBMR(
            regression_model,
            AutoNormal(regression_model),
            DataParallelOptimizer(optim) if wrap else optim,
        )
        trainer.fit(lambda: (X, y), num_epochs=2, steps_per_epoch=20, progress=False)
        assert trainer.distributed is wrap
        assert set(trainer.optim.get_state()) == set(optim.get_state()) != set()
        runs.append((trainer.history, pyro.param("AutoNormal.locs.w").detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_bad_setups_are_clear_errors(monkeypatch, sparse_regression):
    guide = AutoNormal(regression_model)
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        StochasticBMR(regression_model, guide, Adam({}), distributed=True)
    with pytest.raises(ValueError, match="distributed=False, but optim is"):
        StochasticBMR(regression_model, guide, DataParallelOptimizer(Adam({})), distributed=False)
    with pytest.raises(TypeError, match="Pyro optimiser"):
        DataParallelOptimizer(torch.optim.SGD)
    with pytest.raises(TypeError, match="already"):
        DataParallelOptimizer(DataParallelOptimizer(Adam({})))
    monkeypatch.setattr(parallel, "world", lambda group=None: (0, 3))
    assert parallel.local_batch_size(33) == 11
    with pytest.raises(ValueError, match="global batch size 32 does not divide among 3"):
        parallel.local_batch_size(32)


def test_module_local_parameters_have_no_name_to_order_them_by():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="not in Pyro's param store"):
        DataParallelOptimizer(Adam({}))([p])


def test_init_from_environment_reads_torchruns_variables(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    # not started by torchrun: one process, nothing initialised
    assert parallel.init_from_environment("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        parallel.init_from_environment("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT is not set: .*torchrun"):
        parallel.init_from_environment("cpu")
    assert not torch.distributed.is_initialized()


def test_set_sampler_epoch_finds_the_sampler():
    dataset = worker.data()
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, seed=3)
    # as a DataLoader's sampler, and inside a BatchSampler handed over as the sampler
    for loader in (
        DataLoader(dataset, batch_size=4, sampler=sampler),
        DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, 4, False)),
    ):
        assert parallel.set_sampler_epoch(loader, 7) and sampler.epoch == 7
        parallel.set_sampler_epoch(loader, 0)
    assert not parallel.set_sampler_epoch([(1, 2)], 7)
    assert not parallel.set_sampler_epoch(DataLoader(dataset, batch_size=4, shuffle=True), 7)
