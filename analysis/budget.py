"""What a comparison cost and what it would need: tuning curves, time to target, and seeds for an effect.

- Tuning curves (Dodge et al. 2019, "Show Your Work"): per arm, the expected best validation score after n
  tuning trials, n = 1..N, so "A beats B" can be told apart from "A is easier to tune" (Schmidt et al. 2021).
- Time to target (AlgoPerf): per arm, the epochs and seconds its seeds need to first reach a validation score,
  seconds of training and evaluation (`compute_seconds`), not of the process a trial happened to start.
- Seeds needed (`sweep plan`): how many paired seeds a difference needs, from the observed seed-to-seed spread.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.results import FINISHED, Results, ResultsError, _read_spec, load_results
from analysis.stats import (
    expected_best,
    expected_best_band,
    expected_power,
    paired_sd,
    seeds_needed,
)
from analysis.tables import (
    ALPHA,
    MIN_PAIRED_SEEDS,
    Comparison,
    compare,
    display,
    seed_columns,
)

TUNING_ASSUMES = ("Expected best of n trials: the mean of the best over every n-subset of the arm's N finished "
                  "configurations (a configuration with several seeds counts once, with its mean), an unbiased "
                  "estimate of what n independent trials give, so exact in expectation for random search; for TPE, "
                  "whose later trials depend on the earlier ones, and for trials ASHA stopped (they enter with the "
                  "score they had when stopped) it is an approximation. Band: 95%, the union of a bootstrap-t interval "
                  "(for skewed scores) and a Bayesian-bootstrap one (for diverged trials far below the rest), 2,000 "
                  "seeded resamples each, drawn for n up to N/5: in simulation (N = 10 to 40) it covers at least 93% "
                  "of the time for normal, skewed and 30%-diverged scores, but only 90% when a few configurations "
                  "are far better than the rest (a heavy upper tail the N scores rarely show). Beyond N/5 N trials "
                  "say too little about the best of n, and the curve is drawn without one.")


def configuration_scores(results: Results) -> pd.DataFrame:
    """One row per (arm, configuration) that ended: its mean final score over its seeds.

    Trials stopped early count, with their last score; a score that is not finite (a diverged loss) counts as
    the arm's worst finite score, so a diverged draw is a spent trial that is never the best.
    """
    trials, metric = results.trials, f"final_{results.metric}"
    ended = trials[trials["status"].isin([*FINISHED, "stopped"])]
    if ended.empty or metric not in ended:
        return pd.DataFrame(columns=["arm", "config", "score", "n_seeds"])
    seeds = seed_columns(results)
    settings = [h for h in results.hyperparameters if h not in seeds]
    config = ended[settings].map(str).agg("|".join, axis=1) if settings else pd.Series("", index=ended.index)
    sign = 1 if results.mode == "max" else -1
    score = ended[metric].astype(float)
    worst = score.where(np.isfinite(score)).groupby(ended["arm"]).transform("min" if sign > 0 else "max")
    score = score.where(np.isfinite(score), worst)
    frame = pd.DataFrame({"arm": ended["arm"], "config": config, "score": score})
    return frame.groupby(["arm", "config"], sort=False)["score"].agg(score="mean", n_seeds="size").reset_index()


def tuning_curves(results: Results) -> pd.DataFrame:
    """Per arm with at least two configurations: n, the expected best score of n trials, and its band."""
    scores, sign = configuration_scores(results), 1 if results.mode == "max" else -1
    rows = []
    for arm, group in scores.groupby("arm", sort=False):
        values = group["score"].dropna().to_numpy()
        if len(values) < 2:
            continue
        curve = expected_best(values, len(values), sign)
        low, high = expected_best_band(values, len(values), sign)
        rows += [{"arm": arm, "n": n + 1, f"expected_best_{results.metric}": curve[n], "band_low": low[n],
                  "band_high": high[n], "n_configs": len(values)} for n in range(len(values))]
    return pd.DataFrame(rows, columns=["arm", "n", f"expected_best_{results.metric}", "band_low", "band_high",
                                       "n_configs"])


def default_target(results: Results, comparison: Comparison) -> float:
    """The best validation score that more than half of every row's seeds reach (the row's best configuration;
    rows whose every seed diverged are left out): a target every row has a median time to."""
    trials, metric = results.trials.set_index("trial_id"), f"best_{results.metric}"
    sign = 1 if results.mode == "max" else -1
    reached = []
    for ids in comparison.members:
        rows = trials.loc[ids]
        if len(rows) and metric in rows and not (rows["status"] == "diverged").all():
            best = np.sort(sign * rows[metric].astype(float).to_numpy())[::-1]  # best first
            best = best[np.isfinite(best)]
            if len(best) > len(rows) // 2:
                reached.append(sign * best[len(rows) // 2])  # the (n//2 + 1)-th best: reached by more than half
    return (min(reached) if sign > 0 else max(reached)) if reached else np.nan


def compute_seconds(epochs: pd.DataFrame) -> pd.Series:
    """Per epoch row: the seconds its trial spent training and evaluating up to the end of that epoch, from what the
    trial reports (`epoch_time_s`, the epoch's training, and `eval_time_s`, the report's evaluation).

    Not Ray's `time_total_s`: that also counts what a trial waited for before its first epoch
    (`trial_startup_seconds`), which the first trial on a worker pays and the next ones do not. Epochs between two
    reports (`train.report_every` > 1) are counted at the reported epoch's training time; results written before
    trials reported `eval_time_s` count training only. NaN where a trial reported no `epoch_time_s`."""
    if epochs.empty or "epoch_time_s" not in epochs:
        return pd.Series(np.nan, index=epochs.index, dtype=float)
    rows = epochs.sort_values(["trial_id", "epoch"])
    trained = rows["epoch"] - rows.groupby("trial_id")["epoch"].shift(fill_value=0)  # epochs since the last report
    spent = rows["epoch_time_s"].astype(float) * trained.clip(lower=1)
    if "eval_time_s" in rows:
        spent += rows["eval_time_s"].astype(float).fillna(0.0)
    return spent.groupby(rows["trial_id"]).cumsum().reindex(epochs.index)


def trial_startup_seconds(results: Results) -> pd.Series:
    """Per trial (indexed by trial_id): the seconds Ray counted up to its first report beyond that report's training
    and evaluation (`compute_seconds`): what the trial waited for in its worker before it trained (its data, its
    model, a new worker's first torch calls; for a packed trial, its pack worker's start and the round it joined).
    Ray's clock starts once the worker holds the trial's actor, so a new worker process's own start is not in it
    (timeline.json shows that)."""
    epochs = results.epochs
    if epochs.empty or "epoch_time_s" not in epochs:
        return pd.Series(np.nan, index=results.trials["trial_id"], dtype=float)
    waited = epochs["time_total_s"].astype(float) - compute_seconds(epochs)
    first = epochs.groupby("trial_id", sort=False)["epoch"].idxmin()
    return pd.Series(waited.loc[first.to_numpy()].to_numpy(), index=first.index).reindex(results.trials["trial_id"])


def trial_compute_seconds(results: Results) -> pd.Series:
    """Per trial (indexed by trial_id): `compute_seconds` over every epoch it reported."""
    epochs = results.epochs
    spent = compute_seconds(epochs)
    return spent.groupby(epochs["trial_id"]).max().reindex(results.trials["trial_id"])


def time_to_target(results: Results, comparison: Comparison, target: float | None = None) -> pd.DataFrame:
    """Per comparison row: epochs and seconds (`compute_seconds`: training and evaluation) until each seed of its
    best configuration first reaches `target` on the validation metric; the median over seeds, where a seed that
    never reached it counts as never (so more than half missing gives no time), as AlgoPerf reports it."""
    target = default_target(results, comparison) if target is None else target
    epochs, metric = results.epochs.assign(compute_s=compute_seconds(results.epochs)), results.metric
    better = (lambda v: v >= target) if results.mode == "max" else (lambda v: v <= target)
    rows = []
    for label, ids in zip(comparison.labels, comparison.members, strict=True):
        reached_epoch, reached_time = [], []
        for trial_id in ids:
            curve = epochs[epochs["trial_id"] == trial_id]
            hit = curve[better(curve[metric].astype(float))] if metric in curve else curve.iloc[:0]
            reached_epoch.append(float(hit["epoch"].iloc[0]) if len(hit) else np.inf)
            reached_time.append(float(hit["compute_s"].iloc[0]) if len(hit) else np.inf)
        rows.append({"arm": label, "target": target, "n_seeds": len(ids),
                     "n_reached": int(np.isfinite(reached_epoch).sum()),
                     "epochs_to_target": _median_or_never(reached_epoch),
                     "seconds_to_target": _median_or_never(reached_time)})
    return pd.DataFrame(rows, columns=["arm", "target", "n_seeds", "n_reached", "epochs_to_target",
                                       "seconds_to_target"])


def _median_or_never(values: list[float]) -> float:
    """The median, with never-reached as infinity; NaN (no time) when it is infinite."""
    median = float(np.median(values)) if values else np.inf
    return median if np.isfinite(median) else np.nan


class SeedPlan(NamedTuple):
    better: str
    worse: str
    n_now: int  # seeds both arms finished with a finite score: the pairs the spread was measured on
    sd_diff: float  # std of the paired differences between the two arms' seeds
    level: float  # alpha over the number of pairs: Holm's strictest step
    power_now: float  # the chance that n_now seeds detect `effect`, averaged over the spreads sd_diff leaves possible
    seeds_needed: int | None  # None: more than 100,000, or not planned
    why_not: str  # why no seeds were planned for the pair ("" when they were)


def plan_seeds(arms: dict[str, pd.Series], effect: float, *, alpha: float, power: float = 0.8) -> list[SeedPlan]:
    """For every pair of arms (each a Series of final scores indexed by seed): how many paired seeds detect a true
    difference `effect` with probability `power`, with the test the comparison table runs on them, a paired t-test
    on the seeds both ran, at the level Holm's first step applies to every pair (alpha / number of pairs).

    The spread of the paired differences is known only from the n_now pairs seen so far: the power is averaged over
    the true spreads they leave possible (`stats.expected_power`), which keeps its promise over repeated pilots
    where planning from the observed spread as if true fell short (69-79% for a promised 80% from 5 seeds).
    A pair sharing fewer than MIN_PAIRED_SEEDS seeds is not planned: the table would run Welch's unpaired test.
    """
    pairs = list(itertools.combinations(arms, 2))
    level = alpha / max(1, len(pairs))
    plans = []
    for a, b in pairs:
        joined = pd.concat([arms[a], arms[b]], axis=1, join="inner").to_numpy(float)
        both = joined[np.isfinite(joined).all(axis=1)]
        n_now, sd = len(both), paired_sd(both[:, 0], both[:, 1])  # as paired_test sees it: no spread from rounding
        if n_now < MIN_PAIRED_SEEDS:
            why = (f"fewer than {MIN_PAIRED_SEEDS} seeds both finished with a finite score: the comparison table would "
                   "run Welch's unpaired test, which this plan does not cover")
        else:
            why = "" if sd > 0 else "the same difference on every seed: no spread to plan from"
        planned = not why
        plans.append(SeedPlan(a, b, n_now, sd, level,
                              expected_power(effect, sd, n_now, level, n_now - 1) if planned else np.nan,
                              seeds_needed(effect, sd, level, power, sd_df=n_now - 1) if planned else None, why))
    return plans


def seeds_by_row(results: Results, comparison: Comparison, metric: str) -> dict[str, pd.Series]:
    """Each comparison row's best configuration: its seeds' final `metric`, indexed by seed (for pairing)."""
    seed = next(iter(seed_columns(results)), None)
    trials = results.trials.set_index("trial_id")
    out = {}
    for label, ids in zip(comparison.labels, comparison.members, strict=True):
        rows = trials.loc[ids]
        if seed and len(rows) and rows[seed].notna().all() and f"final_{metric}" in rows:
            out[label] = pd.Series(rows[f"final_{metric}"].astype(float).to_numpy(), index=rows[seed])
    return out


def plan_report(results_dir: str | Path, effect: float, power: float = 0.8) -> str:
    """`sweep plan`: for every pair of arms, the paired seeds needed to detect `effect` with `power`, from the
    spread seen so far: a protocol's confirm stage (on test_acc), or an ordinary sweep's rows that have seeds."""
    directory = Path(results_dir)
    protocol = (directory / "tune" / "spec.yaml").exists()
    if protocol and not (directory / "confirm" / "spec.yaml").exists():
        raise ResultsError(f"{directory}: the confirm stage has not started; the seed-to-seed spread is measured "
                           "there (`sweep resume` continues the protocol)")
    results = load_results(directory / "confirm" if protocol else directory)
    metric = "test_acc" if protocol and "final_test_acc" in results.trials else results.metric
    alpha = ((_read_spec(directory).get("protocol") or {}).get("alpha", ALPHA)) if protocol else ALPHA
    plans = plan_seeds(seeds_by_row(results, compare(results), metric), effect, alpha=alpha, power=power)
    measured = [p for p in plans if not p.why_not]
    if not measured:
        raise ResultsError(f"{directory}: no two arms have 2 or more finished seeds to pair yet" +
                           (" whose paired differences vary (each pair differs by the same amount on every seed)"
                            if any(p.n_now >= 2 for p in plans) else "") +
                           ", so the spread between seeds is unknown; plan once each arm has finished at least 2 seeds")
    table = pd.DataFrame([p._asdict() for p in measured]).drop(columns=["level", "why_not"])
    table["seeds_needed"] = [">100,000" if n is None else str(n) for n in table["seeds_needed"]]
    head = (f"Paired seeds to detect a true difference of {effect:g} in {metric} with {power:.0%} power (paired t-test "
            f"on the seeds both arms ran, as the comparison table runs it, at {measured[0].level:.3g}: alpha {alpha:g} "
            f"over {len(plans)} pair{'s' * (len(plans) > 1)}, Holm's strictest step). The spread of the paired "
            "differences is known only from the seeds so far: power now and seeds needed average the power over the "
            "true spreads those seeds leave possible, so the plan keeps its promise over repeated pilots (the fewer "
            "seeds so far, the more it asks for):")
    skipped = [f"{p.better} vs {p.worse}: not planned: {p.why_not}" for p in plans if p.why_not]
    return "\n".join([head, display(table).to_string(index=False), *skipped])
