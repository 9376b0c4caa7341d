"""Instruction-swap probe behind :class:`~apt_studies.metrics.InstructionSensitivity`.

For each episode the probe freezes one observation (the start of the episode) and one noise draw, and pairs
the episode's own instruction with a second instruction naming a *different* object of the same scene.
A policy that reads language must change its chunk between the two; a layout-memorising one cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apt_studies.data import images_to_tensor
from apt_studies.expert import scripted_actions
from apt_studies.language import paraphrase_instruction, training_instruction
from apt_studies.metrics import InstructionSensitivity
from apt_studies.physics import ACTION_DIM
from apt_studies.render import render
from apt_studies.scene import Episode
from apt_studies.tokenizer import PromptTokens, WordTokenizer, build_prompt

PolicyFn = Callable[[dict[str, torch.Tensor]], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class SensitivityProbe:
    """Paired queries: identical observation and noise, two instructions.

    Attributes:
        observation: ``image``, ``state``, ``noise`` ``(N, chunk, 2)`` and ``episode_index`` tensors.
        prompt_a: Prompts with each episode's own instruction.
        prompt_b: Prompts naming another object of the same scene.
        expert_a: ``(N, chunk, 2)`` expert chunks towards the episode's target.
        expert_b: ``(N, chunk, 2)`` expert chunks towards the other object.
        instructions_b: The swapped-in instructions.
    """

    observation: dict[str, torch.Tensor]
    prompt_a: PromptTokens
    prompt_b: PromptTokens
    expert_a: torch.Tensor
    expert_b: torch.Tensor
    instructions_b: tuple[str, ...]

    def __len__(self) -> int:
        return self.expert_a.shape[0]


def sensitivity_probe(
    episodes: Sequence[Episode],
    chunk_size: int,
    seed: int = 0,
    *,
    register: str = "train",
    tokenizer: WordTokenizer | None = None,
    image_size: int = 32,
    num_image_tokens: int = 0,
    max_len: int | None = None,
) -> SensitivityProbe:
    """Build the probe for ``episodes`` (deterministic in ``seed``).

    Args:
        episodes: Episodes whose start observation is probed.
        chunk_size: Length of the action chunks compared.
        seed: Chooses the swapped-in object and the shared noise.
        register: Wording of the swapped-in instruction, ``"train"`` or ``"paraphrase"``.
        tokenizer: Word tokenizer (default vocabulary when None).
        image_size: Observation image size.
        num_image_tokens: ``<image>`` placeholders at the front of each prompt.
        max_len: Prompt length; longest of both prompt sets when None.
    """
    if register not in ("train", "paraphrase"):
        raise ValueError(f"register must be 'train' or 'paraphrase', got {register!r}")
    rng = np.random.default_rng(seed)
    describe = training_instruction if register == "train" else paraphrase_instruction
    instructions_b, expert_a, expert_b, images = [], [], [], []
    for episode in episodes:
        scene = episode.scene
        others = [i for i in range(len(scene.objects)) if i != scene.target]
        other = others[int(rng.integers(len(others)))]
        instructions_b.append(describe(rng, scene.objects[other]))
        expert_a.append(scripted_actions(scene, episode.ee_start, chunk_size))
        expert_b.append(scripted_actions(scene.with_target(other), episode.ee_start, chunk_size))
        images.append(render(scene, episode.ee_start, size=image_size))
    tokenizer = tokenizer or WordTokenizer()
    texts_a = [e.instruction for e in episodes]
    if max_len is None:
        max_len = num_image_tokens + 2 + max(len(tokenizer.tokenize(t)) for t in [*texts_a, *instructions_b])
    generator = torch.Generator().manual_seed(seed)
    observation = {
        "image": images_to_tensor(np.stack(images)),
        "state": torch.tensor(np.array([e.ee_start for e in episodes]), dtype=torch.float32),
        "noise": torch.randn((len(episodes), chunk_size, ACTION_DIM), generator=generator),
        "episode_index": torch.arange(len(episodes)),
    }
    return SensitivityProbe(
        observation=observation,
        prompt_a=build_prompt(tokenizer, texts_a, num_image_tokens, max_len),
        prompt_b=build_prompt(tokenizer, instructions_b, num_image_tokens, max_len),
        expert_a=torch.from_numpy(np.stack(expert_a)),
        expert_b=torch.from_numpy(np.stack(expert_b)),
        instructions_b=tuple(instructions_b),
    )


def _query(
    policy_fn: PolicyFn, observation: dict[str, torch.Tensor], prompt: PromptTokens, rows: slice
) -> torch.Tensor:
    batch = {k: v[rows] for k, v in observation.items()}
    batch.update(
        input_ids=prompt.input_ids[rows],
        attention_mask=prompt.attention_mask[rows],
        language_mask=prompt.language_mask[rows],
    )
    with torch.inference_mode():
        actions = policy_fn(batch)
    return torch.as_tensor(actions).detach().float().cpu()


def measure_instruction_sensitivity(
    policy_fn: PolicyFn, probe: SensitivityProbe, batch_size: int = 256, metric: InstructionSensitivity | None = None
) -> torch.Tensor:
    """Query the policy on both halves of the probe and return the normalised sensitivity.

    The observation batch includes ``noise``; stochastic policies (flow matching, diffusion) should start
    from it so that the two queries differ only in their instruction.
    """
    metric = metric or InstructionSensitivity()
    for start in range(0, len(probe), batch_size):
        rows = slice(start, start + batch_size)
        metric.update(
            _query(policy_fn, probe.observation, probe.prompt_a, rows),
            _query(policy_fn, probe.observation, probe.prompt_b, rows),
            probe.expert_a[rows],
            probe.expert_b[rows],
        )
    return metric.compute()
