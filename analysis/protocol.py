"""The report of a two-stage protocol (`sweeps/protocol.py`): a verdict per arm from the confirm stage,
paired by seed and corrected for multiple comparisons, beside each arm's learning-rate robustness from
the tune stage. Each stage also gets its own ordinary report."""

from __future__ import annotations

import html
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.budget import (
    TUNING_ASSUMES,
    time_to_target,
    trial_compute_seconds,
    tuning_curves,
)
from analysis.figures import FIGURES, ComparisonInfo, comparison_plot
from analysis.page import html_table, made_with, page_end, page_start, smoke_tag
from analysis.plotting import NotApplicable, arm_colours
from analysis.results import FINISHED, ResultsError, load_results
from analysis.stats import (
    holm,
    metric_range,
    metric_resolution,
    minimum_detectable_effect,
    paired_sd,
    paired_test,
    rank_key,
    summarize,
)
from analysis.tables import compare

GOOD_LR_TOLERANCE = 0.01  # a tuning trial is "good" if its final metric is within this of its arm's best
POWER = 0.8  # the detection probability behind each pair's minimum detectable effect (mde)


class ArmSeeds(NamedTuple):
    """One arm's confirm stage: the final metric of each finished seed (indexed by seed), which diverged."""
    values: pd.Series  # float; a diverged seed keeps its score, NaN/inf where that score is not finite
    diverged: pd.Series  # bool, same index
    planned: int  # seeds the confirm stage ran for this arm (finished or not)

    def key(self, sign: int) -> tuple:
        return rank_key(self.values, self.diverged, sign)

    def facts(self, arm: str) -> str:
        """`adam: 2 of 5 seeds diverged, 1 failed`, or "" when every planned seed finished normally."""
        parts = [f"{int(self.diverged.sum())} of {self.planned} seeds diverged"] if self.diverged.any() else []
        if len(self.values) < self.planned:
            parts.append(f"{self.planned - len(self.values)} of {self.planned} did not finish")
        return f"{arm}: {', '.join(parts)}" if parts else ""


class Pair(NamedTuple):
    better: str
    worse: str
    mean_diff: float  # mean over paired seeds of better - worse, in the metric's units (negative when lower is better)
    p_value: float  # paired t-test, two-sided; NaN when not testable
    p_holm: float  # Holm-adjusted over all pairs of arms
    significant: bool
    n: int  # seeds both arms finished with a finite value: what the test used
    why_not: str  # why the pair was not tested ("" when it was)
    sd_diff: float  # std of the paired differences
    mde: float  # the smallest true difference these seeds detect with power POWER at alpha / number of tested pairs
    tied: bool  # both arms have the same score on every seed both finished
    mode: str  # "max" or "min": which direction of the metric is better


def pairwise(arms: dict[str, ArmSeeds], mode: str, alpha: float) -> list[Pair]:
    """Every pair of arms, tested paired by seed.

    The family is all pairs, so with Holm's step-down the chance of any false "better" claim is at most
    alpha. A pair is tested only when both arms have a finite score on every seed they finished: testing
    the survivors of an arm that lost seeds to divergence would judge it on its lucky seeds; nor when an arm
    diverged on every seed (it ranks last). A tested pair's better arm is the one ahead on the seeds both
    finished (what the test compares), which need not be the one whose own seeds average higher when some of
    its seeds did not finish; an untested pair keeps the ranking's order.
    """
    sign = 1 if mode == "max" else -1
    pairs = []
    for a, b in itertools.combinations(arms, 2):
        if arms[b].key(sign) > arms[a].key(sign):
            a, b = b, a
        joined = pd.concat([arms[a].values, arms[b].values], axis=1, join="inner").to_numpy(float)
        finite = joined[np.isfinite(joined).all(axis=1)]
        diff = sign * float((finite[:, 0] - finite[:, 1]).mean()) if len(finite) else np.nan
        tied = len(joined) > 0 and np.array_equal(joined[:, 0], joined[:, 1], equal_nan=True)
        why = _why_untested(arms, a, b, tied)
        p = np.nan if why else paired_test(joined[:, 0], joined[:, 1]).p_value
        if not why and not np.isfinite(p):
            why = "fewer than 2 paired seeds, or the same difference on every seed"
        if not why and diff < 0:  # a tested pair: b is ahead where the two are compared
            a, b, diff, finite = b, a, -diff, finite[:, ::-1]
        sd = paired_sd(finite[:, 0], finite[:, 1])
        pairs.append((a, b, sign * diff, p, len(finite), why, sd, tied))
    adjusted = holm([p for _, _, _, p, *_ in pairs])
    level = alpha / max(1, int(np.isfinite(adjusted).sum()))  # Holm's first, strictest, step
    return [Pair(a, b, d, p, q, bool(q < alpha), n, why, sd,
                 minimum_detectable_effect(sd, n, level, POWER) if not why else np.nan, tied, mode)
            for (a, b, d, p, n, why, sd, tied), q in zip(pairs, adjusted)]


def _why_untested(arms: dict[str, ArmSeeds], a: str, b: str, tied: bool) -> str:
    """Why the pair (a ranked above b) is not tested, or "" when it is."""
    if tied:
        return "the same score on every seed both finished"
    lost = [arm for arm in (a, b) if not np.isfinite(arms[arm].values).all()]
    if lost:
        return f"{' and '.join(lost)} has no finite score on some seeds (diverged)"
    dead = [arm for arm in (a, b) if len(arms[arm].diverged) and arms[arm].diverged.all()]
    if dead:  # ranked last whatever its scores: a model that never trained to the end is no candidate
        return f"{' and '.join(dead)} diverged on every seed"
    return ""


def signed_difference(pair: Pair, metric: str) -> tuple[str, str]:
    """(`ece −0.0100`, `lower is better`): better − worse in the metric's own units, and which way is better."""
    signed = f"{pair.mean_diff:+.4f}".replace("-", "\u2212")  # a minus sign, not a hyphen
    return f"{metric} {signed}", f"{'higher' if pair.mode == 'max' else 'lower'} is better"


def verdict(pair: Pair, metric: str, arms: dict[str, ArmSeeds] | None = None) -> str:
    """One sentence per pair of arms, with how many seeds each lost to divergence beside it."""
    facts = "; ".join(f for f in (arms[pair.better].facts(pair.better), arms[pair.worse].facts(pair.worse)) if f) \
        if arms else ""
    facts = f"; {facts}" if facts else ""
    if pair.tied:
        return f"{pair.better} and {pair.worse} tied: the same {metric} on every seed{_both(pair, arms)}{facts}"
    if pair.why_not:
        return f"{pair.better} ranks above {pair.worse}, not tested: {pair.why_not}{facts}"
    stats = (f"paired t-test over {pair.n} seeds p = {pair.p_value:.3g}, Holm-adjusted p = {pair.p_holm:.3g}"
             f"{facts}")
    difference, direction = signed_difference(pair, metric)
    if pair.significant:
        return f"{pair.better} is better than {pair.worse}: {difference} on average ({direction}; {stats})"
    missed = (f"; with {pair.n} seeds it could have missed a true difference of up to {pair.mde:.4f} "
              f"({POWER:.0%} power at Holm's strictest level)" if np.isfinite(pair.mde) else "")
    return (f"{pair.better} vs {pair.worse}: no detectable difference at this budget "
            f"({difference} on average, {direction}; {stats}){missed}")


def _both(pair: Pair, arms: dict[str, ArmSeeds] | None) -> str:
    """` both finished` when the two arms did not finish the same seeds, else ``."""
    same = arms is None or set(arms[pair.better].values.index) == set(arms[pair.worse].values.index)
    return "" if same else " both finished"


def lr_robustness(tune_trials: pd.DataFrame, metric: str, mode: str, lr_key: str = "optim.lr") -> pd.DataFrame:
    """Per arm: how wide the range of good learning rates is in the tune stage (good = within tolerance of best).

    Only trials that ran the full budget count when the arm has any, so early-stopped trials' partial
    scores are not compared with finished ones."""
    rows = []
    for arm, group in tune_trials.groupby("arm", sort=False):
        finished = group[group["status"] == "completed"]  # as in the choice of the tuned configuration:
        group = finished if len(finished) else group      # trials that ran the whole budget, when there are any
        values = group[f"final_{metric}"].astype(float)
        finite = values[np.isfinite(values)]
        if lr_key not in group or finite.empty:
            continue
        best = finite.max() if mode == "max" else finite.min()
        good = group.loc[finite.index[(finite - best).abs() <= GOOD_LR_TOLERANCE], lr_key].astype(float)
        low, high = good.min(), good.max()
        rows.append({"arm": arm, "full_budget_trials": len(group), f"best_{metric}": best, "good_trials": len(good),
                     "good_lr_low": low, "good_lr_high": high,
                     "good_lr_decades": float(np.log10(high / low)) if low > 0 else np.nan})
    return pd.DataFrame(rows)


def confirm_seeds(trials: pd.DataFrame, metric: str, seed_key: str | None) -> dict[str, ArmSeeds]:
    """Arm -> its confirm-stage seeds. Finished trials (trained to the end, or diverged) are results;
    a trial that failed or is still running is not, and is counted as not finished."""
    arms = {}
    for arm, group in trials.groupby("arm", sort=False):
        done = group[group["status"].isin(FINISHED)]
        index = done[seed_key] if seed_key else done.index
        arms[arm] = ArmSeeds(pd.Series(done[f"final_{metric}"].astype(float).to_numpy(), index=index),
                             pd.Series((done["status"] == "diverged").to_numpy(), index=index), len(group))
    return arms


def protocol_tables(results_dir: Path, alpha: float = 0.05, target: float | None = None) -> dict[str, object]:
    """The verdict table, the pairwise tests with each pair's power, the LR robustness table, the tune stage's
    tuning curves, and compute per arm with the confirm stage's time to `target`."""
    tune, confirm = load_results(results_dir / "tune"), load_results(results_dir / "confirm")
    metric = "test_acc" if "final_test_acc" in confirm.trials else confirm.metric
    mode = "max" if metric.endswith("acc") else confirm.mode
    sign = 1 if mode == "max" else -1
    trials = confirm.trials
    seed_key = next((h for h in confirm.hyperparameters if h.rsplit(".", 1)[-1] == "seed"), None)
    arms = confirm_seeds(trials, metric, seed_key) if not trials.empty else {}
    ranked = sorted(arms, key=lambda a: arms[a].key(sign), reverse=True)
    arms = {a: arms[a] for a in ranked}
    pairs = pairwise(arms, mode, alpha)
    resolution = metric_resolution(metric, confirm.confusion)
    top = ranked[0] if ranked else None
    settings = [h for h in confirm.hyperparameters if h != seed_key]
    rows = []
    for rank, arm in enumerate(ranked, 1):
        group, seeds = trials[trials["arm"] == arm], arms[arm]
        done = group[group["status"].isin(FINISHED)]
        acc = summarize(seeds.values, bounds=metric_range(metric), resolution=resolution)
        loss = summarize(done.get("final_test_loss", np.nan), bounds=metric_range("test_loss"))
        vs_top = next((p for p in pairs if {p.better, p.worse} == {arm, top}), None)
        first = group.iloc[0]
        notes = [seeds.facts(arm).removeprefix(f"{arm}: ")]
        fewer = max((len(arms[a].values) for a in ranked[rank:]), default=0)
        if 0 < len(seeds.values) < fewer:
            notes.append(f"ranked above arms with more finished seeds ({len(seeds.values)} against up to {fewer})")
        if len(seeds.values) and seeds.diverged.all():
            call = "diverged on every seed"
        elif arm == top:
            call = "top"
        elif vs_top is not None and vs_top.tied:
            call = f"tied with {top}: the same {metric} on every seed both finished"
        elif vs_top is None or vs_top.why_not:
            call = "not tested" + (f": {vs_top.why_not}" if vs_top else "")
        elif vs_top.significant and vs_top.better == arm:  # ranked below on its own seeds, ahead on the shared ones
            call = f"better than {top} on the {vs_top.n} seeds both finished"
        else:
            call = "worse" if vs_top.significant else "no detectable difference"
        rows.append({
            "rank": rank, "arm": arm,
            "tuned_config": ", ".join(f"{k}={_fmt(first[k])}" for k in settings if k in first and not pd.isna(first[k])),
            "n_seeds": len(seeds.values), "n_diverged": int(seeds.diverged.sum()),
            f"{metric}_mean": acc.mean, f"{metric}_ci95_low": acc.ci_low, f"{metric}_ci95_high": acc.ci_high,
            "test_loss_mean": loss.mean, "test_loss_ci95_low": loss.ci_low, "test_loss_ci95_high": loss.ci_high,
            "p_vs_top": vs_top.p_value if vs_top else np.nan, "p_holm_vs_top": vs_top.p_holm if vs_top else np.nan,
            "verdict_vs_top": call, "note": "; ".join(n for n in notes if n),
        })
    compute = []
    tune_seconds, confirm_seconds = trial_compute_seconds(tune), trial_compute_seconds(confirm)  # training and eval
    for arm in ranked:
        t, c = tune.trials[tune.trials["arm"] == arm], trials[trials["arm"] == arm]
        compute.append({"arm": arm, "tune_trials": len(t), "tune_epochs": int(t["epochs_run"].sum()),
                        "tune_seconds": float(np.nansum(tune_seconds[t["trial_id"]])), "confirm_trials": len(c),
                        "confirm_epochs": int(c["epochs_run"].sum()),
                        "confirm_seconds": float(np.nansum(confirm_seconds[c["trial_id"]]))})
    timed = time_to_target(confirm, compare(confirm), target) if not trials.empty else pd.DataFrame(columns=["arm"])
    compute = pd.DataFrame(compute, columns=["arm", "tune_trials", "tune_epochs", "tune_seconds", "confirm_trials",
                                             "confirm_epochs", "confirm_seconds"])
    compute = compute.merge(timed.drop(columns="n_seeds", errors="ignore"), on="arm", how="left")
    level = alpha / max(1, sum(np.isfinite(p.p_holm) for p in pairs))
    power = pd.DataFrame([{"better": p.better, "worse": p.worse, "n_seeds": p.n, "mean_diff": p.mean_diff,
                           "sd_diff": p.sd_diff, "level": level, f"mde_power{POWER * 100:.0f}": p.mde,
                           "significant": p.significant} for p in pairs],
                         columns=["better", "worse", "n_seeds", "mean_diff", "sd_diff", "level",
                                  f"mde_power{POWER * 100:.0f}", "significant"])
    return {"tune": tune, "confirm": confirm, "metric": metric, "mode": mode, "pairs": pairs, "arms": arms,
            "verdicts": pd.DataFrame(rows), "robustness": lr_robustness(tune.trials, tune.metric, tune.mode),
            "compute": compute, "power": power, "tuning": tuning_curves(tune)}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def protocol_page(results_dir: Path, spec: dict, target: float | None = None) -> tuple[str, dict[str, str]]:
    """The protocol report page and its tables (file name -> CSV/Markdown text)."""
    protocol = spec.get("protocol") or {}
    t = protocol_tables(results_dir, protocol.get("alpha", 0.05), target)
    metric, verdicts = t["metric"], t["verdicts"]
    parts = [page_start(spec, str(spec.get("name", results_dir.name)), "protocol")]
    if t["tune"].partial or t["confirm"].partial:
        parts.append("<p class='partial'><b>Partial results.</b> A stage has not finished; run "
                     "<code>sweep resume</code>, then <code>sweep report</code> again.</p>")
    search, train = spec.get("search") or {}, spec.get("train") or {}
    parts.append(
        "<p class='method'>Protocol: <b>tune</b> — each arm searched its own space with the same budget "
        f"({search.get('num_samples')} trials of up to {train.get('epochs')} epochs, {search.get('algorithm')} search, "
        f"scheduler {(spec.get('scheduler') or {}).get('name', 'fifo')}), judged on "
        f"{search.get('metric', 'val_acc')} on a validation split carved from the training data; the test split was "
        "not given to these trials. <b>confirm</b> — each arm's best configuration rerun with "
        f"{protocol.get('confirm_seeds')} seeds to the full budget without early stopping; the test split was "
        "evaluated once per trial, after its last epoch. Verdicts: paired t-tests over seeds (seed i of one arm "
        f"against seed i of another) for every pair of arms, Holm-corrected so the chance of any false "
        f"'better' claim is at most {protocol.get('alpha', 0.05)}.</p>")
    parts.append(f"<h2>Verdict{smoke_tag(spec)}</h2><ul>" + "".join(
        f"<li>{html.escape(verdict(p, metric, t['arms']))}</li>" for p in t["pairs"]) + "</ul>")
    parts += ["<h2>Per arm (confirm stage, test split)</h2>",
              html_table(verdicts, details=["test_loss_mean", "test_loss_ci95_low", "test_loss_ci95_high", "p_vs_top"])]
    palette = arm_colours(list(spec.get("arms") or {}), list(verdicts["arm"]))  # once: one colour per arm throughout
    if len(verdicts):
        fig = comparison_plot(confirm_info(t), palette, f"Confirm stage: {metric} of each arm",
                              "points: each seed; diamond and bar: mean and 95% CI (kept inside the metric's range), "
                              "as in the table; best first")
        parts.append(f"<figure>{fig.to_html(full_html=False, include_plotlyjs=False, div_id='figure-confirm-seeds')}"
                     "</figure>")
    parts += ["<h2>Learning-rate robustness (tune stage)</h2><p class='method'>Good trials: final "
              f"validation metric within {GOOD_LR_TOLERANCE} of the arm's best; the width of their learning-rate "
              "range in decades says how forgiving the arm is to tuning.</p>", html_table(t["robustness"])]
    parts += ["<h2>Power: what the confirm stage could have detected</h2><p class='method'>For each pair: the "
              f"smallest true difference its paired seeds detect with {POWER:.0%} power, at alpha over the number of "
              "tested pairs (Holm's first and strictest step, so the figure errs on the large side). The spread of "
              "the paired differences is measured on these few seeds and may be an underestimate: the power is "
              "averaged over the true spreads the observed one leaves possible, so that over repeated confirm stages "
              f"a true difference of this size is detected {POWER:.0%} of the time. A 'no detectable difference' "
              "verdict could have missed a "
              "difference up to this size; <code>sweep plan DIR --effect D</code> says how many seeds a difference "
              "D needs.</p>", html_table(t["power"])]
    target_text = ("set with sweep report --target" if target is not None else "the best score more than "
                   "half of every arm's confirm seeds reach; set another with sweep report --target")
    parts += ["<h2>Compute spent per arm, and time to target</h2><p class='method'>Time to target (confirm stage, "
              f"validation {t['confirm'].metric}, target {target_text}): epochs and seconds (of training and "
              "evaluation, as the trials timed them) until each seed first reaches it, the median over seeds, a seed that never reached it counting as never.</p>",
              html_table(t["compute"])]
    if len(t["tuning"]):
        parts.append(f"<p class='method'>Tuning curves (tune stage): {html.escape(TUNING_ASSUMES)}</p>")
    for stage, key in (("tune", "lr_sensitivity"), ("tune", "tuning_curves"), ("confirm", "learning_curves")):
        results = t[stage]
        try:
            fig = FIGURES[key](results, compare(results), palette)
        except NotApplicable as reason:
            parts.append(f"<p>{key.replace('_', ' ')} ({stage}): not shown: {html.escape(str(reason))}</p>")
            continue
        parts.append(f"<h2>{stage} stage: {key.replace('_', ' ')}</h2><figure>"
                     + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{stage}-{key}") + "</figure>")
    versions = made_with(results_dir / "tune")
    parts.append(page_end((f"Made with {html.escape(versions)}.<br>" if versions else "")
                          + "Stage reports: <a href='../tune/report/report.html'>tune</a> · "
                          "<a href='../confirm/report/report.html'>confirm</a> · tables: "
                          "<a href='verdicts.csv'>verdicts.csv</a> · <a href='pairs.csv'>pairs.csv</a> · "
                          "<a href='lr_robustness.csv'>lr_robustness.csv</a> · <a href='power.csv'>power.csv</a> · "
                          "<a href='tuning_curves.csv'>tuning_curves.csv</a> · <a href='compute.csv'>compute.csv</a>"))
    pairs = pd.DataFrame([p._asdict() for p in t["pairs"]])
    tables = {"verdicts.csv": verdicts.to_csv(index=False), "pairs.csv": pairs.to_csv(index=False),
              "lr_robustness.csv": t["robustness"].to_csv(index=False), "compute.csv": t["compute"].to_csv(index=False),
              "power.csv": t["power"].to_csv(index=False), "tuning_curves.csv": t["tuning"].to_csv(index=False)}
    return "\n".join(parts), tables


def confirm_info(t: dict[str, object]) -> ComparisonInfo:
    """The confirm stage's figure: each arm's seeds (as `protocol_tables` judged them) with the table's mean and CI."""
    verdicts, metric = t["verdicts"], t["metric"]
    mean, low, high = (verdicts[f"{metric}_{c}"].to_numpy(float) for c in ("mean", "ci95_low", "ci95_high"))
    return ComparisonInfo(metric, verdicts["arm"].tolist(), mean, low, high,
                          [t["arms"][arm].values for arm in verdicts["arm"]])


def is_protocol(results_dir: Path) -> bool:
    return (results_dir / "tune").is_dir() and (results_dir / "tune" / "spec.yaml").exists()


__all__ = ["ArmSeeds", "Pair", "pairwise", "confirm_seeds", "verdict", "lr_robustness", "protocol_tables", "protocol_page", "confirm_info",
           "is_protocol",
           "ResultsError"]
