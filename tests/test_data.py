"""Tests for prunekit.data: tiny files in the real on-disk formats, errors, batched augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from prunekit.config import DATASETS, ConfigError
import torch
from PIL import Image

from prunekit.data import (
    DATASET_STATS,
    ArrayDataset,
    BatchLoader,
    DataError,
    ImageFolderLoader,
    dataset_info,
    load_dataset,
    make_loader,
    split_validation,
)


def _assert_one_line_naming(error: pytest.ExceptionInfo, path: Path | str) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ---------------------------------------------------------------------------------------------
# idx (MNIST / Fashion-MNIST)


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dataset(root: Path, images: dict, labels: dict, compress: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        files = {
            f"{prefix}-images-idx3-ubyte": _idx_bytes(images[prefix], 0x803),
            f"{prefix}-labels-idx1-ubyte": _idx_bytes(labels[prefix], 0x801),
        }
        for name, payload in files.items():
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (root / name).write_bytes(payload)


@pytest.fixture
def idx_arrays():
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "t10k": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)}
    labels = {"train": np.array([0, 9, 3, 3, 1], np.uint8), "t10k": np.array([7, 2, 5], np.uint8)}
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, idx_arrays, compress):
    images, labels = idx_arrays
    _write_idx_dataset(tmp_path, images, labels, compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("mnist", tmp_path, split)
        assert ds.images.shape == (len(labels[prefix]), 1, 28, 28)
        assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images[prefix]))
        assert ds.labels.tolist() == labels[prefix].tolist()
        assert ds.num_classes == 10 and ds.name == "mnist"
    assert load_dataset("fashion-mnist", tmp_path, "test").name == "fashion-mnist"


def test_idx_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        load_dataset("fashion-mnist", missing)
    message = _assert_one_line_naming(error, missing)
    assert "dataset directory not found" in message and "train-images-idx3-ubyte[.gz]" in message


def test_idx_missing_file(tmp_path, idx_arrays):
    _write_idx_dataset(tmp_path, *idx_arrays, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, "test")
    _assert_one_line_naming(error, tmp_path / "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated(tmp_path, idx_arrays, compress):
    _write_idx_dataset(tmp_path, *idx_arrays, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    payload = path.read_bytes()[:16 + 1000]
    if compress:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path)
    message = _assert_one_line_naming(error, path)
    assert "truncated idx file (expected 3920 bytes of image data, got 1000)" in message


def test_idx_trailing_bytes(tmp_path, idx_arrays):
    _write_idx_dataset(tmp_path, *idx_arrays, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path)
    assert "trailing" in _assert_one_line_naming(error, path)


def test_idx_wrong_magic(tmp_path, idx_arrays):
    images, labels = idx_arrays
    _write_idx_dataset(tmp_path, images, labels, compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(labels["train"], 0x803))  # image magic on a label file
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path)
    message = _assert_one_line_naming(error, path)
    assert "0x00000801" in message


def test_idx_corrupt_gzip(tmp_path, idx_arrays):
    _write_idx_dataset(tmp_path, *idx_arrays, compress=True)
    not_gzip = tmp_path / "train-images-idx3-ubyte.gz"
    not_gzip.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path)
    assert "corrupt gzip" in _assert_one_line_naming(error, not_gzip)

    cut_gzip = tmp_path / "t10k-images-idx3-ubyte.gz"
    cut_gzip.write_bytes(cut_gzip.read_bytes()[:50])
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, "test")
    assert "corrupt gzip" in _assert_one_line_naming(error, cut_gzip)


def test_idx_label_out_of_range(tmp_path, idx_arrays):
    images, labels = idx_arrays
    labels["train"][2] = 12
    _write_idx_dataset(tmp_path, images, labels, compress=False)
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path)
    assert "label 12" in _assert_one_line_naming(error, tmp_path / "train-labels-idx1-ubyte")


def test_idx_label_count_mismatch(tmp_path, idx_arrays):
    images, labels = idx_arrays
    labels["t10k"] = labels["t10k"][:2]
    _write_idx_dataset(tmp_path, images, labels, compress=False)
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, "test")
    _assert_one_line_naming(error, tmp_path / "t10k-labels-idx1-ubyte")


def test_mnist_requires_root():
    with pytest.raises(DataError, match="mnist: no default location"):
        load_dataset("mnist")


def test_real_fashion_mnist():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not root.is_dir():
        pytest.skip("Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist")
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    mean = train.images.float().mean().item() / 255
    assert mean == pytest.approx(DATASET_STATS["fashion-mnist"][0][0], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


def _cifar_batch(rng, n: int, label_key: bytes, num_classes: int) -> dict:
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = rng.integers(0, 20, n).tolist()
    return batch


def _write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        pickle.dump(obj, stream, protocol=2)


@pytest.fixture
def cifar10_root(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    batches = {name: _cifar_batch(rng, 2, b"labels", 10)
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, batch in batches.items():
        _write_pickle(folder / name, batch)
    return tmp_path, batches


def test_cifar10_layout(cifar10_root):
    root, batches = cifar10_root
    train = load_dataset("cifar10", root)
    assert train.images.shape == (10, 3, 32, 32) and train.num_classes == 10
    expected_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    row = batches["data_batch_3"][b"data"][1]  # sample 5 of the concatenated train set
    for c, y, x in [(0, 0, 0), (0, 0, 31), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 17, 5)]:
        assert train.images[5, c, y, x].item() == row[c * 1024 + y * 32 + x]
    test = load_dataset("cifar10", root / "cifar-10-batches-py", "test")  # root may be the folder
    assert torch.equal(test.images.reshape(2, -1), torch.from_numpy(batches["test_batch"][b"data"]))


def test_cifar100_layout(tmp_path):
    rng = np.random.default_rng(2)
    train = _cifar_batch(rng, 3, b"fine_labels", 100)
    train[b"fine_labels"][0] = 99
    _write_pickle(tmp_path / "cifar-100-python" / "train", train)
    _write_pickle(tmp_path / "cifar-100-python" / "test", _cifar_batch(rng, 2, b"fine_labels", 100))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.labels.tolist() == train[b"fine_labels"]
    assert torch.equal(ds.images.reshape(3, 3072), torch.from_numpy(train[b"data"]))
    assert len(load_dataset("cifar100", tmp_path, "test")) == 2


def test_cifar_missing_directory(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", tmp_path / "absent")
    _assert_one_line_naming(error, tmp_path / "absent" / "cifar-10-batches-py")


def test_cifar_truncated_pickle(cifar10_root):
    root, _ = cifar10_root
    path = root / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", root)
    assert "corrupt pickle" in _assert_one_line_naming(error, path)


class _RunsShellOnUnpickle:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_cifar_malicious_pickle_is_refused(cifar10_root):
    root, _ = cifar10_root
    marker = root / "PWNED"
    path = root / "cifar-10-batches-py" / "test_batch"
    _write_pickle(path, {b"data": _RunsShellOnUnpickle(marker), b"labels": []})
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", root, "test")
    message = _assert_one_line_naming(error, path)
    assert f"refusing to load global {os.system.__module__}.system" in message
    assert not marker.exists()

    # The same attack spelled as a hand-written protocol-0 pickle naming os.system directly.
    path.write_bytes(f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", root, "test")
    assert "refusing to load global os.system" in _assert_one_line_naming(error, path)
    assert not marker.exists()


def test_cifar_label_out_of_range(cifar10_root):
    root, batches = cifar10_root
    batch = batches["test_batch"]
    batch[b"labels"][1] = 10
    path = root / "cifar-10-batches-py" / "test_batch"
    _write_pickle(path, batch)
    with pytest.raises(DataError) as error:
        load_dataset("cifar10", root, "test")
    assert "label 10" in _assert_one_line_naming(error, path)


# ---------------------------------------------------------------------------------------------
# SVHN, digits, names


def test_svhn_layout(tmp_path):
    import scipy.io

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", tmp_path)
    assert ds.images.shape == (4, 3, 32, 32)
    assert ds.labels.tolist() == [0, 1, 9, 0]
    for n, c, row, col in [(0, 0, 0, 0), (1, 2, 5, 30), (3, 1, 31, 7)]:
        assert ds.images[n, c, row, col].item() == x[row, col, c, n]


def test_svhn_extra_split_joins_the_training_set(tmp_path):
    import scipy.io

    from prunekit.config import make_config
    from prunekit.distributed import DistContext
    from prunekit.runner import make_loaders

    rng = np.random.default_rng(4)
    for split, n in (("train", 3), ("extra", 5), ("test", 2)):
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                          "y": np.full((n, 1), 1 + n, dtype=np.uint8)})
    config = make_config({"data": "svhn", "data_dir": str(tmp_path), "extra_data": True, "batch_size": 1})
    train, _ = make_loaders(config, DistContext())
    assert len(train) == 8 and sorted(train.labels.tolist()) == [4] * 3 + [6] * 5
    with pytest.raises(ConfigError, match="only SVHN has an extra split"):
        make_config({"data": "cifar10", "extra_data": True})


def test_svhn_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path, "test")
    _assert_one_line_naming(error, tmp_path / "test_32x32.mat")
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(b"MATLAB garbage" * 10)
    with pytest.raises(DataError) as error:
        load_dataset("svhn", tmp_path, "test")
    _assert_one_line_naming(error, path)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    expected = r"digits needs scikit-learn: pip install 'prunekit\[digits\]'"
    with pytest.raises(DataError, match=expected):
        load_dataset("digits")


def test_digits_with_scikit_learn():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images.shape == (1500, 1, 8, 8) and len(test) == 297
    assert int(train.images.max()) == 255


def test_unknown_dataset_lists_names():
    with pytest.raises(DataError) as error:
        load_dataset("cifar11")
    assert "\n" not in str(error.value)
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits"):
        assert name in str(error.value)


def test_dataset_info_covers_every_name():
    assert dataset_info("cifar100") == {"in_channels": 3, "num_classes": 100, "image_size": 32}
    assert dataset_info("imagenet") == {"in_channels": 3, "num_classes": 1000, "image_size": 224}
    assert dataset_info("digits")["image_size"] == 8
    for name, (mean, std) in DATASET_STATS.items():
        assert len(mean) == len(std) == dataset_info(name)["in_channels"]
    assert tuple(DATASET_STATS) == DATASETS  # the options' and recipes' choices
    with pytest.raises(DataError):
        dataset_info("nope")


# ---------------------------------------------------------------------------------------------
# ArrayDataset


def _indexed_dataset(n: int, channels: int = 1, size: int = 6) -> ArrayDataset:
    """Images with distinct nonzero pixels, shifted per sample and channel; label = sample index."""
    base = torch.arange(1, size * size + 1, dtype=torch.int64).view(1, 1, size, size)
    images = base + torch.arange(n).view(n, 1, 1, 1) * 3 + torch.arange(channels).view(1, -1, 1, 1)
    return ArrayDataset(images.clamp(max=255).to(torch.uint8), torch.arange(n), n, "indexed")


def test_array_dataset_validation():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError) as error:
        ArrayDataset(images, torch.tensor([0, 5, 1]), 5, "toy")
    assert str(error.value).startswith("toy: label 5 out of range")
    with pytest.raises(DataError, match="toy: images must be uint8"):
        ArrayDataset(images.float(), torch.tensor([0, 1, 1]), 5, "toy")
    with pytest.raises(DataError, match="toy: labels must be"):
        ArrayDataset(images, torch.tensor([0, 1, 1], dtype=torch.int32), 5, "toy")
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ArrayDataset(images, torch.tensor([0, 1]), 5, "toy")


def test_subset_and_validation_split():
    ds = _indexed_dataset(20)
    assert ds.subset(4).labels.tolist() == [0, 1, 2, 3]
    train, val = split_validation(ds, 5, seed=7)
    again_train, again_val = split_validation(ds, 5, seed=7)
    assert len(train) == 15 and len(val) == 5
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(20))
    assert torch.equal(val.labels, again_val.labels)
    assert torch.equal(train.images, again_train.images)
    assert not torch.equal(split_validation(ds, 5, seed=8)[1].labels, val.labels)


# ---------------------------------------------------------------------------------------------
# BatchLoader


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _train_loader(ds, **kwargs) -> BatchLoader:
    options = dict(train=True, mean=(0.0,), std=(1.0,), pad=2, flip=True, seed=3)
    options.update(kwargs)
    return BatchLoader(ds, 4, **options)


def test_batches_are_reproducible_per_epoch():
    ds = _indexed_dataset(10)
    first, resumed = _train_loader(ds), _train_loader(ds)
    first.set_epoch(3)
    resumed.set_epoch(3)
    x1, y1 = _collect(first)
    x2, y2 = _collect(resumed)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    first.set_epoch(4)
    x3, y3 = _collect(first)
    assert not torch.equal(y1, y3) and not torch.equal(x1[torch.argsort(y1)], x3[torch.argsort(y3)])
    assert not torch.equal(_collect(_train_loader(ds, seed=4))[1], _collect(_train_loader(ds))[1])


def _all_crops(padded: torch.Tensor, size: int) -> dict:
    """Every size×size window of `padded`, plain and mirrored, keyed by (top, left, mirrored)."""
    crops = {}
    for top in range(padded.shape[1] - size + 1):
        for left in range(padded.shape[2] - size + 1):
            window = padded[:, top:top + size, left:left + size]
            crops[top, left, False], crops[top, left, True] = window, window.flip(-1)
    return crops


def test_crop_and_flip_yield_shifted_copies_of_padded_image():
    ds = _indexed_dataset(8)
    loader = _train_loader(ds)
    seen = set()
    for epoch in range(6):
        loader.set_epoch(epoch)
        for x, labels in loader:
            assert x.shape == (4, 1, 6, 6) and x.dtype == torch.float32
            pixels = torch.round(x * 255).to(torch.uint8)
            for out, label in zip(pixels, labels.tolist()):
                crops = _all_crops(torch.nn.functional.pad(ds.images[label], (2, 2, 2, 2)), 6)
                matches = [key for key, crop in crops.items() if torch.equal(out, crop)]
                assert len(matches) == 1, (label, out)
                seen.add(matches[0])
    assert {m[2] for m in seen} == {False, True}
    assert len({m[:2] for m in seen}) > 10


def test_eval_covers_every_sample_in_order_without_augmentation():
    ds = _indexed_dataset(10, channels=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    loader = BatchLoader(ds, 3, train=False, mean=mean, std=std, pad=2, flip=True)
    assert len(loader) == 4
    batches = list(loader)
    assert [len(y) for _, y in batches] == [3, 3, 3, 1]
    x, y = _collect(batches)
    assert y.tolist() == list(range(10))
    mean_, std_ = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expected = (ds.images.float() / 255 - mean_) / std_
    torch.testing.assert_close(x, expected)


def test_train_drops_last_partial_batch_by_default():
    ds = _indexed_dataset(10)
    assert len(_train_loader(ds)) == 2 and len(list(_train_loader(ds))) == 2
    assert len(_train_loader(ds, drop_last=False)) == 3
    assert sorted(_collect(_train_loader(ds, drop_last=False))[1].tolist()) == list(range(10))


def test_ddp_shards_are_disjoint_and_equal():
    ds = _indexed_dataset(11)
    shards = []
    for rank in range(2):
        loader = BatchLoader(ds, 2, train=True, mean=(0.0,), std=(1.0,), seed=5, rank=rank,
                             world_size=2, drop_last=False)
        loader.set_epoch(2)
        assert len(loader) == 3
        shards.append(_collect(loader)[1])
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    permutation = torch.randperm(11, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))
    assert torch.equal(shards[0], permutation[0:10:2])
    assert torch.equal(shards[1], permutation[1:10:2])


def test_ddp_eval_scores_every_sample_once():
    ds = _indexed_dataset(11)
    loaders = [BatchLoader(ds, 4, train=False, mean=(0.0,), std=(1.0,), rank=r, world_size=2)
               for r in range(2)]
    shards = [_collect(loader)[1] for loader in loaders]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))


def test_channels_last_and_bad_arguments():
    ds = _indexed_dataset(4, channels=3)
    stats = dict(mean=(0.0,) * 3, std=(1.0,) * 3)
    x, _ = next(iter(BatchLoader(ds, 4, train=False, channels_last=True, **stats)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        BatchLoader(ds, 4, train=False, mean=(0.0,), std=(1.0,))
    with pytest.raises(ValueError):
        BatchLoader(ds, 4, train=False, mean=(0.0,) * 3, std=(1.0,) * 3, rank=2, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_match_across_devices():
    ds = _indexed_dataset(16, channels=3)
    stats = dict(mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    cpu = _collect(_train_loader(ds, **stats))
    gpu = _collect(_train_loader(ds, device="cuda", **stats))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[1].cpu(), cpu[1])


def test_make_loader_for_in_memory_dataset(tmp_path, idx_arrays):
    _write_idx_dataset(tmp_path, *idx_arrays, compress=True)
    loader = make_loader("fashion-mnist", tmp_path, "train", 2, train=False, subset=4)
    x, y = _collect(loader)
    assert y.tolist() == idx_arrays[1]["train"][:4].tolist()
    mean, std = DATASET_STATS["fashion-mnist"]
    pixels = torch.from_numpy(idx_arrays[0]["train"][:4]).float()
    torch.testing.assert_close(x[:, 0], (pixels / 255 - mean[0]) / std[0])


# ---------------------------------------------------------------------------------------------
# ImageFolderLoader (ImageNet layout)


@pytest.fixture
def image_folder_root(tmp_path):
    colors = {"ant": (200, 10, 60), "bee": (0, 128, 255)}
    for split in ("train", "val"):
        for class_name, color in colors.items():
            folder = tmp_path / split / class_name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40 + i * 7, 30), color).save(folder / f"{i}.png")
            Image.new("RGB", (33, 20), color).save(folder / "extra.jpg", quality=100)
    return tmp_path, colors


def test_image_folder_val_batches(image_folder_root):
    root, colors = image_folder_root
    loader = make_loader("imagenet", root, "val", 3, train=False, num_workers=0)
    assert isinstance(loader, ImageFolderLoader)
    assert loader.num_classes == 2 and len(loader) == 3
    x, y = _collect(loader)
    assert x.shape == (8, 3, 224, 224) and y.tolist() == [0] * 4 + [1] * 4
    mean, std = DATASET_STATS["imagenet"]
    for index, color in enumerate(colors.values()):
        expected = (torch.tensor(color) / 255 - torch.tensor(mean)) / torch.tensor(std)
        centre = x[index * 4, :, 112, 112]
        torch.testing.assert_close(centre, expected, atol=0.05, rtol=0)


def test_image_folder_train_is_reproducible_and_sharded(image_folder_root):
    root, _ = image_folder_root
    loaders = [ImageFolderLoader(root, "train", 2, train=True, seed=1, num_workers=0)
               for _ in range(2)]
    orders = []
    for loader in loaders:
        loader.set_epoch(5)
        orders.append(_collect(loader)[1])
    assert torch.equal(orders[0], orders[1]) and len(loaders[0]) == 4
    shards = [ImageFolderLoader(root, "train", 2, train=True, rank=r, world_size=3, num_workers=0)
              for r in range(3)]
    labels = [_collect(s)[1] for s in shards]
    assert [len(s) for s in shards] == [1, 1, 1] and all(len(lab) == 2 for lab in labels)


def test_image_folder_class_count_comes_from_its_folders(image_folder_root):
    root, _ = image_folder_root
    (root / "train" / "cow").mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(root / "train" / "cow" / "0.png")
    assert dataset_info("imagenet", root)["num_classes"] == 3
    assert dataset_info("imagenet")["num_classes"] == 1000  # no folder to count: ImageNet's


def test_image_folder_subset_is_a_seeded_draw_across_classes(image_folder_root):
    root, _ = image_folder_root

    def labels(seed):
        loader = ImageFolderLoader(root, "train", 4, train=False, seed=seed, subset=4, num_workers=0)
        return [loader.dataset.dataset.targets[i] for i in loader.dataset.indices], loader.dataset.indices

    (first, chosen), (again, chosen_again) = labels(0), labels(0)
    assert chosen == chosen_again == sorted(chosen) and len(chosen) == 4
    assert set(first) == {0, 1}  # the first 4 files of the class-sorted list would all be class 0
    assert any(labels(seed)[1] != chosen for seed in range(1, 5))


def test_a_validation_folder_whose_classes_differ_from_training_is_refused(image_folder_root):
    root, _ = image_folder_root
    for image in (root / "val" / "ant").iterdir():
        image.unlink()
    (root / "val" / "ant").rmdir()
    with pytest.raises(DataError) as error:
        ImageFolderLoader(root, "val", 2, train=False, num_workers=0)
    message = _assert_one_line_naming(error, root / "val")
    assert "class folders differ" in message and "'ant'" in message


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataError) as error:
        make_loader("imagenet", tmp_path, "train", 2, train=True)
    _assert_one_line_naming(error, tmp_path / "train")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_image_folder_corrupt_image(image_folder_root, num_workers):
    root, _ = image_folder_root
    broken = root / "val" / "bee" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    loader = ImageFolderLoader(root, "val", 8, train=False, num_workers=num_workers)
    with pytest.raises(DataError) as error:
        list(loader)
    message = _assert_one_line_naming(error, broken)
    assert message.startswith(str(broken)) and "unreadable image" in message
