"""Combining studies run separately: one protocol, no duplicated rows, the same summary as one run."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from apt_studies.combine import combine_studies
from apt_studies.report import aggregate
from apt_studies.study import StudyConfig


def _run(method: str, seed: int, rate: float) -> dict:
    return {
        "arch": "pi0",
        "method": method,
        "seed": seed,
        "success": {"seen": rate, "counterfactual": rate / 2},
        "instruction_sensitivity": 0.5,
        "outcomes": {"counterfactual": {"success": rate / 2, "habitual": 0.1, "other": 0.1, "none": 0.8 - rate / 2}},
    }


def _study(methods: list[str], runs: list[dict], **config: object) -> dict:
    base = dataclasses.asdict(StudyConfig(methods=tuple(methods), archs=("pi0",)))
    base.update(config)
    return {"config": base, "runs": runs, "wall_s": 10.0, "command": f"run {methods}"}


def test_combined_summary_equals_one_run_of_every_row():
    a = _study(["baseline", "apt"], [_run("baseline", 0, 0.4), _run("apt", 0, 0.6)])
    b = _study(["apt_dropout"], [_run("apt_dropout", 0, 0.5)])
    combined = combine_studies([a, b])
    assert combined["summary"] == aggregate([*a["runs"], *b["runs"]])
    assert combined["config"]["methods"] == ["baseline", "apt", "apt_dropout"] and combined["wall_s"] == 20.0


def test_settings_are_compared_where_the_runs_used_them():
    unguided = _study(["apt"], [{**_run("apt", 0, 0.6), "guidance_scale": 1.0}], guidance_scale=1.25)
    guided = _study(["apt_dropout_guided"], [{**_run("apt_dropout_guided", 0, 0.5), "guidance_scale": 1.5}])
    combined = combine_studies([unguided, {**guided, "config": {**guided["config"], "guidance_scale": 1.5}}])
    assert combined["config"]["guidance_scale"] == [1.0, 1.5]  # what the rows used
    other_seed = _study(["apt_dropout_guided"], [{**_run("apt_dropout_guided", 1, 0.5), "guidance_scale": 2.0}])
    with pytest.raises(ValueError, match=r"apt_dropout_guided ran with guidance_scale=1.5 and 2.0"):
        combine_studies([guided, other_seed])


def test_different_protocols_and_duplicate_rows_are_refused():
    a = _study(["apt"], [_run("apt", 0, 0.6)])
    longer = _study(["apt_dropout"], [_run("apt_dropout", 0, 0.5)], steps=800)
    with pytest.raises(ValueError, match="steps=800, study 0 with 400"):
        combine_studies([a, longer])
    with pytest.raises(ValueError, match=r"\('pi0', 'apt', 0\) appears in study 0 and study 1"):
        combine_studies([a, copy.deepcopy(a)])
    with pytest.raises(ValueError, match="at least one"):
        combine_studies([])
