"""Choose the study's language dropout p and guidance scale w on validation episodes only.

Trains ``apt_dropout`` for each p (both archs, the given seeds, the study's default budget), rolls each policy
out on validation episodes (seeds 20000 + s, never used by a reported split) unguided and with each w, and
applies the rule of :mod:`apt_studies.selection`. Writes ``<out>/selection.json`` and prints the
chosen values, to be recorded in CHANGELOG.md and used as ``StudyConfig`` defaults before the final table.

    python examples/choose_settings.py                           # p in {0.1, 0.25, 0.5}, w in {1.25, 1.5, 2}
    python examples/choose_settings.py --seeds 0 --dropouts 0.25 --scales 1.5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apt_studies.selection import select_settings
from apt_studies.study import ARCHS, StudyConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--dropouts", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.25, 1.5, 2.0])
    parser.add_argument("--episodes", type=int, default=100, help="validation episodes per split (default 100)")
    parser.add_argument("--steps", type=int, help="optimiser steps per run (default: the study's)")
    parser.add_argument("--switch", type=int, dest="switch_step", help="APT Stage-1 steps (default: the study's)")
    parser.add_argument("--out", type=Path, default=Path("runs/selection"))
    args = parser.parse_args(argv)
    values = {k: getattr(args, k) for k in ("steps", "switch_step") if getattr(args, k) is not None}
    config = StudyConfig(archs=tuple(args.archs), seeds=tuple(args.seeds), methods=("apt_dropout",), **values)
    result = select_settings(config, args.dropouts, args.scales, args.episodes)
    result["command"] = " ".join(["python", *sys.argv])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection.json").write_text(json.dumps(result, indent=1))
    chosen = result["chosen"]
    print("\nValidation counterfactual success at w=1, mean over archs and seeds, per p:")
    for p, rate in chosen["by_dropout"].items():
        print(f"  p={p}: {rate:.3f}")
    print(f"\nAt p={chosen['language_dropout']}, per w (validation counterfactual / seen):")
    for w, rates in chosen["by_scale"].items():
        print(f"  w={w}: {rates['counterfactual']:.3f} / {rates['seen']:.3f}")
    print(
        f"\nChosen: language_dropout={chosen['language_dropout']}, guidance_scale={chosen['guidance_scale']} "
        f"({result['wall_s']:.0f} s). Wrote {args.out}/selection.json"
    )
    return result


if __name__ == "__main__":
    main()
