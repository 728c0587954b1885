"""Images written to disk in torchvision's MNIST layout (raw IDX files), for the tests and
benchmarks/bench_performance.py: there is no internet here to download the real files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's raw idx format: magic (0x08 = ubyte, number of dims), big-endian dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write (images (N,1,28,28) or (N,28,28) uint8, labels) splits so `torchvision.datasets.MNIST(root)` reads them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images.reshape(len(images), 28, 28))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root
