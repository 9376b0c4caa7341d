"""Vectorised gripper kinematics with continuous contact detection.

The same function advances one environment (:class:`~apt_studies.env.TabletopEnv`) or hundreds in
lockstep (:func:`~apt_studies.rollout.rollout`), so single-episode and batched evaluation can never
disagree. Contact is tested along the whole segment travelled in a step, not only at its end point, so a
fast gripper cannot tunnel through an object.
"""

from __future__ import annotations

import numpy as np

STATE_DIM = 2
"""Proprioceptive state: gripper ``(x, y)`` in ``[0, 1]^2``."""
ACTION_DIM = 2
"""Action: normalised planar velocity ``(vx, vy)``, each component clipped to ``[-1, 1]``."""
MAX_STEP = 0.05
"""Displacement per step for a unit action component (table units)."""


def advance(
    ee: np.ndarray, actions: np.ndarray, centres: np.ndarray, radii: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Move grippers by one step and report the first object disc each one touches.

    Args:
        ee: ``(B, 2)`` gripper positions.
        actions: ``(B, 2)`` normalised actions; components are clipped to ``[-1, 1]``.
        centres: ``(B, M, 2)`` object centres (scenes padded to ``M`` objects).
        radii: ``(B, M)`` contact radii.
        valid: ``(B, M)`` bool, False for padding objects; all valid when omitted.

    Returns:
        ``(new_ee, contact)``: positions ``(B, 2)`` (stopped at the contact point when a disc is touched, and
        kept inside the table) and ``(B,)`` int index of the touched object or ``-1``.
    """
    step = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0) * MAX_STEP
    end = np.clip(ee + step, 0.0, 1.0)
    d = end - ee  # (B, 2)
    f = ee[:, None, :] - centres  # (B, M, 2)
    a = np.sum(d * d, axis=-1)[:, None]  # (B, 1)
    b = 2.0 * np.sum(f * d[:, None, :], axis=-1)  # (B, M)
    c = np.sum(f * f, axis=-1) - radii * radii  # (B, M)
    disc = b * b - 4.0 * a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    hits = (disc >= 0.0) & (a > 0.0) & (t >= 0.0) & (t <= 1.0)
    t = np.where(hits, t, np.inf)
    t = np.where(c <= 0.0, 0.0, t)  # already touching: contact immediately
    if valid is not None:
        t = np.where(valid, t, np.inf)
    first = np.argmin(t, axis=1)
    t_first = t[np.arange(len(t)), first]
    touched = np.isfinite(t_first)
    contact = np.where(touched, first, -1)
    new_ee = ee + np.where(touched, np.minimum(t_first, 1.0), 1.0)[:, None] * d
    return new_ee, contact
