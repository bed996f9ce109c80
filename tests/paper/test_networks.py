import pytest
import torch
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pyro_bmr.paper.networks import (
    MLP,
    NETWORKS,
    LeNet,
    LeNet5,
    LeNet5Caffe,
    LeNet300100,
    build_network,
    mlp_mixer,
    vit,
)

_CLASSES = {
    "mlp": MLP,
    "lenet": LeNet,
    "lenet5": LeNet5,
    "lenet300100": LeNet300100,
    "lenet5-caffe": LeNet5Caffe,
    "vit": VisionTransformer,
    "mixer": MlpMixer,
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("input_shape", [(1, 16, 16), (3, 12, 20)])
def test_networks_map_images_to_logits(name, input_shape):
    torch.manual_seed(0)
    kwargs = {"patch_size": 4} if name in ("vit", "mixer") else {}
    if name == "lenet5-caffe" and min(input_shape[1:]) < 16:  # unpadded 5x5 convolutions
        with pytest.raises(ValueError, match="at least 16x16, got 12x20"):
            build_network(name, input_shape, 7)
        return
    if name == "lenet":  # one convolution: the paper's three need 32x32 images
        kwargs = {"conv": (4,)}
    net = build_network(name, input_shape, 7, **kwargs)
    assert isinstance(net, _CLASSES[name]) and not any(
        isinstance(m, nn.LazyLinear) for m in net.modules()
    )
    logits = net(torch.randn(5, *input_shape))
    assert logits.shape == (5, 7)
    assert torch.isfinite(logits).all()


def test_names_map_to_the_expected_classes():
    assert NETWORKS == {
        "mlp": MLP,
        "lenet": LeNet,
        "lenet5": LeNet5,
        "lenet300100": LeNet300100,
        "lenet5-caffe": LeNet5Caffe,
        "vit": vit,
        "mixer": mlp_mixer,
    }


def test_unknown_network_lists_the_choices():
    with pytest.raises(ValueError, match="unknown network 'resnet'.*mlp, lenet, lenet5"):
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


def _shapes(net):
    return {name: tuple(p.shape) for name, p in net.named_parameters()}


def test_the_papers_transformers_have_the_authors_sizes():
    """PAPER.md: ViT patch 4, width 256, depth 6, 8 heads, MLP hidden 512, class token;
    Mixer patch 4, width 256, 6 blocks, token hidden 512, channel hidden 256."""
    net = vit((1, 32, 32), 10, patch_size=4, dim=256, depth=6, heads=8, mlp_ratio=2.0)
    shapes = _shapes(net)
    assert len(net.blocks) == 6 and net.blocks[0].attn.num_heads == 8
    assert shapes["cls_token"] == (1, 1, 256) and shapes["pos_embed"] == (1, 65, 256)
    assert shapes["patch_embed.proj.weight"] == (256, 1, 4, 4)
    assert shapes["blocks.0.mlp.fc1.weight"] == (512, 256)
    assert shapes["head.weight"] == (10, 256)
    assert isinstance(net.blocks[0].mlp.act, nn.GELU)
    mixer = mlp_mixer((3, 32, 32), 100, dim=256, depth=6, token_ratio=2.0, channel_ratio=1.0)
    shapes = _shapes(mixer)
    assert len(mixer.blocks) == 6
    assert shapes["stem.proj.weight"] == (256, 3, 4, 4)
    assert shapes["blocks.0.mlp_tokens.fc1.weight"] == (512, 64)  # 64 patches
    assert shapes["blocks.0.mlp_channels.fc1.weight"] == (256, 256)
    assert shapes["head.weight"] == (100, 256)


def test_the_papers_lenet_and_mlp_have_the_authors_sizes():
    lenet = LeNet((1, 32, 32), 10)
    convs = [m for m in lenet if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size) for m in convs] == [
        (6, (5, 5)),
        (16, (5, 5)),
        (120, (5, 5)),
    ]
    linears = [(m.in_features, m.out_features) for m in lenet if isinstance(m, nn.Linear)]
    assert linears == [(120, 84), (84, 10)]
    assert sum(isinstance(m, nn.AvgPool2d) for m in lenet) == 2
    assert sum(isinstance(m, nn.Tanh) for m in lenet) == 4
    cifar = LeNet((3, 32, 32), 100, conv=(18, 48, 360), dense=(256,), dropout=0.2)
    linears = [(m.in_features, m.out_features) for m in cifar if isinstance(m, nn.Linear)]
    assert linears == [(360, 256), (256, 100)]
    assert [m.p for m in cifar if isinstance(m, nn.Dropout)] == [0.2]
    mlp = MLP((1, 28, 28), 10, hidden=(500,) * 4, activation="swish", dropout=0.2)
    linears = [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)]
    assert linears == [(784, 500)] + [(500, 500)] * 3 + [(500, 10)]
    assert sum(isinstance(m, nn.SiLU) for m in mlp) == 4
    assert sum(isinstance(m, nn.Dropout) for m in mlp) == 4


def test_dropout_acts_in_training_mode_only():
    torch.manual_seed(0)
    net = MLP((1, 4, 4), 3, hidden=(64,), dropout=0.5)
    x = torch.randn(2, 1, 4, 4)
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="patch_size 5 must divide the image size 16x16"):
        vit((1, 16, 16), 10, patch_size=5)
    with pytest.raises(ValueError, match="MLPMixer patch_size"):
        mlp_mixer((1, 16, 16), 10, patch_size=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        vit((1, 16, 16), 10, dim=30, heads=4)
    with pytest.raises(ValueError, match="activation 'sigmoid' is unknown; choose one of relu"):
        MLP((1, 4, 4), 3, activation="sigmoid")
    with pytest.raises(ValueError, match="images of 16x16 are too small for 3 convolutions"):
        LeNet((1, 16, 16), 3)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1"):
        LeNet((1, 32, 32), 3, dropout=1)
    with pytest.raises(ValueError, match="at least 12x12"):
        LeNet5((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        LeNet5((28, 28), 10)
    with pytest.raises(ValueError, match="positive"):
        MLP((1, 4, 4), 3, hidden=(0,))
