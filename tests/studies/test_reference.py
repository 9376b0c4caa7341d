"""A study run tells a user on another machine whether their numbers agree with the reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from apt_studies.environment import environment_record, same_kernels
from apt_studies.reference import compare, format_agreement, reference_report

ROOT = Path(__file__).parents[2]


def runs(values: dict[int, float], method: str = "baseline") -> list[dict]:
    return [{"arch": "pi0", "method": method, "seed": s, "success": {"counterfactual": v}} for s, v in values.items()]


def test_a_row_outside_the_seed_spread_is_flagged_and_bit_exactness_needs_the_same_environment():
    reference = runs({0: 0.49, 1: 0.46, 2: 0.43})
    near, far = (
        compare(runs({0: 0.47}), reference, 100, ["counterfactual"]),
        compare(runs({0: 0.20}), reference, 100, ["counterfactual"]),
    )
    assert near[0].agrees and not far[0].agrees
    assert "1 of 1 rows lie outside" in format_agreement(far, same_environment=False)
    exact = compare(runs({0: 0.49}), reference, 100, ["counterfactual"])
    assert exact[0].bit_exact and "bit-exact, as expected" in format_agreement(exact, same_environment=True)
    assert "SHOULD be bit-exact" in format_agreement(near, same_environment=True)


def test_environment_records_name_what_changes_the_kernels():
    here = environment_record()
    assert same_kernels(here, dict(here)) == []
    other = {**here, "cpu_capability": "AVX2", "isa_flags": ["avx", "avx2", "fma"]}
    assert [d.split(":")[0] for d in same_kernels(here, other)] == ["cpu_capability", "isa_flags"]
    assert same_kernels(here, None) == ["no environment recorded"]


def test_the_main_job_compares_its_rows_with_the_readmes_reference(tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_finetune", ROOT / "examples" / "pretrain_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    reference = json.loads((ROOT / "docs" / "study_pretrain_results.json").read_text())
    seed0 = [r for r in reference["runs"] if r["seed"] == 0 and r["method"] in ("baseline", "apt_ft_vlm")]
    study = {"runs": seed0, "config": reference["config"], "environment": environment_record()}
    text = example.compare_with_reference(study, reference, tmp_path)
    assert "environment differs: no environment recorded" in text  # the published file predates the record
    assert "settings are not" not in text
    assert "All rows agree" in text and text.count("| yes |") >= 4 * 4
    assert (tmp_path / "agreement.md").read_text() == text


def test_the_metaworld_reference_records_its_environment_so_a_rerun_there_is_checked_bit_for_bit():
    reference = json.loads((ROOT / "docs" / "study_metaworld_results.json").read_text())
    splits = ("seen", "counterfactual", "paraphrase", "novel_position")  # examples/metaworld_study.py's
    seed0 = {"runs": [r for r in reference["runs"] if r["seed"] == 0], "config": reference["config"]}
    same = reference_report({**seed0, "environment": dict(reference["environment"])}, reference, splits)
    assert "environment the same" in same and "the same-seed rows are bit-exact, as expected" in same
    assert same.count("| yes | yes |") == 2 * 3 * len(splits)  # both archs, three methods
    avx2 = {**reference["environment"], "cpu_capability": "AVX2"}
    other = reference_report({**seed0, "environment": avx2}, reference, splits)
    assert "environment differs: cpu_capability" in other and "bit-exact rows are not expected" in other
    changed = [dict(r, success={**r["success"], "counterfactual": 1.0}) for r in seed0["runs"]]
    far = reference_report({"runs": changed, "config": reference["config"], "environment": avx2}, reference, splits)
    assert "rows lie outside the reference's seed spread" in far


def test_a_run_with_other_settings_is_told_it_cannot_be_compared_instead_of_that_it_should_be_bit_exact():
    reference = json.loads((ROOT / "docs" / "study_metaworld_results.json").read_text())
    seed0 = [r for r in reference["runs"] if r["seed"] == 0]
    shorter = {**reference["config"], "steps": 2, "seeds": [0]}  # other steps; the seeds only select runs
    text = reference_report(
        {"runs": seed0, "config": shorter, "environment": reference["environment"]}, reference, ["seen"]
    )
    assert "settings are not the reference's (steps: 2 vs 200)" in text
    assert "SHOULD be bit-exact" not in text and "bit-exact rows are not expected" in text
    same = reference_report(
        {"runs": seed0, "config": {**reference["config"], "seeds": [0]}, "environment": reference["environment"]},
        reference,
        ["seen"],
    )
    assert "settings are not" not in same and "bit-exact, as expected" in same
