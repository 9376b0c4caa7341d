"""Accuracy of each cheaper fusion option on the study's validation episodes (the evidence for the default).

Trains the study's ``apt`` method (same data, budget, initialisation) once per (fusion option, arch, seed), with
the option's :class:`~apt_lightning.FusionConfig` fields passed through the policies' ``fusion_options``, and rolls
each policy out on the validation episodes of its seed (:func:`~apt_studies.evaluation.evaluate_validation`,
never a reported split). The rule that picks the default is written in ``docs/performance.md`` and was committed
before this ran:

    the cheapest option (sampling FLOPs) whose mean validation counterfactual and paraphrase success, per arch,
    are both within one standard deviation (over seeds) of today's default's (``ff_mult=4``, every layer).

    nice -n 10 python benchmarks/fusion_choice.py [--seeds 0 1 2] [--episodes 100] [--options ...] --out runs/fusion
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from fusion_options import FUSION_OPTIONS

from apt_lightning.callbacks import GateMonitor
from apt_studies.evaluation import evaluate_validation
from apt_studies.study import StudyConfig, build_policy, prepare_vlm, study_data
from apt_studies.trainer import quiet_trainer

SPLITS = ("counterfactual", "paraphrase", "seen")


def train(config: StudyConfig, arch: str, seed: int, options: dict[str, Any], vocabulary, vlm_dir, data):
    """``apt`` of the study for one (arch, seed), with the fusion blocks built from ``options``."""
    pl.seed_everything(seed, verbose=False)  # same expert initialisation for every option
    policy = build_policy(
        arch,
        vocabulary,
        config.apt_config(arch, "apt", seed),
        vlm_dir,
        config.hidden_size,
        config.chunk_size,
        False,
        dict(options) or None,
        False,
    )
    trainer = quiet_trainer(config.steps, [config.scheduler("apt"), GateMonitor(every_n_steps=50)])
    tic = time.perf_counter()
    trainer.fit(policy, data.train_dataloader())
    return policy, time.perf_counter() - tic


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each split's success, per (option, arch)."""
    out: dict[str, Any] = {}
    for option in dict.fromkeys(r["option"] for r in records):
        for arch in dict.fromkeys(r["arch"] for r in records):
            rows = [r for r in records if r["option"] == option and r["arch"] == arch]
            if not rows:
                continue
            entry = {}
            for split in SPLITS:
                values = [r["success"][split] for r in rows]
                entry[split] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
            out.setdefault(option, {})[arch] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+", default=list(FUSION_OPTIONS), choices=list(FUSION_OPTIONS))
    parser.add_argument("--archs", nargs="+", default=["pi0", "groot"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=100, help="validation episodes per split")
    parser.add_argument("--out", type=Path, default=Path("runs/fusion_choice"))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    config = StudyConfig(archs=tuple(args.archs), methods=("apt",), seeds=tuple(args.seeds))
    vocabulary, vlm_dir, _ = prepare_vlm(config, progress=False)
    data = {seed: study_data(config, seed) for seed in config.seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in config.seeds:  # seeds outermost: a run cut short still has every option on its first seeds
        for arch in config.archs:
            for option in args.options:
                policy, train_s = train(config, arch, seed, FUSION_OPTIONS[option], vocabulary, vlm_dir, data[seed])
                tic = time.perf_counter()
                result = evaluate_validation(policy, seed, args.episodes, (1.0,), splits=SPLITS)[1.0]
                records.append(
                    {
                        "option": option,
                        "fusion_options": FUSION_OPTIONS[option],
                        "arch": arch,
                        "seed": seed,
                        "success": result["success"],
                        "gates": policy.apt.gate_values(),
                        "train_s": train_s,
                        "eval_s": time.perf_counter() - tic,
                    }
                )
                print(f"{option} {arch} seed {seed}: {result['success']} ({train_s:.0f} s)", flush=True)
                summary = {"records": records, "summary": summarise(records), "wall_s": time.perf_counter() - started}
                (args.out / "fusion_choice.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
