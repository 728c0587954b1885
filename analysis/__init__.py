"""Read a sweep's results directory, compare its arms, draw Plotly figures and write one offline
HTML report. Reads files only and never imports torch or ray, so it runs on a laptop against
results copied from a cluster, and on a sweep still running.

Its public names load on first use (PEP 562): `sweep --help` and the driver's callbacks that only need a small
part (`analysis.outcome`, `ResultsError`) do not pay for pandas and Plotly."""

import importlib


class ResultsError(Exception):
    """The directory is not a sweep's results directory, or cannot be read."""


_LAZY = {"Results": "analysis.results", "load_results": "analysis.results",
         "console_summary": "analysis.report", "write_report": "analysis.report"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


__all__ = ["Results", "ResultsError", "console_summary", "load_results", "write_report"]
