"""report.html in a real headless Chromium: no JavaScript errors, every figure drawn, a screenshot
that is not blank, tables that read on a 1400 px window, one colour per arm. Needs Debian's `chromium` and
`chromium-driver` (installed by .ci/run)."""

import io
from pathlib import Path

import pytest
from conftest import CHROMIUM
from results_fixtures import curve_rows, report_sweep, spec_for, synthetic_sweep, write_spec, write_trial

from analysis import write_report
from analysis.figures import FIGURES

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


ONLY_FOR = {"pareto": "several search metrics", "pbt": "a PBT sweep",  # the figures the synthetic sweep lacks
            "importance": "an arm with 16 full-budget trials over two searched settings"}


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


# Per table.data: how far it scrolls sideways, each shown column's width against its header's text on one line,
# cells whose text overflows them, and the narrowest column of prose (a note, a verdict).
MEASURE_TABLES = """
const range = document.createRange(), shown = e => e.offsetParent !== null;
return Array.from(document.querySelectorAll('table.data')).map(table => ({
  heading: table.closest('.scroll').previousElementSibling?.textContent || '',
  scrolls: table.closest('.scroll').scrollWidth - table.closest('.scroll').clientWidth,
  columns: Array.from(table.tHead.rows[0].cells).filter(shown).map(th => {
    range.selectNodeContents(th);
    return {header: th.textContent, width: th.clientWidth, text: Math.ceil(range.getBoundingClientRect().width)};
  }),
  overfull: Array.from(table.querySelectorAll('td')).filter(shown).filter(td => td.scrollWidth > td.clientWidth)
    .map(td => td.textContent),
  prose: Math.min(...Array.from(table.querySelectorAll('td.prose')).filter(shown).map(td => td.clientWidth)),
}));
"""
# Arm -> the colours its traces have, over every figure of the page (bands, which belong to no legend, left out).
ARM_COLOURS = """
const arms = {};
for (const div of document.querySelectorAll('.plotly-graph-div')) for (const trace of div.data || []) {
  const colour = (trace.marker || {}).color || (trace.line || {}).color, arm = trace.legendgroup || trace.name;
  if (trace.mode === 'none' || typeof colour !== 'string' || !arguments[0].includes(arm)) continue;
  (arms[arm] = arms[arm] || new Set()).add(colour);
}
return Object.fromEntries(Object.entries(arms).map(([arm, colours]) => [arm, Array.from(colours)]));
"""


def _long_protocol(root: Path) -> Path:
    """A protocol whose confirm stage ran tuned configurations of several settings, one arm losing seeds."""
    arms = {"adam": {}, "adamw-with-a-long-name": {}, "sgd": {}}
    write_spec(root, {**spec_for("proto", arms=arms), "smoke": True, "protocol": {"confirm_seeds": 3}})
    write_spec(root / "tune", spec_for("tune", arms=arms))
    write_spec(root / "confirm", spec_for("confirm", arms=arms))
    index = 0
    for arm, finals in {"adam": [0.91, 0.92, 0.9], "adamw-with-a-long-name": [0.93, 0.94, 0.95],
                        "sgd": [0.8, 0.1, 0.82]}.items():
        settings = {"optim.optimizer": arm[:5], "optim.lr": 0.000123456, "optim.weight_decay": 0.0004963,
                    "optim.momentum": 0.9, "data.batch_size": 64}
        write_trial(root / "tune", index, {"arm": {"name": arm, **settings}}, curve_rows(0.9, 3), done=True)
        index += 1
        for seed, final in enumerate(finals):
            rows = curve_rows(final, 3)
            if final < 0.5:
                rows[-1].update(train_loss=float("nan"), diverged=True)
            write_trial(root / "confirm", index, {"arm": {"name": arm, **settings}, "train.seed": seed}, rows,
                        done=True)
            index += 1
    return root


@pytest.mark.parametrize("build", ["sweep", "protocol"])
def test_tables_read_on_a_1400px_window_and_an_arm_has_one_colour(chromium, tmp_path, build):
    # The comparison squeezed its note column to about 20 px (rows ~330 px tall) behind a horizontal scrollbar,
    # the protocol's "Per arm" table too; and red was one arm in one figure and another in the next.
    page = write_report(report_sweep(tmp_path / "sweep", smoke=True) if build == "sweep"
                        else _long_protocol(tmp_path / "protocol"))
    errors, divs, _ = open_page(chromium, page, tmp_path / f"{build}.png")
    assert errors == [] and divs
    chromium.set_window_size(1400, 1000)
    assert chromium.execute_script("return document.documentElement.scrollWidth") <= 1400
    tables = chromium.execute_script(MEASURE_TABLES)
    assert len(tables) >= 3
    for table in tables:
        assert table["scrolls"] <= 0, table
        assert table["overfull"] == [], table
        assert table["prose"] is None or table["prose"] >= 120, table  # 11em of 13 px: a note reads in a few lines
        # (None: no column of prose; Math.min of nothing is Infinity, which JSON cannot say)
        for column in table["columns"]:
            assert column["width"] >= column["text"], (table["heading"], column)
    banner = chromium.execute_script("const b = document.getElementById('smoke'), h = document.querySelector('h2');"
                                     "return b && [b.getBoundingClientRect().top, h.getBoundingClientRect().top];")
    assert banner and banner[0] < banner[1]  # at the top, above the first table and verdict
    arms = ["sgd", "adam", "rmsprop", "adamw-with-a-long-name"]
    colours = chromium.execute_script(ARM_COLOURS, arms)
    assert len(colours) >= 3 and all(len(c) == 1 for c in colours.values()), colours
    assert len({c[0] for c in colours.values()}) == len(colours)  # and no two arms share one
