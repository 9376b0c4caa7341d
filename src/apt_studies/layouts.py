"""The fixed training layouts and held-out compositions (decided up-front; never tuned on results).

Real VLA fine-tuning data comes from a few fixed task setups, so the scene alone usually tells which task is
being demonstrated (the visual shortcut exposed by LIBERO-PRO). The benchmark reproduces that imbalance:

* :data:`TRAIN_LAYOUTS` are eight fixed object sets with nominal positions (jittered per episode). Each has
  a *canonical* target that ~90% of its training episodes ask for; the other objects are asked for in the
  remaining ~10%, so following language is learnable but rarely necessary.
* :data:`HELD_OUT_PAIRS` are (colour, shape) compositions that never appear in any training scene, neither
  as target nor as distractor. Every colour and every shape still appears in training on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apt_studies.scene import Attributes, Scene, place_objects

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "circle"),
        ("green", "diamond"),
        ("blue", "triangle"),
        ("yellow", "square"),
        ("purple", "circle"),
        ("orange", "triangle"),
    }
)
"""Compositions reserved for the ``unseen_composition`` split: one per colour, each shape at least once."""

LAYOUT_JITTER = 0.05
"""Half-width of the uniform jitter applied to a layout's nominal positions."""


@dataclass(frozen=True)
class TrainingLayout:
    """A fixed object set with nominal positions and the target its episodes habitually ask for.

    Attributes:
        objects: ``(colour, shape, size)`` per object; (colour, shape) pairs are unique in a layout.
        anchors: Nominal ``(x, y)`` per object.
        canonical: Index of the habitual target.
    """

    objects: tuple[Attributes, ...]
    anchors: tuple[tuple[float, float], ...]
    canonical: int

    def place(self, rng: np.random.Generator, target: int) -> Scene:
        """This layout's objects at their anchors jittered by :data:`LAYOUT_JITTER`, asking for ``target``."""
        return place_objects(rng, self.objects, target, anchors=self.anchors, jitter=LAYOUT_JITTER)


TRAIN_LAYOUTS: tuple[TrainingLayout, ...] = (
    TrainingLayout(
        (("red", "square", "large"), ("blue", "circle", "small"), ("yellow", "triangle", "large")),
        ((0.25, 0.3), (0.72, 0.28), (0.5, 0.74)),
        0,
    ),
    TrainingLayout(
        (
            ("green", "circle", "small"),
            ("purple", "square", "large"),
            ("orange", "diamond", "small"),
            ("red", "triangle", "small"),
        ),
        ((0.26, 0.26), (0.74, 0.27), (0.27, 0.74), (0.73, 0.73)),
        0,
    ),
    TrainingLayout(
        (("blue", "diamond", "large"), ("green", "triangle", "small"), ("yellow", "circle", "large")),
        ((0.7, 0.7), (0.24, 0.5), (0.7, 0.26)),
        0,
    ),
    TrainingLayout(
        (
            ("yellow", "triangle", "small"),
            ("orange", "square", "large"),
            ("blue", "circle", "large"),
            ("purple", "diamond", "small"),
        ),
        ((0.5, 0.22), (0.22, 0.52), (0.78, 0.52), (0.5, 0.8)),
        0,
    ),
    TrainingLayout(
        (("purple", "square", "small"), ("red", "diamond", "large"), ("green", "circle", "large")),
        ((0.24, 0.74), (0.3, 0.26), (0.76, 0.5)),
        0,
    ),
    TrainingLayout(
        (
            ("orange", "circle", "large"),
            ("yellow", "diamond", "small"),
            ("green", "square", "small"),
            ("blue", "square", "large"),
        ),
        ((0.74, 0.26), (0.26, 0.26), (0.25, 0.72), (0.72, 0.74)),
        0,
    ),
    TrainingLayout(
        (("red", "triangle", "large"), ("purple", "diamond", "large"), ("orange", "square", "small")),
        ((0.5, 0.26), (0.24, 0.72), (0.76, 0.72)),
        0,
    ),
    TrainingLayout(
        (
            ("green", "square", "large"),
            ("blue", "diamond", "small"),
            ("yellow", "circle", "small"),
            ("red", "square", "large"),
        ),
        ((0.3, 0.5), (0.74, 0.22), (0.76, 0.78), (0.72, 0.5)),
        0,
    ),
)
"""The training task layouts; the canonical target is listed first in each."""


def training_pairs() -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs present in any training scene (and hence possible training targets)."""
    return frozenset((c, s) for layout in TRAIN_LAYOUTS for c, s, _ in layout.objects)


def canonical_pairs() -> frozenset[tuple[str, str]]:
    """(colour, shape) pairs of the layouts' canonical targets."""
    return frozenset(layout.objects[layout.canonical][:2] for layout in TRAIN_LAYOUTS)
