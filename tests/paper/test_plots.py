import numpy as np
import pytest
import torch

from pyro_bmr.paper.plots import (
    _ecdf_points,
    plot_first_layer,
    plot_metrics,
    plot_pruned_fraction,
    plot_weight_cdf,
)

METHODS = ("flat-map", "flat-ff", "tiered-ff", "bmr")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _results():
    return {
        m: {
            "epoch": [1, 2, 3],
            "accuracy": [0.5 + 0.1 * i, 0.7, 0.8],
            "nll": [1.0, 0.8 - 0.1 * i, 0.6],
            "ece": [0.1, 0.05, None],  # None: not evaluated
            "pruned_fraction": [0.0, 0.3 * i, 0.4 * i],
            "seconds": [1.0, 1.1, 1.2],
        }
        for i, m in enumerate(METHODS)
    }


def _assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plot_metrics_writes_png(tmp_path):
    path = plot_metrics(_results(), tmp_path / "figs" / "metrics.png", title="MNIST")
    assert path == tmp_path / "figs" / "metrics.png"
    _assert_png(path)


def test_plot_pruned_fraction_writes_png(tmp_path):
    _assert_png(plot_pruned_fraction(_results(), str(tmp_path / "pruned.png")))


def test_plot_weight_cdf_writes_png(tmp_path):
    torch.manual_seed(0)
    weights = {}
    for i, m in enumerate(METHODS):
        w = torch.randn(20, 16) * 10.0**-i
        w[:, : 4 * i] = 0.0
        weights[m] = {"fc1.weight": w, "fc2.weight": torch.randn(4, 20)}
    weights["bmr"]["fc2.weight"] = torch.zeros(4, 20)  # everything pruned
    del weights["flat-map"]["fc2.weight"]  # a method may lack a layer
    _assert_png(plot_weight_cdf(weights, tmp_path / "cdf.png"))


def test_plot_first_layer_writes_png(tmp_path):
    w = torch.randn(10, 64)
    w[3] = 0.0
    _assert_png(plot_first_layer(w, tmp_path / "first.png"))  # 64 = 8 x 8 inferred
    colour = torch.randn(5, 3 * 4 * 4)
    _assert_png(
        plot_first_layer(colour, tmp_path / "colour.png", image_shape=(3, 4, 4), max_units=4)
    )


def test_ecdf_keeps_height_of_zero_jump_when_thinned():
    values = np.concatenate([np.zeros(300), np.linspace(1e-4, 1.0, 700)])
    x, y = _ecdf_points(values, max_points=7)
    assert x[0] == 0.0 and y[0] == 0.0
    assert y[x == 0.0].max() == pytest.approx(0.3)
    assert y[-1] == 1.0 and x[-1] == 1.0
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)


def test_curve_plots_name_missing_key(tmp_path):
    results = _results()
    del results["bmr"]["ece"]
    with pytest.raises(ValueError, match=r"results\['bmr'\] has no key 'ece'"):
        plot_metrics(results, tmp_path / "x.png")
    results = _results()
    results["flat-ff"]["pruned_fraction"] = [0.1]
    with pytest.raises(ValueError, match=r"results\['flat-ff'\]\['pruned_fraction'\] has 1 values"):
        plot_pruned_fraction(results, tmp_path / "x.png")
    with pytest.raises(ValueError, match="empty"):
        plot_metrics({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_weight_cdf_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match=r"weights\['bmr'\]\['fc1'\] must be a torch.Tensor"):
        plot_weight_cdf({"bmr": {"fc1": [0.1, 0.2]}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"weights\['bmr'\]"):
        plot_weight_cdf({"bmr": {}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'fc1' contain NaN"):
        plot_weight_cdf({"bmr": {"fc1": torch.tensor([float("nan")])}}, tmp_path / "x.png")


def test_first_layer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="cannot infer an image shape for 10 inputs"):
        plot_first_layer(torch.randn(2, 10), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"with 64 elements, got \(7, 7\)"):
        plot_first_layer(torch.randn(2, 64), tmp_path / "x.png", image_shape=(7, 7))
    with pytest.raises(ValueError, match=r"shape \(out, in\)"):
        plot_first_layer(torch.randn(64), tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_units"):
        plot_first_layer(torch.randn(2, 64), tmp_path / "x.png", max_units=0)
