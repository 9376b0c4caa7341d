"""Where a rollout ended: success, the layout's habitual object, another object, or nothing.

A counterfactual episode asks for a non-canonical object of a training layout, so a failed one tells *why* it
failed: a policy that reads the scene and not the instruction ends at the layout's habitual (canonical)
target; one that reads the instruction but grounds it wrongly ends at another object; one that is lost
reaches nothing before the step budget runs out. The shortcut policy
(:func:`~apt_studies.policies.shortcut_policy`) is the reference point: all of its counterfactual
failures are ``"habitual"``.

Example:
    >>> import numpy as np
    >>> from apt_studies.rollout import RolloutResult
    >>> from apt_studies.splits import make_episodes
    >>> episodes = make_episodes("counterfactual", 3, seed=0)
    >>> habitual = [e.canonical_target for e in episodes]
    >>> result = RolloutResult(
    ...     success=np.zeros(3, bool), contact=np.array([habitual[0], -1, habitual[2]]), steps=np.ones(3, int),
    ...     splits=("counterfactual",) * 3)
    >>> outcome_rates(result, episodes)
    {'success': 0.0, 'habitual': 0.6666666666666666, 'other': 0.0, 'none': 0.3333333333333333}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apt_studies.rollout import RolloutResult
from apt_studies.scene import Episode

__all__ = ["FAILURE_CLASSES", "OUTCOMES", "classify_outcomes", "nearest_at_timeout", "outcome_rates"]

FAILURE_CLASSES: tuple[str, ...] = ("habitual", "other", "none")
"""Failed episodes: ended at the layout's habitual object / at another object / at no object (time-out)."""
OUTCOMES: tuple[str, ...] = ("success", *FAILURE_CLASSES)
"""Every episode falls in exactly one of these."""


def classify_outcomes(result: RolloutResult, episodes: Sequence[Episode]) -> list[str]:
    """One of :data:`OUTCOMES` per episode of ``result``.

    Args:
        result: what :func:`~apt_studies.rollout.rollout` returned for ``episodes``.
        episodes: the episodes rolled out, in the same order (their ``canonical_target`` names the habitual
            object; ``-1``, as on fresh layouts, means there is none, so no failure there is ``"habitual"``).

    Raises:
        ValueError: ``result`` and ``episodes`` differ in length.
    """
    if len(result.contact) != len(episodes):
        raise ValueError(
            f"`result` holds {len(result.contact)} episodes but `episodes` has {len(episodes)}: pass the list "
            "that was rolled out."
        )
    habitual = np.array([e.canonical_target for e in episodes], dtype=np.int64)
    labels = []
    for ok, contact, habit in zip(result.success, result.contact, habitual, strict=True):
        if ok:
            labels.append("success")
        elif contact < 0:
            labels.append("none")
        elif habit >= 0 and contact == habit:
            labels.append("habitual")
        else:
            labels.append("other")
    return labels


def outcome_rates(result: RolloutResult, episodes: Sequence[Episode]) -> dict[str, float]:
    """Fraction of the episodes in each of :data:`OUTCOMES` (they sum to 1; ``nan`` for no episode)."""
    labels = classify_outcomes(result, episodes)
    n = len(labels)
    return {name: (labels.count(name) / n if n else float("nan")) for name in OUTCOMES}


def nearest_at_timeout(result: RolloutResult, episodes: Sequence[Episode]) -> dict[str, float]:
    """For the episodes that reached nothing (``"none"``): which object the gripper was nearest when time ran out.

    Splits the ``"none"`` class further: ``"target"`` (headed the right way, too slow or stopped short),
    ``"habitual"`` (stalled by the layout's habit), ``"other"``; fractions of the ``"none"`` episodes, plus
    ``"none"`` (their count) and ``"mean_distance"`` (to the nearest object's edge, in table units).

    Raises:
        ValueError: ``result`` has no ``final_state`` (it was not made by :func:`~apt_studies.rollout.rollout`).
    """
    if result.final_state is None:
        raise ValueError("`result.final_state` is None: roll out with `apt_studies.rollout.rollout`.")
    labels = classify_outcomes(result, episodes)
    counts = {"target": 0, "habitual": 0, "other": 0}
    distances = []
    for i, label in enumerate(labels):
        if label != "none":
            continue
        scene = episodes[i].scene
        gaps = np.linalg.norm(scene.centres() - result.final_state[i], axis=1) - scene.radii()
        nearest = int(np.argmin(gaps))
        distances.append(float(gaps[nearest]))
        if nearest == scene.target:
            counts["target"] += 1
        elif nearest == episodes[i].canonical_target:
            counts["habitual"] += 1
        else:
            counts["other"] += 1
    n = len(distances)
    out = {k: (v / n if n else float("nan")) for k, v in counts.items()}
    return {**out, "none": float(n), "mean_distance": float(np.mean(distances)) if n else float("nan")}
