import json
import math

import pytest
import torch

from pyro_bmr.paper import METHODS
from pyro_bmr.paper.data import load_dataset
from pyro_bmr.paper.experiments import (
    CURVES,
    DEFAULTS,
    OUTPUT_FILES,
    Comparison,
    format_table,
    resolve_device,
    run_comparison,
    write_outputs,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A tiny configuration: 200 digits, a hidden layer of 8 units, 2 posterior samples.
TINY = dict(train_size=200, test_size=100, hidden=[8], samples=2, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return run_comparison("digits", "mlp", METHODS, epochs=2, seed=0, **TINY)


def test_results_hold_one_finite_entry_per_method_and_epoch(tiny):
    results, weights = tiny
    assert isinstance(tiny, Comparison)
    assert set(results) == {"config", "methods"}
    assert list(results["methods"]) == list(METHODS)
    for method, curve in results["methods"].items():
        assert tuple(curve) == CURVES
        assert curve["epoch"] == [1, 2]
        for key in CURVES:
            assert len(curve[key]) == 2
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in curve[key])
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
        assert all(v > 0 for v in curve["nll"] + curve["seconds"])
        assert all(0.0 <= v <= 1.0 for v in curve["ece"])
        if method == "bmr":
            # train → evaluate → prune: pruning starts with the second epoch
            assert curve["pruned_fraction"][0] == 0.0 < curve["pruned_fraction"][1] < 1.0
        else:
            assert curve["pruned_fraction"] == [0.0, 0.0]
    # The whole of results is JSON, and survives a round trip exactly.
    assert json.loads(json.dumps(results)) == results


def test_config_records_the_run(tiny):
    config = tiny.results["config"]
    expected = {
        "dataset": "digits",
        "data_dir": None,
        "model": "mlp",
        "hidden": [8],
        "methods": list(METHODS),
        "epochs": 2,
        "batch_size": DEFAULTS["batch_size"],
        "lr": DEFAULTS["lr"],
        "samples": 2,
        "seed": 0,
        "device": "cpu",
        "eval_every": 1,
        "train_size": 200,
        "test_size": 100,
        "num_classes": 10,
        "input_shape": [1, 8, 8],
    }
    assert {key: config[key] for key in expected} == expected
    assert set(config["versions"]) == {"pyro_bmr", "pyro", "torch"}


def test_weights_are_final_posterior_means_of_each_layer(tiny):
    _, weights = tiny
    assert list(weights) == list(METHODS)
    for layers in weights.values():
        assert list(layers) == ["1.weight", "3.weight"]
        assert layers["1.weight"].shape == (8, 64) and layers["3.weight"].shape == (10, 8)
        assert all(w.device.type == "cpu" and torch.isfinite(w).all() for w in layers.values())
    # Only BMR prunes, and its pruned weights are exactly zero.
    assert any((w == 0).any() for w in weights["bmr"].values())
    for method in ("flat-map", "flat-ff", "tiered-ff"):
        assert not any((w == 0).any() for w in weights[method].values())


def test_same_seed_gives_identical_results_and_another_seed_does_not(tiny):
    methods = ["tiered-ff", "bmr"]
    again = run_comparison("digits", "mlp", methods, epochs=2, seed=0, **TINY)
    other = run_comparison("digits", "mlp", ["bmr"], epochs=2, seed=1, **TINY)

    def without_seconds(results):
        return {m: {k: v for k, v in c.items() if k != "seconds"} for m, c in results.items()}

    # Each method trains alone, so the same seed gives the same numbers whatever ran before.
    full = {m: c for m, c in tiny.results["methods"].items() if m in methods}
    assert without_seconds(again.results["methods"]) == without_seconds(full)
    for method in methods:
        for layer, w in tiny.weights[method].items():
            assert torch.equal(again.weights[method][layer], w)
    assert other.results["methods"]["bmr"]["nll"] != tiny.results["methods"]["bmr"]["nll"]


def test_training_depends_neither_on_other_methods_nor_on_evaluation(tiny):
    # bmr alone, evaluated only after the last epoch and with other samples, trains
    # exactly as in the full comparison: the final weights are the same.
    alone = run_comparison(
        "digits", "mlp", ["bmr"], epochs=2, seed=0, eval_every=5, **{**TINY, "samples": 3}
    )
    assert alone.results["methods"]["bmr"]["epoch"] == [2]
    assert (
        alone.results["methods"]["bmr"]["pruned_fraction"]
        == tiny.results["methods"]["bmr"]["pruned_fraction"][-1:]
    )
    for layer, w in tiny.weights["bmr"].items():
        assert torch.equal(alone.weights["bmr"][layer], w)


def test_loaded_splits_give_the_same_results_as_the_name(tiny):
    data = load_dataset("digits", train_size=200, test_size=100)
    kwargs = {k: v for k, v in TINY.items() if k not in ("train_size", "test_size")}
    result = run_comparison(data, "mlp", ["flat-ff"], epochs=2, seed=0, **kwargs)
    assert (
        result.results["methods"]["flat-ff"]["accuracy"]
        == (tiny.results["methods"]["flat-ff"]["accuracy"])
    )
    with pytest.raises(ValueError, match="train_size"):
        run_comparison(data, methods=["bmr"], train_size=10)


def test_eval_every_evaluates_every_kth_epoch_and_the_last():
    results, _ = run_comparison("digits", methods=["flat-map"], epochs=3, eval_every=2, **TINY)
    assert results["methods"]["flat-map"]["epoch"] == [2, 3]


def test_format_table_aligns_the_last_evaluation(tiny):
    table = format_table(tiny.results)
    lines = table.splitlines()
    assert lines[0].split() == ["method", "accuracy", "NLL", "ECE", "pruned", "hidden", "s/epoch"]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines}) == 1  # every column aligned
    for line, method in zip(lines[2:], METHODS):
        curve = tiny.results["methods"][method]
        seconds = sum(curve["seconds"]) / len(curve["seconds"])
        assert line.split() == [
            method,
            f"{curve['accuracy'][-1]:.4f}",
            f"{curve['nll'][-1]:.4f}",
            f"{curve['ece'][-1]:.4f}",
            f"{curve['pruned_fraction'][-1]:.4f}",
            f"{curve['pruned_hidden'][-1]:.4f}",
            f"{seconds:.2f}",
        ]
    assert len(lines) == 2 + len(METHODS)


def test_write_outputs_writes_json_and_four_figures(tiny, tmp_path):
    out = tmp_path / "new" / "dir"
    paths = write_outputs(*tiny, out)
    assert list(paths) == list(OUTPUT_FILES)
    assert json.loads((out / "results.json").read_text()) == tiny.results
    for name in OUTPUT_FILES[1:]:
        data = paths[name].read_bytes()
        assert paths[name] == out / name
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_first_layer_of_a_convolution_is_drawn_per_filter(tmp_path):
    results = {
        "config": {"dataset": "mnist", "model": "lenet5", "input_shape": [1, 28, 28]},
        "methods": {"bmr": {key: [1] for key in CURVES}},
    }
    kernel = torch.randn(6, 1, 5, 5)
    kernel[0] = 0.0
    weights = {"bmr": {"0.weight": kernel, "3.weight": torch.randn(16, 6, 5, 5)}}
    paths = write_outputs(results, weights, tmp_path)
    assert paths["first_layer.png"].read_bytes().startswith(PNG_SIGNATURE)


def test_write_outputs_rejects_empty_results(tmp_path):
    with pytest.raises(ValueError, match="at least one method"):
        write_outputs({"config": {}, "methods": {}}, {}, tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["bmr", "svgd"]}, "unknown method 'svgd'"),
        ({"methods": []}, "methods is empty"),
        ({"methods": ["bmr", "bmr"]}, "must not repeat"),
        ({"model": "resnet"}, "unknown network 'resnet'"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"batch_size": 2.5}, "batch_size must be a positive int"),
        ({"samples": -1}, "samples must be a positive int"),
        ({"eval_every": 0}, "eval_every must be a positive int"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"model": "lenet5", "hidden": [8]}, "mlp only"),
        ({"hidden": [0]}, "hidden width must be a positive int"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ],
)
def test_bad_arguments_are_rejected_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_comparison(**kwargs)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    kwargs = {**TINY, "device": "cuda"}
    results, weights = run_comparison("digits", methods=["flat-ff", "bmr"], epochs=2, **kwargs)
    assert results["config"]["device"] == "cuda"
    assert results["methods"]["bmr"]["pruned_fraction"][-1] > 0.0
    assert all(w.device.type == "cpu" for w in weights["bmr"].values())
