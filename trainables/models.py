"""Models the specs can name: one function per architecture, registered in MODELS.

Every model function takes the whole `model` settings section as keywords and ignores the
options it does not use, so `create_model(**spec["model"])` works for any of them.
"""

from collections.abc import Callable
from itertools import pairwise

import torch.nn as nn

ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "relu": lambda negative_slope: nn.ReLU(),
    "leaky_relu": nn.LeakyReLU,  # takes negative_slope as its first argument
    "tanh": lambda negative_slope: nn.Tanh(),
    "sigmoid": lambda negative_slope: nn.Sigmoid(),
}


def mlp(*, in_channels: int, num_classes: int, image_size: int, hidden_sizes: list[int],
        activation: str, negative_slope: float, **_ignored) -> nn.Module:
    """Fully connected net on flattened images; seed 004 is 784-500-250-100-10."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    sizes = [in_channels * image_size * image_size, *hidden_sizes]
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation](negative_slope)]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


def overparam_cnn(*, in_channels: int, num_classes: int, image_size: int, **_ignored) -> nn.Module:
    """Seed 003's MassiveCNN: 60,166,026 parameters at 1x28x28, most of them in the 4096-2048 head."""
    if image_size % 4:
        raise ValueError(f"overparam_cnn needs image_size divisible by 4 (two 2x2 pools), got {image_size}")

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        # ReLU before BatchNorm, the order the seed's notebook uses
        return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(), nn.BatchNorm2d(c_out)]

    return nn.Sequential(
        *block(in_channels, 64),
        *block(64, 128), nn.MaxPool2d(2),
        *block(128, 256), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256 * (image_size // 4) ** 2, 4096), nn.ReLU(),
        nn.Linear(4096, 2048), nn.ReLU(),
        nn.Linear(2048, num_classes),
    )


def alexnet(*, in_channels: int, num_classes: int, dropout: float, **_ignored) -> nn.Module:
    """torchvision's ImageNet AlexNet (no weights) with its first conv swapped for `in_channels`.

    Built for 224x224; the smallest input it accepts is 63x63 (62x62 pools down to nothing).
    """
    try:  # here: every `sweep` command imports this module, and torchvision takes ~1 s to import
        import torchvision
    except (ImportError, RuntimeError) as err:  # e.g. a torchvision built for another torch ("torchvision::nms")
        raise ImportError(f"alexnet is torchvision's model, and torchvision does not import here "
                          f"({str(err).strip().splitlines()[-1]})") from None

    net = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    net.features[0] = nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
    return net


def alexnet_cifar(*, in_channels: int, num_classes: int, image_size: int, dropout: float,
                  **_ignored) -> nn.Module:
    """AlexNet's widths (64-192-384-256-256 convs, 4096-4096 head) scaled down to 32x32 inputs.

    Seed 001 only says "Krizhevsky's specifications", so this is the usual CIFAR adaptation.

    The 11x11/4 stem and 3x3/2 pools would shrink 32x32 to nothing, so the stem is a 3x3/2
    conv and the pools are 2x2: 32 -> 16 -> 8 -> 4 -> 2.
    """
    if image_size % 16:
        raise ValueError(f"alexnet_cifar needs image_size divisible by 16, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(256 * (image_size // 16) ** 2, 4096), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, num_classes),
    )


def lenet_cifar(*, in_channels: int, num_classes: int, image_size: int, **_ignored) -> nn.Module:
    """LeNet-5 as in PyTorch's CIFAR tutorial: 69,656 parameters at 3x32x32 with 100 classes.

    Seed 001's authors evaluate their "AlexNet" checkpoints with this network (`BuMuNet` in their
    Inference.py), so it is the likely source of the published numbers.
    """
    side = ((image_size - 4) // 2 - 4) // 2  # two unpadded 5x5 convs, each followed by a 2x2 pool
    if side < 1:
        raise ValueError(f"lenet_cifar needs image_size >= 16, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "overparam_cnn": overparam_cnn,
    "alexnet": alexnet,
    "alexnet_cifar": alexnet_cifar,
    "lenet_cifar": lenet_cifar,
}


def xavier_init(model: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear and Conv (seeds 001 and 004)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


INITS: dict[str, Callable[[nn.Module], None]] = {
    "default": lambda model: None,  # keep PyTorch's own per-layer initialisation
    "xavier": xavier_init,
}


def create_model(name: str, *, in_channels: int, num_classes: int, image_size: int,
                 hidden_sizes: list[int] = (500, 250, 100), activation: str = "relu",
                 negative_slope: float = 0.01, dropout: float = 0.5,
                 init: str = "default") -> nn.Module:
    """Build the model `name` for images of in_channels x image_size x image_size."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    model = MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                         hidden_sizes=list(hidden_sizes), activation=activation,
                         negative_slope=negative_slope, dropout=dropout)
    INITS[init](model)
    return model
