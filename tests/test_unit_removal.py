import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_bmr.deterministic import LinearChain, export, guide_means
from pyro_bmr.nn import BayesianClassifier, GaussianPrior
from pyro_bmr.paper.networks import MLP, LeNet5
from pyro_bmr.paper.networks.timm_models import mlp_mixer, vit
from pyro_bmr.unit_removal import shrink


def _assert_same_function(small, net, x, atol=1e-5):
    small.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=atol, rtol=0)


def _params(net):
    return dict(net.named_parameters())


# Zero chosen units of a network, given its parameters by name: the same helpers set
# a plain network's weights and a guide's posterior means.


def _zero_mlp(p):
    """MLP((1, 4, 4), 3, hidden=(8, 6)): layers "1" (8 units), "3" (6), "5"."""
    p["1.weight"][0], p["1.bias"][0] = 0.0, 0.0  # dead, relu(0) = 0
    p["1.weight"][1], p["1.bias"][1] = 0.0, 0.5  # dead, outputs 0.5: folded
    p["3.weight"][:, 2] = 0.0  # unused
    p["3.weight"][:, 3] = 0.0
    p["3.weight"][4, 3] = 1.0  # read by unit 4 of the next layer only
    p["3.weight"][3], p["3.bias"][3] = 0.0, -0.2  # dead, relu(-0.2) = 0
    p["5.weight"][:, 4] = 0.0  # unused, and then so is unit 3 of layer "1"


def _zero_lenet5(p, block):
    """LeNet5: conv "0" (6 channels), conv "3" (16), dense "7", "9", "11"."""
    p["0.weight"][[1, 4]], p["0.bias"][[1, 4]] = 0.0, 0.0  # dead channels
    p["3.weight"][2], p["3.bias"][2] = 0.0, 0.3  # a constant map: folded into "7"
    p["7.weight"][:, 5 * block : 6 * block] = 0.0  # channel 5 flattened: unused
    p["7.weight"][:10], p["7.bias"][:10] = 0.0, 0.0  # dead neurons
    p["11.weight"][:, [0, 1, 2]] = 0.0  # unused


def _zero_vit(p, prefix="blocks.0."):
    """vit((1, 8, 8), 3, dim=16, depth=1, heads=4): 4 heads of 4, an MLP of 32."""
    qkv_w, qkv_b = p[prefix + "attn.qkv.weight"], p[prefix + "attn.qkv.bias"]
    v = slice(32, 48)  # the rows of q, k, v are [0, 16), [16, 32), [32, 48)
    qkv_w[v][4:8], qkv_b[v][4:8] = 0.0, 0.0  # head 1 outputs zero
    qkv_w[v][8:12] = 0.0  # head 2 outputs its value bias: folded into proj
    qkv_b[v][8:12] = torch.tensor([0.5, -1.0, 0.25, 2.0])
    p[prefix + "attn.proj.weight"][:, 12:16] = 0.0  # head 3 unused
    fc1_w, fc1_b = p[prefix + "mlp.fc1.weight"], p[prefix + "mlp.fc1.bias"]
    fc1_w[:10], fc1_b[:10] = 0.0, 0.0  # dead, gelu(0) = 0
    fc1_w[15], fc1_b[15] = 0.0, 1.0  # dead, gelu(1) folded into fc2
    p[prefix + "mlp.fc2.weight"][:, 10:15] = 0.0  # unused


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def test_mlp_loses_dead_and_unused_units_until_nothing_changes(generator):
    net = MLP((1, 4, 4), 3, hidden=(8, 6))
    with torch.no_grad():
        _zero_mlp(_params(net))
    small, units = shrink(net)
    # layer "1": units 0, 1 dead, 2 unused, 3 read only by unit 4 of "3", which "5"
    # does not read; layer "3": unit 3 dead, unit 4 unused
    assert units == {"1": (4, 8), "3": (4, 6)}
    assert [tuple(small[i].weight.shape) for i in (1, 3, 5)] == [(4, 16), (4, 4), (3, 4)]
    assert (small[1].out_features, small[3].in_features) == (4, 4)
    assert net[1].weight.shape == (8, 16)  # a copy was shrunk
    _assert_same_function(small, net, torch.randn(9, 1, 4, 4, generator=generator))


@pytest.mark.parametrize(
    "build",
    [
        lambda: MLP((1, 4, 4), 3, hidden=(8, 6)),
        lambda: LeNet5((1, 28, 28), 10),
        lambda: vit((1, 8, 8), 3, patch_size=4, dim=16, depth=1, heads=4),
        lambda: mlp_mixer((1, 8, 8), 3, patch_size=4, dim=16, depth=1),
    ],
    ids=["mlp", "lenet5", "vit", "mixer"],
)
def test_nothing_goes_when_no_unit_is_zero(build, generator):
    net = build().eval()
    small, units = shrink(net)
    assert units and all(kept == total for kept, total in units.values())
    shapes = {name: p.shape for name, p in net.named_parameters()}
    assert {name: p.shape for name, p in small.named_parameters()} == shapes
    x = torch.randn(3, 1, *((4, 4) if isinstance(net, MLP) else (8, 8)), generator=generator)
    if isinstance(net, LeNet5):
        x = torch.randn(3, 1, 28, 28, generator=generator)
    with torch.no_grad():
        assert torch.equal(small(x), net(x))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_lenet5_loses_channels_and_their_flattened_columns(dtype, atol, generator):
    net = LeNet5((1, 28, 28), 10).to(dtype)  # 16 maps of 5x5 enter "7"
    with torch.no_grad():
        _zero_lenet5(_params(net), block=25)
    small, units = shrink(net)
    assert units == {"0": (4, 6), "3": (14, 16), "7": (110, 120), "9": (81, 84)}
    assert small[0].weight.shape == (4, 1, 5, 5) and small[0].out_channels == 4
    assert small[3].weight.shape == (14, 4, 5, 5) and small[3].in_channels == 4
    assert small[7].weight.shape == (110, 14 * 25) and small[9].weight.shape == (81, 110)
    assert small[11].weight.shape == (10, 81)
    x = torch.randn(5, 1, 28, 28, generator=generator, dtype=dtype)
    _assert_same_function(small, net, x, atol)


def test_vit_loses_heads_and_mlp_units(generator):
    net = vit((1, 8, 8), 3, patch_size=4, dim=16, depth=1, heads=4)
    with torch.no_grad():
        _zero_vit(_params(net))
    small, units = shrink(net)
    assert units == {"blocks.0.attn": (1, 4), "blocks.0.mlp.fc1": (16, 32)}
    attn, mlp = small.blocks[0].attn, small.blocks[0].mlp
    assert (attn.num_heads, attn.head_dim, attn.attn_dim) == (1, 4, 4)
    assert attn.qkv.weight.shape == (12, 16) and attn.qkv.bias.shape == (12,)
    assert attn.proj.weight.shape == (16, 4)
    assert mlp.fc1.weight.shape == (16, 16) and mlp.fc2.weight.shape == (16, 16)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    _assert_same_function(small, net, x)
    net = net.double()  # folded in float64, the value bias is exact to rounding
    _assert_same_function(shrink(net).network, net, x.double(), atol=1e-12)


def test_attention_without_live_heads_keeps_one_empty_head(generator):
    net = vit((1, 8, 8), 3, patch_size=4, dim=16, depth=1, heads=4)
    attn = net.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight[32:] = 0.0  # every head outputs its value bias: folded
        attn.qkv.bias.normal_(generator=generator)
    small, units = shrink(net)
    assert units["blocks.0.attn"] == (1, 4)
    kept = small.blocks[0].attn
    assert kept.num_heads == 1 and kept.qkv.weight.shape == (12, 16)
    assert not kept.proj.weight.any() and not kept.qkv.weight.any()
    _assert_same_function(small, net, torch.randn(4, 1, 8, 8, generator=generator))


def test_mixer_loses_token_and_channel_mixing_units(generator):
    net = mlp_mixer((1, 8, 8), 3, patch_size=4, dim=16, depth=1)
    block = net.blocks[0]
    with torch.no_grad():
        block.mlp_tokens.fc1.weight[:20], block.mlp_tokens.fc1.bias[:20] = 0.0, 0.0
        block.mlp_channels.fc2.weight[:, :8] = 0.0
    small, units = shrink(net)
    assert units == {"blocks.0.mlp_tokens.fc1": (12, 32), "blocks.0.mlp_channels.fc1": (8, 16)}
    tokens, channels = small.blocks[0].mlp_tokens, small.blocks[0].mlp_channels
    assert tokens.fc1.weight.shape == (12, 4) and tokens.fc2.weight.shape == (4, 12)
    assert channels.fc1.weight.shape == (8, 16) and channels.fc2.weight.shape == (16, 8)
    _assert_same_function(small, net, torch.randn(4, 1, 8, 8, generator=generator))


def test_a_dead_unit_that_outputs_a_constant_is_folded_where_that_is_exact(generator):
    dense = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))
    padded = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 3, padding=1))
    unpadded = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 3))
    # the average of a constant map with zero padding is not constant at the border
    pooled = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2, padding=1), nn.Flatten(), nn.Linear(64, 2)
    )
    for net in (dense, padded, unpadded, pooled):
        with torch.no_grad():
            net[0].weight[:2] = 0.0  # unit 0 outputs sigmoid(0) = 1/2 or relu(0) = 0
            net[0].bias[0], net[0].bias[1] = 0.0, 0.7
    assert shrink(dense).units == {"0": (2, 4)}  # a Linear sees the constant: folded
    assert shrink(padded).units == {"0": (4, 4)}  # zero padding: kept
    assert shrink(unpadded).units == {"0": (2, 4)}
    assert shrink(pooled).units == {"0": (3, 4)}  # relu(0) = 0 goes, relu(0.7) stays
    vectors = torch.randn(6, 5, generator=generator)
    images = torch.randn(6, 1, 8, 8, generator=generator)
    for net, x in [(dense, vectors), (padded, images), (unpadded, images), (pooled, images)]:
        _assert_same_function(shrink(net).network, net, x)


def test_batch_norm_channels_are_sliced_and_constants_pass_through_it(generator):
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(24, 5),
    ).eval()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.normal_(generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
        bn.weight.normal_(generator=generator)
        bn.bias.uniform_(0.5, 1.0, generator=generator)
        net[0].weight[1] = 0.0  # a constant channel after batch norm: folded
        net[6].weight[:, 12:16] = 0.0  # channel 3 unused
    small, units = shrink(net)
    assert units == {"0": (4, 6)}
    assert small[1].num_features == 4 and small[1].running_var.shape == (4,)
    assert small[6].weight.shape == (5, 16)
    _assert_same_function(small, net, torch.randn(7, 2, 9, 9, generator=generator))


def test_a_layer_with_no_live_unit_keeps_one_that_contributes_nothing(generator):
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.zero_()  # every unit outputs sigmoid(bias): folded into "2"
    small, units = shrink(net)
    assert units == {"0": (1, 4)}
    assert not small[0].weight.any() and not small[0].bias.any() and not small[2].weight.any()
    _assert_same_function(small, net, torch.randn(5, 3, generator=generator))
    assert shrink(small).units == {"0": (1, 1)}  # and it stays


def test_layers_whose_wiring_is_unknown_are_left_alone():
    from timm.layers import GluMlp
    from timm.models.vision_transformer import Attention

    shared = nn.Linear(4, 4)
    nets = [
        GluMlp(8, 16),  # fc1's rows are values and gates
        Attention(16, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm),
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), shared, nn.ReLU(), shared),
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)),  # which dim?
        nn.Sequential(nn.Conv2d(2, 4, 1, groups=2), nn.Conv2d(4, 2, 1)),
        nn.Sequential(nn.Conv2d(2, 4, 1), nn.Linear(4, 3)),  # reads the width, not channels
    ]
    for net in nets:
        for p in net.parameters():
            with torch.no_grad():
                p.zero_()
        small, units = shrink(net)
        assert units == {}
        assert [p.shape for p in small.parameters()] == [p.shape for p in net.parameters()]


def test_inplace_changes_the_network_itself():
    net = MLP((1, 4, 4), 3, hidden=(8, 6))
    with torch.no_grad():
        _zero_mlp(_params(net))
    small, _ = shrink(net, inplace=True)
    assert small is net and net[1].weight.shape == (4, 16)


# -- through export ----------------------------------------------------------------------


def _guide_with_zero_units(model, x, y, zero):
    guide = AutoNormal(model, init_loc_fn=model.init_loc_fn, init_scale=0.05)
    guide(x, y)
    store = pyro.get_param_store()
    prefix = "AutoNormal.locs.net."
    locs = {name[len(prefix) :]: store[name] for name in store.keys() if name.startswith(prefix)}
    with torch.no_grad():
        zero(locs)
    return guide


def _reference(model, guide, x):
    with torch.no_grad():
        return poutine.condition(model, data=guide_means(guide, x))(x)


def test_export_removes_the_units_that_the_posterior_means_zero(generator):
    x = torch.randn(6, 1, 12, 12, generator=generator)
    y = torch.randint(0, 3, (6,), generator=generator)
    model = BayesianClassifier(LeNet5((1, 12, 12), 3), 100, GaussianPrior())
    guide = _guide_with_zero_units(model, x, y, lambda p: _zero_lenet5(p, block=1))
    exported = export(model, guide, x)
    plain = export(model, guide, x, compress=False)
    assert plain[3].weight.shape == (16, 6, 5, 5)
    assert exported[0].weight.shape == (4, 1, 5, 5) and exported[3].weight.shape == (14, 4, 5, 5)
    chain = exported[-1]
    assert isinstance(chain, LinearChain)
    assert [layer.shape for layer in chain.layers] == [(110, 14), (81, 110), (3, 81)]
    with torch.no_grad():
        assert torch.allclose(exported(x), plain(x), atol=1e-5)
        assert torch.allclose(exported(x), _reference(model, guide, x), atol=1e-5)


def test_export_removes_the_heads_that_the_posterior_means_zero(generator):
    x = torch.randn(6, 1, 8, 8, generator=generator)
    y = torch.randint(0, 3, (6,), generator=generator)
    net = vit((1, 8, 8), 3, patch_size=4, dim=16, depth=1, heads=4)
    model = BayesianClassifier(net, 100, GaussianPrior())
    guide = _guide_with_zero_units(model, x, y, _zero_vit)
    exported = export(model, guide, x)
    plain = export(model, guide, x, compress=False)
    attn, mlp = exported.blocks[0].attn, exported.blocks[0].mlp
    assert type(attn) is type(plain.blocks[0].attn) and attn.num_heads == 1
    assert attn.qkv.weight.shape == (12, 16) and mlp.fc1.weight.shape == (16, 16)
    with torch.no_grad():
        assert torch.allclose(exported(x), plain(x), atol=1e-5)
        assert torch.allclose(exported(x), _reference(model, guide, x), atol=1e-5)
