"""Datasets, splits, normalisation, the on-device Loader and batch augmentation, on real (embedded) data."""
import warnings

import numpy as np
import pytest
import torch
from mnist_files import write_mnist

from trainables.data import (
    DATASETS,
    SOURCES,
    STD_FLOOR,
    DataError,
    Loader,
    augment_batch,
    load_dataset,
    rotate,
    split_sizes,
)


def _rows(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


# --- datasets and splits ---------------------------------------------------------------------------

def test_mnist5k_splits_are_stratified_disjoint_and_complete():
    data = load_dataset("mnist5k", val_split=0.1)
    assert data.train_x.dtype == np.uint8 and data.train_y.dtype == np.int64
    assert data.train_x.shape[1:] == (1, 28, 28) and data.num_classes == 10 and len(data.classes) == 10
    # 20% held out as test (100/class), then 10% of the rest as validation (40/class).
    assert np.bincount(data.train_y).tolist() == [360] * 10
    assert np.bincount(data.val_y).tolist() == [40] * 10
    assert np.bincount(data.test_y).tolist() == [100] * 10
    train, val, test = _rows(data.train_x), _rows(data.val_x), _rows(data.test_x)
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 5000  # the 5,000 embedded images are all distinct
    assert data.note == ""


def test_split_seed_fixes_the_split():
    a, b = load_dataset("mnist5k", split_seed=0), load_dataset("mnist5k", split_seed=0)
    c = load_dataset("mnist5k", split_seed=1)
    assert np.array_equal(a.test_x, b.test_x) and np.array_equal(a.val_x, b.val_x)
    assert _rows(a.test_x) != _rows(c.test_x) and _rows(a.val_x) != _rows(c.val_x)


def test_train_subset_is_stratified_and_test_can_serve_as_validation():
    data = load_dataset("mnist5k", train_subset=1000, val_split="test")
    assert np.bincount(data.train_y).tolist() == [100] * 10
    assert len(data.val_y) == 1000 and data.test_x is None and data.test_y is None
    assert not _rows(data.train_x) & _rows(data.val_x)


def test_eval_subset_draws_validation_and_test_stratified_from_the_same_splits():
    full, small = load_dataset("mnist5k"), load_dataset("mnist5k", eval_subset=200)
    assert len(small.val_y) == len(small.test_y) == 200 and np.array_equal(small.train_x, full.train_x)
    assert np.bincount(small.val_y).tolist() == np.bincount(small.test_y).tolist() == [20] * 10
    val_rows = {row.tobytes() for row in full.val_x}
    assert all(row.tobytes() in val_rows for row in small.val_x), "a subset of the validation split, no other image"
    assert np.array_equal(load_dataset("mnist5k", eval_subset=200).val_x, small.val_x), "the same for every trial"
    assert len(load_dataset("mnist5k", eval_subset=10**6).val_y) == len(full.val_y), "at most all of them"


def test_train_subset_counts_training_images_and_leaves_validation_alone():
    # One meaning everywhere (data section and arms): the number of images trials train on, drawn after
    # the validation split, which stays the same whatever the subset.
    full, small = load_dataset("mnist5k", val_split=0.1), load_dataset("mnist5k", val_split=0.1, train_subset=2000)
    assert len(small.train_y) == 2000 and np.bincount(small.train_y).tolist() == [200] * 10
    assert np.array_equal(small.val_x, full.val_x) and np.array_equal(small.test_x, full.test_x)
    assert _rows(small.train_x) <= _rows(full.train_x)
    with pytest.raises(DataError, match="train_subset=3601 is larger than the training split .3600 images after"):
        load_dataset("mnist5k", val_split=0.1, train_subset=3601)


@pytest.mark.parametrize("name", ["mnist5k", "digits", "synthetic"])
@pytest.mark.parametrize("val_split", [0.1, 0.15, 0.2, "test"])
def test_what_validation_knows_of_a_dataset_is_what_loading_gives(name, val_split):
    # `sweep validate` checks models and subsets against SOURCES without decoding anything.
    data = load_dataset(name, val_split=val_split)
    assert split_sizes(name, val_split=val_split) == (len(data.train_y), len(data.val_y))
    source = SOURCES[name]
    assert data.train_x.shape[1:] == source.shape and data.num_classes == source.num_classes


def test_digits_loads_as_uint8_images():
    data = load_dataset("digits")
    assert data.train_x.shape[1:] == (1, 8, 8) and data.train_x.max() == 255
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 1797


def test_synthetic_is_deterministic_and_learnable():
    train_x, train_y, test_x, test_y, classes = DATASETS["synthetic"](None, False)
    assert train_x.shape == (2000, 1, 28, 28) and test_x.shape == (500, 1, 28, 28) and len(classes) == 10
    assert np.array_equal(train_x, DATASETS["synthetic"](None, False)[0])
    # Nearest class mean already separates the classes: a network has a signal to learn in a smoke run.
    means = np.stack([train_x[train_y == k].reshape(-1, 784).mean(0) for k in range(10)])
    distances = ((test_x.reshape(-1, 1, 784) - means[None]) ** 2).sum(-1)
    assert (distances.argmin(1) == test_y).mean() > 0.9


def test_torchvision_files_on_disk_are_decoded_to_nchw(tmp_path):
    images, labels, *_ = DATASETS["mnist5k"](None, False)  # real digits written in torchvision's MNIST layout
    write_mnist(tmp_path, train=(images[:400], labels[:400]), test=(images[400:500], labels[400:500]))
    data = load_dataset("mnist", data_dir=str(tmp_path), val_split="test", normalize="none")
    assert data.note == "" and data.classes[0] == "0 - zero" and data.test_x is None
    np.testing.assert_array_equal(data.train_x, images[:400])
    np.testing.assert_array_equal(data.train_y, labels[:400])
    np.testing.assert_array_equal(data.val_x, images[400:500])


def test_missing_torchvision_files_raise_naming_dataset_and_directory(tmp_path):
    with pytest.raises(DataError, match="cifar10") as error:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value) and "download" in str(error.value)


def test_data_dir_defaults_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "from-env"))
    with pytest.raises(DataError, match="from-env"):
        load_dataset("mnist")


def test_standin_replaces_missing_files_with_the_same_shape(tmp_path):
    data = load_dataset("cifar100", data_dir=str(tmp_path), allow_standin=True)
    assert data.train_x.shape[1:] == (3, 32, 32) and data.num_classes == 100
    assert "synthetic" in data.note and str(tmp_path) in data.note
    mnist = load_dataset("mnist", data_dir=str(tmp_path), allow_standin=True, val_split="test")
    assert mnist.train_x.shape[1:] == (1, 28, 28) and mnist.num_classes == 10 and mnist.test_x is None


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "imagenet"}, "valid names: mnist5k, digits, mnist, fashion_mnist, cifar10, cifar100, synthetic"),
    ({"name": "mnist5k", "val_split": 1.5}, "val_split"),
    ({"name": "mnist5k", "val_split": "train"}, "val_split"),
    ({"name": "mnist5k", "normalize": "batch"}, "normalize"),
    ({"name": "mnist5k", "train_subset": 4001}, "larger than the training split"),
    ({"name": "mnist5k", "train_subset": 5}, "train_subset=5"),  # fewer images than classes
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_dataset(**kwargs)


# --- normalisation ---------------------------------------------------------------------------------

def test_channel_and_pixel_normalisation_match_numpy_on_the_training_split():
    data = load_dataset("cifar10", data_dir="/nonexistent", allow_standin=True, normalize="channel")
    x = data.train_x.astype(np.float64) / 255
    assert data.mean.shape == (3, 1, 1) and data.mean.dtype == np.float32
    np.testing.assert_allclose(data.mean, x.mean((0, 2, 3))[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(data.std, x.std((0, 2, 3))[:, None, None], rtol=1e-5)

    data = load_dataset("mnist5k", normalize="pixel")
    x = data.train_x.astype(np.float64) / 255
    expected_std = x.std(0)
    constant = expected_std == 0
    assert constant.any()  # MNIST's border pixels are constant: they must not divide by zero
    floor = STD_FLOOR * expected_std[~constant].mean()
    assert (expected_std[~constant] < floor).any()  # and some barely vary: they are floored
    expected_std = np.where(constant, 1.0, np.maximum(expected_std, floor))
    np.testing.assert_allclose(data.mean, x.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(data.std, expected_std, rtol=1e-5)

    data = load_dataset("mnist5k", normalize="none")
    assert (data.mean == 0).all() and (data.std == 1).all()


def test_pixel_normalisation_keeps_held_out_images_in_a_sane_range():
    # Without the floor a pixel with std 4e-4 in training turns one stroke on the test split into z of ~460.
    data = load_dataset("mnist5k", normalize="pixel")
    z = (data.test_x.astype(np.float32) / 255 - data.mean) / data.std
    assert np.abs(z).max() < 50  # 43 here


# --- Loader ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_like():
    data = load_dataset("cifar10", data_dir="/nonexistent", allow_standin=True)
    data.train_x.setflags(write=False)  # as arrays arrive from Ray's object store
    return data


def _batches(loader: Loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_matches_a_numpy_reference_over_two_epochs(cifar_like):
    data, seed, batch_size = cifar_like, 3, 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only array must not trigger torch's non-writable warning
        loader = Loader(data.train_x, data.train_y, batch_size=batch_size, device="cpu", mean=data.mean,
                        std=data.std, shuffle=True, seed=seed)
    reference_generator = torch.Generator().manual_seed(seed)
    for _ in range(2):  # each epoch draws a new permutation from the same generator
        order = torch.randperm(len(data.train_y), generator=reference_generator).numpy()
        got = list(loader)
        assert len(got) == len(loader) == -(-len(order) // batch_size)
        for start, (x, y) in zip(range(0, len(order), batch_size), got):
            index = order[start:start + batch_size]
            expected = (data.train_x[index].astype(np.float32) / 255 - data.mean) / data.std
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(y.numpy(), data.train_y[index])


def test_loader_seed_decides_the_order_and_unshuffled_keeps_it(cifar_like):
    data = cifar_like

    def make(**kw) -> Loader:
        return Loader(data.train_x, data.train_y, batch_size=500, device="cpu", mean=data.mean, std=data.std, **kw)

    first, again, other = (_batches(make(shuffle=True, seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    in_order = torch.cat([y for _, y in make(shuffle=False)])
    np.testing.assert_array_equal(in_order.numpy(), data.train_y)


def test_loader_resumes_from_a_saved_generator_state(cifar_like):
    data = cifar_like
    kw = dict(batch_size=256, device="cpu", mean=data.mean, std=data.std, shuffle=True,
              augment={"crop_padding": 2, "hflip": True})
    uninterrupted = Loader(data.train_x, data.train_y, seed=5, **kw)
    list(uninterrupted)  # epoch 1
    state = uninterrupted.generator.get_state()  # what a checkpoint after epoch 1 keeps
    resumed = Loader(data.train_x, data.train_y, seed=999, **kw)
    resumed.generator.set_state(state)
    for (x, y), (x_resumed, y_resumed) in zip(_batches(uninterrupted), _batches(resumed)):
        assert torch.equal(x, x_resumed) and torch.equal(y, y_resumed)


def test_loader_last_partial_batch_resize_and_channels_last(cifar_like):
    data = cifar_like  # 1,800 training images
    loader = Loader(data.train_x, data.train_y, batch_size=256, device="cpu", mean=data.mean, std=data.std,
                    resize=48, channels_last=True)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == 8 and sizes == [256] * 7 + [1800 - 7 * 256] and loader.num_samples == 1800
    x, _ = next(iter(loader))
    assert x.shape == (256, 3, 48, 48) and x.is_contiguous(memory_format=torch.channels_last)


def test_loader_augmentation_is_reproducible_and_changes_the_images(cifar_like):
    data = cifar_like
    augment = {"crop_padding": 4, "hflip": True, "rotation": 15.0}

    def first_batch(seed: int, augment: dict | None) -> torch.Tensor:
        loader = Loader(data.train_x, data.train_y, batch_size=32, device="cpu", mean=data.mean, std=data.std,
                        augment=augment, seed=seed)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(0, augment), first_batch(0, augment))
    assert not torch.equal(first_batch(0, augment), first_batch(1, augment))
    assert not torch.equal(first_batch(0, augment), first_batch(0, None))
    assert torch.equal(first_batch(0, {"crop_padding": 0, "hflip": False}), first_batch(0, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_on_gpu_gives_the_cpu_batches(cifar_like):
    data = cifar_like
    kw = dict(batch_size=100, mean=data.mean, std=data.std, augment={"crop_padding": 4, "hflip": True},
              shuffle=True, seed=0, resize=64)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(Loader(data.train_x, data.train_y, device="cpu", **kw),
                                              Loader(data.train_x, data.train_y, device="cuda", **kw)):
        assert x_gpu.is_cuda and y_gpu.is_cuda
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=1e-4, atol=1e-4)
        assert torch.equal(y_gpu.cpu(), y_cpu)


# --- augment_batch ---------------------------------------------------------------------------------

def _replay(generator_state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(generator_state)
    return generator


def test_crop_moves_a_bright_pixel_by_each_images_own_offset():
    batch, pad = 32, 3
    x = torch.zeros(batch, 2, 12, 12)
    x[:, :, 6, 5] = 1.0
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    out = augment_batch(x, crop_padding=pad, generator=generator)
    # RandomCrop semantics: pad by `pad`, then cut a window at offset (dy, dx) in [0, 2*pad].
    dy, dx = torch.randint(0, 2 * pad + 1, (2, batch), generator=_replay(state))
    assert out.shape == x.shape and len(set(zip(dy.tolist(), dx.tolist()))) > 1
    for i in range(batch):
        expected = torch.zeros(2, 12, 12)
        expected[:, 6 + pad - dy[i], 5 + pad - dx[i]] = 1.0
        assert torch.equal(out[i], expected)


def test_flip_mirrors_exactly_the_drawn_images():
    x = torch.rand(64, 3, 5, 7)
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    out = augment_batch(x, hflip=True, generator=generator)
    flipped = torch.rand(64, generator=_replay(state)) < 0.5
    assert 0 < flipped.sum() < 64
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(2, 3, 9, 9)
    out = rotate(x, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(1, 2)), atol=1e-5, rtol=0)  # counter-clockwise
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, dims=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, torch.zeros(2)), x, atol=1e-6, rtol=0)


def test_rotation_keeps_non_square_images_rigid():
    x = torch.zeros(1, 1, 7, 11)
    x[0, 0, 3, 7] = 1.0  # two pixels right of the centre (3, 5)
    out = rotate(x, torch.tensor([90.0]))
    assert (out[0, 0] > 0.99).nonzero().tolist() == [[1, 5]]  # now two pixels above it


def test_augment_rotation_draws_one_angle_per_image_within_range():
    x = torch.rand(16, 1, 10, 10)
    generator = torch.Generator().manual_seed(2)
    state = generator.get_state()
    out = augment_batch(x, rotation=20.0, generator=generator)
    angles = (torch.rand(16, generator=_replay(state)) * 2 - 1) * 20.0
    assert angles.abs().max() <= 20.0 and angles.unique().numel() == 16
    torch.testing.assert_close(out, rotate(x, angles))
