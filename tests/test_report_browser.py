"""report.html in a real headless Chromium: no JavaScript errors, every figure drawn, a screenshot
that is not blank. Needs Debian's `chromium` and `chromium-driver` (installed by .ci/run)."""

import io
from pathlib import Path

import pytest
from results_fixtures import curve_rows, spec_for, synthetic_sweep, write_spec, write_trial

from analysis import write_report
from analysis.figures import FIGURES
from conftest import CHROMIUM

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")

# Per figure div: how many drawn traces Plotly put into its SVG (or WebGL canvas for parcoords).
COUNT_DRAWN = """
return Array.from(document.querySelectorAll('.plotly-graph-div')).map(div => ({
  id: div.id,
  traces: div.querySelectorAll('.scatterlayer .trace path, .barlayer .trace path, .heatmaplayer image').length,
  parcoords: div.querySelectorAll('.parcoords g.y-axis').length
             * div.querySelectorAll('canvas.gl-canvas-context').length,
  data: (div.data || []).length,
}));
"""


def open_page(driver, page: Path, screenshot: Path):
    """Loads `page`; returns (severe console messages, figure divs, full-page screenshot PNG bytes)."""
    driver.set_window_size(1400, 1000)
    driver.get(page.resolve().as_uri())
    driver.execute_async_script("const done = arguments[0]; setTimeout(done, 1500);")  # let Plotly draw
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    divs = driver.execute_script(COUNT_DRAWN)
    driver.set_window_size(1400, min(driver.execute_script("return document.body.scrollHeight"), 12000))
    png = driver.get_screenshot_as_png()
    screenshot.write_bytes(png)
    return errors, divs, png


def distinct_colours(png: bytes) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").resize((350, 250))
    return len(image.getcolors(maxcolors=350 * 250))


ONLY_FOR = {"pareto": "several search metrics", "pbt": "a PBT sweep"}  # the figures the synthetic sweep lacks


def test_report_renders_every_figure_without_errors(chromium, tmp_path):
    page = write_report(synthetic_sweep(tmp_path / "sweep", n_trials=30, epochs=12))
    errors, divs, png = open_page(chromium, page, tmp_path / "report.png")

    assert errors == []
    assert sorted(d["id"] for d in divs) == sorted(f"figure-{name}" for name in FIGURES if name not in ONLY_FOR)
    for div in divs:
        drawn = div["parcoords"] if div["id"] == "figure-parallel_coordinates" else div["traces"]
        assert div["data"] > 0 and drawn > 0, div
    assert distinct_colours(png) > 50  # a blank or error page has a handful of colours


def test_a_pbt_sweep_with_two_objectives_draws_its_own_figures(chromium, tmp_path):
    results = write_spec(tmp_path / "pbt", spec_for("pbt", epochs=4, arms={"a": {}},
                                                    search={"algorithm": "random", "metric": ["val_acc", "ece"],
                                                            "mode": ["max", "min"]},
                                                    scheduler={"name": "pbt", "perturbation_interval": 2}))
    for index, (final, lr) in enumerate([(0.9, 1e-3), (0.85, 1e-2), (0.8, 3e-3)]):
        rows = curve_rows(final, 4, lr=lr)
        for row in rows:
            row["lr"] = lr
        if index == 2:  # copied trial 0's epoch-2 checkpoint, then explored its lr
            rows[2].update(copied_from="5f3a1_00000", copied_epoch=2, lr=1.2e-3)
            rows[3]["lr"] = 1.2e-3
        write_trial(results, index, {"arm": {"name": "a", "optim.lr": lr}}, rows, done=True)
    errors, divs, _ = open_page(chromium, write_report(results), tmp_path / "pbt.png")
    assert errors == []
    drawn = {d["id"]: d["traces"] for d in divs}
    assert drawn["figure-pareto"] > 0 and drawn["figure-pbt"] > 0


def test_empty_sweep_page_has_no_errors(chromium, tmp_path):
    page = write_report(write_spec(tmp_path / "empty", spec_for("empty")))
    errors, divs, _ = open_page(chromium, page, tmp_path / "empty.png")
    assert errors == [] and divs == []
    assert "No trial has reported yet" in page.read_text()
