"""The Meta-World study's choice rule and goal check (committed in ``docs/metaworld.md`` before any result).

* **Best APT variant**, per arch: among :data:`APT_CANDIDATES` (in that order), the one with the highest mean
  *validation* counterfactual success over seeds, among those whose mean validation ``seen`` success is at least
  the baseline's minus :data:`SEEN_MARGIN`; if none qualifies, the highest validation counterfactual success. Ties
  go to the first. Validation episodes never enter a reported split.
* **Strongest baseline**: ``baseline`` (the only baseline of this study).
* **Goal** (issue 25): best APT minus the baseline >= :data:`GOAL_DELTA` in reported counterfactual success (means
  over seeds), with best APT's reported ``seen`` success >= the baseline's minus :data:`SEEN_MARGIN` ("at equal
  seen success"), on both archs, with 3 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["APT_CANDIDATES", "GOAL_DELTA", "SEEN_MARGIN", "format_goal_table", "goal_check"]

APT_CANDIDATES: tuple[str, ...] = ("apt", "apt_ft_vlm")
GOAL_DELTA = 0.15
SEEN_MARGIN = 0.10
REQUIRED_SEEDS = 3


def _mean(runs: Sequence[Mapping[str, Any]], key: str, split: str) -> float:
    values = [float(r[key][split]) for r in runs]
    return math.fsum(values) / len(values) if values else math.nan


def goal_check(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arch: the APT variant chosen on validation, the deltas on the reported splits, whether the goal is met."""
    out: dict[str, dict[str, Any]] = {}
    for arch in dict.fromkeys(r["arch"] for r in runs):
        mine = [r for r in runs if r["arch"] == arch]
        base = [r for r in mine if r["method"] == "baseline"]
        candidates = [m for m in APT_CANDIDATES if any(r["method"] == m for r in mine)]
        if not base or not candidates:
            continue
        val = {m: [r for r in mine if r["method"] == m] for m in candidates}
        floor = _mean(base, "validation", "seen") - SEEN_MARGIN
        qualified = [m for m in candidates if _mean(val[m], "validation", "seen") >= floor] or candidates
        best = max(qualified, key=lambda m: (_mean(val[m], "validation", "counterfactual"), -candidates.index(m)))
        seeds = len({r["seed"] for r in val[best]})
        row = {
            "best_apt": best,
            "seeds": seeds,
            "seen": (_mean(val[best], "success", "seen"), _mean(base, "success", "seen")),
            "counterfactual": (_mean(val[best], "success", "counterfactual"), _mean(base, "success", "counterfactual")),
            "paraphrase": (_mean(val[best], "success", "paraphrase"), _mean(base, "success", "paraphrase")),
        }
        delta = row["counterfactual"][0] - row["counterfactual"][1]
        equal_seen = row["seen"][0] >= row["seen"][1] - SEEN_MARGIN
        row["delta_counterfactual"] = delta
        row["goal_met"] = bool(delta >= GOAL_DELTA and equal_seen and seeds >= REQUIRED_SEEDS)
        row["equal_seen"] = bool(equal_seen)
        out[arch] = row
    return out


def format_goal_table(goal: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of :func:`goal_check`."""
    lines = [
        "| arch | best APT (validation) | seeds | seen APT / baseline | counterfactual APT - baseline "
        "| paraphrase APT - baseline | goal met |",
        "| :--- | :--- | ---: | ---: | ---: | ---: | :--- |",
    ]
    for arch, row in goal.items():
        (sa, sb), (ca, cb), (pa, pb) = row["seen"], row["counterfactual"], row["paraphrase"]
        met = "yes" if row["goal_met"] else ("no" if row["seeds"] >= REQUIRED_SEEDS else "no (fewer than 3 seeds)")
        lines.append(
            f"| {arch} | `{row['best_apt']}` | {row['seeds']} | {sa:.2f} / {sb:.2f} | {ca:.2f} - {cb:.2f} = "
            f"{ca - cb:+.2f} | {pa:.2f} - {pb:.2f} = {pa - pb:+.2f} | {met} |"
        )
    return "\n".join(lines)
