"""Image classification data sets as in-memory tensors, and seeded loaders.

:func:`load_dataset` returns the whole train and test splits as
:class:`~torch.utils.data.TensorDataset` objects of ``(images, labels)``: images
are float tensors of shape ``(N, C, H, W)``, scaled to ``[0, 1]`` and then
standardised per channel with the training split's mean and standard deviation;
labels are ``int64``. ``digits`` (scikit-learn's bundled 8×8 digits) needs no
files; the torchvision data sets are read from ``data_dir`` in torchvision's
layout and downloaded there only when asked.

:func:`make_loaders` batches them with a seeded generator, so the same seed gives
the same batches in the same order.
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "DatasetNotFoundError",
    "DatasetSplits",
    "load_dataset",
    "make_loader",
    "make_loaders",
]

#: Data directory used when ``data_dir`` is not given (relative to the working directory).
DEFAULT_DATA_DIR = "data"

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class _Source:
    torchvision_class: str
    folder: str  # relative to data_dir
    files: tuple[str, ...]
    num_classes: int


_TORCHVISION = {
    "mnist": _Source("MNIST", "MNIST/raw", _IDX_FILES, 10),
    "fashion-mnist": _Source("FashionMNIST", "FashionMNIST/raw", _IDX_FILES, 10),
    "cifar10": _Source(
        "CIFAR10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        10,
    ),
    "cifar100": _Source("CIFAR100", "cifar-100-python", ("train", "test", "meta"), 100),
}

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits",) + tuple(_TORCHVISION)

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are missing (or fail torchvision's integrity check) and
    were not, or could not be, downloaded. The message names the expected files."""


@dataclass(frozen=True)
class DatasetSplits:
    """Result of :func:`load_dataset`.

    :ivar str name: data set name, one of :data:`DATASETS`.
    :ivar TensorDataset train: training ``(images, labels)``.
    :ivar TensorDataset test: test ``(images, labels)``.
    :ivar int num_classes: number of classes.
    :ivar tuple input_shape: shape ``(C, H, W)`` of one image.
    :ivar tuple mean: per-channel mean subtracted from the ``[0, 1]`` pixels.
    :ivar tuple std: per-channel standard deviation the pixels were divided by.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    # Pixel values are integers 0..16.
    scale = 16.0

    def images_of(x):
        return torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1, 8, 8) / scale

    def labels_of(y):
        return torch.as_tensor(y, dtype=torch.int64)

    return images_of(x_train), labels_of(y_train), images_of(x_test), labels_of(y_test), 10


def _not_found_message(name: str, root: Path, source: _Source, missing: list[Path]) -> str:
    folder = root / source.folder
    expected = "\n".join(f"  {folder / f}" for f in source.files)
    missing_text = ", ".join(p.name for p in missing)
    return (
        f"dataset {name!r} not found in data directory {str(root)!r} "
        f"(missing: {missing_text}).\nExpected files:\n{expected}\n"
        "Pass --download (download=True) on a machine with internet access, "
        "or copy the files there."
    )


def _torchvision(
    name: str, root: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    import torchvision.datasets

    source = _TORCHVISION[name]
    folder = root / source.folder
    if not download:
        missing = [folder / f for f in source.files if not (folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(_not_found_message(name, root, source, missing))
    cls = getattr(torchvision.datasets, source.torchvision_class)
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=False)
    except (RuntimeError, OSError) as err:
        # Download failures and MD5 mismatches; report them without torchvision's traceback.
        missing = [folder / f for f in source.files if not (folder / f).is_file()]
        reason = "download failed" if download else "files failed torchvision's integrity check"
        message = _not_found_message(name, root, source, missing or [folder])
        raise DatasetNotFoundError(f"{message}\n({reason}: {str(err).strip()})") from None
    except (
        AssertionError,
        TypeError,
        ValueError,
        EOFError,
        KeyError,
        pickle.UnpicklingError,
    ) as err:
        raise ValueError(
            f"could not read dataset {name!r} from {str(folder)!r}: the files are malformed "
            f"({type(err).__name__}: {err}); delete them and download again"
        ) from None

    def images_of(ds):
        data = torch.as_tensor(ds.data)
        # MNIST-like data are (N, H, W) uint8, CIFAR (N, H, W, C) uint8.
        data = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        return data.contiguous()

    def labels_of(ds):
        return torch.as_tensor(ds.targets, dtype=torch.int64)

    x_train, y_train = images_of(train), labels_of(train)
    x_test, y_test = images_of(test), labels_of(test)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"dataset {name!r} in {str(folder)!r}: {split} split has {x.shape[0]} images "
                f"but {y.shape[0]} labels"
            )
    return x_train, y_train, x_test, y_test, source.num_classes


def _take(x: torch.Tensor, y: torch.Tensor, size: int | None, option: str, name: str):
    if size is None:
        return x, y
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{option} must be a positive int or None, got {size!r}")
    if size > x.shape[0]:
        raise ValueError(f"{option}={size} exceeds the {x.shape[0]} examples of {name!r}")
    # Copies, so the full split's storage can be freed.
    return x[:size].clone(), y[:size].clone()


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    normalize: bool = True,
    pad: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DatasetSplits:
    """Load a data set's train and test splits into memory.

    Pixels :math:`u \\in \\{0, \\dots, u_{\\max}\\}` become
    :math:`x = (u/u_{\\max} - m_c) / s_c`, with :math:`m_c, s_c` the mean and
    (population) standard deviation of channel :math:`c` over the whole training
    split, so the normalisation does not depend on ``train_size``.

    ``digits`` is scikit-learn's 8×8 digits (1797 images, no download), split into
    a stratified 80/20 train/test split with a fixed seed. ``mnist``,
    ``fashion-mnist``, ``cifar10`` and ``cifar100`` use torchvision's files under
    ``data_dir`` (e.g. ``<data_dir>/MNIST/raw/train-images-idx3-ubyte``).

    :param str name: one of :data:`DATASETS`.
    :param data_dir: directory holding the torchvision files; defaults to
        :data:`DEFAULT_DATA_DIR`. Ignored for ``digits``.
    :type data_dir: str or pathlib.Path or None
    :param bool download: download missing torchvision files into ``data_dir``.
    :param train_size: keep only the first ``train_size`` training examples.
    :type train_size: int or None
    :param test_size: keep only the first ``test_size`` test examples.
    :type test_size: int or None
    :param bool normalize: standardise per channel; if False, pixels stay in ``[0, 1]``
        (``mean`` and ``std`` are then reported as 0 and 1).
    :param int pad: zeros added on every side of every image after the
        standardisation (the authors pad 28x28 images by 2 to 32x32 for every
        network but the MLP).
    :param dtype: floating dtype of the images; defaults to
        :func:`torch.get_default_dtype`.
    :type dtype: torch.dtype or None
    :param device: device for all tensors; defaults to the CPU.
    :type device: torch.device or str or None
    :returns: the splits with ``num_classes``, ``input_shape`` and the normalisation.
    :rtype: DatasetSplits
    :raises ValueError: for an unknown name, bad sizes or malformed files.
    :raises DatasetNotFoundError: if the files are missing and not downloaded.
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    name = name.lower()
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")

    if name == "digits":
        x_train, y_train, x_test, y_test, num_classes = _digits()
    else:
        root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir).expanduser()
        x_train, y_train, x_test, y_test, num_classes = _torchvision(name, root, download)
        x_train = x_train.to(dtype).div_(255)
        x_test = x_test.to(dtype).div_(255)
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")

    channels = x_train.shape[1]
    if normalize:
        # At least float32 so half-precision data still give accurate statistics.
        stats_dtype = torch.promote_types(dtype, torch.float32)
        std, mean = torch.std_mean(x_train.to(stats_dtype), dim=(0, 2, 3), correction=0)
        std = std.clamp_min(torch.finfo(dtype).eps)  # a constant channel stays finite
    else:
        mean, std = torch.zeros(channels), torch.ones(channels)
    x_train, y_train = _take(x_train, y_train, train_size, "train_size", name)
    x_test, y_test = _take(x_test, y_test, test_size, "test_size", name)
    if normalize:
        shape = (1, channels, 1, 1)
        x_train = (x_train - mean.to(dtype).view(shape)) / std.to(dtype).view(shape)
        x_test = (x_test - mean.to(dtype).view(shape)) / std.to(dtype).view(shape)
    if pad:
        x_train = torch.nn.functional.pad(x_train, (pad,) * 4)
        x_test = torch.nn.functional.pad(x_test, (pad,) * 4)

    def on_device(*tensors):
        return TensorDataset(*(t.to(device) if device is not None else t for t in tensors))

    return DatasetSplits(
        name=name,
        train=on_device(x_train, y_train),
        test=on_device(x_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """Batch a data set, shuffling with a generator seeded by ``seed``.

    Each pass over the loader draws a fresh permutation from the generator, so
    epochs differ from one another while a new loader with the same seed repeats
    the same sequence of batches. A :class:`~torch.utils.data.TensorDataset` is
    indexed one batch at a time rather than one example at a time, which is much
    faster; its batches are tuples of tensors on the data set's device.

    With ``num_replicas > 1`` the loader yields the shard of replica ``rank`` of a
    data-parallel run, through a
    :class:`~torch.utils.data.distributed.DistributedSampler` (seeded by ``seed``;
    the data set padded with repeated examples to a multiple of ``num_replicas``):
    batch ``i`` of every replica together are the examples of one global batch of
    ``num_replicas * batch_size``. Its order is set by the sampler's epoch
    (:func:`pyro_bmr.distributed.set_sampler_epoch`), not drawn afresh at each pass.

    :param torch.utils.data.Dataset dataset: data set, e.g. ``DatasetSplits.train``.
    :param int batch_size: examples per batch (of each replica).
    :param bool shuffle: shuffle each epoch; if False, keep the data set's order.
    :param int seed: seed of the shuffling generator.
    :param bool drop_last: drop a final batch smaller than ``batch_size``.
    :param int num_replicas: the processes of a data-parallel run.
    :param int rank: this process's place among them.
    :returns: the loader.
    :rtype: torch.utils.data.DataLoader
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_replicas > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    if isinstance(dataset, TensorDataset):
        # batch_size=None hands each list of indices to dataset[...] in one call.
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(sampler, batch_size, drop_last),
            collate_fn=tuple,
        )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last)


def make_loaders(
    data: DatasetSplits,
    batch_size: int,
    *,
    test_batch_size: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training loader and ordered test loader for :func:`load_dataset`'s splits.

    :param DatasetSplits data: the splits.
    :param int batch_size: training batch size (of each replica).
    :param test_batch_size: test batch size; defaults to ``batch_size``.
    :type test_batch_size: int or None
    :param int seed: seed of the training loader's shuffling generator.
    :param bool drop_last: drop the last incomplete training batch.
    :param int num_replicas: the processes of a data-parallel run, each of which
        trains on its shard of the training split (see :func:`make_loader`) and
        tests on the whole test split.
    :param int rank: this process's place among them.
    :returns: ``(train_loader, test_loader)``.
    :rtype: tuple[DataLoader, DataLoader]
    """
    train = make_loader(
        data.train,
        batch_size,
        shuffle=True,
        seed=seed,
        drop_last=drop_last,
        num_replicas=num_replicas,
        rank=rank,
    )
    test_bs = batch_size if test_batch_size is None else test_batch_size
    test = make_loader(data.test, test_bs, shuffle=False)
    return train, test
