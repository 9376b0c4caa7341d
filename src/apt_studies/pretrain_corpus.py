"""A broad pretraining corpus for the tabletop: many layouts, none of the task's, targets balanced or habit-biased.

APT's authors run Stage 1 on a large, heterogeneous robot corpus, never on the downstream task's demonstrations,
which they fine-tune in Stage 2 only (``shared/APT-BRIEF.md`` section 10). This module is that corpus for the
benchmark:

* **Layouts.** :func:`corpus_layouts` draws ``n_layouts`` fixed object sets (3 or 4 objects) with the benchmark's
  one fresh-scene generator (:func:`~apt_studies.scene.random_scene`); their positions become anchors
  jittered per episode, exactly like the task's :data:`~apt_studies.layouts.TRAIN_LAYOUTS`. A layout is
  rejected when it holds a held-out (colour, shape) pair (that would leak ``unseen_composition``) or when its
  object set (``(colour, shape, size)`` of every object) equals a training layout's, another corpus layout's or
  any fresh evaluation scene's of the reported and validation episodes of study seeds ``[0, 10)``
  (:func:`evaluation_object_sets`).
* **Targets.** By default every layout's episodes ask for its objects in equal numbers (round robin, shuffled), so
  the corpus carries no habit: vision alone never tells the target. ``habit=h`` sends ``round(h * E)`` of a
  layout's ``E`` episodes to one object (the layout's ``canonical``) and spreads the rest evenly over the others:
  the habit-biased control corpus.
* **Wording.** Instructions come from the training templates only
  (:func:`~apt_studies.language.training_instruction`): no paraphrase or counterfactual wording leaks.

Everything is a pure function of the arguments (``layout_seed`` picks the layouts, ``seed`` the episodes).

Example::

    >>> corpus = make_corpus(n_layouts=4, episodes_per_layout=6, seed=0)
    >>> len(corpus.episodes), len(corpus.layouts)
    (24, 4)
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from apt_lightning.errors import ConfigError
from apt_studies.evaluation import EVAL_SEED, VALIDATION_SEED
from apt_studies.language import training_instruction
from apt_studies.layouts import HELD_OUT_PAIRS, TRAIN_LAYOUTS, TrainingLayout
from apt_studies.scene import COLOURS, SHAPES, SIZES, Attributes, Episode, random_scene, sample_ee_start
from apt_studies.splits import make_episodes

__all__ = [
    "CORPUS_SPLIT",
    "FRESH_SPLITS",
    "PretrainCorpus",
    "corpus_layouts",
    "evaluation_object_sets",
    "make_corpus",
    "object_set",
]

CORPUS_SPLIT = "pretrain"
"""``Episode.split`` of corpus episodes."""
FRESH_SPLITS: tuple[str, ...] = ("unseen_composition", "novel_layout")
"""Evaluation splits whose scenes are fresh layouts (the others use the task's training layouts)."""
GUARDED_SEEDS = 10
"""Study seeds whose reported and validation evaluation scenes no corpus layout may equal."""
GUARDED_EPISODES = 200
"""Evaluation episodes per split guarded (the ``--full`` study's count; a split's first ``n`` episodes are the
same for every larger ``n``)."""
_LAYOUT_STREAM, _EPISODE_STREAM = 100, 101  # split_rng uses [seed, 0..5]; these streams are distinct from it


def object_set(objects: tuple[Attributes, ...] | list[Attributes]) -> frozenset[Attributes]:
    """A layout's identity: the set of its objects' ``(colour, shape, size)``, wherever they lie."""
    return frozenset(tuple(o) for o in objects)  # type: ignore[misc]


@functools.cache
def evaluation_object_sets(
    seeds: int = GUARDED_SEEDS, episodes: int = GUARDED_EPISODES
) -> frozenset[frozenset[Attributes]]:
    """Object sets of every fresh-layout evaluation scene: reported and validation episodes of study seeds
    ``[0, seeds)``, ``episodes`` per split (the layout splits use :data:`TRAIN_LAYOUTS`, excluded separately)."""
    found: set[frozenset[Attributes]] = set()
    for offset in (EVAL_SEED, VALIDATION_SEED):
        for seed in range(seeds):
            for split in FRESH_SPLITS:
                for episode in make_episodes(split, episodes, offset + seed):
                    found.add(object_set([o.attributes for o in episode.scene.objects]))
    return frozenset(found)


MAX_CORPUS_EPISODES = 1_000_000
"""Most episodes :func:`make_corpus` builds (``n_layouts * episodes_per_layout``): a corpus is held in memory, and
its demonstrations are collected by running the expert on every episode."""


@functools.cache
def distinct_corpus_layouts() -> int:
    """How many distinct corpus layouts exist: object sets of 3 or 4 objects with pairwise distinct (colour,
    shape), no held-out pair, each object small or large, minus the training and evaluation sets among them.

    Example::

        >>> distinct_corpus_layouts() > 50_000
        True
    """
    pairs = len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)
    possible = sum(math.comb(pairs, k) * len(SIZES) ** k for k in (3, 4))
    forbidden = {object_set(layout.objects) for layout in TRAIN_LAYOUTS} | evaluation_object_sets()
    reachable = [
        objects
        for objects in forbidden
        if len(objects) in (3, 4)
        and len({o[:2] for o in objects}) == len(objects)
        and not any(o[:2] in HELD_OUT_PAIRS for o in objects)
    ]
    return possible - len(reachable)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def corpus_layouts(n_layouts: int = 64, layout_seed: int = 0) -> tuple[TrainingLayout, ...]:
    """``n_layouts`` distinct layouts of 3-4 objects, none a task or evaluation layout (see the module docstring).

    Each layout's ``canonical`` is the object a habit-biased corpus favours (a uniformly drawn one).

    Raises:
        ConfigError: (a ``ValueError``) If ``n_layouts`` is not an integer >= 1 or exceeds
            :func:`distinct_corpus_layouts` (no such corpus exists: drawing would never end), before any draw.
    """
    _positive_int("n_layouts", n_layouts)
    available = distinct_corpus_layouts()
    if n_layouts > available:
        raise ConfigError(
            f"`n_layouts`={n_layouts:,} exceeds the {available:,} distinct corpus layouts that exist (3-4 objects "
            "of distinct colour and shape, no held-out pair, none a task or evaluation layout). Pass at most "
            f"{available:,}, or more `episodes_per_layout` for a larger corpus."
        )
    forbidden = {object_set(layout.objects) for layout in TRAIN_LAYOUTS} | evaluation_object_sets()
    rng = np.random.default_rng([layout_seed, _LAYOUT_STREAM])
    layouts: list[TrainingLayout] = []
    while len(layouts) < n_layouts:
        scene = random_scene(rng, int(rng.integers(3, 5)), accept=lambda a: a[:2] not in HELD_OUT_PAIRS)
        objects = tuple(o.attributes for o in scene.objects)
        if any(o[:2] in HELD_OUT_PAIRS for o in objects) or object_set(objects) in forbidden:
            continue
        forbidden.add(object_set(objects))
        anchors = tuple((o.x, o.y) for o in scene.objects)
        layouts.append(TrainingLayout(objects, anchors, canonical=scene.target))
    return tuple(layouts)


def _targets(rng: np.random.Generator, n_objects: int, canonical: int, episodes: int, habit: float | None) -> list[int]:
    """Targets of one layout's episodes: balanced round robin, or ``round(habit * episodes)`` to ``canonical``."""
    if habit is None:
        targets = [k % n_objects for k in range(episodes)]
    else:
        n_habit = round(habit * episodes)
        others = [i for i in range(n_objects) if i != canonical]
        targets = [canonical] * n_habit + [others[k % len(others)] for k in range(episodes - n_habit)]
    return [targets[i] for i in rng.permutation(episodes)]


@dataclass(frozen=True)
class PretrainCorpus:
    """Corpus episodes and the layouts they were drawn from.

    Attributes:
        layouts: The corpus layouts (:func:`corpus_layouts`).
        episodes: ``episodes_per_layout`` episodes per layout, layout-major.
        layout_of: Corpus layout index of each episode (``Episode.layout`` stays -1: not a task layout).
        habit: The habit fraction, or ``None`` for the balanced corpus.
    """

    layouts: tuple[TrainingLayout, ...]
    episodes: tuple[Episode, ...]
    layout_of: tuple[int, ...]
    habit: float | None

    def target_counts(self) -> list[Counter[int]]:
        """Per layout, how many episodes ask for each object index."""
        counts: list[Counter[int]] = [Counter() for _ in self.layouts]
        for layout, episode in zip(self.layout_of, self.episodes, strict=True):
            counts[layout][episode.scene.target] += 1
        return counts


def make_corpus(
    n_layouts: int = 64,
    episodes_per_layout: int = 8,
    seed: int = 0,
    habit: float | None = None,
    layout_seed: int = 0,
) -> PretrainCorpus:
    """The pretraining corpus: ``n_layouts * episodes_per_layout`` episodes, a pure function of the arguments.

    Args:
        n_layouts: Layouts (at least 64 for the study's "broad" corpus; any positive number works).
        episodes_per_layout: Episodes per layout (>= the layout's object count, so every object is a target at
            least once in a balanced corpus).
        seed: Episode seed (jitter, targets' order, gripper starts, wording).
        habit: ``None`` for balanced targets; a fraction in ``(0, 1)`` of each layout's episodes that ask for its
            canonical object (the habit-biased control corpus).
        layout_seed: Which layouts (kept fixed across seeds by default: the corpus is one dataset).

    Raises:
        ConfigError: (a ``ValueError``) before any layout is drawn: a habit outside ``(0, 1)`` or one that does
            not give a whole number of episodes (``habit * episodes_per_layout`` would be rounded), fewer than 4
            episodes per layout, more layouts than exist, or more than :data:`MAX_CORPUS_EPISODES` episodes.
    """
    if habit is not None and (isinstance(habit, bool) or not isinstance(habit, (int, float)) or not 0.0 < habit < 1.0):
        raise ConfigError(f"`habit` must be None (balanced) or a fraction in (0, 1), got {habit!r}.")
    if isinstance(episodes_per_layout, bool) or not isinstance(episodes_per_layout, int) or episodes_per_layout < 4:
        raise ConfigError(
            f"`episodes_per_layout` must be an integer >= 4 (every object of a 4-object layout asked for at least "
            f"once), got {episodes_per_layout!r}."
        )
    _positive_int("n_layouts", n_layouts)
    if n_layouts * episodes_per_layout > MAX_CORPUS_EPISODES:
        raise ConfigError(
            f"`n_layouts` x `episodes_per_layout` = {n_layouts:,} x {episodes_per_layout:,} = "
            f"{n_layouts * episodes_per_layout:,} episodes exceeds the {MAX_CORPUS_EPISODES:,} a corpus may hold. "
            "Pass fewer layouts or episodes per layout."
        )
    if habit is not None:
        exact = habit * episodes_per_layout
        if abs(exact - round(exact)) > 1e-9:
            multiples = sorted(
                {k / episodes_per_layout for k in range(1, episodes_per_layout)}, key=lambda h: abs(h - habit)
            )
            raise ConfigError(
                f"`habit`={habit!r} x `episodes_per_layout`={episodes_per_layout} = {exact:.4g} episodes per layout is "
                f"not a whole number and would be rounded to {round(exact)}. Pass a multiple of "
                f"1/{episodes_per_layout} "
                f"(nearest: {multiples[0]:.4g}), or an `episodes_per_layout` that makes it whole."
            )
    layouts = corpus_layouts(n_layouts, layout_seed)
    rng = np.random.default_rng([seed, _EPISODE_STREAM])
    episodes: list[Episode] = []
    owners: list[int] = []
    for index, layout in enumerate(layouts):
        for target in _targets(rng, len(layout.objects), layout.canonical, episodes_per_layout, habit):
            scene = layout.place(rng, target)
            episodes.append(
                Episode(
                    scene=scene,
                    instruction=training_instruction(rng, scene.target_object),
                    ee_start=sample_ee_start(rng, scene),
                    split=CORPUS_SPLIT,
                    canonical_target=layout.canonical if habit is not None else -1,
                )
            )
            owners.append(index)
    return PretrainCorpus(layouts, tuple(episodes), tuple(owners), habit)
