"""One study from several runs of the same protocol (methods or seeds run separately, on other machines).

Every run of :func:`~apt_lightning.bench.study.run_study` is a pure function of (arch, method, seed) and the
protocol, so rows from separate invocations may share a table only if the protocol agrees: same steps, switch,
data, evaluation, settings and pretrained VLM. :func:`combine_studies` checks that and refuses a row that
appears twice, then re-aggregates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from apt_lightning.bench.report import aggregate

__all__ = ["combine_studies"]

_PER_INVOCATION = frozenset({"archs", "methods", "seeds", "save_checkpoints", "curve_every", "curve_episodes"})
"""Config fields that select which rows run, not how: they may differ between the combined studies."""
_PER_RUN = ("language_dropout", "guidance_scale")
"""Settings each run records as it used them (0 and 1 for methods without dropout or guidance): compared per
method across runs, not per study, so a study of unguided methods combines with one run under another ``w``."""


def combine_studies(studies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge ``results.json`` records of one protocol into one study with a fresh ``summary``.

    Raises:
        ValueError: If no study is given, a protocol setting differs (named with both values), or an
            (arch, method, seed) row appears in more than one study.
    """
    if not studies:
        raise ValueError("combine_studies needs at least one study.")
    first = studies[0]["config"]
    for index, study in enumerate(studies[1:], start=1):
        config = study["config"]
        for key in sorted((set(first) | set(config)) - _PER_INVOCATION - set(_PER_RUN)):
            if first.get(key) != config.get(key):
                raise ValueError(
                    f"Study {index} was run with {key}={config.get(key)!r}, study 0 with {first.get(key)!r}: rows of "
                    "different protocols cannot share a table. Rerun it with the same settings."
                )
    seen: dict[tuple[Any, Any, Any], int] = {}
    runs: list[dict[str, Any]] = []
    for index, study in enumerate(studies):
        for run in study["runs"]:
            key = (run["arch"], run["method"], run["seed"])
            if key in seen:
                raise ValueError(f"{key} appears in study {seen[key]} and study {index}; keep one of them.")
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
