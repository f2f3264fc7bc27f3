"""Shared fixtures: tiny datasets written in the real idx format (by bench/faults.py's writers, which
the fault campaign uses too)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from faults import write_tiny_fashion_mnist  # noqa: E402


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory):
    """A Fashion-MNIST-format directory with 96 training and 48 test images whose class is learnable."""
    root = tmp_path_factory.mktemp("fmnist")
    write_tiny_fashion_mnist(root)
    return root
