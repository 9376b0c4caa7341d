"""Main job: the baselines against APT on the tabletop benchmark, both reference architectures, every split.

Pretrains (once, then cached) a small PaliGemma on diverse vision-language data from the environment, trains
each selected method of the catalogue (``apt_studies.study.METHODS``) at equal steps for each
architecture and seed, rolls every policy out on every evaluation split, and writes to ``--out``:

* ``results.json``: settings, VLM pretraining metrics, every run, and the mean ± std summary;
* ``table.md``: the summary as a Markdown table, then where counterfactual episodes ended (both printed);
* ``success.png``: success rate per split per method; ``outcomes.png``: counterfactual outcomes (success, the
  layout's habitual object, another object, none); ``gates.png``: APT's gate values over training;
* with ``--curve-every N``: ``curves.png`` and ``curves.json``, seen and counterfactual success every N steps;
* ``checkpoints/<arch>-<method>-seed<k>.ckpt``: each trained policy, one per training (methods that train
  identically share it; evaluate one with ``examples/evaluate_checkpoint.py``).

    python examples/apt_study.py                 # baseline, apt, apt_dropout, 3 seeds: ~5.5 min, 2 cores
    python examples/apt_study.py --methods baseline baseline_frozen apt apt_dropout apt_stage2_only
    python examples/apt_study.py --full          # the larger study: 5 seeds, 800 steps, 200 rollouts per split
    python examples/apt_study.py --archs groot --seeds 0 --steps 200 --switch 100   # a quick look
    python examples/apt_study.py --curve-every 100 --curve-episodes 50   # + learning curves (curves.png/.json)

``--language-dropout`` and ``--guidance-scale`` default to the values chosen on validation episodes by
``examples/choose_settings.py``; never choose them on this script's output. The numbers are a function of the
command alone: the study runs with ``--threads`` torch threads (default 1, whatever ``OMP_NUM_THREADS`` or the
machine says) and deterministic algorithms, and the cached VLM's key holds its thread count and library versions.
The pretraining regime (pretrain on a broad corpus, then fine-tune) is ``examples/pretrain_finetune.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from apt_studies.report import (
    aggregate,
    curve_records,
    format_curve_table,
    format_outcome_table,
    format_table,
    plot_curves,
    plot_gates,
    plot_outcomes,
    plot_success,
)
from apt_studies.study import ARCHS, METHOD_NAMES, StudyConfig, run_study

FULL = dict(seeds=(0, 1, 2, 3, 4), steps=800, switch_step=400, episodes=600, eval_episodes=200)


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, Path]:
    defaults = StudyConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"the larger study: {FULL}")
    parser.add_argument("--archs", nargs="+", choices=ARCHS)
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, help=f"default {' '.join(defaults.methods)}")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--steps", type=int, help=f"optimiser steps per run (default {defaults.steps})")
    parser.add_argument(
        "--switch", type=int, dest="switch_step", help=f"APT Stage-1 steps (default {defaults.switch_step})"
    )
    parser.add_argument("--episodes", type=int, help=f"training episodes (default {defaults.episodes})")
    parser.add_argument("--eval-episodes", type=int, help=f"rollouts per split (default {defaults.eval_episodes})")
    parser.add_argument("--lr", type=float, help=f"expert learning rate (default {defaults.lr})")
    parser.add_argument("--gate-lr", type=float, help="APT gate learning rate (default 10 x lr)")
    parser.add_argument("--apt-vlm-mode", choices=["frozen", "lora", "full"])
    parser.add_argument(
        "--language-dropout", type=float, help=f"p of the apt_dropout methods (default {defaults.language_dropout})"
    )
    parser.add_argument(
        "--guidance-scale", type=float, help=f"w of apt_dropout_guided (default {defaults.guidance_scale})"
    )
    parser.add_argument(
        "--baseline-vlm-mode",
        nargs="+",
        metavar="ARCH=MODE",
        help=f"how the baseline adapts the VLM, per arch (default {defaults.baseline_vlm_mode})",
    )
    parser.add_argument(
        "--no-pretrain", action="store_true", help="random VLM instead of the pretrained one (ablation)"
    )
    parser.add_argument(
        "--curve-every",
        type=int,
        help="record learning curves: seen and counterfactual success every N optimiser steps (default off)",
    )
    parser.add_argument(
        "--curve-episodes", type=int, help=f"rollouts per split per curve point (default {defaults.curve_episodes})"
    )
    parser.add_argument(
        "--threads", type=int, help=f"torch threads of the whole run; results depend on it (default {defaults.threads})"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    args = parser.parse_args(argv)
    values = dict(FULL) if args.full else {}
    for field in dataclasses.fields(StudyConfig):  # every flag named after a setting reaches it
        if getattr(args, field.name, None) is not None and field.name != "baseline_vlm_mode":
            values[field.name] = getattr(args, field.name)
    if args.baseline_vlm_mode:
        values["baseline_vlm_mode"] = {
            **defaults.baseline_vlm_mode,
            **dict(s.split("=", 1) for s in args.baseline_vlm_mode),
        }
    if args.no_pretrain:
        values["pretrain_vlm"] = False
    return StudyConfig(**values), args.out


def main(argv: list[str] | None = None) -> dict:
    config, out = parse_args(argv)
    out.mkdir(parents=True, exist_ok=True)
    study = run_study(config, out=out)
    summary = aggregate(study["runs"])
    study["summary"] = summary
    study["command"] = " ".join(["python", *sys.argv])
    (out / "results.json").write_text(json.dumps(study, indent=1))
    table = format_table(summary, fmt="markdown")
    outcomes = format_outcome_table(summary, fmt="markdown")
    (out / "table.md").write_text(f"{table}\n\nCounterfactual episodes, where they ended:\n\n{outcomes}\n")
    plot_success(summary, out / "success.png")
    plot_outcomes(summary, out / "outcomes.png")
    plot_gates(study["runs"], out / "gates.png")
    if config.curve_every is not None:
        plot_curves(study["runs"], out / "curves.png")
        curves = curve_records(study["runs"])
        (out / "curves.json").write_text(json.dumps(curves, indent=1))
        print(f"\nLearning curves (success on {config.curve_episodes} rollouts per split and point):\n")
        print(format_curve_table(curves))
    print(
        f"\nSuccess rate per split, mean ± std over seeds {list(config.seeds)} ({config.steps} steps; APT switches at "
        f"{config.switch_step}):\n"
    )
    print(format_table(summary, fmt="text"))
    print(
        f"\nCounterfactual episodes, where they ended (language dropout p={config.language_dropout}, guidance "
        f"w={config.guidance_scale}):\n"
    )
    print(format_outcome_table(summary, fmt="text"))
    if study["pretraining"]:
        metrics = study["pretraining"].get("metrics", study["pretraining"])
        shown = {k.split("/", 1)[1]: round(v, 3) for k, v in metrics.items() if k.startswith("eval/") and "_acc" in k}
        print(f"\nPretrained VLM, held-out accuracy of the referred object's attributes: {shown}")
    print(
        f"\nWall time {study['wall_s']:.0f} s. Wrote {out}/results.json, table.md, success.png, gates.png, checkpoints/"
    )
    return study


if __name__ == "__main__":
    main()
