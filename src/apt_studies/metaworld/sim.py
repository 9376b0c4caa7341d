"""Meta-World environments reset to a chosen start: the one place that touches Meta-World's private state.

Meta-World draws an episode's object and goal positions (its *rand vec*) inside ``reset()`` from a per-task box.
The benchmark needs the opposite: it chooses the vector (one shared distribution for every task of a group, and a
range outside training for the novel-position split), and the env starts from it. :func:`reset_to` freezes the
vector the way Meta-World's own ``set_task`` does and resets. Environments are built once per task and process
(:func:`make_env`); building one parses its MuJoCo model.

Observations are made fully observable (the goal position fills the last three of the 39 dims), because the
scripted experts read the goal from there; policies only get :func:`proprioception` (the hand's position and the
gripper opening), never the goal.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from apt_studies.metaworld.errors import MetaWorldConfigError, MetaWorldUnavailableError

__all__ = ["ACTION_DIM", "PROPRIO_DIM", "make_env", "proprioception", "require_metaworld", "require_mujoco", "reset_to"]

PROPRIO_DIM = 4
"""Hand ``(x, y, z)`` and gripper opening in [0, 1]: the first four dims of Meta-World's observation."""
ACTION_DIM = 4
"""Hand displacement ``(dx, dy, dz)`` and gripper effort, each in [-1, 1]."""
_INSTALL = 'pip install "metaworld==3.1.1" packaging'


def _headless_defaults() -> None:
    """Without a display MuJoCo's default GLFW backend cannot start: default to EGL (software Mesa works)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def require_mujoco() -> Any:
    """The ``mujoco`` module, or a :class:`MetaWorldUnavailableError` saying how to install it."""
    _headless_defaults()
    try:
        return importlib.import_module("mujoco")
    except ImportError as error:
        raise MetaWorldUnavailableError(f"the Meta-World benchmark needs MuJoCo: {_INSTALL}") from error


def require_metaworld() -> Any:
    """The ``metaworld`` module, or a :class:`MetaWorldUnavailableError` saying how to install it."""
    require_mujoco()
    try:
        return importlib.import_module("metaworld")
    except ImportError as error:  # metaworld 3.1.1 also imports `packaging` without declaring it
        raise MetaWorldUnavailableError(f"the Meta-World benchmark needs metaworld: {_INSTALL} ({error})") from error


@functools.cache
def _env_classes() -> dict[str, type]:
    require_metaworld()
    return dict(importlib.import_module("metaworld.env_dict").ENV_CLS_MAP)


def make_env(task: str) -> Any:
    """A fresh, fully observable Meta-World env of ``task`` (e.g. ``"push-v3"``) with no time limit of its own.

    Raises:
        MetaWorldConfigError: ``task`` is not a Meta-World v3 task.
    """
    classes = _env_classes()
    if task not in classes:
        raise MetaWorldConfigError(f"unknown Meta-World task {task!r}; expected one of {sorted(classes)}.")
    env = classes[task]()
    env._partially_observable = False
    # the observation is clipped to the goal space: widen it, or goals of the novel-position split are cut off
    low, high = env.goal_space.low, env.goal_space.high
    env.goal_space = type(env.goal_space)(low - 1.0, high + 1.0, dtype=np.float64)
    env.__dict__.pop("sawyer_observation_space", None)  # cached with the goal bounds zeroed: recompute
    env.max_path_length = 10**9  # the benchmark counts steps itself
    env._set_task_called = True
    env.apt_task = task
    return env


def reset_to(env: Any, rand_vec: Sequence[float]) -> np.ndarray:
    """Reset ``env`` so that its objects and goal come from ``rand_vec``; returns the 39-dim observation.

    Raises:
        MetaWorldConfigError: ``rand_vec`` has the wrong length for the env.
    """
    vec = np.asarray(rand_vec, dtype=np.float64)
    expected = env._random_reset_space.low.shape
    if vec.shape != expected:
        raise MetaWorldConfigError(
            f"{type(env).__name__} takes a rand vec of shape {expected}, got {vec.shape}: sample it with the group's "
            "sampler (apt_studies.metaworld.groups)."
        )
    env._freeze_rand_vec = True
    env._last_rand_vec = vec
    obs, _ = env.reset()
    require_mujoco().mj_forward(env.model, env.data)  # some resets move bodies in the model only: refresh poses
    return np.asarray(obs, dtype=np.float64)


def proprioception(obs: np.ndarray) -> np.ndarray:
    """The policy's state: the first :data:`PROPRIO_DIM` dims of a Meta-World observation, as float32."""
    return np.asarray(obs[..., :PROPRIO_DIM], dtype=np.float32)
