"""Scripted expert: shortest collision-free path to the target, walked at full speed.

Because touching *any* object ends an episode, the expert must route around distractors. It plans on a
visibility graph: every distractor is inflated by :data:`CLEARANCE` and approximated by a circumscribed
octagon whose corners (plus the gripper and the target centre) are the graph's nodes; an edge exists when
the straight segment keeps out of every inflated disc. Dijkstra gives the shortest route and the gripper
walks it, ending each step exactly on a corner when it reaches one so it never cuts a corner into a
distractor. The expert is Markov (a function of scene and gripper position only), so re-planning at every
step gives the same behaviour as following one plan.
"""

from __future__ import annotations

import numpy as np

from apt_studies.physics import ACTION_DIM, MAX_STEP
from apt_studies.scene import Scene

CLEARANCE = 0.03
"""Distance kept between the planned path and every distractor's contact disc."""
_CORNERS = 8
_CORNER_SCALE = 1.0 / np.cos(np.pi / _CORNERS) + 1e-3
_EPS = 1e-7


def _segments_clear(starts: np.ndarray, ends: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(N, N)`` bool: whether each segment ``starts[i] -> ends[j]`` stays outside every disc."""
    d = ends[None, :, :] - starts[:, None, :]  # (N, N, 2)
    length2 = np.maximum(np.sum(d * d, axis=-1), 1e-18)[..., None]  # (N, N, 1)
    rel = centres[None, None, :, :] - starts[:, None, None, :]  # (N, 1, M, 2)
    t = np.clip(np.sum(rel * d[:, :, None, :], axis=-1) / length2, 0.0, 1.0)  # (N, N, M)
    closest = starts[:, None, None, :] + t[..., None] * d[:, :, None, :]
    dist = np.linalg.norm(closest - centres[None, None, :, :], axis=-1)
    return np.all(dist >= radii[None, None, :] - _EPS, axis=-1)


def _dijkstra(weights: np.ndarray, source: int, sink: int) -> list[int] | None:
    """Node indices of a shortest path in a dense weight matrix (``inf`` = no edge), or None."""
    n = len(weights)
    dist = np.full(n, np.inf)
    dist[source] = 0.0
    previous = np.full(n, -1)
    done = np.zeros(n, dtype=bool)
    for _ in range(n):
        candidates = np.where(done, np.inf, dist)
        u = int(np.argmin(candidates))
        if not np.isfinite(candidates[u]) or u == sink:
            break
        done[u] = True
        through = dist[u] + weights[u]
        better = (through < dist) & ~done
        dist[better] = through[better]
        previous[better] = u
    if not np.isfinite(dist[sink]):
        return None
    path = [sink]
    while path[-1] != source:
        path.append(int(previous[path[-1]]))
    return path[::-1]


def plan_path(scene: Scene, ee_pos: np.ndarray | tuple[float, float]) -> np.ndarray:
    """Shortest path from the gripper to the target centre that keeps clear of distractors.

    Args:
        scene: Objects and target.
        ee_pos: Gripper position.

    Returns:
        ``(P, 2)`` waypoints, starting at ``ee_pos`` and ending at the target centre. Falls back to the
        straight line when no clear route exists (e.g. the gripper is boxed in).
    """
    start = np.asarray(ee_pos, dtype=np.float64)
    goal = np.array([scene.target_object.x, scene.target_object.y])
    others = [i for i in range(len(scene.objects)) if i != scene.target]
    centres, radii = scene.centres()[others], scene.radii()[others]
    inflated = radii + CLEARANCE
    # A gripper already inside an inflated disc (but not touching) may leave it: shrink that disc to fit.
    gap = np.linalg.norm(centres - start, axis=1)
    inflated = np.where(gap < inflated, np.maximum(gap - 1e-4, radii + 1e-4), inflated)
    angles = (np.arange(_CORNERS) + 0.5) * (2.0 * np.pi / _CORNERS)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    corners = (centres[:, None, :] + (inflated * _CORNER_SCALE)[:, None, None] * ring[None]).reshape(-1, 2)
    inside_table = np.all((corners >= 0.0) & (corners <= 1.0), axis=1)
    corner_gap = np.linalg.norm(corners[:, None, :] - centres[None, :, :], axis=-1)
    free = inside_table & np.all(corner_gap >= inflated[None, :] - _EPS, axis=1)
    nodes = np.concatenate([start[None], goal[None], corners[free]], axis=0)
    clear = _segments_clear(nodes, nodes, centres, inflated)
    weights = np.where(clear, np.linalg.norm(nodes[:, None, :] - nodes[None, :, :], axis=-1), np.inf)
    route = _dijkstra(weights, source=0, sink=1)
    if route is None:
        return np.stack([start, goal])
    return nodes[route]


def walk_path(path: np.ndarray, horizon: int) -> np.ndarray:
    """Normalised actions that follow a waypoint path at :data:`MAX_STEP` per step, zero once arrived.

    A step that would pass a waypoint stops on it, so the executed polyline is exactly the planned one.
    """
    actions = np.zeros((horizon, ACTION_DIM), dtype=np.float32)
    position, index = path[0].astype(np.float64), 1
    for k in range(horizon):
        while index < len(path) and np.linalg.norm(path[index] - position) < 1e-9:
            index += 1
        if index >= len(path):
            break
        delta = path[index] - position
        distance = float(np.linalg.norm(delta))
        step = delta if distance <= MAX_STEP else delta * (MAX_STEP / distance)
        actions[k] = step / MAX_STEP
        position = position + step
    return actions


def scripted_actions(scene: Scene, ee_pos: np.ndarray | tuple[float, float], horizon: int) -> np.ndarray:
    """The expert's next ``horizon`` normalised actions from ``ee_pos`` towards ``scene.target``.

    Args:
        scene: Objects and target (the expert reads the target from the scene, never from language).
        ee_pos: Current gripper position.
        horizon: Number of actions (the chunk length).

    Returns:
        ``(horizon, 2)`` float32 actions in ``[-1, 1]``; trailing zeros once the target centre is reached.
    """
    return walk_path(plan_path(scene, ee_pos), horizon)
