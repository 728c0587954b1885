import math

import pytest
import torch
import torch.nn as nn
import torchvision

from trainables.models import MODELS, create_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@pytest.mark.parametrize("name, in_channels, image_size, num_classes", [
    ("mlp", 1, 28, 10),
    ("overparam_cnn", 1, 28, 10),
    ("alexnet", 1, 224, 10),
    ("alexnet_cifar", 3, 32, 100),
    ("lenet_cifar", 3, 32, 100),
])
def test_output_shape_at_natural_input_size(name, in_channels, image_size, num_classes):
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_mlp_is_seed_004_784_500_250_100_10():
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=28)
    expected = linear(784, 500) + linear(500, 250) + linear(250, 100) + linear(100, 10)
    assert n_params(model) == expected == 784 * 500 + 500 + 500 * 250 + 250 + 250 * 100 + 100 + 100 * 10 + 10


def test_mlp_hidden_sizes_and_activation():
    model = create_model("mlp", in_channels=3, num_classes=4, image_size=8, hidden_sizes=[16],
                         activation="leaky_relu", negative_slope=0.2)
    assert n_params(model) == linear(3 * 8 * 8, 16) + linear(16, 4)
    (act,) = [m for m in model if isinstance(m, nn.LeakyReLU)]
    assert act.negative_slope == 0.2
    for activation, cls in [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid)]:
        model = create_model("mlp", in_channels=1, num_classes=10, image_size=4, activation=activation)
        assert sum(isinstance(m, cls) for m in model) == 3


def test_overparam_cnn_matches_seed_003_parameter_count():
    model = create_model("overparam_cnn", in_channels=1, num_classes=10, image_size=28)
    batchnorms = 2 * (64 + 128 + 256)
    expected = (conv(1, 64, 3) + conv(64, 128, 3) + conv(128, 256, 3) + batchnorms
                + linear(256 * 7 * 7, 4096) + linear(4096, 2048) + linear(2048, 10))
    assert n_params(model) == expected == 60_166_026  # the count the seed's notebook prints


def test_overparam_cnn_other_sizes_and_channels():
    model = create_model("overparam_cnn", in_channels=3, num_classes=5, image_size=16)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match="divisible by 4"):
        create_model("overparam_cnn", in_channels=1, num_classes=10, image_size=30)


def test_alexnet_is_torchvision_layout_with_swapped_input_and_output():
    model = create_model("alexnet", in_channels=1, num_classes=10, image_size=224, dropout=0.3)
    imagenet = n_params(torchvision.models.alexnet())  # 3 channels, 1000 classes
    first_conv_saved = (3 - 1) * 64 * 11 * 11
    last_linear_saved = (1000 - 10) * 4096 + (1000 - 10)
    assert n_params(model) == imagenet - first_conv_saved - last_linear_saved
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]


def test_alexnet_runs_down_to_63_pixels():
    model = create_model("alexnet", in_channels=1, num_classes=10, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)
        assert model(torch.randn(1, 1, 63, 63)).shape == (1, 10)
        with pytest.raises(RuntimeError, match="too small"):
            model(torch.randn(1, 1, 62, 62))


def test_alexnet_cifar_parameter_count():
    model = create_model("alexnet_cifar", in_channels=3, num_classes=100, image_size=32)
    expected = (conv(3, 64, 3) + conv(64, 192, 3) + conv(192, 384, 3) + conv(384, 256, 3)
                + conv(256, 256, 3) + linear(256 * 2 * 2, 4096) + linear(4096, 4096) + linear(4096, 100))
    assert n_params(model) == expected
    with pytest.raises(ValueError, match="divisible by 16"):
        create_model("alexnet_cifar", in_channels=3, num_classes=100, image_size=28)


def test_lenet_cifar_is_seed_001_bumunet_parameter_count():
    model = create_model("lenet_cifar", in_channels=3, num_classes=100, image_size=32)
    expected = conv(3, 6, 5) + conv(6, 16, 5) + linear(16 * 5 * 5, 120) + linear(120, 84) + linear(84, 100)
    assert n_params(model) == expected == 69_656
    smallest = create_model("lenet_cifar", in_channels=3, num_classes=100, image_size=16)
    assert smallest(torch.randn(1, 3, 16, 16)).shape == (1, 100)
    with pytest.raises(ValueError, match="image_size >= 16"):
        create_model("lenet_cifar", in_channels=3, num_classes=100, image_size=15)


@pytest.mark.parametrize("name", list(MODELS))
def test_xavier_init_zero_biases_and_weights_within_bound(name):
    size = {"alexnet": 64, "alexnet_cifar": 32, "lenet_cifar": 32}.get(name, 28)
    model = create_model(name, in_channels=1, num_classes=10, image_size=size, init="xavier")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers
    for layer in layers:
        receptive_field = layer.weight[0, 0].numel()  # 1 for Linear, k*k for Conv2d
        fan_out, fan_in = (n * receptive_field for n in layer.weight.shape[:2])
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert torch.all(layer.bias == 0)
        assert layer.weight.abs().max() <= bound
        # PyTorch's default bound 1/sqrt(fan_in) is well below this: the init really ran
        assert layer.weight.abs().max() > 0.9 * bound


def test_default_init_keeps_pytorch_biases():
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=28)
    assert model[1].bias.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "resnet"}, "unknown model 'resnet'; valid: mlp, overparam_cnn, alexnet, alexnet_cifar, lenet_cifar"),
    ({"name": "mlp", "activation": "gelu"},
     "unknown activation 'gelu'; valid: relu, leaky_relu, tanh, sigmoid"),
    ({"name": "mlp", "init": "kaiming"}, "unknown init 'kaiming'; valid: default, xavier"),
])
def test_unknown_names_list_the_valid_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**kwargs, in_channels=1, num_classes=10, image_size=28)
