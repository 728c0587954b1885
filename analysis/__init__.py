"""Read a sweep's results directory, compare its arms, draw Plotly figures and write one offline
HTML report. Reads files only and never imports torch or ray, so it runs on a laptop against
results copied from a cluster, and on a sweep still running."""

from analysis.report import console_summary, write_report
from analysis.results import Results, ResultsError, load_results

__all__ = ["Results", "ResultsError", "console_summary", "load_results", "write_report"]
