"""Unit groups derived from torch.nn layers, and a structured reduction of a network."""

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_bmr import BayesianModelReduction, StochasticBMR, ThresholdRule
from pyro_bmr.groups import Member, UnitGroup
from pyro_bmr.nn import BayesianClassifier, LayerScalePrior, unit_groups


def _lenet5():
    from pyro_bmr.paper.networks.zoo import LeNet5

    return LeNet5((1, 28, 28), 10)


def test_lenet5_channels_and_neurons():
    bnn = BayesianClassifier(_lenet5(), 100)
    groups = unit_groups(bnn)
    assert [g.name for g in groups] == ["net.0", "net.3", "net.7", "net.9"]
    conv2 = groups[1]
    assert conv2.members == (Member("net.3.weight"), Member("net.3.bias"))
    # 16 channels of 5x5 maps, flattened into the 400 inputs of the first dense layer
    assert conv2.readers == (Member("net.7.weight", 1, 25),)
    assert groups[3].readers == (Member("net.11.weight", 1),)  # the output layer reads
    # every site is one the handler reduces, and the units are consistent
    guide = AutoNormal(bnn)
    bmr = BayesianModelReduction(guide, groups=groups)
    sites = bmr.sites(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    for group in groups:
        counts = {m.num_units(sites[m.site].shape) for m in group.members + group.readers}
        assert len(counts) == 1
    assert [groups[i].members[0].num_units(sites[f"net.{n}.weight"].shape) for i, n in
            enumerate((0, 3, 7, 9))] == [6, 16, 120, 84]  # fmt: skip


def test_transformer_heads_and_mlp_units():
    from pyro_bmr.paper.networks.timm_models import mlp_mixer, vit

    bnn = BayesianClassifier(vit((1, 8, 8), 3, patch_size=4, dim=16, depth=1, heads=4), 10)
    heads, mlp = unit_groups(bnn)
    assert heads.name == "net.blocks.0.attn"
    assert heads.members[0] == Member("net.blocks.0.attn.qkv.weight", 0, 4, 16)
    assert heads.readers == (Member("net.blocks.0.attn.proj.weight", 1, 4),)
    assert mlp.readers == (Member("net.blocks.0.mlp.fc2.weight", 1),)
    mixer = BayesianClassifier(mlp_mixer((1, 8, 8), 3, patch_size=4, dim=16, depth=2), 10)
    names = [g.name for g in unit_groups(mixer)]
    assert names == [
        f"net.blocks.{i}.mlp_{kind}.fc1" for i in range(2) for kind in ("tokens", "channels")
    ]


def test_readers_only_where_a_dead_unit_outputs_zero():
    net = nn.Sequential(
        nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(),
        nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.1), nn.Linear(6, 2),
    )  # fmt: skip
    groups = unit_groups(BayesianClassifier(net, 10))
    assert [(g.name, len(g.readers)) for g in groups] == [
        ("net.0", 0),  # sigmoid(0) = 1/2: the unit's readers still matter
        ("net.2", 0),  # batch norm shifts a zero
        ("net.5", 1),
    ]


def test_only_random_parameters_and_decentered_sites():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    def weights_only(name, module):
        return name.endswith("weight")

    groups = unit_groups(BayesianClassifier(net, 10, predicate=weights_only))
    assert groups == [UnitGroup("net.0", (Member("net.0.weight"),), (Member("net.2.weight", 1),))]
    decentered = unit_groups(BayesianClassifier(net, 10, prior=LayerScalePrior()))
    assert decentered[0].members[0].site == "net.0.weight_decentered"
    with pytest.raises(TypeError, match="make the network Bayesian first"):
        unit_groups(net)


def test_stochastic_bmr_prunes_units_of_an_mlp():
    """Two informative inputs of eight; a 32-unit hidden layer shrinks, the network
    still classifies."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = ((x[:, 0] + x[:, 1]) > 0).long()
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    bnn = BayesianClassifier(net, 400)
    guide = AutoNormal(bnn, init_scale=0.05)
    groups = unit_groups(bnn)
    bmr = BayesianModelReduction(
        guide, ThresholdRule(exclude=["net.2.weight", "net.2.bias"]), groups=groups
    )
    svi = StochasticBMR(bnn, guide, pyro.optim.Adam({"lr": 0.02}), bmr=bmr)
    history = svi.fit(lambda: (x, y), num_epochs=6, steps_per_epoch=100, progress=False)
    units = bmr.units()["net.0"]
    # half the units or more gone: those whose every element went (with the threshold
    # at 0, a unit never beats what the element decisions keep of it)
    assert units.total == 32 and units.kept <= 16
    masks = bmr.masks
    dead = ~(masks["net.0.weight"].any(1) | masks["net.0.bias"])
    assert int(dead.sum()) == 32 - units.kept
    assert not masks["net.2.weight"][:, dead].any()  # their readers went with them
    assert history[-1]["total_pruned_fraction"] > 0.5
    with torch.no_grad():
        logits = pyro.poutine.condition(bnn, data=guide.median())(x)
    accuracy = float((logits.argmax(-1) == y).float().mean())
    assert accuracy > 0.9
