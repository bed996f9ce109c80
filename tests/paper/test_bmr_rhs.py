"""``bmr-rhs``: the fifth method, beyond the paper's four."""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_bmr.horseshoe_reduction import HorseshoeReduction
from pyro_bmr.nn import LayerScalePrior
from pyro_bmr.paper import METHODS, fit_method
from pyro_bmr.paper.cli import _reduction, build_parser, main
from pyro_bmr.paper.experiments import _pruned_hidden, format_table, run_comparison
from pyro_bmr.paper.methods import EXTRA_METHODS, method_prior
from pyro_bmr.paper.preset import paper_preset

# a short fit, and a threshold that a layer without evidence falls below at once
QUICK_FIT = {"num_steps": 60, "num_particles": 2, "lr": 0.05, "num_samples": 100, "threshold": 0.1}


def _loader(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 3)
    return DataLoader(data, batch_size=8, shuffle=True, generator=g)


def test_bmr_rhs_is_an_extra_method_with_bmrs_prior():
    assert EXTRA_METHODS == ("bmr-rhs",) and "bmr-rhs" not in METHODS
    prior = method_prior("bmr-rhs")
    assert type(prior) is LayerScalePrior and (prior.concentration, prior.rate) == (2.0, 2.0)


def test_fit_method_trains_prunes_between_epochs_and_predicts():
    records = list(
        fit_method(
            "bmr-rhs", "mlp", _loader(), num_classes=3, num_epochs=2, lr=1e-2, num_samples=2,
            network_kwargs={"hidden": (8,)}, reduction=QUICK_FIT,
        )
    )  # fmt: skip
    first, last = records
    assert isinstance(last.bmr, HorseshoeReduction)
    assert first.sparsity.total == 0  # train → evaluate → prune
    assert last.sparsity.total > 0 and _pruned_hidden(last) > 0
    masks = last.bmr.masks
    assert masks["net.3.weight_decentered"].all() and masks["net.3.bias_decentered"].all()
    assert set(last.bmr.scales) == {"net.1.weight_decentered", "net.1.bias_decentered"}
    x = torch.rand(4, 1, 8, 8)
    probs = last.predict_proba(x)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    means = last.weight_means(x[:1], num_samples=2)
    assert (means["net.1.weight"][~masks["net.1.weight_decentered"]] == 0).all()
    assert math.isfinite(last.loss)


def test_reduction_options_are_checked_at_once():
    loader = _loader()
    with pytest.raises(ValueError, match="reduction options apply to bmr-rhs only, not to 'bmr'"):
        fit_method("bmr", "mlp", loader, num_classes=3, num_epochs=1, reduction={})
    with pytest.raises(ValueError, match="num_steps must be a positive int, got 0"):
        fit_method(
            "bmr-rhs", "mlp", loader, num_classes=3, num_epochs=1, reduction={"num_steps": 0}
        )
    with pytest.raises(ValueError, match="unknown option"):
        run_comparison(methods=["bmr-rhs"], reduction={"steps": 5})
    with pytest.raises(ValueError, match="unknown method 'rhs'; choose from .*bmr, bmr-rhs"):
        run_comparison(methods=["rhs"])


def test_run_comparison_runs_it_and_records_its_settings():
    results, weights = run_comparison(
        "digits", "mlp", ["bmr-rhs"], epochs=2, seed=0, train_size=100, test_size=50,
        hidden=[8], samples=2, device="cpu", reduction=QUICK_FIT,
    )  # fmt: skip
    curve = results["methods"]["bmr-rhs"]
    assert curve["epoch"] == [1, 2]
    assert all(math.isfinite(v) for key in curve for v in curve[key])
    assert curve["pruned_fraction"][0] == 0.0 < curve["pruned_fraction"][1]
    assert curve["pruned_hidden"][1] > curve["pruned_fraction"][1]  # the output layer is kept
    settings = results["config"]["method_settings"]["bmr-rhs"]
    assert settings["prior"] == "LayerScalePrior(concentration=2.0, rate=2.0)"
    assert settings["reduction"] == {
        **{k: v for k, v in HorseshoeReduction.check_options().items() if k != "progress"},
        **QUICK_FIT,
        "slab": [2.0, 6.0],
    }
    assert json.loads(json.dumps(results)) == results
    assert format_table(results).splitlines()[2].split()[0] == "bmr-rhs"
    assert set(weights) == {"bmr-rhs"}


def test_the_paper_preset_gives_it_bmrs_settings_and_the_authors_reduction():
    preset = paper_preset("mnist", "lenet")
    assert tuple(preset.methods) == METHODS
    rhs, bmr = preset.settings("bmr-rhs"), preset.settings("bmr")
    assert (rhs.lr, rhs.warmup_steps, rhs.samples, rhs.elbo) == (1e-2, 500, 100, "trace")
    assert rhs.prior is bmr.prior and bmr.reduction == {}
    assert rhs.reduction == {
        "global_scale": 1e-2,
        "slab": (2.0, 6.0),
        "threshold": 1e-6,
        "num_steps": 5000,
        "num_particles": 16,
        "lr": 1e-2,
        "num_samples": 1000,
        "update_posterior": True,
    }
    recorded = preset.to_dict()["extra_methods"]["bmr-rhs"]
    assert (
        recorded["reduction"]["num_particles"] == 16
        and "reduction" not in preset.to_dict()["methods"]["bmr"]
    )


def test_the_command_line_offers_it_and_its_fit_options(capsys):
    args = build_parser().parse_args(["run", "--methods", "bmr", "bmr-rhs", "--rhs-steps", "7"])
    assert args.methods == ["bmr", "bmr-rhs"] and _reduction(args) == {"num_steps": 7}
    assert _reduction(build_parser().parse_args(["run"])) is None
    assert build_parser().parse_args(["run"]).methods == list(METHODS)
    assert main(["run", "--rhs-particles", "0"]) == 2
    assert "--rhs-particles: expected a positive integer" in capsys.readouterr().err
    assert main(["run", "--help"]) == 0
    assert "bmr-rhs" in capsys.readouterr().out
