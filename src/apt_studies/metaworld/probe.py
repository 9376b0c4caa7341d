"""Instruction sensitivity on Meta-World: how much a policy's first chunk changes when only the instruction does.

For start scenes of the groups (the first frame is pixel-identical for every task of a group), the policy samples
its first action chunk once per task of the group, each with that task's first training wording, with the same
observation and the same noise. The scripted experts give the reference: their first ``chunk`` actions per task
from the same start. The score is

    mean over scenes and task pairs of |a_i - a_j|  /  the same mean of |expert_i - expert_j|

(L2 over the chunk): 0 for a policy that ignores the instruction, about 1 for one that separates the tasks' first
moves as much as the experts do. First moves are a partial view: push and pick-place both start towards the puck.
"""

from __future__ import annotations

import importlib
import itertools
from typing import Any

import numpy as np
import torch

from apt_studies.data import images_to_tensor
from apt_studies.evaluation import EVAL_SEED
from apt_studies.metaworld.datamodule import prompt_encoder
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import get_group
from apt_studies.metaworld.lockstep import EnvPool
from apt_studies.metaworld.sim import proprioception
from apt_studies.metaworld.splits import make_episodes
from apt_studies.metaworld.tasks import INSTRUCTIONS

__all__ = ["instruction_sensitivity", "probe_chunks"]


def _expert_chunk(pool: EnvPool, group: Any, task: str, vec: np.ndarray, chunk: int) -> np.ndarray:
    experts = importlib.import_module("metaworld.policies").ENV_POLICY_MAP
    env, _ = pool.get(task, 0)
    obs = group.reset(env, vec)
    expert, actions = experts[task](), []
    for _ in range(chunk):
        action = np.clip(expert.get_action(obs), -1.0, 1.0)
        actions.append(action)
        obs, *_ = env.step(action)
    return np.stack(actions)


@torch.no_grad()
def probe_chunks(
    policy: Any, scenes: int, seed: int, pool: EnvPool | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per start scene, ``(policy chunks, expert chunks)``, each ``(tasks of the group, chunk, 4)``.

    Scenes are the ``seen`` split's starts with episode seed ``EVAL_SEED + seed + 1`` (the tabletop's probe seed).
    """
    if scenes < 1:
        raise MetaWorldConfigError(f"`scenes` must be >= 1, got {scenes}.")
    own = pool is None
    pool = pool or EnvPool()
    encode = prompt_encoder()
    chunk = policy.chunk_size
    out = []
    policy.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED + seed + 1)
            for episode in make_episodes("seen", scenes, seed=EVAL_SEED + seed + 1):
                group = get_group(episode.group)
                vec = np.asarray(episode.rand_vec)
                env, renderer = pool.get(group.habitual, 0)
                obs = group.reset(env, vec)
                frame = renderer.render(env.data, group.markers(vec))
                n = len(group.tasks)
                batch = {
                    "pixel_values": images_to_tensor(np.repeat(frame[None], n, 0)),
                    "state": torch.from_numpy(np.repeat(proprioception(obs)[None], n, 0)),
                    **encode([INSTRUCTIONS[t].training[0] for t in group.tasks]),
                }
                noise = torch.randn(1, chunk, policy.noise_dim).expand(n, -1, -1).contiguous()
                actions = policy.sample_actions(batch, noise=noise).float().numpy()
                experts = np.stack([_expert_chunk(pool, group, t, vec, chunk) for t in group.tasks])
                out.append((actions, experts))
    finally:
        if own:
            pool.close()
    return out


def instruction_sensitivity(policy: Any, seed: int, scenes: int = 16, pool: EnvPool | None = None) -> float:
    """The score of the module docstring on ``scenes`` start scenes (cycling over the groups)."""
    policy_gap, expert_gap = [], []
    for actions, experts in probe_chunks(policy, scenes, seed, pool):
        for i, j in itertools.combinations(range(len(actions)), 2):
            policy_gap.append(float(np.linalg.norm(actions[i] - actions[j])))
            expert_gap.append(float(np.linalg.norm(experts[i] - experts[j])))
    return float(np.mean(policy_gap) / max(np.mean(expert_gap), 1e-9))
