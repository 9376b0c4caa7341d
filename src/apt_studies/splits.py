"""Deterministic episode generators for the training distribution and the evaluation splits.

=======================  ==================  ===========================  ===============================
split                    scenes              target                       wording
=======================  ==================  ===========================  ===============================
``train``                training layouts    canonical w.p. 0.9, else     training templates
                                             another layout object
``seen``                 training layouts    canonical                    training templates
``paraphrase``           training layouts    canonical                    unseen frames, verbs, synonyms
``counterfactual``       training layouts    a non-canonical object       training templates
``unseen_composition``   fresh layouts       a held-out (colour, shape)   training templates
``novel_layout``         fresh layouts       a training (colour, shape)   training templates
=======================  ==================  ===========================  ===============================

``unseen_composition`` scenes also contain an object of the target's colour and one of its shape, so neither
word alone identifies the target: the composition must be understood. ``novel_layout`` is a control that
separates "new scene" from "new composition". User-provided instructions (the ``user`` split) are read by
:func:`load_instruction_file` and paired with scenes by :func:`user_episodes` (both from
:mod:`apt_studies.user_file`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from apt_studies.language import (
    matches_training_wording,
    paraphrase_instruction,
    training_content_words,
    training_instruction,
)
from apt_studies.layouts import HELD_OUT_PAIRS, TRAIN_LAYOUTS, training_pairs
from apt_studies.scene import COLOURS, SHAPES, AttributeSpec, Episode, Scene, random_scene, sample_ee_start
from apt_studies.tokenizer import normalise
from apt_studies.user_file import load_instruction_file, user_episodes

__all__ = [
    "DEFAULT_CANONICAL_PROB",
    "EVAL_SPLITS",
    "TRAIN_SPLIT",
    "held_out_violations",
    "load_instruction_file",
    "make_episodes",
    "sample_episode",
    "split_names",
    "split_rng",
    "user_episodes",
    "wording_violations",
]

EVAL_SPLITS: tuple[str, ...] = ("seen", "paraphrase", "counterfactual", "unseen_composition", "novel_layout")
"""Evaluation splits, in reporting order."""
TRAIN_SPLIT = "train"
DEFAULT_CANONICAL_PROB = 0.9
"""Fraction of training episodes of a layout that ask for its canonical target."""


def _layout_episode(
    rng: np.random.Generator, split: str, target_rule: str, wording: str, canonical_prob: float = 1.0
) -> Episode:
    """An episode on a jittered training layout.

    Args:
        rng: Source of randomness.
        split: Name recorded on the episode.
        target_rule: ``"canonical"``, ``"other"`` (a non-canonical object) or ``"habit"`` (canonical with
            probability ``canonical_prob``, else another object).
        wording: ``"train"`` or ``"paraphrase"``.
        canonical_prob: Used by the ``"habit"`` rule.
    """
    layout_index = int(rng.integers(len(TRAIN_LAYOUTS)))
    layout = TRAIN_LAYOUTS[layout_index]
    others = [i for i in range(len(layout.objects)) if i != layout.canonical]
    if target_rule == "habit":
        target_rule = "canonical" if rng.random() < canonical_prob else "other"
    target = layout.canonical if target_rule == "canonical" else others[int(rng.integers(len(others)))]
    scene = layout.place(rng, target)
    describe = training_instruction if wording == "train" else paraphrase_instruction
    return Episode(
        scene=scene,
        instruction=describe(rng, scene.target_object),
        ee_start=sample_ee_start(rng, scene),
        split=split,
        layout=layout_index,
        canonical_target=layout.canonical,
    )


def _fresh_scene(rng: np.random.Generator, target_pair: tuple[str, str], confusers: bool) -> Scene:
    """A random scene of 3-4 objects whose target is ``target_pair`` (:func:`random_scene`).

    With ``confusers``, one distractor shares the target's colour and one shares its shape.
    """
    colour, shape = target_pair
    include: list[AttributeSpec] = [(colour, shape, None)]
    if confusers:
        include.append((colour, str(rng.choice([s for s in SHAPES if s != shape])), None))
        include.append((str(rng.choice([c for c in COLOURS if c != colour])), shape, None))
    return random_scene(rng, int(rng.integers(3, 5)), include)


def _fresh_episode(
    rng: np.random.Generator, split: str, candidate_pairs: tuple[tuple[str, str], ...], confusers: bool
) -> Episode:
    target_pair = candidate_pairs[int(rng.integers(len(candidate_pairs)))]
    scene = _fresh_scene(rng, target_pair, confusers)
    return Episode(
        scene=scene,
        instruction=training_instruction(rng, scene.target_object),
        ee_start=sample_ee_start(rng, scene),
        split=split,
    )


_HELD_OUT = tuple(sorted(HELD_OUT_PAIRS))
_TRAIN_TARGETS = tuple(sorted(training_pairs()))

_GENERATORS: dict[str, Callable[[np.random.Generator, float], Episode]] = {
    "train": lambda rng, p: _layout_episode(rng, "train", "habit", "train", p),
    "seen": lambda rng, p: _layout_episode(rng, "seen", "canonical", "train"),
    "paraphrase": lambda rng, p: _layout_episode(rng, "paraphrase", "canonical", "paraphrase"),
    "counterfactual": lambda rng, p: _layout_episode(rng, "counterfactual", "other", "train"),
    "unseen_composition": lambda rng, p: _fresh_episode(rng, "unseen_composition", _HELD_OUT, confusers=True),
    "novel_layout": lambda rng, p: _fresh_episode(rng, "novel_layout", _TRAIN_TARGETS, confusers=False),
}


def split_names() -> tuple[str, ...]:
    """All generator names: ``"train"`` followed by :data:`EVAL_SPLITS`."""
    return (TRAIN_SPLIT, *EVAL_SPLITS)


def split_rng(split: str, seed: int) -> np.random.Generator:
    """The generator used for ``(split, seed)``: independent streams per split for the same seed."""
    if split not in _GENERATORS:
        raise KeyError(f"unknown split {split!r}; expected one of {split_names()}")
    return np.random.default_rng([seed, split_names().index(split)])


def sample_episode(split: str, rng: np.random.Generator, canonical_prob: float = DEFAULT_CANONICAL_PROB) -> Episode:
    """Draw one episode of ``split`` from ``rng`` (``canonical_prob`` only affects ``"train"``)."""
    if split not in _GENERATORS:
        raise KeyError(f"unknown split {split!r}; expected one of {split_names()}")
    return _GENERATORS[split](rng, canonical_prob)


def make_episodes(split: str, n: int, seed: int = 0, canonical_prob: float = DEFAULT_CANONICAL_PROB) -> list[Episode]:
    """``n`` episodes of ``split``; a pure function of ``(split, n, seed, canonical_prob)``.

    Args:
        split: One of :func:`split_names`.
        n: Number of episodes.
        seed: Seed; each split draws from its own stream, so equal seeds do not couple splits.
        canonical_prob: Fraction of canonical targets in ``"train"`` episodes.
    """
    rng = split_rng(split, seed)
    return [sample_episode(split, rng, canonical_prob) for _ in range(n)]


# --- checks that the splits are what they claim ------------------------------------------------------


def held_out_violations(episodes: list[Episode]) -> list[int]:
    """Indices of episodes whose scene contains a held-out (colour, shape) pair anywhere.

    Empty for any list of ``train`` episodes: held-out compositions are never seen during training.
    """
    return [i for i, e in enumerate(episodes) if any(o.pair in HELD_OUT_PAIRS for o in e.scene.objects)]


def wording_violations(episodes: list[Episode]) -> list[int]:
    """Indices of ``paraphrase`` episodes whose instruction reuses training wording.

    An instruction violates the split when it matches a training template or contains any training content
    word (the training verb or a canonical colour/shape word).
    """
    banned = training_content_words()
    return [
        i
        for i, e in enumerate(episodes)
        if matches_training_wording(e.instruction) or banned.intersection(normalise(e.instruction))
    ]
