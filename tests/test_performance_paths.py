"""The fast paths behind the benchmarks compute what the usual way computes: the on-device Loader gives the
batches of torchvision's per-sample pipeline, and each trial's torch threads follow the CPUs Ray gave it."""

import pytest
import ray
import torch
import torchvision
import torchvision.transforms.functional as TF
from mnist_files import write_mnist
from ray import tune
from torchvision import transforms

from trainables.data import Loader, load_dataset
from trainables.train import set_threads


def test_loader_gives_the_batches_of_torchvisions_per_sample_pipeline(tmp_path):
    """Values, labels and order over two shuffled epochs, with random crops and flips, image by image."""
    data = load_dataset("mnist5k", train_subset=300, val_split=0.2)  # 300 training images: a partial last batch
    write_mnist(tmp_path, train=(data.train_x, data.train_y), test=(data.val_x, data.val_y))
    mean, std = data.mean.ravel().tolist(), data.std.ravel().tolist()
    usual = torchvision.datasets.MNIST(str(tmp_path), train=True, download=False, transform=transforms.ToTensor())
    seed, pad, batch_size = 7, 3, 64
    loader = Loader(data.train_x, data.train_y, batch_size=batch_size, device="cpu", mean=data.mean, std=data.std,
                    shuffle=True, seed=seed, augment={"crop_padding": pad, "hflip": True})

    # The Loader's random draws, replayed: a permutation per epoch, then per batch crop offsets and flips.
    replay = torch.Generator().manual_seed(seed)
    for _ in range(2):
        order = torch.randperm(len(usual), generator=replay)
        batches = list(loader)
        assert len(batches) == 5 and [len(y) for _, y in batches] == [64, 64, 64, 64, 44]
        for index, (x, y) in zip(order.split(batch_size), batches):
            dy, dx = torch.randint(0, 2 * pad + 1, (2, len(index), 1), generator=replay)
            flip = torch.rand(len(index), generator=replay) < 0.5
            for i, k in enumerate(index.tolist()):
                image, label = usual[k]  # PIL -> ToTensor, as a torchvision user gets it
                image = TF.crop(TF.pad(image, pad), int(dy[i]), int(dx[i]), 28, 28)  # RandomCrop(28, padding=pad)
                image = TF.normalize(TF.hflip(image) if flip[i] else image, mean, std)
                torch.testing.assert_close(x[i], image, rtol=0, atol=1e-5)
                assert y[i].item() == label


def test_set_threads_outside_ray_keeps_torchs_setting_and_starts_nothing():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        set_threads()
        assert torch.get_num_threads() == 3 and not ray.is_initialized()
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_each_trial_gets_one_torch_thread_per_cpu_ray_gave_it(tmp_path):
    def report_threads(config):  # local, so Ray pickles it by value: workers cannot import test modules
        torch.set_num_threads(7)  # whatever the worker had before, set_threads must replace it
        set_threads()
        tune.report({"threads": torch.get_num_threads()})

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        # Resources per trial and actor reuse as sweeps.runner.build_tuner sets them.
        trainable = tune.with_resources(report_threads, lambda config: {"cpu": config["cpu"]})
        tuner = tune.Tuner(trainable, param_space={"cpu": tune.grid_search([2, 0.5, 1])},
                           tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
                           run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    threads = {(r.config["cpu"], r.metrics["threads"]) for r in results}
    assert not results.errors and threads == {(2, 2), (0.5, 1), (1, 1)}
