"""The paper preset builds exactly the authors' configuration (../shared/PAPER.md)."""

import json

import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_bmr import StochasticBMR
from pyro_bmr.nn import LayerHorseshoePrior, LayerScalePrior
from pyro_bmr.paper import METHODS, fit_method
from pyro_bmr.paper.cli import main
from pyro_bmr.paper.data import DatasetSplits
from pyro_bmr.paper.experiments import run_comparison
from pyro_bmr.paper.networks import build_network
from pyro_bmr.paper.preset import PAPER_DATASETS, PAPER_NETWORKS, paper_preset


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
@pytest.mark.parametrize("model", PAPER_NETWORKS)
def test_every_method_gets_the_authors_settings(dataset, model):
    preset = paper_preset(dataset, model)
    assert (preset.batch_size, preset.epochs, preset.steps_per_epoch) == (120, 50, 500)
    assert (preset.optimizer, preset.init_radius, preset.init_scale) == ("adabelief", 2.0, 0.1)
    assert preset.guide == "auto" and preset.ece_bins == 20
    assert tuple(preset.methods) == METHODS
    lrs = {m: s.lr for m, s in preset.methods.items()}
    assert lrs == {"flat-map": 1e-3, "flat-ff": 5e-3, "tiered-ff": 5e-3, "bmr": 1e-2}
    samples = {m: s.samples for m, s in preset.methods.items()}
    assert samples == {"flat-map": 1, "flat-ff": 100, "tiered-ff": 100, "bmr": 100}
    elbos = {m: s.elbo for m, s in preset.methods.items()}
    assert elbos == {
        "flat-map": "mean-field",
        "flat-ff": "trace",
        "tiered-ff": "trace",
        "bmr": "trace",
    }
    inits = {m: s.init for m, s in preset.methods.items()}
    assert inits == {
        "flat-map": "median",
        "flat-ff": "uniform",
        "tiered-ff": "uniform",
        "bmr": "uniform",
    }
    warmups = {m: s.warmup_steps for m, s in preset.methods.items()}
    assert warmups == {"flat-map": 0, "flat-ff": 0, "tiered-ff": 0, "bmr": 500}
    # Flat-MAP, Flat-FF and BMR share one model: c^-2 ~ Gamma(2, 2), c / 10 off the output
    for method in ("flat-map", "flat-ff", "bmr"):
        prior = preset.methods[method].prior
        assert type(prior) is LayerScalePrior
        assert (prior.concentration, prior.rate, prior.hidden_scale) == (2.0, 2.0, 0.1)
    tiered = preset.methods["tiered-ff"].prior
    assert type(tiered) is LayerHorseshoePrior
    assert (tiered.global_scale, tiered.slab_concentration, tiered.slab_rate) == (1e-2, 2.0, 6.0)
    dropouts = {m: s.network_kwargs.get("dropout", 0.0) for m, s in preset.methods.items()}
    flat_map_dropout = 0.0 if model == "mixer" else 0.2
    assert dropouts == {"flat-map": flat_map_dropout, "flat-ff": 0, "tiered-ff": 0, "bmr": 0}
    cifar = dataset.startswith("cifar")
    assert preset.pad == (0 if cifar or model == "mlp" else 2)
    json.dumps(preset.to_dict())  # results.json can hold it


def _parameter_shapes(dataset, model):
    preset = paper_preset(dataset, model)
    channels, side = (3, 32) if dataset.startswith("cifar") else (1, 28 + 2 * preset.pad)
    classes = 100 if dataset == "cifar100" else 10
    net = build_network(model, (channels, side, side), classes, **preset.network_kwargs)
    return net, {name: tuple(p.shape) for name, p in net.named_parameters()}


def test_the_networks_are_the_authors():
    net, shapes = _parameter_shapes("mnist", "mlp")
    widths = [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]
    assert widths == [(784, 500), (500, 500), (500, 500), (500, 500), (500, 10)]
    assert sum(isinstance(m, nn.SiLU) for m in net) == 4
    net, shapes = _parameter_shapes("fashion-mnist", "lenet")
    convs = [m.out_channels for m in net if isinstance(m, nn.Conv2d)]
    dense = [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]
    assert convs == [6, 16, 120] and dense == [(120, 84), (84, 10)]
    assert sum(isinstance(m, nn.AvgPool2d) for m in net) == 2
    assert sum(isinstance(m, nn.Tanh) for m in net) == 4
    net, shapes = _parameter_shapes("cifar10", "lenet")
    convs = [m.out_channels for m in net if isinstance(m, nn.Conv2d)]
    dense = [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)]
    assert convs == [18, 48, 360] and dense == [(360, 256), (256, 10)]
    net, shapes = _parameter_shapes("mnist", "vit")
    assert len(net.blocks) == 6 and net.blocks[0].attn.num_heads == 8
    assert shapes["pos_embed"] == (1, 65, 256) and shapes["cls_token"] == (1, 1, 256)
    assert shapes["patch_embed.proj.weight"] == (256, 1, 4, 4)
    assert shapes["blocks.5.mlp.fc1.weight"] == (512, 256)
    net, shapes = _parameter_shapes("cifar100", "mixer")
    assert len(net.blocks) == 6
    assert shapes["blocks.0.mlp_tokens.fc1.weight"] == (512, 64)
    assert shapes["blocks.0.mlp_channels.fc1.weight"] == (256, 256)
    assert shapes["head.weight"] == (100, 256)


def test_mnist_takes_fashion_mnists_settings():
    for model in PAPER_NETWORKS:
        mnist = paper_preset("mnist", model).to_dict()
        fashion = paper_preset("fashion-mnist", model).to_dict()
        assert {**mnist, "dataset": None} == {**fashion, "dataset": None}


def test_settings_the_paper_lacks_are_refused():
    with pytest.raises(ValueError, match="no settings for dataset 'digits'; choose one of mnist"):
        paper_preset("digits", "mlp")
    with pytest.raises(ValueError, match="no network 'lenet5'; choose one of mlp, lenet, vit"):
        paper_preset("mnist", "lenet5")


def _loader(n=6, batch_size=2):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % 3)
    return DataLoader(data, batch_size=batch_size)


def _traced_bmr(monkeypatch):
    """Record the order of StochasticBMR's steps and reductions."""
    events = []
    step, reduce = StochasticBMR.step, StochasticBMR.reduce

    def traced_step(self, *args, **kwargs):
        events.append("step")
        return step(self, *args, **kwargs)

    def traced_reduce(self, *args, **kwargs):
        events.append("reduce")
        return reduce(self, *args, **kwargs)

    monkeypatch.setattr(StochasticBMR, "step", traced_step)
    monkeypatch.setattr(StochasticBMR, "reduce", traced_reduce)
    return events


def _bmr(**kwargs):
    return fit_method(
        "bmr",
        "mlp",
        _loader(),
        num_classes=3,
        num_epochs=3,
        network_kwargs={"hidden": (4,)},
        **kwargs,
    )


def test_bmr_warms_up_then_trains_evaluates_and_prunes_in_the_authors_order(monkeypatch):
    events = _traced_bmr(monkeypatch)
    for record in _bmr(warmup_steps=4, steps_per_epoch=2):
        events.append(f"record {record.epoch}")
    assert events == (
        ["step"] * 4  # warm-up
        + ["reduce", "step", "step", "record 1"]
        + ["reduce", "step", "step", "record 2"]
        + ["reduce", "step", "step", "record 3"]  # and no pruning after the last epoch
    )


def test_without_warm_up_the_first_epoch_is_unpruned(monkeypatch):
    events = _traced_bmr(monkeypatch)
    for record in _bmr():  # 3 batches per pass
        events.append(f"record {record.epoch}")
    assert events == (
        ["step"] * 3
        + ["record 1"]
        + ["reduce"]
        + ["step"] * 3
        + ["record 2"]
        + ["reduce"]
        + ["step"] * 3
        + ["record 3"]
    )


def test_steps_per_epoch_cycles_the_loader():
    records = list(
        fit_method(
            "flat-ff",
            "mlp",
            _loader(),
            num_classes=3,
            num_epochs=2,
            network_kwargs={"hidden": (4,)},
            steps_per_epoch=5,
        )
    )
    assert [r.epoch for r in records] == [1, 2]
    with pytest.raises(
        ValueError, match="warmup_steps applies to bmr and bmr-rhs only, not to 'flat-ff'"
    ):
        fit_method("flat-ff", "mlp", _loader(), num_classes=3, num_epochs=1, warmup_steps=2)
    with pytest.raises(ValueError, match="unknown elbo 'renyi'"):
        fit_method("bmr", "mlp", _loader(), num_classes=3, num_epochs=1, elbo="renyi")
    with pytest.raises(ValueError, match="init_loc_fn must be a Pyro initialisation function"):
        fit_method("bmr", "mlp", _loader(), num_classes=3, num_epochs=1, init_loc_fn=2.0)


def test_the_point_mass_guide_starts_at_the_prior_median():
    (record,) = fit_method(
        "flat-map",
        "mlp",
        _loader(),
        num_classes=3,
        num_epochs=1,
        lr=1e-12,
        network_kwargs={"hidden": (32,)},
        prior=paper_preset("mnist", "mlp").methods["flat-map"].prior,
        init_loc_fn=paper_preset("mnist", "mlp").methods["flat-map"].init_loc_fn(),
    )
    store = pyro.get_param_store()
    z = torch.cat([store[n].detach().flatten() for n in store.keys() if "decentered" in n])
    # the median of 15 standard normal draws: about N(0, 0.32^2), nowhere near +-2
    assert z.numel() > 100 and z.abs().max() < 1.5 and 0.2 < z.std() < 0.45


def test_the_guide_starts_uniform_in_minus_two_two_with_scales_point_one():
    (record,) = fit_method(
        "flat-ff",
        "mlp",
        _loader(),
        num_classes=3,
        num_epochs=1,
        lr=1e-12,  # one epoch that barely moves the guide
        network_kwargs={"hidden": (32,)},
        init_loc_fn=paper_preset("mnist", "mlp").methods["flat-ff"].init_loc_fn(),
        init_scale=0.1,
    )
    store = pyro.get_param_store()
    params = {name: store[name].detach().flatten() for name in store.keys()}
    locs = torch.cat([v for name, v in params.items() if ".locs." in name])
    scales = torch.cat([v for name, v in params.items() if ".scales." in name])
    assert locs.numel() == scales.numel() > 100
    assert locs.abs().max() < 2 and locs.abs().max() > 1.9 and abs(locs.mean()) < 0.1
    # uniform on (-2, 2): variance 4/3
    assert abs(locs.var().item() - 4 / 3) < 0.1
    torch.testing.assert_close(scales, torch.full_like(scales, 0.1), rtol=1e-6, atol=0)


def _fake_mnist(n=12):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 28, 28, generator=generator)
    y = torch.arange(n) % 10
    split = TensorDataset(x, y)
    return DatasetSplits("mnist", split, split, 10, (1, 28, 28), (0.0,), (1.0,))


def test_run_comparison_records_the_full_configuration_and_pads():
    results, _ = run_comparison(
        _fake_mnist(),
        "lenet",
        ["flat-map", "bmr"],
        preset="paper",
        epochs=2,
        steps_per_epoch=1,
        warmup_steps=3,
        samples=2,
        device="cpu",
    )
    config = results["config"]
    assert config["preset"] == "paper" and config["input_shape"] == [1, 32, 32]
    assert (config["batch_size"], config["optimizer"], config["pad"]) == (120, "adabelief", 2)
    assert (config["init_radius"], config["init_scale"]) == (2.0, 0.1)
    assert config["network_kwargs"] == {"conv": [6, 16, 120], "dense": [84], "activation": "tanh"}
    flat_map, bmr = config["method_settings"]["flat-map"], config["method_settings"]["bmr"]
    assert (flat_map["lr"], flat_map["elbo"], flat_map["samples"]) == (1e-3, "mean-field", 1)
    assert flat_map["network_kwargs"]["dropout"] == 0.2 and "dropout" not in bmr["network_kwargs"]
    # the options given explicitly override the preset
    assert (bmr["lr"], bmr["warmup_steps"], bmr["samples"]) == (1e-2, 3, 2)
    assert bmr["prior"] == "LayerScalePrior(concentration=2.0, rate=2.0, hidden_scale=0.1)"
    assert "4 iterations, one sparsity per layer" in config["rule"]
    preset = paper_preset("mnist", "lenet").to_dict()
    overridden = {"epochs", "steps_per_epoch", "methods"}
    shared = [k for k in preset if k in config and k not in overridden]
    assert len(shared) == 11 and {k: config[k] for k in shared} == {k: preset[k] for k in shared}
    assert results["methods"]["bmr"]["epoch"] == [1, 2]
    json.dumps(results)


def test_the_command_line_takes_the_preset_and_refuses_what_it_lacks(capsys):
    assert main(["run", "--preset", "paper", "--model", "lenet5", "--dataset", "mnist"]) == 2
    assert "paper has no network 'lenet5'" in capsys.readouterr().err
    assert main(["run", "--preset", "paper", "--model", "mlp"]) == 2  # digits
    assert "paper has no settings for 'digits'" in capsys.readouterr().err
