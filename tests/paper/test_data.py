import struct

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from pyro_bmr.paper.data import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSplits,
    load_dataset,
    make_loader,
    make_loaders,
)

IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _write_idx(folder, prefix, images, labels):
    """Write images (N, H, W) and labels (N,) as big-endian IDX files, as MNIST ships them."""
    n, rows, cols = images.shape
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def _make_idx_dataset(root, name, num_train=12, num_test=5):
    folder = root / IDX_FOLDERS[name] / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(folder, prefix, images, labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_idx_dataset(tmp_path, name):
    arrays = _make_idx_dataset(tmp_path, name)
    data = load_dataset(name, tmp_path)
    assert isinstance(data, DatasetSplits)
    assert (data.name, data.num_classes, data.input_shape) == (name, 10, (1, 28, 28))
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    assert x_train.shape == (12, 1, 28, 28) and x_test.shape == (5, 1, 28, 28)
    assert x_train.dtype == torch.get_default_dtype() and y_train.dtype == torch.int64
    assert torch.equal(y_train, torch.as_tensor(arrays["train"][1]))
    assert torch.equal(y_test, torch.as_tensor(arrays["t10k"][1]))
    # Standardised with the training split's statistics of the [0, 1] pixels.
    raw = arrays["train"][0] / 255.0
    assert data.mean == pytest.approx((raw.mean(),), rel=1e-5)
    assert data.std == pytest.approx((raw.std(),), rel=1e-5)
    assert float(x_train.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x_train.std(correction=0)) == pytest.approx(1.0, rel=1e-5)
    expected_test = (arrays["t10k"][0] / 255.0 - raw.mean()) / raw.std()
    torch.testing.assert_close(
        x_test[:, 0].double(), torch.as_tensor(expected_test), atol=1e-5, rtol=0
    )


def test_load_unnormalized_subset_in_float64(tmp_path):
    arrays = _make_idx_dataset(tmp_path, "mnist")
    data = load_dataset(
        "mnist", tmp_path, train_size=4, test_size=2, normalize=False, dtype=torch.float64
    )
    x_train, y_train = data.train.tensors
    assert x_train.dtype == torch.float64
    assert (data.mean, data.std) == ((0.0,), (1.0,))
    expected = torch.as_tensor(arrays["train"][0][:4] / 255.0).unsqueeze(1)
    assert torch.equal(x_train, expected)
    assert torch.equal(y_train, torch.as_tensor(arrays["train"][1][:4]))
    assert len(data.test) == 2


def test_subset_keeps_full_split_normalisation(tmp_path):
    _make_idx_dataset(tmp_path, "mnist")
    full = load_dataset("mnist", tmp_path)
    part = load_dataset("mnist", tmp_path, train_size=3)
    assert part.mean == full.mean
    assert torch.equal(part.train.tensors[0], full.train.tensors[0][:3])


def test_subset_larger_than_split_is_rejected(tmp_path):
    _make_idx_dataset(tmp_path, "mnist")
    with pytest.raises(ValueError, match="train_size=13 exceeds the 12 examples"):
        load_dataset("mnist", tmp_path, train_size=13)


def test_missing_dataset_names_expected_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte") in message
    assert "--download" in message
    assert "Traceback" not in message


def test_partially_missing_dataset_names_missing_file(tmp_path):
    _make_idx_dataset(tmp_path, "fashion-mnist")
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing: t10k-labels-idx1-ubyte\)"):
        load_dataset("fashion-mnist", tmp_path)


@pytest.mark.parametrize(
    "name, expected",
    [("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train")],
)
def test_missing_cifar_names_expected_files(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path)
    assert str(tmp_path / expected) in str(info.value)
    assert info.value.__context__ is None


def test_corrupt_cifar_files_fail_integrity_check(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / f).write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="integrity check") as info:
        load_dataset("cifar10", tmp_path)
    # torchvision's RuntimeError is folded into the message, not chained.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_malformed_idx_file_is_reported(tmp_path):
    _make_idx_dataset(tmp_path, "mnist")
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="'mnist'.*malformed"):
        load_dataset("mnist", tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*digits, mnist, fashion-mnist"):
        load_dataset("svhn")
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")


def test_digits_offline_fixed_split():
    data = load_dataset("digits", normalize=False)
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert (data.num_classes, data.input_shape) == (10, (1, 8, 8))
    assert y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    # Stratified: every class appears in both splits.
    assert torch.equal(torch.unique(y_test), torch.arange(10))
    again = load_dataset("digits", normalize=False)
    assert torch.equal(again.test.tensors[0], x_test)
    assert torch.equal(again.train.tensors[1], y_train)


def _tiny_splits():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    y = torch.arange(10)
    return DatasetSplits(
        "tiny", TensorDataset(x, y), TensorDataset(x, y), 10, (1, 1, 1), (0.0,), (1.0,)
    )


def _epoch(loader):
    return [batch[1].tolist() for batch in loader]


def test_train_loader_is_seeded():
    data = _tiny_splits()
    train, test = make_loaders(data, 4, seed=3)
    first, second = _epoch(train), _epoch(train)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10))
    assert first != second  # a new permutation each epoch
    train_again, _ = make_loaders(data, 4, seed=3)
    assert _epoch(train_again) == first and _epoch(train_again) == second
    other, _ = make_loaders(data, 4, seed=4)
    assert _epoch(other) != first
    assert _epoch(test) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_loader_batches_are_tuples_and_drop_last():
    data = _tiny_splits()
    loader = make_loader(data.train, 4, drop_last=True)
    batches = list(loader)
    assert len(loader) == 2 and len(batches) == 2
    x, y = batches[0]
    assert isinstance(batches[0], tuple) and x.shape == (4, 1, 1, 1)
    assert torch.equal(x.view(-1).long(), y)


class _ListDataset(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def test_loader_for_other_datasets_is_seeded():
    first = [b[1].tolist() for b in make_loader(_ListDataset(), 4, seed=1)]
    again = [b[1].tolist() for b in make_loader(_ListDataset(), 4, seed=1)]
    assert first == again
    assert sorted(sum(first, [])) == list(range(6))


def test_loader_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(_tiny_splits().train, 0)


def test_replicas_share_each_global_batch_and_their_sampler_sets_the_order():
    from pyro_bmr.distributed import set_sampler_epoch

    data = _tiny_splits()
    shards = [make_loaders(data, 2, seed=3, num_replicas=2, rank=rank)[0] for rank in range(2)]
    first = [_epoch(shard) for shard in shards]
    # batch i of the two replicas together: 4 distinct examples, all 10 over the epoch
    # (the sampler pads 10 to 10: no repeats), and the test split is not sharded
    together = [sorted(a + b) for a, b in zip(*first)]
    assert [len(b) for b in together] == [4, 4, 2]
    assert sorted(sum(together, [])) == list(range(10))
    assert _epoch(make_loaders(data, 2, num_replicas=2, rank=1)[1]) == [
        [2 * i, 2 * i + 1] for i in range(5)
    ]
    # the order is the sampler's epoch's: the same pass after pass until it is set
    assert [_epoch(shard) for shard in shards] == first
    for shard in shards:
        assert set_sampler_epoch(shard, 1)
    second = [_epoch(shard) for shard in shards]
    assert second != first
    assert sorted(sum((a + b for a, b in zip(*second)), [])) == list(range(10))
