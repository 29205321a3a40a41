"""Statistics of the segmentation benchmarks: per-group summaries over seeds, paired differences against a
baseline with t intervals, and Holm's step-down correction of a family of them.

A run row is a dict with at least `cohort`, `labelled`, `init`, `seed` and the metric (default
`test_dice_mean`); an optional `site` (default "all") says which test set it was scored on, so one run can
give one row per site. Groups are (cohort, site, labelled, init); pairs are matched on the seed (the seed
chooses the labelled volumes and every crop, so the inits of one seed saw the same data).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ALL_SITES = "all"


def _site(row: dict[str, Any]) -> str:
    return row.get("site", ALL_SITES)


def nan_stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation (ddof 1; 0 for one value) of the values that are not None or NaN."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per (cohort, site, labelled, init): runs, mean, std (ddof 1; 0 for one run), min, max of test_dice_mean, the
    mean seconds per run, the mean weight drifts and the mean (over seeds) of every class's Dice ("dice_<class>").
    Sorted by cohort, site, labelled and `order` of the inits (others after, by name)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["cohort"], _site(run), run["labelled"], run["init"]), []).append(run)
    rows = []
    for (cohort, site, labelled, init), members in groups.items():
        v = np.asarray([m["test_dice_mean"] for m in members], dtype=float)
        organs = [k for k in members[0] if k.startswith("dice_")]
        rows.append({"cohort": cohort, **({"site": site} if site != ALL_SITES else {}), "labelled": labelled,
                     "init": init, "runs": len(v), "dice_mean": float(v.mean()),
                     "dice_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "dice_min": float(v.min()),
                     "dice_max": float(v.max()),
                     "seconds_mean": nan_stats([m.get("seconds", math.nan) for m in members])[0],
                     **{k: nan_stats([m.get(k, math.nan) for m in members])[0]
                        for k in ("drift_encoder", "drift_decoder") if k in members[0]},
                     **{organ: nan_stats([m.get(organ, math.nan) for m in members])[0] for organ in organs}})
    rank = {init: k for k, init in enumerate(order)}
    return sorted(rows, key=lambda r: (r["cohort"], _site(r), r["labelled"], rank.get(r["init"], len(rank)),
                                       r["init"]))


def paired_differences(runs: list[dict[str, Any]], *, baseline: str = "scratch", level: float = 0.95,
                       metric: str = "test_dice_mean", order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per (cohort, site, labelled, init != baseline): the per-seed differences init - baseline of `metric`
    over the seeds both have, their mean, std (ddof 1), the two-sided `level` t interval of the mean and the
    two-sided p value of the paired t test (NaN with fewer than 2 seeds), and how many seeds the init won."""
    from scipy import stats

    by_key = {(r["cohort"], _site(r), r["labelled"], r["init"], r["seed"]): r.get(metric) for r in runs}
    by_key = {k: v for k, v in by_key.items() if v is not None and not math.isnan(v)}
    rows = []
    for cohort, site, labelled, init in sorted({k[:4] for k in by_key}):
        if init == baseline:
            continue
        seeds = sorted(k[4] for k in by_key if k[:4] == (cohort, site, labelled, init)
                       and (cohort, site, labelled, baseline, k[4]) in by_key)
        if not seeds:
            continue
        d = np.asarray([by_key[(cohort, site, labelled, init, s)] - by_key[(cohort, site, labelled, baseline, s)]
                        for s in seeds])
        mean = float(d.mean())
        std = float(d.std(ddof=1)) if len(d) > 1 else math.nan
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * std / math.sqrt(len(d))) if len(d) > 1 else math.nan
        if len(d) > 1 and std > 0:
            p = float(2 * stats.t.sf(abs(mean) / (std / math.sqrt(len(d))), len(d) - 1))
        else:
            p = math.nan if len(d) < 2 else float(mean == 0)
        rows.append({"cohort": cohort, **({"site": site} if site != ALL_SITES else {}), "labelled": labelled,
                     "init": init, **({"metric": metric} if metric != "test_dice_mean" else {}), "seeds": len(d),
                     "diff_mean": mean, "diff_std": std, "ci_low": mean - half, "ci_high": mean + half,
                     "p_value": p, "wins": int((d > 0).sum()), "diffs": " ".join(f"{x:+.4f}" for x in d)})
    rank = {init: k for k, init in enumerate(order)}
    return sorted(rows, key=lambda r: (r["cohort"], _site(r), r["labelled"], rank.get(r["init"], len(rank))))


def holm(rows: list[dict[str, Any]], *, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm's step-down correction of the family `rows` (paired_differences rows, in place and returned).

    With the m p values sorted, the k-th smallest (k = 1..m) is tested at alpha / (m - k + 1) until the first
    one that is not rejected; it and every later one are tested at that first non-rejected level. Each row
    gets `holm_p` (the adjusted p value: the running maximum of (m - k + 1) p_(k), at most 1), `holm_level`
    (the level of its test), `holm_reject`, and the t interval at confidence 1 - holm_level
    (`holm_ci_low`, `holm_ci_high`): it excludes 0 exactly when Holm rejects. Rows without a p value (one
    seed) are left out of the family (NaN)."""
    from scipy import stats

    tested = sorted((r for r in rows if not math.isnan(r["p_value"])), key=lambda r: r["p_value"])
    m, running, level = len(tested), 0.0, None
    for k, row in enumerate(tested):
        running = max(running, min(1.0, (m - k) * row["p_value"]))
        if level is None and row["p_value"] > alpha / (m - k):
            level = alpha / (m - k)
        row_level = level if level is not None else alpha / (m - k)
        n, std = row["seeds"], row["diff_std"]
        half = float(stats.t.ppf(1 - row_level / 2, n - 1) * std / math.sqrt(n))
        row.update({"holm_p": running, "holm_level": row_level, "holm_reject": level is None,
                    "holm_ci_low": row["diff_mean"] - half, "holm_ci_high": row["diff_mean"] + half})
    for row in rows:
        if math.isnan(row["p_value"]):
            row.update({"holm_p": math.nan, "holm_level": math.nan, "holm_reject": False, "holm_ci_low": math.nan,
                        "holm_ci_high": math.nan})
    return rows
