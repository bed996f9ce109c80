import pytest
import torch
from torch import nn

from pyro_bmr.paper.networks import (
    MLP,
    NETWORKS,
    LeNet5,
    LeNet5Caffe,
    LeNet300100,
    MLPMixer,
    ViT,
    build_network,
)


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("input_shape", [(1, 16, 16), (3, 12, 20)])
def test_networks_map_images_to_logits(name, input_shape):
    torch.manual_seed(0)
    kwargs = {"patch_size": 4} if name in ("vit", "mixer") else {}
    if name == "lenet5-caffe" and min(input_shape[1:]) < 16:  # unpadded 5x5 convolutions
        with pytest.raises(ValueError, match="at least 16x16, got 12x20"):
            build_network(name, input_shape, 7)
        return
    net = build_network(name, input_shape, 7, **kwargs)
    assert isinstance(net, NETWORKS[name]) and not any(
        isinstance(m, nn.LazyLinear) for m in net.modules()
    )
    logits = net(torch.randn(5, *input_shape))
    assert logits.shape == (5, 7)
    assert torch.isfinite(logits).all()


def test_names_map_to_the_expected_classes():
    assert NETWORKS == {
        "mlp": MLP,
        "lenet5": LeNet5,
        "lenet300100": LeNet300100,
        "lenet5-caffe": LeNet5Caffe,
        "vit": ViT,
        "mixer": MLPMixer,
    }


def test_unknown_network_lists_the_choices():
    with pytest.raises(ValueError, match="unknown network 'resnet'.*mlp, lenet5, lenet300100"):
        build_network("resnet", (1, 28, 28), 10)


def test_lenet_architectures_have_their_classic_sizes():
    lenet = LeNet300100((1, 28, 28), 10)
    assert [m.out_features for m in lenet if isinstance(m, nn.Linear)] == [300, 100, 10]
    lenet5 = LeNet5((1, 28, 28), 10)
    linears = [m for m in lenet5 if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]
    assert MLP((1, 4, 4), 3, hidden=(5, 6))[1].in_features == 16
    # the sparsity record's networks: 266,610 and 431,080 weights and biases on MNIST
    assert sum(p.numel() for p in lenet.parameters()) == 266_610
    caffe = LeNet5Caffe((1, 28, 28), 10)
    assert [m.out_channels for m in caffe if isinstance(m, nn.Conv2d)] == [20, 50]
    linears = [m for m in caffe if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(800, 500), (500, 10)]
    assert sum(p.numel() for p in caffe.parameters()) == 431_080


def test_sizes_are_configurable():
    small = ViT((1, 28, 28), 10)
    big = ViT((1, 28, 28), 10, patch_size=7, dim=64, depth=3, heads=8, mlp_dim=128)
    assert len(big.blocks) == 3 and big.pos_embedding.shape == (1, 16, 64)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())
    mixer = MLPMixer((1, 28, 28), 10, patch_size=14, dim=8, depth=1, token_dim=3, channel_dim=5)
    assert mixer.blocks[0].token_mlp[0].weight.shape == (3, 4)
    assert mixer.blocks[0].channel_mlp[0].weight.shape == (5, 8)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="patch_size 5 must divide the image size 16x16"):
        ViT((1, 16, 16), 10, patch_size=5)
    with pytest.raises(ValueError, match="MLPMixer patch_size"):
        MLPMixer((1, 16, 16), 10, patch_size=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        ViT((1, 16, 16), 10, dim=30, heads=4)
    with pytest.raises(ValueError, match="at least 12x12"):
        LeNet5((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        LeNet5((28, 28), 10)
    with pytest.raises(ValueError, match="positive"):
        MLP((1, 4, 4), 3, hidden=(0,))
