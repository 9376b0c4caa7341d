"""The pretraining-regime study: pretrain on a broad corpus, then fine-tune on the task (APT's own recipe).

Every method pretrains ``--pretrain-steps`` on a corpus of 64 layouts that are none of the task's (balanced
targets; the ``*_habit`` controls: 0.9 of each layout's episodes to one object), then fine-tunes ``--steps`` on the
task's demonstrations in a fresh ``Trainer``: APT in Stage 2 only (VLM frozen, or fully fine-tuned at 0.1 x lr for
``apt_ft_vlm``), the baselines jointly. Pretrained weights are cached under ``--cache-dir`` and shared by the
methods that share them (``apt`` and ``apt_ft_vlm``). The protocol, the settings and the results are in
``docs/study.md``.

    python examples/pretrain_finetune.py                  # the README's main job: baseline vs apt_ft_vlm, seed 0
    python examples/pretrain_finetune.py --archs pi0 --methods baseline apt apt_ft_vlm --seeds 0 1 2 --out runs/pi0
    python examples/pretrain_finetune.py --combine runs/pre/*/results.json --out runs/pre/all

Writes ``results.json`` (the schema of ``docs/study_results.json``; each run also holds ``validation``, its
success on validation episodes, and ``step0_max_diff``, 0.0 when fine-tuning started exactly from the pretrained
model, and ``environment``, the versions and CPU it ran on), ``table.md``, and with ``--combine``, ``success.png`` and
``outcomes.png``. A run (not ``--combine``) also prints its rows beside ``--reference``'s (the 3-seed study the
README reports) and writes that comparison to ``agreement.md``: bit-exact where the versions and CPU kernels match
the reference's, otherwise whether each row lies within the reference's seed spread (apt_studies.reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apt_studies.environment import environment_record
from apt_studies.pretrain_goal import format_goal_table, goal_check
from apt_studies.reference import reference_report
from apt_studies.report import aggregate, format_outcome_table, format_table, plot_outcomes, plot_success
from apt_studies.study import ARCHS, METHOD_NAMES, PRETRAIN_METHODS, StudyConfig, run_study


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = StudyConfig(regime="pretrain")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument(
        "--methods", nargs="+", choices=METHOD_NAMES, default=list(MAIN_JOB_METHODS), help=f"all: {PRETRAIN_METHODS}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps on the task")
    parser.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    parser.add_argument("--cache-dir", type=Path, help="pretrained VLM and policies (default: the bench cache)")
    parser.add_argument("--combine", nargs="+", type=Path, help="merge these results.json files instead of running")
    parser.add_argument(
        "--task-results",
        type=Path,
        default=Path("docs/study_results.json"),
        help="with --combine: the task-only study, the 'no pretraining' arm (its baselines enter the goal check)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=Path(__file__).parents[1] / "docs" / "study_pretrain_results.json",
        help="the study a run's rows are compared with (default: the README's 3-seed study)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/pretrain_study"))
    return parser.parse_args(argv)


MAIN_JOB_METHODS = ("baseline", "apt_ft_vlm")
"""The defaults: the strongest baseline and the APT variant chosen on validation episodes (docs/study.md)."""
NO_PRETRAINING = ("baseline", "baseline_frozen", "apt", "apt_stage2_only")
"""Rows of the task-only study shown beside this regime's (as ``<method> (no pretraining)``)."""
FIGURE_METHODS = (
    "baseline",
    "apt",
    "apt_ft_vlm",
    "baseline (no pretraining)",
    "apt (no pretraining)",
    "apt_stage2_only (no pretraining)",
)
"""The rows of ``success.png`` (all rows are in ``table.md``)."""


def write_tables(study: dict, out: Path, task_runs: list[dict] | None = None) -> str:
    summary = aggregate(study["runs"])
    study["summary"] = summary
    text = (
        f"{format_table(summary, fmt='markdown')}\n\nCounterfactual episodes, where they ended:\n\n"
        f"{format_outcome_table(summary, fmt='markdown')}\n"
    )
    if task_runs is not None:
        complete = len({r["seed"] for r in study["runs"]})  # the rule compares methods that ran every seed
        goal = goal_check(study["runs"], task_runs, min_seeds=complete)
        study["goal"] = goal
        text += (
            f"\nGoal check (docs/study.md, section 1; APT candidates with all {complete} seeds):\n\n"
            f"{format_goal_table(goal)}\n"
        )
        shown = [
            {**r, "method": f"{r['method']} (no pretraining)"}
            for r in task_runs
            if r["method"] in NO_PRETRAINING and r["arch"] in summary
        ]
        both = aggregate([*study["runs"], *shown])
        text += f"\nWith the task-only study's rows:\n\n{format_table(both, fmt='markdown')}\n"
        figure_rows = [r for r in [*study["runs"], *shown] if r["method"] in FIGURE_METHODS]
    else:
        figure_rows = study["runs"]
    plot_success(aggregate(figure_rows), out / "success.png")
    plot_outcomes(summary, out / "outcomes.png")
    stored = {k: v for k, v in study.items() if k != "goal"}  # the schema of docs/study_results.json; goal: table.md
    (out / "results.json").write_text(json.dumps(stored, indent=1))
    (out / "table.md").write_text(text)
    return text


REFERENCE_SPLITS = ("seen", "paraphrase", "counterfactual", "novel_layout")


def compare_with_reference(study: dict, reference: dict, out: Path) -> str:
    """This run's rows beside the reference study's seeds (``agreement.md``), with the verdict."""
    text = reference_report(study, reference, REFERENCE_SPLITS)
    (out / "agreement.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        study = {
            "config": parts[0]["config"],
            "pretraining": parts[0]["pretraining"],
            "runs": [run for part in parts for run in part["runs"]],
            "wall_s": sum(part["wall_s"] for part in parts),
            "combined_from": [
                {"file": str(path), "command": part.get("command")}
                for path, part in zip(args.combine, parts, strict=True)
            ],
        }
    else:
        config = StudyConfig(
            archs=tuple(args.archs),
            methods=tuple(args.methods),
            seeds=tuple(args.seeds),
            regime="pretrain",
            pretrain_steps=args.pretrain_steps,
            steps=args.steps,
            eval_episodes=args.eval_episodes,
            save_checkpoints=False,
        )
        study = run_study(config, out=args.out, cache_dir=args.cache_dir)
        study["command"] = " ".join(["python", *sys.argv])
        study["environment"] = environment_record()
    task_runs = json.loads(args.task_results.read_text())["runs"] if args.combine else None
    print(write_tables(study, args.out, task_runs))
    if not args.combine and args.reference.exists():
        print(compare_with_reference(study, json.loads(args.reference.read_text()), args.out))
    print(f"Wall time {study['wall_s']:.0f} s. Wrote {args.out}/results.json, table.md, success.png, outcomes.png.")
    return study


if __name__ == "__main__":
    main()
