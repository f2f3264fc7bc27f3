"""Offline datasets (read from local files only) and batched on-device augmentation.

Small datasets are held in memory as one uint8 tensor and augmented a whole batch at a
time on the target device; ImageNet is streamed from class folders by a DataLoader.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import one_line


class DataError(ValueError):
    """Missing, truncated or wrongly formatted data; the message is one line naming the file."""


DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "digits": ((0.5,), (0.5,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_DATASET_INFO: dict[str, dict[str, int]] = {
    "fashion-mnist": {"in_channels": 1, "num_classes": 10, "image_size": 28},
    "mnist": {"in_channels": 1, "num_classes": 10, "image_size": 28},
    "cifar10": {"in_channels": 3, "num_classes": 10, "image_size": 32},
    "cifar100": {"in_channels": 3, "num_classes": 100, "image_size": 32},
    "svhn": {"in_channels": 3, "num_classes": 10, "image_size": 32},
    "digits": {"in_channels": 1, "num_classes": 10, "image_size": 8},
    "imagenet": {"in_channels": 3, "num_classes": 1000, "image_size": 224},
}

_DEFAULT_ROOTS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}


def dataset_info(name: str, root: str | Path | None = None) -> dict[str, int]:
    """Input channels, class count and image side length of a named dataset, for building models; an
    image folder at `root` has as many classes as class folders (no forced 1000-class head)."""
    if name not in _DATASET_INFO:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(_DATASET_INFO)})")
    info = dict(_DATASET_INFO[name])
    if name == "imagenet" and root is not None:
        info["num_classes"] = len(image_folder_classes(root))
    return info


def _check_label_range(labels: torch.Tensor, num_classes: int, source: object) -> None:
    """Raise DataError naming `source` and the first label outside [0, num_classes)."""
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise DataError(
            f"{source}: label {int(bad[0])} out of range (expected labels in [0, {num_classes}))"
        )


@dataclass
class ArrayDataset:
    """A whole labelled image dataset in memory: uint8 N×C×H×W images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be uint8 N×C×H×W, "
                f"got {self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"{self.name}: labels must be a 1-D int64 tensor, "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise DataError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )
        _check_label_range(self.labels, self.num_classes, self.name)
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def concat(self, other: ArrayDataset) -> ArrayDataset:
        """This dataset followed by `other` (e.g. SVHN's train and extra splits)."""
        return ArrayDataset(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]),
                            self.num_classes, self.name)

    def subset(self, n: int) -> ArrayDataset:
        """The first n samples, e.g. for quick smoke runs."""
        if not 0 < n <= len(self):
            raise ValueError(f"{self.name}: subset size {n} not in [1, {len(self)}]")
        return ArrayDataset(self.images[:n], self.labels[:n], self.num_classes, self.name)


def split_validation(
    dataset: ArrayDataset, n_val: int, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Randomly split off n_val samples as a validation set; the same seed gives the same split."""
    if not 0 < n_val < len(dataset):
        raise ValueError(f"{dataset.name}: n_val={n_val} not in [1, {len(dataset) - 1}]")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return (
        ArrayDataset(
            dataset.images[train_idx], dataset.labels[train_idx], dataset.num_classes, dataset.name
        ),
        ArrayDataset(
            dataset.images[val_idx], dataset.labels[val_idx], dataset.num_classes, dataset.name
        ),
    )


# ---------------------------------------------------------------------------------------------
# idx files (MNIST, Fashion-MNIST)

_IDX_IMAGE_MAGIC = 0x00000803
_IDX_LABEL_MAGIC = 0x00000801
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_maybe_gzipped(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{path}: corrupt gzip file ({one_line(error)}) (expected a gzip-compressed idx file)"
        ) from None


def _parse_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Parse an idx file of unsigned bytes (big-endian header), checking its size exactly."""
    raw = _read_maybe_gzipped(path)
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated idx file "
            f"(expected a {header_size}-byte header, got {len(raw)} bytes)"
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: not an idx {what} file (magic 0x{found:08x}, expected 0x{magic:08x})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected, got = math.prod(dims), len(raw) - header_size
    if got < expected:
        raise DataError(
            f"{path}: truncated idx file (expected {expected} bytes of {what} data, got {got})"
        )
    if got > expected:
        raise DataError(
            f"{path}: idx file has {got - expected} trailing bytes "
            f"(expected exactly {expected} bytes of {what} data for dims {dims})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _find_idx_file(directory: Path, base: str) -> Path:
    """The plain or .gz idx file named `base` in `directory`."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory / base}[.gz]: idx file not found")


def _load_idx_dataset(name: str, title: str, root: Path, split: str) -> ArrayDataset:
    """Read an MNIST-style pair of idx files (images + labels) from `root`."""
    if not root.is_dir():
        expected = ", ".join(f"{base}[.gz]" for pair in _IDX_FILES.values() for base in pair)
        raise DataError(
            f"{root}: dataset directory not found (expected {title} idx files {expected})"
        )
    image_base, label_base = _IDX_FILES[split]
    image_path, label_path = _find_idx_file(root, image_base), _find_idx_file(root, label_base)
    images = _parse_idx(image_path, _IDX_IMAGE_MAGIC, "image")
    labels = _parse_idx(label_path, _IDX_LABEL_MAGIC, "label")
    if len(labels) != len(images):
        raise DataError(
            f"{label_path}: {len(labels)} labels "
            f"(expected {len(images)}, one per image in {image_path})"
        )
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    _check_label_range(label_tensor, 10, label_path)
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    return ArrayDataset(image_tensor, label_tensor, 10, name)


# ---------------------------------------------------------------------------------------------
# CIFAR pickles

_SAFE_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only containers and numpy arrays: a hostile file runs no code."""

    def __init__(self, stream, path: Path):
        super().__init__(stream, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise DataError(
                f"{self._path}: refusing to load global {module}.{name} "
                "(expected a CIFAR pickle of dicts, lists and numpy arrays)"
            )
        return super().find_class(module, name)


def _load_cifar_batch(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×3×32×32 uint8) and labels (int64) from one CIFAR python pickle."""
    expected = f"expected a CIFAR pickle dict with b'data' (N×3072 uint8) and {label_key!r}"
    if not path.is_file():
        raise DataError(f"{path}: file not found ({expected})")
    try:
        with path.open("rb") as stream:
            batch = _ArrayOnlyUnpickler(stream, path).load()
    except DataError:
        raise
    except Exception as error:  # any failure inside the pickle machinery means a corrupt file
        raise DataError(f"{path}: corrupt pickle ({one_line(error)}) ({expected})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing keys ({expected})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
        description = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise DataError(f"{path}: b'data' is {description} ({expected})")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: bad labels ({one_line(error)}) ({expected})") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.size} labels for {len(data)} images ({expected})")
    _check_label_range(torch.from_numpy(labels), num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_directory(root: Path, folder: str, first_file: str) -> Path:
    """`root/folder` if present, else `root` itself when it already is that folder."""
    if (root / folder).is_dir():
        return root / folder
    if (root / first_file).is_file():
        return root
    raise DataError(
        f"{root / folder}: dataset directory not found "
        f"(expected the python-version CIFAR folder {folder}/)"
    )


def _load_cifar10(root: Path, split: str) -> ArrayDataset:
    directory = _cifar_directory(root, "cifar-10-batches-py", "data_batch_1")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    batches = [_load_cifar_batch(directory / f, b"labels", 10) for f in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), 10, "cifar10")


def _load_cifar100(root: Path, split: str) -> ArrayDataset:
    directory = _cifar_directory(root, "cifar-100-python", "train")
    images, labels = _load_cifar_batch(directory / split, b"fine_labels", 100)
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), 100, "cifar100")


# ---------------------------------------------------------------------------------------------
# SVHN .mat files and scikit-learn digits


def _load_svhn(root: Path, split: str) -> ArrayDataset:
    import scipy.io  # deferred: only SVHN needs it

    if not root.is_dir():
        raise DataError(
            f"{root}: dataset directory not found (expected SVHN train_32x32.mat, test_32x32.mat)"
        )
    path = root / f"{split}_32x32.mat"
    expected = "expected an SVHN .mat with X 32×32×3×N uint8 and y N×1 labels 1..10"
    if not path.is_file():
        raise DataError(f"{path}: file not found ({expected})")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises many unrelated types for corrupt files
        raise DataError(f"{path}: unreadable .mat file ({one_line(error)}) ({expected})") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"{path}: unexpected contents ({expected})")
    labels = y.reshape(-1).astype(np.int64)
    if len(labels) != x.shape[3]:
        raise DataError(f"{path}: {len(labels)} labels for {x.shape[3]} images ({expected})")
    labels[labels == 10] = 0
    label_tensor = torch.from_numpy(labels)
    _check_label_range(label_tensor, 10, path)
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return ArrayDataset(images, label_tensor, 10, "svhn")


_DIGITS_TRAIN_SIZE = 1500


def _load_digits(split: str) -> ArrayDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits needs scikit-learn: pip install 'prunekit[digits]'") from None
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    part = slice(None, _DIGITS_TRAIN_SIZE) if split == "train" else slice(_DIGITS_TRAIN_SIZE, None)
    return ArrayDataset(
        torch.from_numpy(images[part]), torch.from_numpy(labels[part]), 10, "digits"
    )


_IN_MEMORY_DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits")


def load_dataset(name: str, root: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """Read a whole dataset split from local files into memory; nothing is ever downloaded."""
    if split not in ("train", "test", "extra") or (split == "extra" and name != "svhn"):
        raise ValueError(f"split must be 'train' or 'test' (or SVHN's 'extra'), got {split!r} for {name}")
    if name not in _IN_MEMORY_DATASETS:
        hint = " (imagenet is streamed from disk: use make_loader)" if name == "imagenet" else ""
        raise DataError(f"unknown dataset {name!r}{hint} (known: {', '.join(_IN_MEMORY_DATASETS)})")
    if name == "digits":
        return _load_digits(split)
    if root is None:
        if name not in _DEFAULT_ROOTS:
            raise DataError(f"{name}: no default location, pass root=<directory holding the files>")
        root = _DEFAULT_ROOTS[name]
    root = Path(root)
    if name == "fashion-mnist":
        return _load_idx_dataset(name, "Fashion-MNIST", root, split)
    if name == "mnist":
        return _load_idx_dataset(name, "MNIST", root, split)
    if name == "cifar10":
        return _load_cifar10(root, split)
    if name == "cifar100":
        return _load_cifar100(root, split)
    return _load_svhn(root, split)


# ---------------------------------------------------------------------------------------------
# Batched loaders


def _epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's generator, so a resumed run replays exactly the same batches."""
    return seed * 1_000_003 + epoch


class BatchLoader:
    """Batches of an in-memory dataset, shuffled, cropped, flipped and normalized on `device`.

    Augmentation works on whole batches (one gather), never image by image in Python.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int = 0,
        flip: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        channels_last: bool = False,
    ):
        channels = dataset.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean/std need {channels} values for {dataset.name}, got {len(mean)}/{len(std)}"
            )
        if batch_size < 1 or pad < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad batch_size={batch_size}, pad={pad}, rank={rank}, world_size={world_size}"
            )
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.num_classes = dataset.num_classes
        self.batch_size = batch_size
        self.train = train
        self.pad = pad if train else 0
        self.flip = flip and train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        std_tensor = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        mean_tensor = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std folded into one multiply and one subtract.
        self._scale = 1.0 / (255.0 * std_tensor)
        self._shift = mean_tensor / std_tensor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation draws the next iteration replays."""
        self.epoch = epoch

    def _shard_positions(self, n: int) -> torch.Tensor:
        """Positions in the epoch order that this rank reads.

        Training truncates to a multiple of world_size so all ranks step equally often;
        evaluation keeps every sample so the ranks together score each one exactly once.
        """
        usable = n - n % self.world_size if self.train else n
        return torch.arange(self.rank, usable, self.world_size)

    def __len__(self) -> int:
        n = len(self._shard_positions(len(self.labels)))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample indices, crop offsets and flip mask for the epoch, drawn on CPU."""
        n = len(self.labels)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=generator) if self.train else torch.arange(n)
        offsets = flips = None
        if self.pad:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        if self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        positions = self._shard_positions(n)
        return (
            order[positions].to(self.device),
            None if offsets is None else offsets[positions].to(self.device),
            None if flips is None else flips[positions].to(self.device),
        )

    def _crop_and_flip(
        self, x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Zero-pad, crop at per-image offsets and mirror flagged images, as one batch gather."""
        b, c, h, w = x.shape
        if offsets is not None:
            x = F.pad(x, (self.pad, self.pad, self.pad, self.pad))
            top, left = offsets[:, 0:1], offsets[:, 1:2]
        else:
            top = left = torch.zeros(b, 1, dtype=torch.long, device=x.device)
        rows = top + torch.arange(h, device=x.device)
        columns = torch.arange(w, device=x.device).expand(b, w)
        if flips is not None:
            columns = torch.where(flips[:, None], columns.flip(1), columns)
        columns = left + columns
        padded_width = x.shape[3]
        index = rows[:, :, None] * padded_width + columns[:, None, :]
        index = index.view(b, 1, h * w).expand(b, c, h * w)
        return torch.gather(x.reshape(b, c, -1), 2, index).view(b, c, h, w)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, offsets, flips = self._epoch_plan()
        for batch in range(len(self)):
            part = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            x = self.images[indices[part]]
            if offsets is not None or flips is not None:
                x = self._crop_and_flip(
                    x,
                    None if offsets is None else offsets[part],
                    None if flips is None else flips[part],
                )
            x = x.float().mul_(self._scale).sub_(self._shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[indices[part]]


def _load_rgb_image(path: str) -> Image.Image:
    """Open one image file as RGB, turning decoder failures into a DataError naming the file."""
    try:
        with open(path, "rb") as stream:
            return Image.open(stream).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(
            f"{path}: unreadable image ({one_line(error)}) (expected a JPEG or PNG file)"
        ) from None


def _unwrap_worker_message(error: DataError) -> str:
    """The original one-line message of a DataError re-raised by a DataLoader worker."""
    last_line = str(error).strip().splitlines()[-1]
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    return last_line[len(prefix):] if last_line.startswith(prefix) else last_line


_FOLDER_LAYOUT = "expected ImageNet-style class folders root/{train,val}/<class>/<image>"


def image_folder_classes(root: str | Path) -> list[str]:
    """The class names of an ImageNet-style folder: root/train's subfolders, sorted (torchvision's order)."""
    folder = Path(root) / "train"
    try:
        classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError as error:
        raise DataError(f"{folder}: image folder not readable ({one_line(error)}) ({_FOLDER_LAYOUT})") from None
    if not classes:
        raise DataError(f"{folder}: no class folders ({_FOLDER_LAYOUT})")
    return classes


def open_image_folder(root: str | Path, split: str, **kwargs):
    """torchvision's ImageFolder over root/train or root/val (alias test), with `kwargs`; val's classes
    must be train's, or a class folder missing from one would shift every later label."""
    from torchvision import datasets  # deferred: importing torchvision is slow

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train' or 'val' (alias 'test'), got {split!r}")
    folder = Path(root) / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found ({_FOLDER_LAYOUT})")
    try:
        images = datasets.ImageFolder(str(folder), **kwargs)
    except OSError as error:  # ImageFolder raises FileNotFoundError for empty folders
        raise DataError(f"{folder}: no usable images ({one_line(error)}) ({_FOLDER_LAYOUT})") from None
    if split != "train" and (Path(root) / "train").is_dir():
        train_classes = image_folder_classes(root)
        if images.classes != train_classes:
            differing = sorted(set(images.classes) ^ set(train_classes))
            raise DataError(f"{folder}: its class folders differ from {Path(root) / 'train'}'s "
                            f"({len(images.classes)} vs {len(train_classes)}; e.g. {differing[0][:60]!r})")
    return images


def subset_indices(n: int, size: int, seed: int) -> list[int]:
    """`size` of `n` sample positions drawn with `seed`, in order: in a class-sorted image folder the
    subset spans the classes, where the first `size` files would all be class 0."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:size].tolist())


class ImageFolderLoader:
    """ImageNet-style `root/{train,val}/<class>/<image>` streamed by a DataLoader.

    Same interface as BatchLoader; for datasets too large to hold in memory.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        batch_size: int,
        *,
        train: bool,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        subset: int | None = None,
        drop_last: bool | None = None,
        channels_last: bool = False,
    ):
        from torchvision import transforms  # deferred: importing torchvision is slow

        mean, std = DATASET_STATS["imagenet"]
        if train:
            crop = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        else:
            crop = [transforms.Resize(256), transforms.CenterCrop(224)]
        transform = transforms.Compose(
            [*crop, transforms.ToTensor(), transforms.Normalize(mean, std)]
        )
        images = open_image_folder(root, split, transform=transform, loader=_load_rgb_image)
        self.num_classes = len(images.classes)
        if subset is not None:
            images = torch.utils.data.Subset(images, subset_indices(len(images), subset, seed))
        self.dataset = images
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last = channels_last
        self.epoch = 0
        drop_last = train if drop_last is None else drop_last
        # One generator drives the shuffle (single process) and the per-worker augmentation seeds.
        self._generator = torch.Generator()
        if world_size > 1:
            self._sampler = torch.utils.data.DistributedSampler(
                self.dataset,
                num_replicas=world_size,
                rank=rank,
                shuffle=train,
                seed=seed,
                drop_last=train,
            )
        elif train:
            self._sampler = torch.utils.data.RandomSampler(self.dataset, generator=self._generator)
        else:
            self._sampler = torch.utils.data.SequentialSampler(self.dataset)
        self._loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self._sampler,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            generator=self._generator,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; its shuffle and worker augmentation seeds derive from (seed, epoch)."""
        self.epoch = epoch
        self._generator.manual_seed(_epoch_seed(self.seed, epoch) * self.world_size + self.rank)
        if isinstance(self._sampler, torch.utils.data.DistributedSampler):
            self._sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, labels in self._loader:
                x = x.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, labels.to(self.device, non_blocking=True)
        except DataError as error:
            # Dropping the traceback frees the worker iterator now; left to the cycle collector,
            # its shutdown waits out a 5 s join timeout.
            error.__traceback__ = None
            raise DataError(_unwrap_worker_message(error)) from None


def make_loader(
    name: str,
    root: str | Path | None,
    split: str,
    batch_size: int,
    *,
    train: bool,
    device: str | torch.device = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pad: int = 0,
    flip: bool = False,
    subset: int | None = None,
    num_workers: int = 2,
    channels_last: bool = False,
) -> BatchLoader | ImageFolderLoader:
    """The loader for a dataset name: in-memory BatchLoader, or ImageFolderLoader for imagenet."""
    if name == "imagenet":
        if root is None:
            raise DataError("imagenet: no default location, pass root=<directory with train/ val/>")
        return ImageFolderLoader(
            root,
            split,
            batch_size,
            train=train,
            device=device,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            subset=subset,
            channels_last=channels_last,
        )
    dataset = load_dataset(name, root, split)
    if subset is not None:
        dataset = dataset.subset(min(subset, len(dataset)))
    mean, std = DATASET_STATS[name]
    return BatchLoader(
        dataset,
        batch_size,
        train=train,
        mean=mean,
        std=std,
        pad=pad,
        flip=flip,
        device=device,
        seed=seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
