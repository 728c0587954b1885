"""Shared helpers: run the real `sweep` CLI in a subprocess, write small specs, read results."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's, installed by .ci/run


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    """A real headless Chromium driven by Selenium (Debian's browser and driver; nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
