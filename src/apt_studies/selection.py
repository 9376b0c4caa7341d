"""Choose language dropout ``p`` and guidance scale ``w`` on validation episodes, never on the reported splits.

The rule, fixed before any selection was run:

1. For each ``p`` in ``dropouts``, each arch and each seed, train ``apt_dropout`` exactly as the study does
   (same steps, data, expert initialisation) and roll it out on the validation episodes of that seed
   (:func:`~apt_studies.evaluation.evaluate_validation`: seeds ``20_000 + s``, which no reported split
   uses) with ``w = 1`` and every ``w`` in ``scales``.
2. ``p`` = the one with the highest validation counterfactual success at ``w = 1``, averaged over archs and
   seeds (``apt_dropout`` is reported unguided, so ``p`` must serve it on its own); ties go to the smaller ``p``.
3. ``w`` = on the chosen ``p``'s policies, the scale with the highest mean validation counterfactual success
   among those whose mean validation ``seen`` success is within ``seen_tolerance`` of ``w = 1``'s; ties and
   "nothing better than ``w = 1``" go to the smaller scale.

One ``p`` and one ``w`` serve both architectures (fewer choices made on the same few validation episodes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_studies.determinism import fixed_threads
from apt_studies.evaluation import evaluate_validation, validation_seed
from apt_studies.study import StudyConfig, prepare_vlm, study_data, train_method

__all__ = ["choose", "select_settings"]


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def choose(records: Sequence[dict[str, Any]], seen_tolerance: float = 0.05) -> dict[str, Any]:
    """Apply the module's rule to validation ``records`` (one per arch, seed, ``p``, ``w``).

    Each record holds ``language_dropout``, ``guidance_scale`` and ``success`` (``{"counterfactual", "seen"}``).

    Returns:
        ``{"language_dropout", "guidance_scale", "by_dropout": {p: mean cf at w=1},
        "by_scale": {w: {"counterfactual", "seen"}} at the chosen p}``.

    Raises:
        ValueError: no record has ``guidance_scale == 1``.
    """
    plain = [r for r in records if r["guidance_scale"] == 1.0]
    if not plain:
        raise ValueError("`records` has no unguided (guidance_scale=1.0) record to choose the dropout from.")
    dropouts = sorted({r["language_dropout"] for r in plain})
    by_dropout = {
        p: _mean([r["success"]["counterfactual"] for r in plain if r["language_dropout"] == p]) for p in dropouts
    }
    best_p = max(dropouts, key=lambda p: (by_dropout[p], -p))
    at_p = [r for r in records if r["language_dropout"] == best_p]
    scales = sorted({r["guidance_scale"] for r in at_p})
    by_scale = {
        w: {
            split: _mean([r["success"][split] for r in at_p if r["guidance_scale"] == w])
            for split in ("counterfactual", "seen")
        }
        for w in scales
    }
    floor = by_scale[1.0]["seen"] - seen_tolerance
    allowed = [w for w in scales if by_scale[w]["seen"] >= floor]
    best_w = max(allowed, key=lambda w: (by_scale[w]["counterfactual"], -w))
    return {
        "language_dropout": best_p,
        "guidance_scale": best_w,
        "by_dropout": by_dropout,
        "by_scale": by_scale,
        "seen_tolerance": seen_tolerance,
    }


def select_settings(
    config: StudyConfig,
    dropouts: Sequence[float] = (0.1, 0.25, 0.5),
    scales: Sequence[float] = (1.25, 1.5, 2.0),
    episodes: int = 100,
    seen_tolerance: float = 0.05,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``apt_dropout`` for each ``p`` (``config``'s archs and seeds) and choose ``p`` and ``w`` (:func:`choose`).

    Returns:
        ``{"chosen": choose(...), "records": [...], "validation_seeds": {seed: episode seed}, "config",
        "wall_s"}``.
    """
    started = time.perf_counter()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with fixed_threads(config.threads):  # as in run_study: the choice must not depend on the machine
            vocabulary, vlm_dir, _ = prepare_vlm(config, progress, cache_dir)
            records: list[dict[str, Any]] = []
            data = {seed: study_data(config, seed) for seed in config.seeds}
            for p in dropouts:
                run_config = dataclasses.replace(config, language_dropout=p)
                for arch in config.archs:
                    for seed in config.seeds:
                        policy, _, _, train_s = train_method(
                            run_config, arch, "apt_dropout", seed, vocabulary, vlm_dir, data[seed]
                        )
                        tic = time.perf_counter()
                        results = evaluate_validation(policy, seed, episodes, (1.0, *scales))
                        eval_s = time.perf_counter() - tic
                        for w, result in results.items():
                            records.append(
                                {
                                    "arch": arch,
                                    "seed": seed,
                                    "language_dropout": p,
                                    "guidance_scale": w,
                                    **result,
                                    "train_s": train_s,
                                    "eval_s": eval_s,
                                }
                            )
                            if progress:
                                print(f"p={p} {arch} seed {seed} w={w}: {result['success']}", flush=True)
    finally:
        lightning_log.setLevel(level)
    return {
        "chosen": choose(records, seen_tolerance),
        "records": records,
        "validation_seeds": {seed: validation_seed(seed) for seed in config.seeds},
        "config": dataclasses.asdict(config),
        "wall_s": time.perf_counter() - started,
    }
