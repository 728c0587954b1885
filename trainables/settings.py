"""A trial's settings from its spec and its config, and the device it takes: plain Python (no torch), so that the
packs' light actors and their manager can use them too."""

from __future__ import annotations

import copy
from typing import Any


def apply_settings(base: dict[str, dict[str, Any]], flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of the nested settings with dotted keys (`optim.lr`, `data.augment.hflip`) set."""
    settings = copy.deepcopy(base)
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = settings
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return settings


def resolve_settings(base: dict[str, dict[str, Any]], config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Lay a trial's dotted settings (its arm's, then the shared space's) over the base sections."""
    flat = {k: v for k, v in config.get("arm", {}).items() if k != "name"}
    flat.update({k: v for k, v in config.items() if k != "arm"})
    return apply_settings(base, flat)


def device_type(choice: str, gpu_ids: list | None, cuda_available: bool) -> str:
    """"cuda" when the trial has a GPU of its own and `train.device` allows it, else "cpu".

    Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor that asks for no GPU, so such a trial on a GPU
    node sees every GPU and torch.cuda.is_available() is True: only ray.get_gpu_ids() says whether the
    GPU is this trial's (`gpu_ids`; None outside Ray, where any visible GPU counts).
    """
    has_gpu = cuda_available and (gpu_ids is None or len(gpu_ids) > 0)
    if choice == "cuda" and not has_gpu:
        raise RuntimeError("train.device is 'cuda' but Ray assigned this trial no GPU (set resources.gpu)")
    return "cuda" if has_gpu and choice != "cpu" else "cpu"
