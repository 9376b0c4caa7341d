"""A study run tells a user on another machine whether their numbers agree with the reference."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from apt_studies.environment import environment_record, same_kernels
from apt_studies.reference import compare, format_agreement

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
    study = {"runs": seed0, "config": {"eval_episodes": 100}, "environment": environment_record()}
    text = example.compare_with_reference(study, reference, tmp_path)
    assert "environment differs: no environment recorded" in text  # the published file predates the record
    assert "All rows agree" in text and text.count("| yes |") >= 4 * 4
    assert (tmp_path / "agreement.md").read_text() == text
