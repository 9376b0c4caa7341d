"""Scripted-expert demonstrations, rendered, chunked as the tabletop's, and cached on disk once per setting.

The experts are Meta-World's own (``metaworld.policies.ENV_POLICY_MAP``), reading the full observation; what is
stored is what a policy sees: the frame, the proprioception (:func:`~apt_studies.metaworld.sim.proprioception`)
and the next ``chunk_size`` expert actions per step, zero-padded past the episode's end and flagged in
``action_pad`` (as :mod:`apt_studies.data` does). Episodes the expert fails are dropped, so no sample teaches
another task than the instruction's.

Arrays (``N`` samples): ``images`` (N, S, S, 3) uint8, ``states`` (N, 4) float32, ``actions`` (N, chunk, 4)
float32, ``action_pad`` (N, chunk) bool, ``episode_index`` (N,) int64 into ``episodes``, ``step`` (N,) int64.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from apt_studies.disk_cache import cache_key, cached_directory, default_cache_dir, is_complete
from apt_studies.metaworld.camera import DEFAULT_CAMERA, DEFAULT_IMAGE_SIZE, Camera
from apt_studies.metaworld.errors import MetaWorldCacheError, MetaWorldConfigError
from apt_studies.metaworld.rollout import MAX_STEPS, Simulator, run_episode
from apt_studies.metaworld.sim import ACTION_DIM, PROPRIO_DIM, require_metaworld
from apt_studies.metaworld.splits import DEFAULT_HABIT, MetaWorldEpisode, make_episodes

__all__ = [
    "FORMAT_VERSION",
    "Demonstrations",
    "cached_demonstrations",
    "chunk_actions",
    "collect_demonstrations",
    "demonstration_settings",
    "find_demonstrations",
    "load_arrays",
    "read_demonstrations",
    "save_arrays",
    "stack_parts",
    "write_demonstrations",
]

FORMAT_VERSION = 1
"""Bump when what is stored changes: it is part of the cache key."""
_FILES = ("arrays.npz", "episodes.json")


@dataclass
class Demonstrations:
    """Stacked expert samples (see the module docstring) and the kept episodes with their outcomes."""

    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    action_pad: np.ndarray
    episode_index: np.ndarray
    step: np.ndarray
    episodes: list[Any]
    attempted: int
    seconds: float

    def __len__(self) -> int:
        return len(self.states)


def _expert_act(expert: Any) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """The scripted expert as a ``run_episode`` actor: it reads the full observation (goal included)."""
    return lambda frame, state, obs: expert.get_action(obs)


def collect_demonstrations(
    episodes: Sequence[MetaWorldEpisode],
    chunk_size: int = 8,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera: Camera = DEFAULT_CAMERA,
    max_steps: int = MAX_STEPS,
    progress: bool = True,
) -> Demonstrations:
    """Run the scripted expert on ``episodes`` and keep every step of each successful one.

    Raises:
        MetaWorldConfigError: ``chunk_size`` < 1.
    """
    if chunk_size < 1:
        raise MetaWorldConfigError(f"`chunk_size` must be >= 1, got {chunk_size}.")
    require_metaworld()
    experts = importlib.import_module("metaworld.policies").ENV_POLICY_MAP
    sim = Simulator(image_size, camera)
    kept: list[MetaWorldEpisode] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "states", "actions", "action_pad", "owner", "step")}
    started = time.perf_counter()
    try:
        for episode in tqdm(episodes, desc="meta-world expert demos", disable=not progress):
            expert = experts[episode.task]()
            trace = run_episode(sim, episode, _expert_act(expert), max_steps, record=True)
            if trace.outcome != "success":
                continue
            length = len(trace.actions)
            chunks, pad = chunk_actions(trace.actions, chunk_size)
            parts["images"].append(trace.frames)
            parts["states"].append(trace.states)
            parts["actions"].append(chunks)
            parts["action_pad"].append(pad)
            parts["owner"].append(np.full(length, len(kept), np.int64))
            parts["step"].append(np.arange(length, dtype=np.int64))
            kept.append(episode)
    finally:
        sim.close()
    stacked = stack_parts(parts, image_size, chunk_size)
    return Demonstrations(
        **stacked,
        episodes=kept,
        attempted=len(episodes),
        seconds=time.perf_counter() - started,
    )


def chunk_actions(actions: np.ndarray, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(chunks, pad)`` of one episode's ``(T, A)`` actions: the ``chunk_size`` actions from each step ``(T, chunk,
    A)``, zero past the episode's end, and where that is ``(T, chunk)``."""
    length = len(actions)
    padded = np.concatenate([actions, np.zeros((chunk_size, actions.shape[1]), actions.dtype)])
    index = np.arange(length)[:, None] + np.arange(chunk_size)[None, :]
    return padded[index], index >= length


def demonstration_settings(
    split: str = "train",
    n_episodes: int = 100,
    seed: int = 0,
    chunk_size: int = 8,
    *,
    groups: Sequence[str] | None = None,
    habit: float = DEFAULT_HABIT,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera: Camera = DEFAULT_CAMERA,
    max_steps: int = MAX_STEPS,
) -> dict[str, Any]:
    """What :func:`cached_demonstrations` records of its arguments (its key adds the metaworld and mujoco versions)."""
    return {
        "split": split,
        "n_episodes": n_episodes,
        "seed": seed,
        "chunk_size": chunk_size,
        "groups": list(groups) if groups is not None else None,
        "habit": habit,
        "image_size": image_size,
        "camera": asdict(camera),
        "max_steps": max_steps,
        "format": FORMAT_VERSION,
    }


def cached_demonstrations(
    split: str = "train",
    n_episodes: int = 100,
    seed: int = 0,
    chunk_size: int = 8,
    *,
    groups: Sequence[str] | None = None,
    habit: float = DEFAULT_HABIT,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera: Camera = DEFAULT_CAMERA,
    max_steps: int = MAX_STEPS,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Demonstrations:
    """:func:`collect_demonstrations` for ``make_episodes(split, n_episodes, seed, ...)``, built once per setting.

    The cache key holds every argument that changes the data plus the versions of metaworld and mujoco and
    :data:`FORMAT_VERSION`; the artefact lives in ``<cache_dir>/metaworld_demos/<key>/``
    (:func:`~apt_studies.disk_cache.default_cache_dir` by default). ``seconds`` is the build time either way.
    """
    settings = demonstration_settings(
        split,
        n_episodes,
        seed,
        chunk_size,
        groups=groups,
        habit=habit,
        image_size=image_size,
        camera=camera,
        max_steps=max_steps,
    )
    payload = {**settings, "metaworld": metadata.version("metaworld"), "mujoco": metadata.version("mujoco")}
    directory = Path(cache_dir or default_cache_dir()) / "metaworld_demos" / cache_key(payload)

    def build(staging: Path) -> None:
        episodes = make_episodes(split, n_episodes, seed, groups=groups, habit=habit)
        demos = collect_demonstrations(
            episodes, chunk_size, image_size=image_size, camera=camera, max_steps=max_steps, progress=progress
        )
        write_demonstrations(staging, demos, payload)

    cached_directory(directory, _FILES, build)
    return read_demonstrations(directory)


def write_demonstrations(directory: Path, demos: Demonstrations, payload: dict[str, Any]) -> None:
    """Write ``demos`` into ``directory`` as :func:`cached_demonstrations` stores them: ``arrays.npz`` and
    ``episodes.json`` (``payload``, the episodes, how many were attempted, the build seconds)."""
    save_arrays(directory / "arrays.npz", demos)
    meta = {"payload": payload, "attempted": demos.attempted, "seconds": demos.seconds}
    meta["episodes"] = [asdict(e) for e in demos.episodes]
    (directory / "episodes.json").write_text(json.dumps(meta, indent=1))


def read_demonstrations(directory: str | Path) -> Demonstrations:
    """The :class:`Demonstrations` of one cache directory (plain arrays and JSON: no metaworld needed)."""
    directory = Path(directory)
    if not is_complete(directory, _FILES):
        raise MetaWorldCacheError(f"{directory} is not a complete demonstration cache: it lacks one of {_FILES}.")
    meta = json.loads((directory / "episodes.json").read_text())
    episodes = [MetaWorldEpisode(**{**e, "rand_vec": tuple(e["rand_vec"])}) for e in meta["episodes"]]
    return load_arrays(directory / "arrays.npz", episodes, meta["attempted"], meta["seconds"])


def find_demonstrations(settings: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The cache directory of the demonstrations built with ``settings`` (:func:`demonstration_settings`),
    whichever metaworld and mujoco versions built them, found by what each directory records; nothing is built.

    Raises:
        MetaWorldCacheError: no directory, or several (built by different versions), match.
    """
    root = Path(cache_dir or default_cache_dir()) / "metaworld_demos"
    wanted = json.loads(json.dumps(settings))  # tuples as lists, as the record holds them
    found: list[tuple[Path, dict[str, Any]]] = []
    for record in sorted(root.glob("*/episodes.json")):
        payload = json.loads(record.read_text())["payload"]
        if is_complete(record.parent, _FILES):
            found.append((record.parent, payload))
    matches = [(d, p) for d, p in found if {k: v for k, v in p.items() if k not in ("metaworld", "mujoco")} == wanted]
    if len(matches) == 1:
        return matches[0][0]
    if matches:
        versions = {d.name: (p["metaworld"], p["mujoco"]) for d, p in matches}
        raise MetaWorldCacheError(
            f"several cached demonstrations match {settings}, built by (metaworld, mujoco) {versions}: pass the "
            "directory itself."
        )
    held = [{k: p[k] for k in ("split", "n_episodes", "seed", "chunk_size", "image_size")} for _, p in found]
    raise MetaWorldCacheError(
        f"no cached demonstrations under {root} match {settings}; cached there: {held or 'none'}. Build them where "
        "metaworld is installed: `python examples/metaworld_study.py --prepare --seeds <seed>` (same --cache-dir)."
    )


_ARRAYS = ("images", "states", "actions", "action_pad", "episode_index", "step")


def stack_parts(parts: dict[str, list[np.ndarray]], image_size: int, chunk_size: int) -> dict[str, np.ndarray]:
    """Concatenate per-episode arrays (``owner`` becomes ``episode_index``); empty arrays of the right shapes."""
    empty = {
        "images": np.zeros((0, image_size, image_size, 3), np.uint8),
        "states": np.zeros((0, PROPRIO_DIM), np.float32),
        "actions": np.zeros((0, chunk_size, ACTION_DIM), np.float32),
        "action_pad": np.zeros((0, chunk_size), bool),
        "owner": np.zeros(0, np.int64),
        "step": np.zeros(0, np.int64),
    }
    stacked = {k: (np.concatenate(v) if v else empty[k]) for k, v in parts.items()}
    stacked["episode_index"] = stacked.pop("owner")
    return stacked


def save_arrays(path: Path, demos: Demonstrations) -> None:
    """Write ``demos``' arrays to one compressed ``.npz``."""
    np.savez_compressed(path, **{k: getattr(demos, k) for k in _ARRAYS})


def load_arrays(path: Path, episodes: list[Any], attempted: int, seconds: float) -> Demonstrations:
    """:class:`Demonstrations` from :func:`save_arrays`' file and the episodes it indexes."""
    with np.load(path) as arrays:
        return Demonstrations(
            **{k: arrays[k] for k in _ARRAYS}, episodes=episodes, attempted=attempted, seconds=seconds
        )
