"""Shared helpers: run the real `sweep` CLI in a subprocess, write small specs, read results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`sweep ARGS...` as a user runs it; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trial_results(results_dir: Path) -> dict[str, list[dict]]:
    """Trial directory name -> its result rows (one dict per reported epoch)."""
    out = {}
    for result in sorted(results_dir.glob("*/result.json")):
        out[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return out


@pytest.fixture
def tiny_spec() -> dict:
    """A spec that trains in about a second per trial on the embedded data."""
    return {
        "name": "tiny",
        "data": {"name": "mnist5k", "train_subset": 400, "batch_size": 50},
        "model": {"name": "mlp", "hidden_sizes": [32]},
        "train": {"epochs": 2},
        "arms": {"sgd": {"optimizer": "sgd", "lr": 0.1}, "adam": {"optimizer": "adam", "lr": 0.003}},
    }
