"""Study report: exact aggregates on hand-made runs, both table formats, and PNG plots (with and without gates)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from apt_studies.report import aggregate, format_table, plot_gates, plot_success
from apt_studies.splits import EVAL_SPLITS

PNG_MAGIC = b"\x89PNG"


def _gates(switch_step: int, opening: float) -> list[dict[str, Any]]:
    history = []
    for step in (1, 10, 20, 30, 40):
        value = 0.0 if step < switch_step else opening * (step - switch_step + 1)
        history.append(
            {
                "step": step,
                "stage": 1 if step < switch_step else 2,
                "gates": {
                    "action_head.blocks.0": {"attn": value, "ff": -value / 2},
                    "action_head.blocks.1": {"attn": value / 4, "ff": 0.0},
                },
            }
        )
    return history


def _run(arch: str, method: str, seed: int, rate: float, **extra: Any) -> dict[str, Any]:
    """A run whose success is ``rate`` on every split but ``seen`` (fixed at 0.9)."""
    run: dict[str, Any] = {
        "arch": arch,
        "method": method,
        "seed": seed,
        "success": {split: (0.9 if split == "seen" else rate) for split in EVAL_SPLITS},
        "instruction_sensitivity": 0.1 * (seed + 1),
        "action_error": 0.05,
        "train_s": 30.0 + seed,
        "switch_step": 20 if method == "apt" else None,
        "gates": _gates(20, 0.01 * (seed + 1)) if method == "apt" else [],
    }
    run.update(extra)
    return run


def _study() -> list[dict[str, Any]]:
    return [
        _run(arch, method, seed, rate)
        for arch in ("pi0", "groot")
        for method in ("baseline", "apt")
        for seed, rate in enumerate((0.5, 0.7, 0.9) if method == "apt" else (0.2, 0.2, 0.2))
    ]


def test_aggregate_exact_statistics() -> None:
    summary = aggregate(_study())
    assert list(summary) == ["pi0", "groot"]
    assert list(summary["pi0"]) == ["baseline", "apt"]
    apt = summary["pi0"]["apt"]
    assert list(apt["success"]) == list(EVAL_SPLITS)
    paraphrase = apt["success"]["paraphrase"]
    assert paraphrase["mean"] == pytest.approx(0.7)
    assert paraphrase["std"] == pytest.approx(0.2)  # sample std (ddof=1) of 0.5, 0.7, 0.9
    assert paraphrase["n"] == 3
    assert apt["success"]["seen"] == {"mean": pytest.approx(0.9), "std": pytest.approx(0.0), "n": 3}
    assert apt["seeds"] == [0, 1, 2]
    sensitivity = apt["instruction_sensitivity"]
    assert sensitivity["mean"] == pytest.approx(0.2) and sensitivity["std"] == pytest.approx(0.1)
    assert apt["action_error"]["mean"] == pytest.approx(0.05)
    baseline = summary["pi0"]["baseline"]["success"]["counterfactual"]
    assert baseline["mean"] == pytest.approx(0.2) and baseline["std"] == pytest.approx(0.0)
    json.dumps(summary)  # stays serialisable


def test_held_out_averages_each_run_before_seeds() -> None:
    runs = [
        {"arch": "pi0", "method": "apt", "seed": 0, "success": {"seen": 1.0, "paraphrase": 0.2, "counterfactual": 0.4}},
        {"arch": "pi0", "method": "apt", "seed": 1, "success": {"seen": 0.0, "paraphrase": 0.6, "counterfactual": 1.0}},
    ]
    held_out = aggregate(runs)["pi0"]["apt"]["held_out"]
    per_run = [(0.2 + 0.4) / 2, (0.6 + 1.0) / 2]  # 0.3, 0.8: "seen" is excluded
    assert held_out["mean"] == pytest.approx(sum(per_run) / 2)
    assert held_out["std"] == pytest.approx(math.sqrt(2 * 0.25**2))  # sample std of 0.3, 0.8
    assert held_out["n"] == 2


def test_single_seed_and_missing_optional_metrics() -> None:
    run = {"arch": "groot", "method": "baseline", "seed": 7, "success": {"seen": 0.8, "paraphrase": 0.3}}
    entry = aggregate([run])["groot"]["baseline"]
    assert entry["success"]["paraphrase"] == {"mean": pytest.approx(0.3), "std": 0.0, "n": 1}
    assert entry["held_out"]["std"] == 0.0
    assert "instruction_sensitivity" not in entry and "action_error" not in entry
    assert entry["seeds"] == [7]
    assert "n/a" in format_table(aggregate([run]))  # no instruction sensitivity reported


def test_mixed_seed_counts() -> None:
    runs = [r for r in _study() if not (r["arch"] == "groot" and r["method"] == "apt" and r["seed"] == 2)]
    summary = aggregate(runs)
    assert summary["groot"]["apt"]["success"]["paraphrase"]["n"] == 2
    assert summary["groot"]["apt"]["success"]["paraphrase"]["mean"] == pytest.approx(0.6)
    assert summary["pi0"]["apt"]["success"]["paraphrase"]["n"] == 3


def test_duplicate_run_raises() -> None:
    runs = [*_study(), _run("groot", "apt", 1, 0.3)]
    with pytest.raises(ValueError, match=r"duplicate run: arch='groot', method='apt', seed=1"):
        aggregate(runs)


def test_missing_key_raises() -> None:
    with pytest.raises(ValueError, match="lacks required key"):
        aggregate([{"arch": "pi0", "method": "apt", "success": {"seen": 1.0}}])


@pytest.mark.parametrize("fmt", ["markdown", "text"])
def test_format_table(fmt: str) -> None:
    table = format_table(aggregate(_study()), fmt=fmt)
    lines = table.splitlines()
    assert len(lines) == 2 + 4  # header, rule, one row per (arch, method)
    assert "held-out avg" in lines[0] and "instr. sensitivity" in lines[0]
    assert all(split in lines[0] for split in EVAL_SPLITS)
    rows = lines[2:]
    assert [row.split()[0 if fmt == "text" else 1] for row in rows] == ["pi0", "pi0", "groot", "groot"]
    apt_row = next(row for row in rows if "pi0" in row and "apt" in row)
    assert "0.70 ± 0.20" in apt_row and "0.90 ± 0.00" in apt_row
    if fmt == "markdown":
        assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
        assert set(lines[1]) <= set("|-: ")
    else:
        assert "|" not in table
        assert len({len(line) for line in lines[:2]}) == 1  # the rule spans the header


def test_format_table_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="fmt"):
        format_table({}, fmt="latex")


def test_custom_split_flows_through() -> None:
    runs = [
        {"arch": "pi0", "method": m, "seed": s, "success": {"seen": 0.9, "user": u}}
        for m, values in (("baseline", (0.1, 0.3)), ("apt", (0.5, 0.7)))
        for s, u in enumerate(values)
    ]
    summary = aggregate(runs)
    assert summary["pi0"]["apt"]["success"]["user"]["mean"] == pytest.approx(0.6)
    assert summary["pi0"]["apt"]["held_out"]["mean"] == pytest.approx(0.6)  # "user" is held out
    table = format_table(summary)
    assert "user" in table.splitlines()[0] and "paraphrase" not in table
    assert "0.60 ± 0.14" in table and "0.20 ± 0.14" in table


def test_summary_round_trips_through_json() -> None:
    summary = aggregate(_study())
    assert format_table(json.loads(json.dumps(summary))) == format_table(summary)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_success(tmp_path: Path) -> None:
    path = plot_success(aggregate(_study()), tmp_path / "plots" / "success.png")
    assert path == tmp_path / "plots" / "success.png"
    _assert_png(path)


def test_plot_gates(tmp_path: Path) -> None:
    path = plot_gates(_study(), str(tmp_path / "gates.png"))
    assert isinstance(path, Path)
    _assert_png(path)


def test_plots_without_gates(tmp_path: Path) -> None:
    baseline_only = [r for r in _study() if r["method"] == "baseline"]
    _assert_png(plot_gates(baseline_only, tmp_path / "gates.png"))
    _assert_png(plot_success(aggregate(baseline_only), tmp_path / "success.png"))
    _assert_png(plot_success({}, tmp_path / "empty.png"))


def test_plots_explain_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"apt_lightning\[bench\]"):
        plot_gates([], tmp_path / "gates.png")
    assert not (tmp_path / "gates.png").exists()


def test_outcomes_are_aggregated_tabled_and_plotted(tmp_path):
    from apt_studies.report import format_outcome_table, plot_outcomes

    def run(method: str, seed: int, habitual: float) -> dict[str, Any]:
        outcomes = {"success": 0.5, "habitual": habitual, "other": 0.1, "none": 0.4 - habitual}
        return _run("groot", method, seed, 0.5, outcomes={"counterfactual": outcomes})

    runs = [run("baseline", 0, 0.1), run("baseline", 1, 0.3), run("apt", 0, 0.0), _run("pi0", "apt", 0, 0.5)]
    summary = aggregate(runs)
    stats = summary["groot"]["baseline"]["outcomes"]["counterfactual"]
    assert stats["habitual"]["mean"] == pytest.approx(0.2) and stats["habitual"]["n"] == 2
    assert "outcomes" not in summary["pi0"]["apt"]  # a run without outcomes reports none
    table = format_outcome_table(summary)
    lines = table.splitlines()
    assert lines[0].split("|")[4].strip() == "success" and len(lines) == 4  # header, rule, two groot rows
    assert "| groot | baseline |   2 | 0.50 ± 0.00 | 0.20 ± 0.14 |" in table and table.rstrip().endswith("0.00 |")
    assert lines[2].rstrip(" |").endswith("0.40")  # habitual share of failures: 0.2 / 0.5
    with pytest.raises(ValueError, match="fmt must be"):
        format_outcome_table(summary, fmt="html")
    assert plot_outcomes(summary, tmp_path / "o.png").read_bytes()[:4] == PNG_MAGIC
    assert plot_outcomes(aggregate([_run("pi0", "apt", 0, 0.5)]), tmp_path / "n.png").is_file()  # a note
