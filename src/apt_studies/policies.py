"""Reference policies for :func:`~apt_studies.rollout.rollout`: upper bound and shortcut baseline.

Both are privileged (they look the episode up by ``episode_index`` instead of reading pixels or words):
they calibrate the benchmark rather than solve it. The expert should score ~100% everywhere; the shortcut,
which goes wherever the layout habitually sends it, should score ~100% on ``seen`` and ~0% on
``counterfactual``, proving that the splits separate language-following from layout memorisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from apt_studies.expert import scripted_actions
from apt_studies.scene import Episode, Scene

PolicyFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _scripted_policy(scenes: Sequence[Scene], chunk_size: int) -> PolicyFn:
    def policy(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        index = batch["episode_index"].cpu().numpy()
        states = batch["state"].cpu().numpy().astype(np.float64)
        chunks = [scripted_actions(scenes[i], states[b], chunk_size) for b, i in enumerate(index)]
        return torch.from_numpy(np.stack(chunks))

    return policy


def expert_policy(episodes: Sequence[Episode], chunk_size: int) -> PolicyFn:
    """The scripted expert, heading for each episode's instructed target."""
    return _scripted_policy([e.scene for e in episodes], chunk_size)


def shortcut_policy(episodes: Sequence[Episode], chunk_size: int) -> PolicyFn:
    """Ignores the instruction: heads for the layout's canonical target (object 0 on fresh layouts)."""
    scenes = [e.scene.with_target(max(e.canonical_target, 0)) for e in episodes]
    return _scripted_policy(scenes, chunk_size)
