"""Compare a run's rows with a study's reference runs: bit for bit where the environment allows, else within the
seed spread, so a user on another machine learns whether their numbers agree."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from apt_studies.environment import same_kernels

SPREAD = 2.0
"""A value agrees with the reference when it lies within mean ± SPREAD x (seed standard deviation), widened by the
binomial standard error of a success rate over the run's evaluation episodes (seed noise and evaluation noise)."""


@dataclass(frozen=True)
class Agreement:
    arch: str
    method: str
    split: str
    value: float
    mean: float
    std: float
    seeds: int
    tolerance: float
    same_seed_value: float | None

    @property
    def agrees(self) -> bool:
        return abs(self.value - self.mean) <= self.tolerance

    @property
    def bit_exact(self) -> bool:
        return self.same_seed_value is not None and self.same_seed_value == self.value


def compare(
    runs: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]], episodes: int, splits: Sequence[str]
) -> list[Agreement]:
    """One :class:`Agreement` per (arch, method, split) of ``runs`` that the reference also ran.

    Example::

        >>> ref = [{"arch": "a", "method": "m", "seed": s, "success": {"x": v}} for s, v in enumerate([0.5, 0.6, 0.7])]
        >>> row = compare([{"arch": "a", "method": "m", "seed": 0, "success": {"x": 0.55}}], ref, 100, ["x"])[0]
        >>> round(row.mean, 2), row.agrees, row.bit_exact
        (0.6, True, False)
    """
    found = []
    for run in runs:
        for split in splits:
            values = {
                r["seed"]: r["success"][split]
                for r in reference
                if r["arch"] == run["arch"] and r["method"] == run["method"] and split in r.get("success", {})
            }
            if not values or split not in run.get("success", {}):
                continue
            value = float(run["success"][split])
            mean = statistics.fmean(values.values())
            std = statistics.stdev(values.values()) if len(values) > 1 else 0.0
            binomial = (max(value * (1 - value), 0.0) / max(episodes, 1)) ** 0.5
            found.append(
                Agreement(
                    run["arch"],
                    run["method"],
                    split,
                    value,
                    mean,
                    std,
                    len(values),
                    SPREAD * std + binomial,
                    values.get(run["seed"]),
                )
            )
    return found


def format_agreement(rows: Sequence[Agreement], same_environment: bool) -> str:
    """A markdown table of :func:`compare`'s rows and a one-line verdict."""
    lines = [
        "| arch | method | split | this run | reference (mean ± std, seeds) | agrees | same seed, bit-exact |",
        "| :--- | :--- | :--- | ---: | ---: | :---: | :---: |",
    ]
    for row in rows:
        exact = "-" if row.same_seed_value is None else ("yes" if row.bit_exact else f"no ({row.same_seed_value:.2f})")
        lines.append(
            f"| {row.arch} | {row.method} | {row.split} | {row.value:.2f} | {row.mean:.2f} ± {row.std:.2f} "
            f"({row.seeds}) | {'yes' if row.agrees else 'NO'} | {exact} |"
        )
    disagree = [r for r in rows if not r.agrees]
    verdict = (
        "All rows agree with the reference within its seed spread."
        if not disagree
        else f"{len(disagree)} of {len(rows)} rows lie outside the reference's seed spread."
    )
    if same_environment:
        exact = all(r.bit_exact for r in rows if r.same_seed_value is not None)
        verdict += " Same versions and CPU kernels as the reference: " + (
            "the same-seed rows are bit-exact, as expected."
            if exact
            else "the same-seed rows SHOULD be bit-exact but are not."
        )
    else:
        verdict += " Other versions or CPU kernels than the reference: bit-exact rows are not expected."
    return "\n".join(lines) + "\n\n" + verdict


SELECTION_KEYS = ("archs", "methods", "seeds", "save_checkpoints")
"""Config fields that choose which runs a study makes, not what any run computes."""


def settings_differences(config: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The fields (outside :data:`SELECTION_KEYS`) in which a run's config differs from the reference's: a run with
    other steps or episodes is not expected to agree with it, bit for bit or within the seed spread."""
    keys = sorted((set(config) | set(reference)) - set(SELECTION_KEYS))
    return [
        f"{key}: {config.get(key)!r} vs {reference.get(key)!r}" for key in keys if config.get(key) != reference.get(key)
    ]


def reference_report(study: dict[str, Any], reference: dict[str, Any], splits: Sequence[str]) -> str:
    """``study``'s rows beside ``reference``'s seeds on ``splits``, as markdown: whether the two runs' settings
    (:func:`settings_differences`) and environments (:func:`~apt_studies.environment.same_kernels`) allow a
    comparison and bit-exact rows, the table and the verdict."""
    rows = compare(study["runs"], reference["runs"], study["config"]["eval_episodes"], splits)
    differences = same_kernels(study.get("environment"), reference.get("environment"))
    settings = settings_differences(study["config"], reference.get("config", {}))
    seeds = len({run["seed"] for run in reference["runs"]})
    environment = "the same" if not differences else "differs: " + "; ".join(differences)
    text = (
        f"Beside the reference ({seeds} seeds; environment {environment}):\n\n"
        f"{format_agreement(rows, same_environment=not differences and not settings)}\n"
    )
    if settings:
        text += (
            f"\nThis run's settings are not the reference's ({'; '.join(settings)}), so neither agreement nor "
            "bit-exact rows are expected: run with the reference's settings (the defaults) to compare.\n"
        )
    return text
