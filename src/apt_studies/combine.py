"""One study from several runs of the same protocol (methods or seeds run separately, on other machines).

Every run of :func:`~apt_studies.study.run_study` is a pure function of (arch, method, seed) and the
protocol, so rows from separate invocations may share a table only if the protocol agrees: same steps, switch,
data, evaluation, settings and pretrained VLM. :func:`combine_studies` checks that and refuses a row that
appears twice, then re-aggregates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from apt_studies.errors import StudyFileError
from apt_studies.report import aggregate

__all__ = ["StudyFileError", "combine_studies", "read_study"]

_PER_INVOCATION = frozenset({"archs", "methods", "seeds", "save_checkpoints", "curve_every", "curve_episodes"})
"""Config fields that select which rows run, not how: they may differ between the combined studies."""
_PER_RUN = ("language_dropout", "guidance_scale")
"""Settings each run records as it used them (0 and 1 for methods without dropout or guidance): compared per
method across runs, not per study, so a study of unguided methods combines with one run under another ``w``."""


_RUN_KEYS = ("arch", "method", "seed", "success")


def read_study(path: str | Path) -> dict[str, Any]:
    """One ``results.json`` written by ``run_study``, checked for the fields :func:`combine_studies` reads.

    Raises:
        StudyFileError: naming the file: missing, empty, truncated or malformed JSON, or a missing field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise StudyFileError(f"{path}: cannot be read ({type(error).__name__}: {error}).") from error
    if not text.strip():
        raise StudyFileError(f"{path} is empty: the study that writes it did not finish. Rerun it, or leave it out.")
    try:
        study = json.loads(text)
    except json.JSONDecodeError as error:
        raise StudyFileError(
            f"{path} is not valid JSON ({error}): truncated (the study was killed while writing?) or edited. Rerun "
            "the study, or leave the file out."
        ) from error
    _check_study(study, str(path))
    return study


def _check_study(study: Any, name: str) -> None:
    if not isinstance(study, Mapping):
        raise StudyFileError(f"{name} holds a {type(study).__name__}, not a study record (a results.json object).")
    missing = [key for key in ("config", "runs") if key not in study]
    if missing:
        raise StudyFileError(f"{name} lacks {missing}: it is not a results.json written by run_study.")
    config, runs = study["config"], study["runs"]
    if not isinstance(config, Mapping) or not all(
        isinstance(config.get(k), (list, tuple)) for k in ("archs", "methods", "seeds")
    ):
        raise StudyFileError(f"{name}: `config` must hold the lists `archs`, `methods` and `seeds`.")
    if not isinstance(runs, list):
        raise StudyFileError(f"{name}: `runs` must be a list of run records, got {type(runs).__name__}.")
    for index, run in enumerate(runs):
        lacking = [key for key in _RUN_KEYS if not isinstance(run, Mapping) or key not in run]
        if lacking:
            raise StudyFileError(f"{name}: run {index} lacks {lacking}; every run records {list(_RUN_KEYS)}.")


def combine_studies(studies: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Merge ``results.json`` records of one protocol into one study with a fresh ``summary``.

    Args:
        studies: the records (:func:`read_study` reads one from a file).
        names: what to call each study in messages (its file name); ``study <i>`` when ``None``.

    Raises:
        StudyFileError: a record lacks a field it needs (named with the study).
        ValueError: If no study is given, a protocol setting differs (named with both values), or an
            (arch, method, seed) row appears in more than one study.
    """
    if not studies:
        raise ValueError("combine_studies needs at least one study.")
    labels = list(names) if names is not None else [f"study {i}" for i in range(len(studies))]
    for study, label in zip(studies, labels, strict=True):
        _check_study(study, label)
    first = studies[0]["config"]
    for index, study in enumerate(studies[1:], start=1):
        config = study["config"]
        for key in sorted((set(first) | set(config)) - _PER_INVOCATION - set(_PER_RUN)):
            if first.get(key) != config.get(key):
                raise ValueError(
                    f"{labels[index]} was run with {key}={config.get(key)!r}, {labels[0]} with {first.get(key)!r}: "
                    "rows of different protocols cannot share a table. Rerun it with the same settings."
                )
    seen: dict[tuple[Any, Any, Any], int] = {}
    runs: list[dict[str, Any]] = []
    for index, study in enumerate(studies):
        for run in study["runs"]:
            key = (run["arch"], run["method"], run["seed"])
            if key in seen:
                raise ValueError(f"{key} appears in {labels[seen[key]]} and {labels[index]}; keep one of them.")
            seen[key] = index
            runs.append(dict(run))
    for name in _PER_RUN:
        used: dict[tuple[Any, Any], Any] = {}
        for run in runs:
            value = used.setdefault((run["arch"], run["method"]), run.get(name))
            if run.get(name) != value:
                raise ValueError(
                    f"{run['arch']} {run['method']} ran with {name}={value!r} and {run.get(name)!r} (seed "
                    f"{run['seed']}): its rows cannot share a table. Rerun them with the same settings."
                )
    config = dict(first)
    for name in _PER_RUN:
        config[name] = sorted({run.get(name) for run in runs if run.get(name) is not None}) or first.get(name)
    for name in ("archs", "methods", "seeds"):
        config[name] = list(dict.fromkeys(v for study in studies for v in study["config"][name]))
    return {
        "config": config,
        "pretraining": first.get("pretraining"),
        "runs": runs,
        "wall_s": sum(float(study.get("wall_s", 0.0)) for study in studies),
        "summary": aggregate(runs),
        "combined_from": [study.get("command") for study in studies],
    }
