"""Shared fixtures: tiny datasets written in the real idx format."""
import gzip
import struct

import numpy as np
import pytest


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory):
    """A Fashion-MNIST-format directory with 96 training and 48 test images whose class is learnable."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("t10k", 48)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, y in enumerate(labels):
            images[i, 2 * y:2 * y + 6, 4:24] = 250
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images, 0x803)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels, 0x801)
    return root
