"""What the console shows, in-process: the comparison printed at the end of a run, `sweep list` and the live
table, each at the terminal's width (100 columns in a pipe)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from results_fixtures import report_sweep
from rich.console import Console
from test_protocol import _protocol_dir

from analysis import console_summary, write_report
from sweeps import cli
from sweeps.progress import Progress
from sweeps.spec import bundled_specs, validate_spec


def test_the_comparison_printed_at_the_end_fits_the_terminal(tmp_path, monkeypatch):
    # It was 230 characters wide; the note and the configuration now sit under the table, wrapped.
    report = write_report(report_sweep(tmp_path / "sweep")).parent
    for width in (80, 100):
        monkeypatch.setenv("COLUMNS", str(width))
        text = console_summary(report)
        assert max(map(len, text.splitlines())) <= width, text
    lines = text.splitlines()
    ranks = [line.split()[:2] for line in lines if line.split()[:1] in (["1"], ["2"], ["3"], ["4"])]
    assert ranks == [["1", "adamw-with-a-long-name"], ["2", "rmsprop"], ["3", "sgd"], ["4", "adam"]]
    assert "Best configurations:" in lines and "Notes:" in lines
    assert any(line.startswith("Conclusion:") for line in lines)
    assert "  adam: judged on 2 of its 3 seeds (the others were stopped early, failed or are still running):" in text
    assert "Smoke run" not in text


def test_a_smoke_protocol_says_so_beside_its_verdicts_on_the_console(tmp_path):
    root = _protocol_dir(tmp_path / "p", tune={arm: [("completed", 0.9)] for arm in "ab"},
                         confirm={"a": [(0.90, False)] * 3, "b": [(0.95, False)] * 3})
    (root / "spec.yaml").write_text((root / "spec.yaml").read_text() + "smoke: true\n")
    text = console_summary(write_report(root).parent, width=80)
    lines = text.splitlines()
    assert lines[1] == "Protocol verdicts (confirm stage, test split) (as in report/verdicts.csv):"
    assert lines[2].startswith("Smoke run (--smoke): shrunk to check that the spec runs; these numbers are not")
    assert [line.split()[:2] for line in lines if line.split()[:1] in (["1"], ["2"])] == [["1", "b"], ["2", "a"]]
    assert max(map(len, lines)) <= 80


def test_sweep_list_prints_one_line_per_spec_within_the_terminals_width(monkeypatch, capsys):
    # Each line was about 600 characters: the whole description.
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["list"]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(bundled_specs())
    assert max(map(len, lines)) <= 80 and all(line.endswith("…") or len(line) < 80 for line in lines)
    quickstart = next(line for line in lines if line.startswith("quickstart "))
    assert quickstart.endswith(" 20 trials  Five optimizers (SGD, …")


def _trial(arm: str, status: str, epoch: int, value: float, lr: float) -> SimpleNamespace:
    return SimpleNamespace(status=status, last_result={"epoch": epoch, "val_acc": value},
                           config={"arm": {"name": arm, "optim.lr": lr}})


def test_the_live_table_tells_a_trial_stopped_early_from_one_still_running(tiny_spec):
    tiny_spec.update(train={"epochs": 4},
                     arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [0.01, 0.1]}},
                           "adam": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}},
                           "rmsprop": {"optimizer": "rmsprop", "lr": 1e-3}})
    progress = Progress(validate_spec(tiny_spec, "test"))
    progress.setup()  # not on a terminal here: no live display, only the table
    trials = [_trial("sgd", "TERMINATED", 2, 0.8, 0.05),  # stopped early by ASHA
              _trial("adam", "RUNNING", 2, 0.7, 0.001),  # not finished yet
              _trial("rmsprop", "TERMINATED", 4, 0.9, 0.001)]  # completed
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(progress._table(trials))
    shown = console.file.getvalue()
    rows = {line.split()[1]: line for line in shown.splitlines()
            if line.split()[1:2] in (["sgd"], ["adam"], ["rmsprop"])}
    assert "0.8 †" in rows["sgd"] and "0.7 *" in rows["adam"]
    assert "0.9 " in rows["rmsprop"] and "†" not in rows["rmsprop"] and "*" not in rows["rmsprop"]
    words = " ".join(shown.split())  # the caption wraps to the table's width
    assert "* still running: its latest value † ended early (stopped, diverged or failed): its last value" in words
