import math

import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch.utils.data import DataLoader, TensorDataset

from pyro_bmr import BayesianModelReduction
from pyro_bmr.nn import GaussianPrior, HorseshoePrior, LayerScalePrior
from pyro_bmr.paper import METHODS, NETWORKS, fit_method, method_prior

SMALL = {
    "mlp": {"hidden": (8,)},
    "lenet": {"conv": (2, 3), "dense": (4,)},
    "lenet5": {},
    "lenet300100": {},
    "lenet5-caffe": {},
    "vit": {"dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 1.0},
    "mixer": {"dim": 8, "depth": 1, "token_ratio": 0.5, "channel_ratio": 1.0},
}


def _dataset(n=8, shape=(1, 16, 16)):
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, *shape, generator=generator), torch.arange(n) % 3)


def _fit(method, network="mlp", num_epochs=1, seed=0, batch_size=8, **kwargs):
    loader = DataLoader(_dataset(), batch_size=batch_size, shuffle=True)
    return list(
        fit_method(
            method,
            network,
            loader,
            num_classes=3,
            num_epochs=num_epochs,
            lr=1e-2,
            num_samples=2,
            seed=seed,
            network_kwargs=SMALL[network],
            **kwargs,
        )
    )


def test_methods_are_the_papers_four():
    assert METHODS == ("flat-map", "flat-ff", "tiered-ff", "bmr")
    assert isinstance(method_prior("flat-map"), GaussianPrior)
    assert isinstance(method_prior("flat-ff"), GaussianPrior)
    assert isinstance(method_prior("tiered-ff"), HorseshoePrior)
    prior = method_prior("bmr")
    assert isinstance(prior, LayerScalePrior)
    assert (prior.concentration, prior.rate) == (2.0, 2.0)


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_every_network(method, network):
    (record,) = _fit(method, network)
    assert (record.method, record.epoch) == (method, 1)
    assert math.isfinite(record.loss) and record.seconds > 0
    assert isinstance(record.guide, AutoDelta if method == "flat-map" else AutoNormal)
    x, _ = _dataset()[:4]
    probs = record.predict_proba(x)
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    latents = set(record.guide.median())
    assert latents == set(record.model.latent_sites())
    if method == "bmr":
        assert isinstance(record.bmr, BayesianModelReduction)
        # train → evaluate → prune: the first epoch's model is not pruned yet
        assert dict(record.bmr.masks) == {} and record.sparsity.total == 0
    else:
        assert record.bmr is None and record.sparsity is None


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_bmr_prunes_between_epochs_every_layer_but_the_output(network):
    first, record = _fit("bmr", network, num_epochs=2)
    assert first.sparsity.total == 0  # evaluated before any pruning
    decentered = [name + "_decentered" for name in record.model.random_sites()]
    masks = record.bmr.masks
    assert set(masks) == set(decentered)
    output = decentered[-1].rsplit(".", 1)[0]
    assert all(masks[n].all() for n in decentered if n.rsplit(".", 1)[0] == output)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert record.sparsity.total == pytest.approx(1 - kept / total)
    assert record.sparsity == record.bmr.sparsity()


def test_bmr_records_prune_and_weight_means_show_it():
    records = _fit("bmr", num_epochs=2)
    assert [r.epoch for r in records] == [1, 2]
    record = records[-1]
    assert record.sparsity.total > 0
    x, _ = _dataset()[:1]
    means = record.weight_means(x, num_samples=2)
    for name, mean in means.items():
        mask = record.bmr.masks[name + "_decentered"]
        assert torch.all(mean[~mask] == 0)
    probs, targets = record.predict_loader(DataLoader(_dataset(), batch_size=3))
    assert probs.shape == (8, 3) and torch.equal(targets, torch.arange(8) % 3)


@pytest.mark.parametrize("method", ["flat-ff", "bmr"])
def test_same_seed_gives_bit_identical_results(method):
    x, _ = _dataset()[:4]

    def run(seed):
        records = _fit(method, num_epochs=2, seed=seed, batch_size=4)
        torch.manual_seed(123)
        return [r.loss for r in records], records[-1].predict_proba(x)

    losses, probs = run(seed=5)
    again_losses, again_probs = run(seed=5)
    assert losses == again_losses
    assert torch.equal(probs, again_probs)
    other_losses, _ = run(seed=6)
    assert other_losses != losses


def test_flat_map_predicts_with_one_sample():
    (record,) = _fit("flat-map")
    x, _ = _dataset()[:4]
    assert torch.equal(record.predict_proba(x, num_samples=5), record.predict_proba(x))


def test_unknown_names_are_refused():
    loader = DataLoader(_dataset(), batch_size=8)
    with pytest.raises(ValueError, match="unknown method 'mcmc'; choose one of flat-map, flat-ff"):
        fit_method("mcmc", "mlp", loader, num_classes=3, num_epochs=1)
    with pytest.raises(ValueError, match="unknown network 'resnet'; choose one of mlp"):
        fit_method("bmr", "resnet", loader, num_classes=3, num_epochs=1)
    with pytest.raises(ValueError, match="dataset_size"):
        fit_method("bmr", "mlp", [_dataset()[:8]], num_classes=3, num_epochs=1)
    with pytest.raises(ValueError, match="num_epochs"):
        fit_method("bmr", "mlp", loader, num_classes=3, num_epochs=-1)


def test_training_uses_fused_adam_on_cpu_and_plain_adam_elsewhere():
    from pyro_bmr.paper.methods import _adam

    # the for-loop Adam slows down on the exactly-zero gradients of pruned elements
    assert _adam(1e-3, "cpu").pt_optim_args == {"lr": 1e-3, "fused": True}
    assert _adam(1e-3, None).pt_optim_args == {"lr": 1e-3, "fused": True}
    assert _adam(1e-3, "meta").pt_optim_args == {"lr": 1e-3}


def _clusters(n, seed):
    """Three well separated classes of 4x4 'images': any method that learns gets
    them right, one that does not is at chance (1/3)."""
    labels = torch.arange(n) % 3
    means = torch.randn(3, 16, generator=torch.Generator().manual_seed(42)) * 1.5
    x = means[labels] + torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    return x.view(n, 1, 4, 4), labels


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns(method):
    x, y = _clusters(300, seed=0)
    x_test, y_test = _clusters(300, seed=1)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    records = list(
        fit_method(
            method, "mlp", loader, num_classes=3, num_epochs=8, lr=2e-2, num_samples=20,
            seed=0, network_kwargs={"hidden": (16,)},
        )
    )  # fmt: skip
    accuracy = (records[-1].predict_proba(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy >= 0.9, f"{method}: test accuracy {accuracy:.3f}"
    assert records[-1].loss < records[0].loss
    if method == "bmr":
        assert records[-1].sparsity.total > 0.1


def test_adabelief_trains_and_unknown_optimizers_are_refused():
    from pyro.optim import PyroOptim
    from pytorch_optimizer import AdaBelief

    from pyro_bmr.paper.methods import _adabelief

    optim = _adabelief(5e-3)
    assert isinstance(optim, PyroOptim) and optim.pt_optim_constructor is AdaBelief
    assert optim.pt_optim_args == {"lr": 5e-3, "betas": (0.9, 0.999), "eps": 1e-16}
    x, y = _clusters(150, seed=0)
    loader = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True)
    records = list(
        fit_method(
            "bmr", "mlp", loader, num_classes=3, num_epochs=4, lr=1e-2, num_samples=10,
            network_kwargs={"hidden": (16,)}, optimizer="adabelief",
        )
    )  # fmt: skip
    assert records[-1].loss < records[0].loss and records[-1].sparsity.total > 0
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose one of adam, adabelief"):
        fit_method("bmr", "mlp", loader, num_classes=3, num_epochs=1, optimizer="sgd")


def test_distributed_needs_a_process_group_and_passes_set_the_sampler_epoch():
    from torch.utils.data.distributed import DistributedSampler

    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        _fit("flat-ff", distributed=True)
    # a sampler ordered by its epoch gets the number of each pass over the loader
    dataset = _dataset()
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, seed=0)
    seen = []
    original = sampler.set_epoch
    sampler.set_epoch = lambda epoch: (seen.append(epoch), original(epoch))
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    records = fit_method(
        "flat-ff",
        "mlp",
        loader,
        num_classes=3,
        num_epochs=2,
        steps_per_epoch=6,
        network_kwargs=SMALL["mlp"],
        num_samples=2,
    )
    assert [r.epoch for r in records] == [1, 2]
    # each epoch of 6 steps takes a pass of 4 batches and 2 of another: four passes
    assert seen == [0, 1, 2, 3]
