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

import dataclasses
import io
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import vmap
from torch.optim.adam import adam
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from trainables.data import Dataset, to_device
from trainables.settings import resolve_settings
from trainables.train import Trial, load_checkpoint, scores, training_split

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)  # any layout
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)  # per channel, on (B, K*C, H, W)


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


def _packed_layout(layer: nn.Module, name: str) -> bool:
    """Whether a member's tensor is transposed in the pack: a Linear's weight is kept (in, out), so that the
    batched matmul reads it without a transposed copy (1.3x faster on a CPU here)."""
    return isinstance(layer, nn.Linear) and name == "weight"


class PackedModel(nn.Module):
    """K same-shaped `nn.Sequential` models as one: `forward` takes each member's batch, (K, B, C, H, W), and
    returns (K, B, classes). Activations are (K, B, F) between Linear layers and (B, K*C, H, W) between
    convolutions (the layout of a grouped convolution)."""

    def __init__(self, models: Sequence[nn.Sequential]):
        super().__init__()
        self.k = len(models)
        self.layers = models[0]  # the template: its parameter-free layers run as they are
        # Per member parameter, in `parameters()` order: its layer, and whether the pack holds it transposed.
        self.slots = [(layer, _packed_layout(layer, name)) for layer in models[0]
                      for name, _ in layer.named_parameters(recurse=False)]
        self.members = [list(m.parameters()) for m in models]
        with torch.no_grad():  # contiguous whatever the members' layout (channels_last): a member's slice of a
            # weight, its gradient and its optimizer state are then laid out alike, as torch's fused kernels need
            self.stacked = [torch.stack([self._in(m[i], i) for m in self.members]).contiguous().requires_grad_()
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


# torch's fused kernels (torch.optim's `fused=True`, what trainables.optim uses), by optimizer
FUSED = {"sgd": sgd, "adam": adam, "adamw": adamw}


class PackedOptimizer:
    """One step of K members' optimizers at once, each with its own hyperparameters, matching torch.optim's sgd
    (momentum, nesterov), rmsprop, adam and adamw step for step. States come from the members' torch optimizers
    and go back to them (`write_back`) in torch's own format, so a member's checkpoint is an ordinary trial's.

    Two ways to step, by device, as torch.optim picks its own default by device:
    - per member (on a CPU, for sgd, adam and adamw): torch's fused kernel over each member's slices of the
      stacked tensors, with its own hyperparameters: the very step the member takes alone. One pass over a
      member's tensors while they are in cache: Adam over 8 MLPs took 1.45 ms a step here, the stacked ops 5.7.
    - stacked (on a GPU, and for rmsprop): torch's single-tensor algorithms over the stacked tensors, each
      hyperparameter a Python number where the members agree (the very ops torch runs) and a per-member tensor
      where they differ: a few kernel launches per step for any K."""

    def __init__(self, model: PackedModel, optimizers: Sequence[torch.optim.Optimizer], kind: str,
                 l2_penalties: Sequence[float], per_member: bool | None = None):
        self.model, self.optimizers, self.kind = model, list(optimizers), kind
        device = model.stacked[0].device
        self.per_member = kind in FUSED and (device.type == "cpu" if per_member is None else per_member)
        groups = [opt.param_groups[0] for opt in self.optimizers]
        l2_grad = [2 * l2 for l2 in l2_penalties]  # the L2 penalty's gradient is 2 * l2 * w (trainables.optim)
        self.values = {  # per member, as Python floats
            "lr": [g["lr"] for g in groups],
            "l2": l2_grad,
            # the coupled decays add to the gradient: the L2 penalty's and, but for adamw, weight decay (torch adds
            # them one after the other; one fused add differs by rounding only)
            "coupled": [l2 + (0.0 if kind == "adamw" else g["weight_decay"]) for g, l2 in zip(groups, l2_grad)],
            "decoupled": [1 - g["lr"] * g["weight_decay"] if kind == "adamw" else 1.0 for g in groups],
            "momentum": [g.get("momentum", 0.0) for g in groups],
            "alpha": [g.get("alpha", 0.0) for g in groups],
            "eps": [g.get("eps", 0.0) for g in groups],
            "beta1": [g.get("betas", (0.0, 0.0))[0] for g in groups],
            "beta2": [g.get("betas", (0.0, 0.0))[1] for g in groups],
        }
        # as torch forms them from the hyperparameters, in Python doubles
        self.values.update({"neg_lr": [-x for x in self.values["lr"]],
                            "one_minus_alpha": [1 - x for x in self.values["alpha"]],
                            "one_minus_b1": [1 - x for x in self.values["beta1"]],
                            "one_minus_b2": [1 - x for x in self.values["beta2"]]})
        self.nesterov = [bool(g.get("nesterov", False)) for g in groups]
        # The state torch keeps per parameter (absent before a member's first step: zeros, step 0).
        self.keys = {"sgd": ["momentum_buffer"] if any(self.values["momentum"]) else [],
                     "rmsprop": ["square_avg", "momentum_buffer"], "adam": ["exp_avg", "exp_avg_sq"],
                     "adamw": ["exp_avg", "exp_avg_sq"]}[kind]
        self.state = [{key: self._stack(i, key) for key in self.keys} for i in range(len(model.stacked))]
        first = [m[0] for m in model.members]  # a member's parameters all step together: one count each
        self.steps = [int(opt.state[p].get("step", 0)) for opt, p in zip(self.optimizers, first)]
        self.shaped: dict[tuple, float | torch.Tensor] = {}
        # the per-member step's views: each member's slice of every stacked tensor, and the step counts torch's
        # fused Adam keeps per tensor (it counts them up itself)
        self.slices = [{"params": [p[k] for p in model.stacked],
                        **{key: [state[key][k] for state in self.state] for key in self.keys},
                        "steps": [torch.tensor(float(n), device=device) for _ in model.stacked]}
                       for k, n in enumerate(self.steps)] if self.per_member else []

    def _stack(self, slot: int, key: str) -> torch.Tensor:
        members = self.model.members
        return torch.stack([self.model._in(opt.state[m[slot]][key], slot) if key in opt.state[m[slot]]
                            else torch.zeros_like(self.model.stacked[slot][0])
                            for opt, m in zip(self.optimizers, members)]).contiguous()

    def _h(self, values: Sequence[float], like: torch.Tensor, name: str | None = None) -> float | torch.Tensor:
        """`values` (one per member) as one Python number when they agree, else a tensor broadcasting over `like`
        (kept under `name` for the next step)."""
        if all(v == values[0] for v in values):
            return float(values[0])
        key = (name, like.dim())
        if name is None or key not in self.shaped:
            shaped = torch.tensor(values, dtype=torch.float64).to(like.device, like.dtype)
            shaped = shaped.view(-1, *[1] * (like.dim() - 1))
            if name is None:
                return shaped
            self.shaped[key] = shaped
        return self.shaped[key]

    @staticmethod
    def _add(target: torch.Tensor, tensor: torch.Tensor, scale: float | torch.Tensor) -> None:
        """target += scale * tensor, in one op."""
        if isinstance(scale, float):
            target.add_(tensor, alpha=scale)
        else:
            target.addcmul_(tensor, scale)

    @staticmethod
    def _add_product(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> None:
        """target += scale * a * b, in one op where `scale` is one number (torch's addcmul_)."""
        if isinstance(scale, float):
            target.addcmul_(a, b, value=scale)
        else:
            target.addcmul_(a * scale, b)

    def zero_grad(self) -> None:
        """Drop the stacked gradients, as `torch.optim.Optimizer.zero_grad()` does by default."""
        for p in self.model.stacked:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps = [n + 1 for n in self.steps]
        if self.per_member:
            self._step_per_member()
        else:
            self._step_stacked()

    def _step_per_member(self) -> None:
        stacked = self.model.stacked
        if any(self.values["l2"]):  # added to the gradient before torch's step, as trainables.optim does alone
            for param in stacked:
                self._add(param.grad, param, self._h(self.values["l2"], param, "l2"))
        for k, (opt, views) in enumerate(zip(self.optimizers, self.slices)):
            group, grads = opt.param_groups[0], [p.grad[k] for p in stacked]
            if self.kind == "sgd":
                sgd(views["params"], grads, views.get("momentum_buffer", [None] * len(grads)), fused=True,
                    weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                    nesterov=group["nesterov"], maximize=False)
            else:  # the zero moments of a member that never stepped are what torch starts from too
                FUSED[self.kind](views["params"], grads, views["exp_avg"], views["exp_avg_sq"], [], views["steps"],
                                 fused=True, amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                                 lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _step_stacked(self) -> None:
        v, kind = self.values, self.kind
        for slot, param in enumerate(self.model.stacked):
            h = lambda name: self._h(v[name], param, name)  # noqa: E731
            grad, state = param.grad, self.state[slot]
            if any(v["coupled"]):
                self._add(grad, param, h("coupled"))
            if kind == "adamw":
                param.mul_(h("decoupled"))
            if kind == "sgd":
                if any(v["momentum"]):
                    buffer = state["momentum_buffer"].mul_(h("momentum")).add_(grad)  # = grad at the first step
                    if all(self.nesterov):
                        grad = grad.add(buffer * h("momentum"))
                    elif any(self.nesterov):
                        nesterov = torch.tensor(self.nesterov, device=param.device).view(-1, *[1] * (param.dim() - 1))
                        grad = torch.where(nesterov, grad + buffer * h("momentum"), buffer)
                    else:
                        grad = buffer
                self._add(param, grad, h("neg_lr"))
            elif kind == "rmsprop":
                square_avg = state["square_avg"].mul_(h("alpha"))
                self._add_product(square_avg, grad, grad, h("one_minus_alpha"))
                avg = square_avg.sqrt().add_(h("eps"))
                if any(v["momentum"]):
                    buffer = state["momentum_buffer"].mul_(h("momentum")).addcdiv_(grad, avg)  # = grad/avg at m=0
                    self._add(param, buffer, h("neg_lr"))
                else:
                    self._add(param, grad / avg, h("neg_lr"))
            else:  # adam, adamw
                exp_avg = state["exp_avg"].lerp_(grad, h("one_minus_b1"))
                exp_avg_sq = state["exp_avg_sq"].mul_(h("beta2"))
                self._add_product(exp_avg_sq, grad, grad, h("one_minus_b2"))
                # bias corrections in Python doubles, as torch computes them
                step_size = self._h([-lr / (1 - b1 ** n) for lr, b1, n in zip(v["lr"], v["beta1"], self.steps)], param)
                correction2 = self._h([math.sqrt(1 - b2 ** n) for b2, n in zip(v["beta2"], self.steps)], param)
                denom = (exp_avg_sq.sqrt() / correction2).add_(h("eps"))
                if isinstance(step_size, float):
                    param.addcdiv_(exp_avg, denom, value=step_size)
                else:  # members' learning rates differ: fold each one's step size into its (fresh) denominator
                    param.addcdiv_(exp_avg, denom.div_(step_size))

    @torch.no_grad()
    def write_back(self) -> None:
        """Each member's optimizer state, in torch's format, back into its own optimizer."""
        for k, (opt, member) in enumerate(zip(self.optimizers, self.model.members)):
            opt._opt_called = True  # what torch's LR schedules check to know that the optimizer stepped
            if self.steps[k] == 0:
                continue  # never stepped: torch has no state for it yet either
            keys = [key for key in self.keys if key != "momentum_buffer" or self.values["momentum"][k] != 0]
            for slot, param in enumerate(member):
                if not keys:
                    continue  # plain SGD keeps no state
                # laid out as the parameter is (transposed in the pack, or channels_last): torch's fused kernels
                # read a state's memory in the parameter's order
                opt.state[param] = {key: torch.empty_like(param).copy_(self.model._out(self.state[slot][key][k], slot))
                                    for key in keys}
                if self.kind != "sgd":  # where torch keeps it: on the parameter's device for a fused optimizer
                    opt.state[param]["step"] = torch.tensor(float(self.steps[k]), dtype=torch.float32,
                                                            device=param.device if opt.param_groups[0].get("fused") else None)


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
        optimizer.zero_grad()
        losses.sum().backward()  # the sum's gradient w.r.t. member k's weights is that of member k's own loss
        optimizer.step()
        loss_sum += losses.detach() * y.shape[1]
        correct += (logits.argmax(dim=-1) == y).sum(dim=1)
        seen += y.shape[1]
    model.write_back()
    optimizer.write_back()
    return [(loss, acc, seen) for loss, acc in zip((loss_sum / seen).tolist(), (correct / seen).tolist())]


@torch.no_grad()
def packed_evaluation(trials: Sequence[Trial], reporting: dict[int, tuple[bool, bool]]
                      ) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """The members that report after this epoch (`reporting`: index -> `Trial.reports_after`), evaluated together:
    one vectorised pass over each split (validation, the training sample, and the test split for those that end),
    which every member of a pack shares, instead of one pass per member. Returns index -> split -> `scores`, and
    index -> the seconds of the passes it was in."""
    evaluated = {i: {} for i, (report, _) in reporting.items() if report}
    seconds = dict.fromkeys(evaluated, 0.0)
    for split in ("val", "fit", "test"):
        members = [i for i in evaluated if split != "test" or reporting[i][1]]
        if not members or trials[members[0]].loader(split) is None:  # nobody to evaluate, or no test split
            continue
        start = time.perf_counter()
        lead, loader = trials[members[0]], trials[members[0]].loader(split)
        model = PackedModel([trials[i].model for i in members]).eval()
        chunk = max(1, loader.batch_size // len(members))  # a pass holds as many images as one member's batch
        logits, labels = [], []
        for x, y in loader:
            for part in x.split(chunk):
                with lead.autocast():
                    logits.append(model(part.expand(len(members), *part.shape)).float())
            labels.append(y)
        logits, labels = torch.cat(logits, dim=1), torch.cat(labels)
        for i, member_logits in zip(members, logits):
            evaluated[i][split] = scores(member_logits, labels, lead.loss_fn, lead.num_classes)
        elapsed = time.perf_counter() - start
        for i in members:
            seconds[i] += elapsed
    return evaluated, seconds


# --- what a pack worker (trainables.member.PackWorker) runs in its own process ----------------------------------

def member_trial(source: Dataset, on_device: dict, base: dict[str, dict[str, Any]], config: dict[str, Any],
                 checkpoint, device: str, trial_id: str) -> Trial:
    """A pack's member as an ordinary Trial (continued from its checkpoint), its training images on `device` once
    per worker: `on_device` keeps the split of the data settings and device its members share (one at a time)."""
    settings = resolve_settings(base, config)
    split = (settings["data"]["train_subset"], settings["data"]["split_seed"], device)
    if split not in on_device:
        on_device.clear()  # another split: the worker's members of the last one keep theirs, it keeps one
        x, y = training_split(source, settings["data"], base["data"]["train_subset"])
        arrays = dict(train_x=x, train_y=y, val_x=source.val_x, val_y=source.val_y, test_x=source.test_x,
                      test_y=source.test_y)
        on_device[split] = dataclasses.replace(source, **{k: None if v is None else to_device(v, torch.device(device))
                                                           for k, v in arrays.items()})
    # Every member shares that subset, so training_split gives it back as it is.
    return Trial(settings, on_device[split], torch.device(device), loaded_subset=base["data"]["train_subset"],
                 trial_id=trial_id, state=load_checkpoint(checkpoint, torch.device(device)))


def train_round(batch: dict[str, Trial]) -> dict[str, tuple[dict[str, Any], bytes | None, bool] | None]:
    """One epoch of every member in `batch` (trial id -> Trial), together. Each member's report (metrics, its
    checkpoint file's bytes or None, whether it was its last), or None for an epoch between its reports."""
    trials = list(batch.values())
    lrs = [t.lr for t in trials]
    start = time.perf_counter()
    stats = packed_epoch(trials)
    epoch_time = time.perf_counter() - start  # the pack's: each member reports its share of images in it
    reporting = {i: trial.reports_after(loss) for i, (trial, (loss, _, _)) in enumerate(zip(trials, stats))}
    evaluated, eval_times = packed_evaluation(trials, reporting)  # each member's: the pack's passes it was in
    reports = {}
    for i, (trial_id, trial, lr, (loss, acc, seen)) in enumerate(zip(batch, trials, lrs, stats)):
        result = trial.end_epoch(loss, acc, seen, epoch_time, lr, evaluated.get(i), eval_times.get(i, 0.0))
        if result is None:
            reports[trial_id] = None
            continue
        checkpoint = None
        if result.save is not None:
            buffer = io.BytesIO()
            result.save(buffer)
            checkpoint = buffer.getvalue()
        reports[trial_id] = (result.metrics, checkpoint, result.done)
    return reports
