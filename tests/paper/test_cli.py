import json
import math
import subprocess
import sys

import pytest
import torch

from pyro_bmr.paper import METHODS, cli
from pyro_bmr.paper.cli import main
from pyro_bmr.paper.data import DatasetNotFoundError
from pyro_bmr.paper.experiments import CURVES, OUTPUT_FILES

from ..processes import launch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# digits subset, one small hidden layer, two posterior samples: a few seconds.
TINY = [
    "--train-size",
    "200",
    "--test-size",
    "100",
    "--hidden",
    "8",
    "--samples",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]


def _run(out, *extra):
    return main(["run", *TINY, "--out", str(out), *extra])


def _without_seconds(results):
    methods = {
        m: {k: v for k, v in curve.items() if k != "seconds"}
        for m, curve in results["methods"].items()
    }
    return {"config": results["config"], "methods": methods}


def test_run_end_to_end_writes_results_and_figures(tmp_path, capsys):
    assert _run(tmp_path / "out", "--epochs", "2") == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "methods"}
    assert results["config"]["epochs"] == 2 and results["config"]["dataset"] == "digits"
    assert list(results["methods"]) == ["flat-map", "flat-ff", "tiered-ff", "bmr"]
    for curve in results["methods"].values():
        assert tuple(curve) == CURVES
        assert curve["epoch"] == [1, 2]
        for key in CURVES:
            assert len(curve[key]) == 2
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in curve[key])
    assert results["methods"]["bmr"]["pruned_fraction"][-1] > 0.0
    for name in OUTPUT_FILES[1:]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    # The table on stdout shows the last evaluation of every method.
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["method"])
    assert lines[header].split() == [
        "method",
        "accuracy",
        "NLL",
        "ECE",
        "pruned",
        "hidden",
        "s/epoch",
    ]
    for line, method in zip(lines[header + 2 : header + 6], METHODS):
        curve = results["methods"][method]
        cells = line.split()
        assert cells[0] == method
        assert cells[1:6] == [
            f"{curve[key][-1]:.4f}"
            for key in ("accuracy", "nll", "ece", "pruned_fraction", "pruned_hidden")
        ]
    assert str(out) in stdout


def test_same_seed_gives_bit_identical_results(tmp_path):
    methods = ["--methods", "flat-ff", "bmr", "--epochs", "2"]
    for name, seed in [("a", "3"), ("b", "3")]:
        assert _run(tmp_path / name, *methods, "--seed", seed) == 0
    assert _run(tmp_path / "c", "--methods", "bmr", "--epochs", "2", "--seed", "4") == 0
    a, b, c = (json.loads((tmp_path / n / "results.json").read_text()) for n in "abc")
    # Everything but the wall-clock seconds is identical, to the last bit (JSON
    # writes floats with the shortest repr that round-trips).
    assert _without_seconds(a) == _without_seconds(b)
    assert a["methods"]["bmr"]["nll"] != c["methods"]["bmr"]["nll"]
    assert a["config"]["seed"] == 3 and c["config"]["seed"] == 4


def test_missing_dataset_is_one_clear_message(tmp_path, capsys):
    data_dir = tmp_path / "nothing-here"
    out = tmp_path / "out"
    code = _run(out, "--dataset", "mnist", "--data-dir", str(data_dir))
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("pyro-bmr: error: dataset 'mnist' not found")
    assert str(data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte") in err
    assert "--download" in err
    assert "Traceback" not in err
    assert not out.exists()


def _error_of(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "bmr", "svgd"], "argument --methods: invalid choice: 'svgd'"),
        (["--methods", "bmr", "bmr"], "argument --methods: a method is repeated"),
        (["--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--epochs", "-3"], "argument --epochs: expected a positive integer, got '-3'"),
        (["--epochs", "two"], "argument --epochs: expected a positive integer, got 'two'"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--samples", "0"], "argument --samples: expected a positive integer"),
        (["--lr", "0"], "argument --lr: expected a positive number, got '0'"),
        (["--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["--threads", "0"], "argument --threads: expected a positive integer"),
        (["--model", "lenet5", "--hidden", "8"], "argument --hidden: applies to --model mlp"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--guide", "fast"], "argument --guide: invalid choice: 'fast'"),
    ],
)
def test_bad_options_are_one_line_usage_errors(argv, match, capsys):
    code, last = _error_of(capsys, ["run", *argv])
    assert code == 2
    assert last.startswith("pyro-bmr run: error: ") and match in last


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    code, last = _error_of(capsys, ["run", "--device", "cuda"])
    assert code == 2
    assert (
        last == "pyro-bmr run: error: argument --device: cuda requested, but CUDA is not available"
    )


def test_no_command_or_unknown_arguments_are_usage_errors(capsys):
    code, last = _error_of(capsys, [])
    assert code == 2 and last.startswith("pyro-bmr: error: ") and "required: COMMAND" in last
    code, last = _error_of(capsys, ["run", "--frobnicate"])
    assert code == 2 and last == "pyro-bmr: error: unrecognized arguments: --frobnicate"


def test_help_lists_every_option(capsys):
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for option in [
        "--dataset",
        "--data-dir",
        "--download",
        "--model",
        "--methods",
        "--epochs",
        "--batch-size",
        "--lr",
        "--samples",
        "--seed",
        "--device",
        "--out",
    ]:
        assert option in text
    for name in METHODS:
        assert name in text


def test_threads_are_set_for_the_run_and_restored(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    seen = []

    def fake_load_dataset(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise DatasetNotFoundError("no data here")

    monkeypatch.setattr(cli, "load_dataset", fake_load_dataset)
    assert _run(tmp_path, "--threads", str(threads)) == 1
    assert seen == [threads]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("module", ["pyro_bmr", "pyro_bmr.paper"])
def test_python_dash_m_runs_the_command(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pyro-bmr")
    assert "run" in proc.stdout


def test_local_reparameterisation_guide_is_one_option(tmp_path):
    out = tmp_path / "local"
    assert _run(out, "--epochs", "1", "--methods", "flat-ff", "bmr", "--guide", "local") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["guide"] == "local"
    for curve in results["methods"].values():
        assert all(math.isfinite(v) for v in curve["accuracy"] + curve["nll"])


def test_adabelief_is_one_option_and_recorded(tmp_path):
    out = tmp_path / "adabelief"
    assert _run(out, "--epochs", "1", "--methods", "bmr", "--optimizer", "adabelief") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["optimizer"] == "adabelief"
    assert all(math.isfinite(v) for v in results["methods"]["bmr"]["accuracy"])


def test_under_torchrun_two_processes_train_and_rank_0_alone_writes(tmp_path):
    out = tmp_path / "parallel"
    argv = ["-m", "pyro_bmr", "run", *TINY, "--epochs", "1", "--methods", "bmr", "--out", str(out)]
    first, second = launch(argv, world_size=2)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert "2 processes" in first.stdout and second.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["processes"] == 2 and results["config"]["batch_size"] == 64
    assert all(math.isfinite(v) for v in results["methods"]["bmr"]["accuracy"])


def test_a_batch_that_does_not_divide_among_the_processes_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, last = _error_of(capsys, ["run", "--device", "cpu"])
    assert code == 2
    assert last == (
        "pyro-bmr run: error: argument --batch-size: the global batch of 64 (the quick "
        "preset's) does not divide among the 3 processes torchrun started; give a multiple of 3"
    )
    code, last = _error_of(capsys, ["run", "--device", "cpu", "--batch-size", "32"])
    assert code == 2 and "the global batch of 32 does not divide among the 3" in last
    monkeypatch.setenv("WORLD_SIZE", "none")
    code, last = _error_of(capsys, ["run"])
    assert code == 2 and "WORLD_SIZE must be a positive integer, got 'none'" in last
