"""The pretraining corpus: scripted-expert demonstrations of every MT50 task outside the language-critical groups.

APT's authors pretrain on a broad, heterogeneous corpus and fine-tune on the task (``shared/APT-BRIEF.md``,
section 10). Here the corpus is Meta-World's other 45 tasks (:data:`CORPUS_TASKS`: all of MT50 but the groups'
tasks; stick push/pull included), each with its own instruction from the table's training wordings
(:mod:`apt_studies.metaworld.tasks`).

Starts: each episode's env draws its own start from Meta-World's own per-task distribution (its rand-vec box and
its resampling rules), seeded per episode (:func:`episode_seed`), and the drawn vector is recorded in the episode,
so :func:`~apt_studies.metaworld.sim.reset_to` replays it. Success is Meta-World's own ``info["success"]``;
failed expert episodes are dropped. The renderer is the groups' (every site hidden, no marker), so a task whose
goal is only a site shows no goal: the corpus teaches the look of the robot, the objects and the motions.

Samples are taken every ``stride``-th step of an episode (each still with the next ``chunk_size`` expert actions),
which keeps the corpus's memory in proportion to the pretraining budget; the arrays are the demonstrations'
(:class:`~apt_studies.metaworld.demos.Demonstrations`) and are cached on disk the same way.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from apt_studies.disk_cache import cache_key, cached_directory, default_cache_dir
from apt_studies.metaworld.camera import DEFAULT_CAMERA, DEFAULT_IMAGE_SIZE, Camera
from apt_studies.metaworld.demos import Demonstrations, load_arrays, save_arrays, stack_parts
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import group_of
from apt_studies.metaworld.rollout import Simulator
from apt_studies.metaworld.sim import ACTION_DIM, proprioception, require_metaworld, require_mujoco
from apt_studies.metaworld.tasks import MT50_TASKS, training_instruction

__all__ = [
    "CORPUS_MAX_STEPS",
    "CORPUS_TASKS",
    "FORMAT_VERSION",
    "CorpusEpisode",
    "cached_corpus",
    "collect_corpus",
    "episode_seed",
]

CORPUS_TASKS: tuple[str, ...] = tuple(t for t in MT50_TASKS if group_of(t) is None)
"""MT50 tasks outside every language-critical group (45), sorted."""
CORPUS_MAX_STEPS = 300
"""Step budget of a corpus expert episode (Meta-World's experts need 32-224 steps)."""
FORMAT_VERSION = 1
_STREAM = 2501  # keeps the corpus's seeds apart from the splits' streams
_FILES = ("arrays.npz", "episodes.json")


@dataclass(frozen=True)
class CorpusEpisode:
    """One corpus episode: the task, the start its env drew (recorded), the words, and the seed of the draw."""

    task: str
    rand_vec: tuple[float, ...]
    instruction: str
    seed: int
    split: str = "pretrain"


def episode_seed(seed: int, task: str, index: int) -> int:
    """The seed of episode ``index`` of ``task`` in the corpus of study seed ``seed`` (its env's start draw)."""
    return int(np.random.SeedSequence([seed, CORPUS_TASKS.index(task), index, _STREAM]).generate_state(1)[0])


def _draw_start(env, env_seed: int) -> np.ndarray:
    """Reset ``env`` with Meta-World's own start distribution, seeded; returns the observation (vec recorded)."""
    from gymnasium.utils import seeding

    env._np_random, _ = seeding.np_random(env_seed)
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._last_rand_vec = None
    obs, _ = env.reset()
    env._freeze_rand_vec = True  # later resets of this env replay the vector unless told otherwise
    require_mujoco().mj_forward(env.model, env.data)
    return np.asarray(obs, dtype=np.float64)


def collect_corpus(
    episodes_per_task: int,
    seed: int = 0,
    chunk_size: int = 8,
    *,
    tasks: Sequence[str] = CORPUS_TASKS,
    stride: int = 2,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera: Camera = DEFAULT_CAMERA,
    max_steps: int = CORPUS_MAX_STEPS,
    progress: bool = True,
) -> Demonstrations:
    """Run every task's scripted expert ``episodes_per_task`` times from seeded starts of its own; keep successes.

    Raises:
        MetaWorldConfigError: a task is in a language-critical group or unknown, or a count is < 1.
    """
    for name, value in (("episodes_per_task", episodes_per_task), ("chunk_size", chunk_size), ("stride", stride)):
        if value < 1:
            raise MetaWorldConfigError(f"`{name}` must be >= 1, got {value}.")
    for task in tasks:
        if task not in CORPUS_TASKS:
            raise MetaWorldConfigError(
                f"{task!r} is not a corpus task: the corpus holds MT50 tasks outside the language-critical groups "
                f"({len(CORPUS_TASKS)} tasks, see CORPUS_TASKS)."
            )
    require_metaworld()
    experts = importlib.import_module("metaworld.policies").ENV_POLICY_MAP
    sim = Simulator(image_size, camera)
    kept: list[CorpusEpisode] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "states", "actions", "action_pad", "owner", "step")}
    plan = [(task, i) for i in range(episodes_per_task) for task in tasks]
    started = time.perf_counter()
    try:
        for task, i in tqdm(plan, desc="meta-world corpus", disable=not progress):
            env, renderer = sim.get(task)
            env_seed = episode_seed(seed, task, i)
            obs = _draw_start(env, env_seed)
            vec = tuple(float(v) for v in env._last_rand_vec)
            expert = experts[task]()
            frames, states, actions, success = [], [], [], False
            for t in range(max_steps):
                action = np.clip(np.asarray(expert.get_action(obs), dtype=np.float64), -1.0, 1.0)
                if t % stride == 0:
                    frames.append(renderer.render(env.data))
                    states.append(proprioception(obs))
                actions.append(action.astype(np.float32))
                obs, _, _, _, info = env.step(action)
                if info.get("success", 0.0) >= 1.0:
                    success = True
                    break
            if not success:
                continue
            length = len(actions)
            padded = np.concatenate([np.stack(actions), np.zeros((chunk_size, ACTION_DIM), np.float32)])
            starts = np.arange(0, length, stride)
            index = starts[:, None] + np.arange(chunk_size)[None, :]
            words = training_instruction(task, np.random.default_rng([env_seed, 1]))
            parts["images"].append(np.stack(frames))
            parts["states"].append(np.stack(states))
            parts["actions"].append(padded[index])
            parts["action_pad"].append(index >= length)
            parts["owner"].append(np.full(len(starts), len(kept), np.int64))
            parts["step"].append(starts.astype(np.int64))
            kept.append(CorpusEpisode(task, vec, words, env_seed))
    finally:
        sim.close()
    stacked = stack_parts(parts, image_size, chunk_size)
    return Demonstrations(
        **stacked,
        episodes=kept,
        attempted=len(plan),
        seconds=time.perf_counter() - started,  # type: ignore[arg-type]
    )


def cached_corpus(
    episodes_per_task: int,
    seed: int = 0,
    chunk_size: int = 8,
    *,
    tasks: Sequence[str] = CORPUS_TASKS,
    stride: int = 2,
    image_size: int = DEFAULT_IMAGE_SIZE,
    camera: Camera = DEFAULT_CAMERA,
    max_steps: int = CORPUS_MAX_STEPS,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Demonstrations:
    """:func:`collect_corpus`, built once per setting in ``<cache_dir>/metaworld_corpus/<key>/``.

    The key holds every argument, the camera, the metaworld and mujoco versions and :data:`FORMAT_VERSION`.
    """
    payload = {
        "episodes_per_task": episodes_per_task,
        "seed": seed,
        "chunk_size": chunk_size,
        "tasks": list(tasks),
        "stride": stride,
        "image_size": image_size,
        "camera": asdict(camera),
        "max_steps": max_steps,
        "format": FORMAT_VERSION,
        "metaworld": metadata.version("metaworld"),
        "mujoco": metadata.version("mujoco"),
    }
    directory = Path(cache_dir or default_cache_dir()) / "metaworld_corpus" / cache_key(payload)

    def build(staging: Path) -> None:
        corpus = collect_corpus(
            episodes_per_task,
            seed,
            chunk_size,
            tasks=tasks,
            stride=stride,
            image_size=image_size,
            camera=camera,
            max_steps=max_steps,
            progress=progress,
        )
        save_arrays(staging / "arrays.npz", corpus)
        meta = {"payload": payload, "attempted": corpus.attempted, "seconds": corpus.seconds}
        meta["episodes"] = [asdict(e) for e in corpus.episodes]
        (staging / "episodes.json").write_text(json.dumps(meta, indent=1))

    cached_directory(directory, _FILES, build)
    meta = json.loads((directory / "episodes.json").read_text())
    episodes = [CorpusEpisode(**{**e, "rand_vec": tuple(e["rand_vec"])}) for e in meta["episodes"]]
    return load_arrays(directory / "arrays.npz", episodes, meta["attempted"], meta["seconds"])
