import math

import pytest
import torch
import torch.nn as nn

from trainables.optim import add_l2_penalty_grad, create_loss, create_optimizer, create_schedule


def params():
    return nn.Linear(3, 2).parameters()


@pytest.mark.parametrize("settings, cls, expected", [
    ({"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
     torch.optim.SGD, {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
    ({"optimizer": "rmsprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "weight_decay": 1e-4},
     torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "weight_decay": 1e-4}),
    ({"optimizer": "adam", "lr": 1e-3, "betas": [0.8, 0.99], "eps": 1e-7},
     torch.optim.Adam, {"lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.0}),
    ({"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4},
     torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4}),
])
def test_optimizer_class_and_hyperparameters_land_in_param_groups(settings, cls, expected):
    # keys meant for other parts of the trainer (schedule, loss) are ignored
    opt = create_optimizer(params(), **settings, schedule="cosine", loss="mse")
    assert type(opt) is cls
    (group,) = opt.param_groups
    assert {key: group[key] for key in expected} == expected


def test_nesterov_without_momentum_is_a_clear_error():
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        create_optimizer(params(), optimizer="sgd", lr=0.1, nesterov=True)


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; valid: sgd, rmsprop, adam, adamw"):
        create_optimizer(params(), optimizer="lion", lr=0.1)


def lrs_over_epochs(n_epochs: int, base_lr: float, **schedule_settings) -> list[float]:
    """The lr each epoch trains with, stepping the schedule once per epoch like the trainer."""
    opt = create_optimizer(params(), optimizer="sgd", lr=base_lr)
    schedule = create_schedule(opt, **schedule_settings)
    lrs = []
    for _ in range(n_epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


def test_multistep_seed_001_milestones_150_and_200():
    lrs = lrs_over_epochs(300, 0.01, schedule="multistep", milestones=[150, 200], gamma=0.1)
    assert lrs[0] == lrs[149] == 0.01
    assert lrs[150] == pytest.approx(1e-3) and lrs[199] == pytest.approx(1e-3)
    assert lrs[200] == pytest.approx(1e-4) and lrs[299] == pytest.approx(1e-4)


def test_step_seed_003_halves_every_10_epochs():
    lrs = lrs_over_epochs(30, 0.02, schedule="step", step_size=10, gamma=0.5)
    assert lrs == pytest.approx([0.02 * 0.5 ** (epoch // 10) for epoch in range(30)])


def test_exponential_multiplies_every_epoch():
    lrs = lrs_over_epochs(5, 0.1, schedule="exponential", gamma=0.9)
    assert lrs == pytest.approx([0.1 * 0.9 ** epoch for epoch in range(5)])


def test_cosine_anneals_to_zero_over_epochs():
    lrs = lrs_over_epochs(11, 0.1, schedule="cosine", epochs=10)
    assert lrs[0] == 0.1
    assert lrs[5] == pytest.approx(0.05)
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * epoch / 10)) for epoch in range(11)])


def test_no_schedule_is_none_and_bad_settings_are_errors():
    opt = create_optimizer(params(), optimizer="sgd", lr=0.1)
    assert create_schedule(opt) is None
    assert create_schedule(opt, schedule="none", milestones=[5]) is None
    with pytest.raises(ValueError, match="needs milestones"):
        create_schedule(opt, schedule="multistep")
    valid = "none, multistep, step, exponential, cosine"
    with pytest.raises(ValueError, match=f"unknown schedule 'linear'; valid: {valid}"):
        create_schedule(opt, schedule="linear")


def test_mse_on_softmax_hand_example():
    # softmax rows [0.5, 0.5] (label 0) and [0.75, 0.25] (label 1):
    # (0.25 + 0.25) and (0.5625 + 0.5625), summed over classes, averaged over the batch
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss = create_loss("mse")(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((0.5 + 1.125) / 2)


def test_cross_entropy_hand_example():
    loss = create_loss("cross_entropy")(torch.zeros(2, 4), torch.tensor([0, 3]))
    assert loss.item() == pytest.approx(math.log(4))


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid: cross_entropy, mse"):
        create_loss("hinge")


def test_add_l2_penalty_grad_matches_autograd_of_explicit_penalty():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    penalised, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(penalised.state_dict())
    l2 = 0.05

    nn.functional.cross_entropy(penalised(x), y).backward()
    add_l2_penalty_grad(penalised.parameters(), l2)

    penalty = sum(p.pow(2).sum() for p in reference.parameters())  # weights and biases
    (nn.functional.cross_entropy(reference(x), y) + l2 * penalty).backward()

    for got, want in zip(penalised.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_add_l2_penalty_grad_skips_parameters_without_grad():
    layer = nn.Linear(2, 2)
    add_l2_penalty_grad(layer.parameters(), 0.1)
    assert layer.weight.grad is None and layer.bias.grad is None
