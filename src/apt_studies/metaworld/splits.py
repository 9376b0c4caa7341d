"""Episodes of the Meta-World benchmark: habit-biased training data and the evaluation splits, per group.

==================  =====================================  ========================  ======================
split               task                                   positions                 wording
==================  =====================================  ========================  ======================
``train``           habitual w.p. ``habit`` (0.9), else    training box              training wordings
                    another task of the group
``seen``            the habitual task                      training box              training wordings
``counterfactual``  the group's other tasks (same scene)   training box              training wordings
``paraphrase``      the habitual task                      training box              held-out paraphrases
``novel_position``  the habitual task                      outside the training box  training wordings
==================  =====================================  ========================  ======================

Every episode is a pure function of ``(split, n, seed, groups, habit)``: each split draws from its own stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.groups import GROUPS, get_group
from apt_studies.metaworld.tasks import paraphrase_instruction, training_instruction

__all__ = ["DEFAULT_HABIT", "EVAL_SPLITS", "SPLITS", "MetaWorldEpisode", "make_episodes"]

EVAL_SPLITS: tuple[str, ...] = ("seen", "counterfactual", "paraphrase", "novel_position")
"""Evaluation splits, in reporting order."""
SPLITS: tuple[str, ...] = ("train", *EVAL_SPLITS)
DEFAULT_HABIT = 0.9
"""Fraction of a group's training episodes that ask for its habitual task."""
_STREAM = 25  # issue 25: keeps these streams apart from the tabletop's default_rng([seed, split]) streams


@dataclass(frozen=True)
class MetaWorldEpisode:
    """One episode: which task, from which start, with which words.

    Attributes:
        task: Meta-World task name (what the instruction asks for).
        group: Name of its group (:data:`~apt_studies.metaworld.groups.GROUPS`).
        rand_vec: The shared start (object and goal positions) the env is reset to.
        instruction: The sentence the policy reads.
        split: Split name.
    """

    task: str
    group: str
    rand_vec: tuple[float, ...]
    instruction: str
    split: str

    @property
    def habitual(self) -> str:
        """The group's habitual task."""
        return get_group(self.group).habitual


def _episode(rng: np.random.Generator, split: str, group_name: str, habit: float) -> MetaWorldEpisode:
    group = get_group(group_name)
    others = group.tasks[1:]
    if split == "train":
        task = group.habitual if rng.random() < habit else others[int(rng.integers(len(others)))]
    elif split == "counterfactual":
        task = others[int(rng.integers(len(others)))]
    else:
        task = group.habitual
    vec = group.sample(rng, novel=split == "novel_position")
    words = paraphrase_instruction if split == "paraphrase" else training_instruction
    return MetaWorldEpisode(task, group_name, tuple(float(v) for v in vec), words(task, rng), split)


def make_episodes(
    split: str, n: int, seed: int = 0, *, groups: Sequence[str] | None = None, habit: float = DEFAULT_HABIT
) -> list[MetaWorldEpisode]:
    """``n`` episodes of ``split``, cycling over ``groups`` (all groups by default).

    Args:
        split: One of :data:`SPLITS`.
        n: Number of episodes.
        seed: Seed; each split has its own stream, so equal seeds do not couple splits.
        groups: Group names; episode ``i`` belongs to ``groups[i % len(groups)]``.
        habit: Fraction of habitual tasks in ``train`` (ignored elsewhere).

    Raises:
        MetaWorldConfigError: Unknown split or group, ``habit`` outside [0, 1], negative ``n``.
    """
    if split not in SPLITS:
        raise MetaWorldConfigError(f"unknown split {split!r}; expected one of {SPLITS}.")
    if not 0.0 <= habit <= 1.0:
        raise MetaWorldConfigError(f"`habit` must be in [0, 1], got {habit}.")
    if n < 0:
        raise MetaWorldConfigError(f"`n` must be >= 0, got {n}.")
    names = tuple(groups) if groups is not None else tuple(GROUPS)
    for name in names:
        get_group(name)
    rng = np.random.default_rng([seed, SPLITS.index(split), _STREAM])
    return [_episode(rng, split, names[i % len(names)], habit) for i in range(n)]
