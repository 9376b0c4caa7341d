"""Where the study's checkpoints fail counterfactual instructions, with the time-outs split by nearest object.

Loads every ``<arch>-<method>-seed<k>.ckpt`` of a study's ``checkpoints/`` folder, rolls it out on the
reported counterfactual episodes of its seed (the ``apt_dropout`` checkpoints also with guidance ``--guidance``),
and classifies each episode: success / the layout's habitual object / another object / none; the ``none``
episodes (time-outs) are split by the object the gripper was nearest when time ran out. Writes
``<study>/diagnosis.json`` and prints a Markdown table (mean over seeds).

    python examples/diagnose_counterfactual.py runs/study [--guidance 1.5]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from apt_lightning.models.base import load_policy
from apt_studies.evaluation import EVAL_SEED, evaluation_seeds, policy_fn
from apt_studies.language import default_tokenizer
from apt_studies.outcomes import nearest_at_timeout, outcome_rates
from apt_studies.rollout import rollout
from apt_studies.splits import make_episodes
from apt_studies.study import StudyConfig


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study's --out folder (with checkpoints/)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=StudyConfig().guidance_scale,
        help="w for the apt_dropout checkpoints (default: the study's, chosen on validation; 1 adds no row)",
    )
    parser.add_argument("--episodes", type=int, default=100)
    args = parser.parse_args(argv)
    rows = []
    for path in sorted((args.study / "checkpoints").glob("*.ckpt")):
        arch, method, seed_part = path.stem.split("-")
        seed = int(seed_part.removeprefix("seed"))
        policy = load_policy(path)
        policy.eval()
        episodes = make_episodes("counterfactual", args.episodes, seed=evaluation_seeds(seed)["rollouts"])
        for w in dict.fromkeys([1.0, args.guidance] if method == "apt_dropout" else [1.0]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(EVAL_SEED + seed)
                result = rollout(policy_fn(policy, w), episodes, policy.chunk_size, tokenizer=default_tokenizer())
            rows.append(
                {
                    "arch": arch,
                    "method": method if w == 1.0 else f"{method}_guided",
                    "seed": seed,
                    "guidance_scale": w,
                    **outcome_rates(result, episodes),
                    "none_nearest": nearest_at_timeout(result, episodes),
                }
            )
    (args.study / "diagnosis.json").write_text(json.dumps(rows, indent=1))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["arch"], row["method"])].append(row)
    print("| arch | method | success | habitual | other | none | none, nearest: target | habitual | other |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (arch, method), group in groups.items():
        cells = [sum(r[k] for r in group) / len(group) for k in ("success", "habitual", "other", "none")]
        cells += [sum(r["none_nearest"][k] for r in group) / len(group) for k in ("target", "habitual", "other")]
        print(f"| {arch} | {method} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return rows


if __name__ == "__main__":
    main()
