"""The pretraining study's choice rule and goal check, as fixed in ``docs/study.md`` before any result.

* **Best APT variant** per arch (:func:`choose_best_apt`): among :data:`APT_CANDIDATES`, the highest mean
  *validation* counterfactual success over seeds among those whose mean validation ``seen`` success is at least
  :data:`SEEN_FLOOR`; if none qualifies, the highest validation counterfactual success. Ties go to the earlier
  candidate. Validation episodes are never reported.
* **Strongest baseline** per arch (:func:`strongest_baseline`): the row with the highest *reported* counterfactual
  mean among the pretraining regime's ``baseline`` and the task study's ``baseline`` and ``baseline_frozen``
  (picked on the reported numbers, which can only favour the baseline).
* **Goal** (:func:`goal_check`): best APT minus strongest baseline >= :data:`MARGIN` on counterfactual and on
  paraphrase success, best APT's ``seen`` >= :data:`SEEN_FLOOR`, for every arch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from apt_studies.report import aggregate

__all__ = [
    "APT_CANDIDATES",
    "MARGIN",
    "PRETRAIN_BASELINES",
    "SEEN_FLOOR",
    "TASK_BASELINES",
    "choose_best_apt",
    "format_goal_table",
    "goal_check",
    "strongest_baseline",
]

APT_CANDIDATES: tuple[str, ...] = ("apt", "apt_ft_vlm", "apt_s1_quarter", "apt_s1_0")
PRETRAIN_BASELINES: tuple[str, ...] = ("baseline",)
TASK_BASELINES: tuple[str, ...] = ("baseline", "baseline_frozen")
SEEN_FLOOR = 0.85
MARGIN = 0.15


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def choose_best_apt(runs: Sequence[Mapping[str, Any]], arch: str, min_seeds: int = 1) -> dict[str, Any]:
    """The rule's APT variant for ``arch`` from runs holding ``validation`` (``{"counterfactual", "seen"}``).

    Candidates with fewer than ``min_seeds`` seeds are left out (a study that did not finish every seed of a
    method compares only the complete ones). Means are compared at 9 decimals, so float noise never breaks a tie.

    Returns:
        ``{"method": name or None, "qualified": bool, "validation": {method: {"counterfactual", "seen", "n"}}}``.
    """
    table: dict[str, dict[str, float]] = {}
    for method in APT_CANDIDATES:
        group = [r for r in runs if r["arch"] == arch and r["method"] == method and r.get("validation")]
        if len(group) >= min_seeds:
            table[method] = {
                "counterfactual": _mean([r["validation"]["counterfactual"] for r in group]),
                "seen": _mean([r["validation"]["seen"] for r in group]),
                "n": len(group),
            }
    qualified = [m for m in table if table[m]["seen"] >= SEEN_FLOOR]
    pool = qualified or list(table)
    best = max(pool, key=lambda m: (round(table[m]["counterfactual"], 9), -APT_CANDIDATES.index(m)), default=None)
    return {"method": best, "qualified": bool(qualified), "validation": table}


def strongest_baseline(
    pretrain_summary: Mapping[str, Any], task_summary: Mapping[str, Any], arch: str
) -> tuple[str, Mapping[str, Any]] | None:
    """``(label, summary entry)`` of the baseline with the highest reported counterfactual mean on ``arch``.

    Labels are ``"pretrain:<method>"`` or ``"task:<method>"``.
    """
    candidates = [
        (f"{regime}:{method}", summary[arch][method])
        for regime, summary, methods in (
            ("pretrain", pretrain_summary, PRETRAIN_BASELINES),
            ("task", task_summary, TASK_BASELINES),
        )
        for method in methods
        if arch in summary and method in summary[arch]
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[1]["success"]["counterfactual"]["mean"])


def goal_check(
    pretrain_runs: Sequence[Mapping[str, Any]], task_runs: Sequence[Mapping[str, Any]] = (), min_seeds: int = 1
) -> dict[str, dict[str, Any]]:
    """Apply the choice rule (candidates with at least ``min_seeds`` seeds) and the goal per arch.

    Returns:
        ``{arch: {"best_apt", "qualified", "baseline", "apt": {split: mean}, "baseline_success": {split: mean},
        "delta": {"counterfactual", "paraphrase"}, "met": bool, "validation"}}``.
    """
    pretrain_summary = aggregate(pretrain_runs)
    task_summary = aggregate(task_runs) if task_runs else {}
    result: dict[str, dict[str, Any]] = {}
    for arch in pretrain_summary:
        choice = choose_best_apt(pretrain_runs, arch, min_seeds)
        base = strongest_baseline(pretrain_summary, task_summary, arch)
        if choice["method"] is None or base is None:
            continue
        apt = {s: v["mean"] for s, v in pretrain_summary[arch][choice["method"]]["success"].items()}
        baseline = {s: v["mean"] for s, v in base[1]["success"].items()}
        delta = {s: apt[s] - baseline[s] for s in ("counterfactual", "paraphrase")}
        met = all(d >= MARGIN - 1e-9 for d in delta.values()) and apt["seen"] >= SEEN_FLOOR
        result[arch] = {
            "best_apt": choice["method"],
            "qualified": choice["qualified"],
            "validation": choice["validation"],
            "baseline": base[0],
            "apt": apt,
            "baseline_success": baseline,
            "delta": delta,
            "met": met,
        }
    return result


def format_goal_table(result: Mapping[str, Mapping[str, Any]], digits: int = 2) -> str:
    """The goal check as a markdown table, one row per arch."""
    lines = [
        "| arch | best APT (validation) | strongest baseline | seen (APT) | counterfactual APT - baseline | "
        "paraphrase APT - baseline | goal met |",
        "| :--- | :--- | :--- | ---: | ---: | ---: | :--- |",
    ]
    for arch, row in result.items():
        apt, base, delta = row["apt"], row["baseline_success"], row["delta"]
        lines.append(
            f"| {arch} | `{row['best_apt']}` | `{row['baseline']}` | {apt['seen']:.{digits}f} | "
            f"{apt['counterfactual']:.{digits}f} - {base['counterfactual']:.{digits}f} = "
            f"{delta['counterfactual']:+.{digits}f} | {apt['paraphrase']:.{digits}f} - "
            f"{base['paraphrase']:.{digits}f} = {delta['paraphrase']:+.{digits}f} | "
            f"{'yes' if row['met'] else 'no'} |"
        )
    return "\n".join(lines)
