"""APT's regime on Meta-World (issue 25): pretrain on the 45 other MT50 tasks, fine-tune on the shared-scene groups.

Every method pretrains ``--pretrain-steps`` on scripted-expert demonstrations of the MT50 tasks outside the groups
(each with its own instruction), then fine-tunes ``--steps`` on the groups' habit-biased demonstrations (90 % the
habitual task) in a fresh ``Trainer``: ``baseline`` jointly; ``apt`` and ``apt_ft_vlm`` in Stage 2 only (VLM
frozen, or fully fine-tuned at 0.1 x lr). Protocol, choice rule and budgets: ``docs/metaworld.md``.

    python examples/metaworld_study.py --seeds 0                      # one seed, both archs (see docs for its cost)
    python examples/metaworld_study.py --seeds 1 --out runs/mw/s1     # another seed, for --combine
    python examples/metaworld_study.py --combine runs/mw/*/results.json --out runs/mw/all --publish
    .cache/venv-lerobot/bin/python examples/metaworld_study.py --export-lerobot data/mw_s0 --seeds 0   # LeRobotDataset

Writes ``results.json`` (the schema of ``docs/study_pretrain_results.json``, plus ``vlm`` with the vocabulary
coverage and ``environment``), ``table.md``, ``success.png`` and ``outcomes.png`` to ``--out``; ``--publish`` also
copies them to ``docs/study_metaworld_*``. A run (not ``--combine``) also prints its rows beside ``--reference``'s
(the published 3-seed study) and writes them to ``agreement.md``: bit-exact where the versions and CPU kernels match
the reference's recorded environment, otherwise whether each row lies within its seed spread. Demonstrations,
corpus, VLMs and pretrained policies are cached under ``--cache-dir`` (default ``$APT_LIGHTNING_CACHE`` or
``~/.cache/apt_lightning``). ``--export-lerobot DIR`` writes
one seed's cached fine-tuning demonstrations (``--episodes``) as a ``LeRobotDataset`` instead of running; it needs
LeRobot's Python, not metaworld (build the demonstrations first with ``--prepare``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import apt_studies.metaworld  # noqa: F401  (headless EGL defaults before mujoco is imported)
from apt_studies.metaworld.goal import format_goal_table, goal_check
from apt_studies.metaworld.policies import ARCHS
from apt_studies.metaworld.study import METAWORLD_METHODS, MetaWorldStudyConfig, prepare_data, run_metaworld_study
from apt_studies.reference import reference_report
from apt_studies.report import aggregate, format_outcome_table, format_table, plot_outcomes, plot_success

DOCS = Path("docs")
REFERENCE = Path(__file__).parents[1] / "docs" / "study_metaworld_results.json"
REFERENCE_SPLITS = ("seen", "counterfactual", "paraphrase", "novel_position")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = MetaWorldStudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--methods", nargs="+", choices=METAWORLD_METHODS, default=list(METAWORLD_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning steps on the groups")
    parser.add_argument("--episodes", type=int, default=defaults.episodes, help="fine-tuning expert episodes")
    parser.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    parser.add_argument("--validation-episodes", type=int, default=defaults.validation_episodes)
    parser.add_argument("--corpus-episodes", type=int, default=defaults.corpus_episodes_per_task, help="per task")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--combine", nargs="+", type=Path, help="merge these results.json files instead of running")
    parser.add_argument("--out", type=Path, default=Path("runs/metaworld_study"))
    parser.add_argument("--publish", action="store_true", help="also write docs/study_metaworld_*")
    parser.add_argument(
        "--reference",
        type=Path,
        default=REFERENCE,
        help="the study a run's rows are compared with, in agreement.md (default: the published 3-seed study)",
    )
    parser.add_argument("--prepare", action="store_true", help="only build the cached inputs (VLM, demos, corpus)")
    parser.add_argument(
        "--export-lerobot",
        type=Path,
        metavar="DIR",
        help="write one seed's cached fine-tuning demonstrations as a new LeRobotDataset at DIR (LeRobot's Python)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="one process per arch, up to this many at once (1 thread each)"
    )
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> MetaWorldStudyConfig:
    return MetaWorldStudyConfig(
        archs=tuple(args.archs),
        methods=tuple(args.methods),
        seeds=tuple(args.seeds),
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        episodes=args.episodes,
        eval_episodes=args.eval_episodes,
        validation_episodes=args.validation_episodes,
        corpus_episodes_per_task=args.corpus_episodes,
    )


def format_by_task(runs: list[dict]) -> str:
    """Success and habitual share per task of ``seen`` and ``counterfactual`` (runs that recorded ``by_task``)."""
    rows = [r for r in runs if "by_task" in r]
    if not rows:
        return "(no run recorded outcomes per task)"
    splits = ("seen", "counterfactual")
    tasks = [(s, t) for s in splits for t in dict.fromkeys(x for r in rows for x in r["by_task"][s])]
    lines = ["| arch | method | seeds | " + " | ".join(f"{t} ({s})" for s, t in tasks) + " |"]
    lines.append("| :--- | :--- | ---: |" + " ---: |" * len(tasks))
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["arch"] == arch and r["method"] == method]
            if not mine:
                continue
            cells = []
            for s, t in tasks:
                parts = [r["by_task"][s][t] for r in mine if t in r["by_task"][s]]
                n = sum(p["n"] for p in parts)
                success = sum(p["success"] * p["n"] for p in parts) / n
                habitual = sum(p["habitual"] * p["n"] for p in parts) / n
                cells.append(f"{success:.2f} / {habitual:.2f}")
            lines.append(f"| {arch} | {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(study: dict, out: Path) -> str:
    summary = aggregate(study["runs"])
    study["summary"] = summary
    goal = goal_check(study["runs"])
    coverage = study["vlm"]["coverage"]
    text = (
        f"{format_table(summary, fmt='markdown')}\n\nCounterfactual episodes, where they ended:\n\n"
        f"{format_outcome_table(summary, fmt='markdown')}\n\nGoal check (docs/metaworld.md, choice rule):\n\n"
        f"{format_goal_table(goal)}\n\nPer task, success / ended doing the habitual task (pooled over seeds):\n\n"
        f"{format_by_task(study['runs'])}\n\nVLM vocabulary coverage (share of Meta-World words):\n\n"
        "| register | words | in the VLM's vocabulary | in its pretraining texts |\n| :--- | ---: | ---: | ---: |\n"
        + "\n".join(
            f"| {k} | {int(v['words'])} | {v['vocabulary']:.2f} | {v['pretraining_text']:.2f} |"
            for k, v in coverage.items()
        )
        + "\n"
    )
    plot_success(summary, out / "success.png")
    plot_outcomes(summary, out / "outcomes.png")
    (out / "results.json").write_text(json.dumps({**study, "goal": goal}, indent=1))
    (out / "table.md").write_text(text)
    return text


def run_parallel(args: argparse.Namespace, argv: list[str]) -> dict:
    """Each arch in its own process (the numbers do not change: every run uses 1 thread), then combined."""
    tic = time.perf_counter()
    base = _strip(argv, ("--archs", "--out", "--jobs", "--publish", "--reference"))
    outs, procs = [], []
    for arch in args.archs:
        out = args.out / arch
        outs.append(out)
        command = [
            sys.executable,
            __file__,
            *base,
            "--archs",
            arch,
            "--out",
            str(out),
            "--jobs",
            "1",
            "--reference",
            "",
        ]
        procs.append(subprocess.Popen(command))
        while sum(p.poll() is None for p in procs) >= args.jobs:
            time.sleep(2)
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"an arch's process failed (exit codes {codes}); see its output above.")
    parts = [json.loads((out / "results.json").read_text()) for out in outs]
    study = {k: v for k, v in parts[0].items() if k not in ("runs", "summary", "goal", "wall_s", "command")}
    study["runs"] = [run for part in parts for run in part["runs"]]
    study["wall_s"] = time.perf_counter() - tic
    study["process_wall_s"] = {arch: part["wall_s"] for arch, part in zip(args.archs, parts, strict=True)}
    study["command"] = " ".join(["python", *sys.argv])
    return study


def _strip(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without ``options`` and their values."""
    out, skipping = [], False
    for token in argv:
        if token.startswith("--"):
            skipping = token.split("=", 1)[0] in options
            if skipping:
                continue
        elif skipping:
            continue
        out.append(token)
    return out


def export_lerobot(args: argparse.Namespace) -> dict:
    """``--export-lerobot``: the seed's cached ``train`` demonstrations as a LeRobotDataset (no metaworld needed)."""
    from apt_studies.metaworld.lerobot_export import export_demonstrations

    if len(args.seeds) != 1:
        raise SystemExit(f"--export-lerobot writes one seed's demonstrations; got --seeds {args.seeds}.")
    config = make_config(args)
    tic = time.perf_counter()
    dataset = export_demonstrations(
        args.export_lerobot,
        "train",
        config.episodes,
        args.seeds[0],
        config.chunk_size,
        habit=config.habit,
        image_size=config.image_size,
        cache_dir=args.cache_dir,
    )
    summary = {
        "root": str(args.export_lerobot),
        "episodes": dataset.meta.total_episodes,
        "frames": dataset.meta.total_frames,
        "fps": dataset.meta.fps,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    print(summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.export_lerobot is not None:
        return export_lerobot(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        study = {
            **{k: v for k, v in parts[0].items() if k not in ("runs", "summary", "goal", "wall_s")},
            "runs": [run for part in parts for run in part["runs"]],
            "wall_s": sum(part["wall_s"] for part in parts),
            "combined_from": [
                {"file": str(path), "command": part.get("command")}
                for path, part in zip(args.combine, parts, strict=True)
            ],
        }
    elif args.prepare:
        print(prepare_data(make_config(args), cache_dir=args.cache_dir))
        return {}
    elif args.jobs > 1 and len(args.archs) > 1:
        study = run_parallel(args, argv if argv is not None else sys.argv[1:])
    else:
        study = run_metaworld_study(
            make_config(args), cache_dir=args.cache_dir, checkpoint_dir=args.out / "checkpoints"
        )
        study["command"] = " ".join(["python", *sys.argv])
    print(write_outputs(study, args.out))
    if not args.combine and args.reference.is_file():  # `--reference ""`: an arch's process, compared by its parent
        text = reference_report(study, json.loads(args.reference.read_text()), REFERENCE_SPLITS)
        (args.out / "agreement.md").write_text(text)
        print(text)
    print(f"Wall time {study['wall_s']:.0f} s. Wrote {args.out}/results.json, table.md, success.png, outcomes.png.")
    if args.publish:
        for name in ("results.json", "table.md", "success.png", "outcomes.png"):
            target = DOCS / f"study_metaworld_{name}"
            shutil.copyfile(args.out / name, target)
        print("Copied them to docs/study_metaworld_*.")
    return study


if __name__ == "__main__":
    main()
