"""Packed trials: K trials of one architecture trained as one vectorised model, each with its own settings.

A small model leaves a GPU (or a CPU core's vector units) mostly idle; K of them stacked along a new first
dimension keep it busy with the same number of kernel launches (HFTA, Wang et al., MLSys 2021). Each layer's
weights are stacked: a Linear becomes one batched matmul (`baddbmm`), a Conv2d one grouped convolution with K
groups, and element-wise layers and pools act on the stacked activations as they are. The members' losses are
summed, so one backward pass gives every member the gradient of its own loss, and `PackedOptimizer` steps every
member with its own learning rate, weight decay, momentum, betas, eps and L2 penalty, as torch.optim would.

Between epochs each member is an ordinary `trainables.train.Trial` (its nn.Module, torch optimizer, schedule
and Loader): an epoch stacks their tensors, trains, and writes them back, so checkpoints, schedules,
evaluation and reports are the unpacked trial's own code and a packed member's checkpoint resumes unpacked too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)  # any layout
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # per channel, on (B, K*C, H, W)

# Settings each member has for itself; every other setting must match for trials to share a pack.
MEMBER_SETTINGS = {"train.seed", "train.epochs", "train.report_every", "train.checkpoint_every", "optim.lr",
                   "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.betas", "optim.eps",
                   "optim.alpha", "optim.l2_penalty", "optim.schedule", "optim.milestones", "optim.gamma",
                   "optim.step_size"}


def unpackable(model: nn.Module) -> str | None:
    """Why `model` cannot be packed, or None when it can: a sequence of Linear, Conv2d, element-wise, pooling and
    Flatten layers."""
    if not isinstance(model, nn.Sequential):
        return f"{type(model).__name__} is not a sequence of layers"
    for layer in model:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            return (f"it has a {type(layer).__name__} layer, whose running statistics would be shared by the "
                    "members of a pack")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            return f"a Conv2d pads with {layer.padding_mode!r}"
        if isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
            return "a Flatten keeps more than the batch dimension"
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.Flatten, *ELEMENTWISE, *POOLS)):
            return f"it has a {type(layer).__name__} layer"
    return None


def pack_key(settings: dict[str, dict[str, Any]]) -> str:
    """What trials must share to train in one pack: every setting but the members' own (MEMBER_SETTINGS)."""
    shared = {section: {k: v for k, v in values.items() if f"{section}.{k}" not in MEMBER_SETTINGS}
              for section, values in settings.items()}
    return json.dumps(shared, sort_keys=True, default=str)


def _packed_layout(layer: nn.Module, name: str) -> bool:
    """Whether a member's tensor is transposed in the pack: a Linear's weight is kept (in, out), so that the
    batched matmul reads it without a transposed copy (1.3x faster on a CPU here)."""
    return isinstance(layer, nn.Linear) and name == "weight"


class PackedModel(nn.Module):
    """K same-shaped `nn.Sequential` models as one: `forward` takes (K, B, C, H, W), or a shared (B, C, H, W)
    batch, and returns (K, B, classes). Activations are (K, B, F) between Linear layers and (B, K*C, H, W)
    between convolutions (the layout of a grouped convolution)."""

    def __init__(self, models: Sequence[nn.Sequential]):
        super().__init__()
        self.k = len(models)
        self.layers = models[0]  # the template: its parameter-free layers run as they are
        # One stacked tensor per member parameter, in `parameters()` order: (tensor, its layer, transposed).
        self.slots = [(layer, _packed_layout(layer, name)) for layer in models[0]
                      for name, _ in layer.named_parameters(recurse=False)]
        self.members = [list(m.parameters()) for m in models]
        with torch.no_grad():
            self.stacked = [torch.stack([self._in(m[i], i) for m in self.members]).requires_grad_()
                            for i in range(len(self.slots))]

    def _in(self, tensor: torch.Tensor, slot: int) -> torch.Tensor:
        """A member's tensor (a parameter or its optimizer state) as the pack holds it."""
        return tensor.detach().transpose(0, 1) if self.slots[slot][1] else tensor.detach()

    def _out(self, tensor: torch.Tensor, slot: int) -> torch.Tensor:
        return tensor.transpose(0, 1) if self.slots[slot][1] else tensor

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each member's trained weights back into its own model."""
        for i, stacked in enumerate(self.stacked):
            for k, member in enumerate(self.members):
                member[i].copy_(self._out(stacked[k], i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # one batch for every member (evaluation)
            x = x.expand(self.k, *x.shape)
        h, layout = x, "member"  # (K, B, C, H, W)
        params = iter(self.stacked)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                h, layout = self._flat(h, layout), "flat"
                weight = next(params)
                h = torch.baddbmm(next(params).unsqueeze(1), h, weight) if layer.bias is not None else h @ weight
            elif isinstance(layer, nn.Conv2d):
                h, layout = self._grouped(h, layout), "grouped"
                weight, bias = next(params), next(params) if layer.bias is not None else None
                h = F.conv2d(h, weight.flatten(0, 1), bias.flatten() if bias is not None else None, layer.stride,
                             layer.padding, layer.dilation, groups=self.k * layer.groups)
            elif isinstance(layer, nn.Flatten):
                h, layout = self._flat(h, layout), "flat"
            elif isinstance(layer, POOLS):
                h, layout = layer(self._grouped(h, layout)), "grouped"
            else:  # element-wise: a dropout mask drawn over the whole tensor differs from member to member
                h = layer(h)
        return self._flat(h, layout)

    def _flat(self, h: torch.Tensor, layout: str) -> torch.Tensor:
        """(K, B, features), each member's features in nn.Flatten's order."""
        if layout == "grouped":  # (B, K*C, H, W)
            return h.reshape(h.shape[0], self.k, -1).transpose(0, 1)
        return h.flatten(2) if layout == "member" else h

    def _grouped(self, h: torch.Tensor, layout: str) -> torch.Tensor:
        """(B, K*C, H, W): member k's channels are the k-th block, as a grouped convolution reads them."""
        if layout == "member":  # (K, B, C, H, W)
            return h.transpose(0, 1).flatten(1, 2)
        if layout == "flat":
            raise ValueError("a packed model cannot go from Linear layers back to images")
        return h


class PackedOptimizer:
    """One step of K members' optimizers at once, each with its own hyperparameters, matching torch.optim's sgd
    (momentum, nesterov), rmsprop, adam and adamw step for step: their single-tensor algorithms, with every
    scalar a per-member tensor. States come from the members' torch optimizers and go back to them
    (`write_back`) in torch's own format, so a member's checkpoint is an ordinary trial's."""

    def __init__(self, model: PackedModel, optimizers: Sequence[torch.optim.Optimizer], kind: str,
                 l2_penalties: Sequence[float]):
        self.model, self.optimizers, self.kind = model, list(optimizers), kind
        groups = [opt.param_groups[0] for opt in self.optimizers]
        device = model.stacked[0].device

        def per_member(values) -> torch.Tensor:  # float64: torch computes these scalars in Python doubles
            return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)

        self.lr = per_member(g["lr"] for g in groups)
        self.weight_decay = per_member(g["weight_decay"] for g in groups)
        self.l2_penalty = per_member(l2_penalties)
        self.momentum = per_member(g.get("momentum", 0.0) for g in groups)
        self.nesterov = torch.tensor([bool(g.get("nesterov", False)) for g in groups], device=device)
        self.eps = per_member(g.get("eps", 0.0) for g in groups)
        self.alpha = per_member(g.get("alpha", 0.0) for g in groups)
        self.beta1 = per_member(g.get("betas", (0.0, 0.0))[0] for g in groups)
        self.beta2 = per_member(g.get("betas", (0.0, 0.0))[1] for g in groups)
        # The state torch keeps per parameter (absent before a member's first step: zeros, step 0).
        self.keys = {"sgd": ["momentum_buffer"], "rmsprop": ["square_avg", "momentum_buffer"],
                     "adam": ["exp_avg", "exp_avg_sq"], "adamw": ["exp_avg", "exp_avg_sq"]}[kind]
        self.state = [{key: self._stack(i, key) for key in self.keys} for i in range(len(model.stacked))]
        self.steps = [per_member(float(opt.state[m[i]].get("step", 0)) for opt, m in zip(self.optimizers, model.members))
                      for i in range(len(model.stacked))]

    def _stack(self, slot: int, key: str) -> torch.Tensor:
        members = self.model.members
        return torch.stack([self.model._in(opt.state[m[slot]][key], slot) if key in opt.state[m[slot]]
                            else torch.zeros_like(self.model.stacked[slot][0])
                            for opt, m in zip(self.optimizers, members)])

    @staticmethod
    def _each(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-member scalar shaped to broadcast over stacked tensors like `like`, in its dtype."""
        return values.to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    @torch.no_grad()
    def step(self) -> None:
        for slot, param in enumerate(self.model.stacked):
            each = lambda values: self._each(values, param)  # noqa: E731
            grad = param.grad
            if self.l2_penalty.any():  # seed 004's coupled L2 on every parameter (trainables.optim.add_l2_penalty_grad)
                grad = grad + each(2 * self.l2_penalty) * param
            state, step = self.state[slot], self.steps[slot]
            step += 1
            if self.kind == "adamw":
                param.mul_(each(1 - self.lr * self.weight_decay))
            elif self.weight_decay.any():
                grad = grad + each(self.weight_decay) * param
            if self.kind == "sgd":
                buffer = state["momentum_buffer"].mul_(each(self.momentum)).add_(grad)  # = grad at the first step
                if self.momentum.any():
                    nesterov = self.nesterov.view(-1, *[1] * (param.dim() - 1))
                    grad = torch.where(nesterov, grad + each(self.momentum) * buffer, buffer)
                param.sub_(each(self.lr) * grad)
            elif self.kind == "rmsprop":
                square_avg = state["square_avg"].mul_(each(self.alpha)).add_(each(1 - self.alpha) * grad * grad)
                avg = square_avg.sqrt().add_(each(self.eps))
                buffer = state["momentum_buffer"].mul_(each(self.momentum)).add_(grad / avg)  # = grad/avg at m=0
                param.sub_(each(self.lr) * buffer)
            else:  # adam, adamw
                exp_avg = state["exp_avg"].lerp_(grad, each(1 - self.beta1))
                exp_avg_sq = state["exp_avg_sq"].mul_(each(self.beta2)).add_(each(1 - self.beta2) * grad * grad)
                step_size = self.lr / (1 - self.beta1 ** step)
                correction2_sqrt = (1 - self.beta2 ** step).sqrt()
                denom = (exp_avg_sq.sqrt() / each(correction2_sqrt)).add_(each(self.eps))
                param.sub_(each(step_size) * (exp_avg / denom))

    @torch.no_grad()
    def write_back(self) -> None:
        """Each member's optimizer state, in torch's format, back into its own optimizer."""
        for k, (opt, member) in enumerate(zip(self.optimizers, self.model.members)):
            opt._opt_called = True  # what torch's LR schedules check to know that the optimizer stepped
            momentum = float(self.momentum[k])
            for slot, param in enumerate(member):
                if self.steps[slot][k] == 0:
                    continue  # never stepped: torch has no state for it yet either
                keys = [key for key in self.keys if key != "momentum_buffer" or momentum != 0]
                if not keys:
                    continue  # plain SGD keeps no state
                opt.state[param] = {key: self.model._out(self.state[slot][key][k], slot).clone() for key in keys}
                if self.kind != "sgd":
                    opt.state[param]["step"] = torch.tensor(float(self.steps[slot][k]), dtype=torch.float32)


def packed_epoch(trials: Sequence[Any]) -> list[tuple[float, float, int]]:
    """One epoch of every trial (`trainables.train.Trial`, same pack key) as one vectorised model: each member
    reads its own batches (its own order and augmentation draws) and steps with its own settings. Returns each
    member's (mean training loss, accuracy, images seen), as `Trial.train_epoch` does."""
    lead = trials[0]
    model = PackedModel([t.model for t in trials])
    model.train()
    optimizer = PackedOptimizer(model, [t.optimizer for t in trials], lead.optim_cfg["optimizer"],
                                [t.optim_cfg["l2_penalty"] for t in trials])
    per_member_loss = vmap(lead.loss_fn)  # each member's mean loss over its own batch
    device = model.stacked[0].device
    loss_sum, correct, seen = torch.zeros(model.k, device=device), torch.zeros(model.k, device=device), 0
    for batches in zip(*(t.train_loader for t in trials)):
        x = torch.stack([b[0] for b in batches])
        y = torch.stack([b[1] for b in batches])
        with lead.autocast():
            logits = model(x)
            losses = per_member_loss(logits.float(), y)
        for p in model.stacked:
            p.grad = None
        losses.sum().backward()  # the sum's gradient w.r.t. member k's weights is that of member k's own loss
        optimizer.step()
        loss_sum += losses.detach() * y.shape[1]
        correct += (logits.argmax(dim=-1) == y).sum(dim=1)
        seen += y.shape[1]
    model.write_back()
    optimizer.write_back()
    return [(loss, acc, seen) for loss, acc in zip((loss_sum / seen).tolist(), (correct / seen).tolist())]
