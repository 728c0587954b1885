"""`--smoke`: any spec shrunk to run in a minute or three on a laptop CPU, keeping its arms and its structure."""

from __future__ import annotations

from typing import Any

from sweeps.schema import Spec
from sweeps.spec import validate_spec


def smoke_spec(spec: Spec) -> Spec:
    """The same sweep, small: a data subset, few epochs, small images, at most 2 values per grid, one seed."""
    raw = spec.model_dump(mode="json", by_alias=True)
    raw["smoke"] = True
    raw["data"]["train_subset"] = min(raw["data"]["train_subset"] or 600, 600)
    # Evaluation, not training, is most of a small run: 6,000 validation and 10,000 test images against 600 trained on.
    raw["data"]["eval_subset"] = min(raw["data"]["eval_subset"] or 1000, 1000)
    raw["data"]["batch_size"] = min(max(raw["data"]["batch_size"], 32), 64)  # tiny batches cost a step per few images
    if raw["data"]["resize"]:
        raw["data"]["resize"] = min(raw["data"]["resize"], 64)  # AlexNet's smallest comfortable input
    raw["train"]["epochs"] = min(raw["train"]["epochs"], 3)
    raw["train"]["report_every"] = 1  # every one of the few epochs
    # Only the last epoch: a big model's checkpoint costs more than its epoch. PBT copies a checkpoint at every
    # perturbation, so there every epoch's is kept (any perturbation_interval is a multiple of 1).
    raw["train"]["checkpoint_every"] = 1 if raw["scheduler"]["name"] == "pbt" else 3
    raw["search"]["num_samples"] = min(raw["search"]["num_samples"], 2)
    if raw["scheduler"]["max_t"]:
        raw["scheduler"]["max_t"] = min(raw["scheduler"]["max_t"], 3)
    raw["resources"] = {"cpu": min(raw["resources"]["cpu"], 1), "gpu": 0}  # what any laptop has
    if raw["train"]["device"] == "cuda":
        raw["train"]["device"] = "auto"
    caps = {"epochs": 3, "train_subset": raw["data"]["train_subset"], "report_every": 1}  # values an arm or the space sets

    def shrink(settings: dict[str, Any]) -> None:
        for key, value in settings.items():
            name = key.rsplit(".", 1)[-1]
            cap = caps.get(name)
            if isinstance(value, dict) and "grid" in value:
                kept = value["grid"][:1 if name == "seed" else 2]  # seeds repeat a trial; one shows it runs
                value["grid"] = [min(v, cap) if cap else v for v in kept]
            elif cap and isinstance(value, int):
                settings[key] = min(value, cap)
            elif name == "device" and value == "cuda":  # no GPU per smoke trial
                settings[key] = "auto"

    shrink(raw["space"])
    for arm in raw["arms"].values():
        shrink(arm or {})
    raw["notes"] = [*raw["notes"], ("smoke run: training subset <= 600 images, validation and test <= 1,000 each, "
                                    "batches of 32-64, <= 3 epochs, a checkpoint at the last epoch only (every epoch "
                                    "under pbt), images <= 64 px, <= 2 values per grid, 1 seed, <= 2 samples, 1 CPU "
                                    "and no GPU per trial")]
    return validate_spec(raw, f"{spec.name} (smoke)")
