"""The pretraining corpus: fresh random scenes, each rendered once, with a diverse-register text.

Each sample is one scene (:data:`OBJECTS_PER_SCENE` objects with distinct colour/shape pairs, from the
benchmark's one fresh-scene generator), one referred object and a text in the diverse register (every
synonym, verb and frame, or a noun phrase), plus the labels the objectives need: the referred object's
position and attributes, and per image patch the object centred in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apt_studies.data import images_to_tensor
from apt_studies.language import (
    describe_object,
    diverse_instruction,
    paraphrase_instruction,
    training_instruction,
)
from apt_studies.render import render
from apt_studies.scene import COLOURS, SHAPES, SIZES, Scene, random_scene, sample_ee_start
from apt_studies.tokenizer import WordTokenizer, build_prompt

__all__ = [
    "COLOUR_NAMES",
    "DESCRIPTION_PROB",
    "EVAL_REGISTERS",
    "OBJECTS_PER_SCENE",
    "REGISTER_TEXT",
    "Corpus",
    "build_corpus",
    "patch_labels",
    "pretraining_text",
    "render_scenes",
]

EVAL_REGISTERS: tuple[str, ...] = ("templates", "paraphrase", "diverse")
"""Wordings evaluated: VLA training templates, the paraphrase split's wording, the pretraining wording."""
DESCRIPTION_PROB = 0.3
"""Fraction of corpus texts that are noun phrases (``describe_object``) rather than instructions."""
OBJECTS_PER_SCENE = 3

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


@dataclass
class Corpus:
    """Pre-generated samples: images (uint8), text prompts and the referred object's labels."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    input_ids: torch.Tensor  # (N, L) text prompt (no image tokens)
    attention_mask: torch.Tensor  # (N, L)
    language_mask: torch.Tensor  # (N, L) bool
    position: torch.Tensor  # (N, 2) float32 in [0, 1]
    colour: torch.Tensor  # (N,) int64
    shape: torch.Tensor
    size: torch.Tensor
    patch_labels: torch.Tensor  # (N, P, 3) int64 colour/shape/size class of the object centred in each patch
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def random_corpus_scene(rng: np.random.Generator) -> tuple[Scene, tuple[float, float]]:
    """A scene of :data:`OBJECTS_PER_SCENE` objects with distinct (colour, shape), a random target and gripper.

    Distinct colour/shape pairs keep every generated reference unique (``describe_object`` may name colour
    and shape only), exactly as in the benchmark's own scenes.
    """
    scene = random_scene(rng, OBJECTS_PER_SCENE)
    return scene, sample_ee_start(rng, scene)


def pretraining_text(rng: np.random.Generator, scene: Scene) -> str:
    """A diverse-register text naming ``scene.target``: an instruction, or a noun phrase."""
    if rng.random() < DESCRIPTION_PROB:
        return describe_object(scene.target_object, rng)
    return diverse_instruction(rng, scene.target, scene)


REGISTER_TEXT: dict[str, Callable[[np.random.Generator, Scene], str]] = {
    "templates": lambda rng, scene: training_instruction(rng, scene.target_object),
    "paraphrase": lambda rng, scene: paraphrase_instruction(rng, scene.target_object),
    "diverse": lambda rng, scene: diverse_instruction(rng, scene.target, scene),
}


def render_scenes(seed: Sequence[int], n: int, image_size: int) -> tuple[list[Scene], np.ndarray]:
    rng = np.random.default_rng(list(seed))
    scenes, images = [], []
    for _ in range(n):
        scene, ee = random_corpus_scene(rng)
        scenes.append(scene)
        images.append(render(scene, ee, size=image_size))
    return scenes, np.stack(images)


def patch_labels(scenes: list[Scene], grid: int) -> torch.Tensor:
    """``(N, grid * grid, 3)``: colour, shape and size class of the object whose centre lies in each patch.

    Patches are in the vision tower's row-major order; a patch without an object centre gets the extra
    "nothing" class of each attribute (``len(COLOURS)``, ``len(SHAPES)``, ``len(SIZES)``). When two centres
    share a patch, the one nearer the patch centre wins.
    """
    labels = torch.tensor([len(COLOUR_NAMES), len(SHAPES), len(SIZES)]).repeat(len(scenes), grid * grid, 1)
    for n, scene in enumerate(scenes):
        nearest: dict[int, float] = {}
        for obj in scene.objects:
            col, row = min(int(obj.x * grid), grid - 1), min(int(obj.y * grid), grid - 1)
            gap = math.hypot(obj.x * grid - col - 0.5, obj.y * grid - row - 0.5)
            patch = row * grid + col
            if gap < nearest.get(patch, math.inf):
                nearest[patch] = gap
                labels[n, patch] = torch.tensor(
                    [COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size)]
                )
    return labels


def build_corpus(
    scenes: list[Scene], images: np.ndarray, texts: list[str], tokenizer: WordTokenizer, grid: int
) -> Corpus:
    prompt = build_prompt(tokenizer, texts)
    targets = [s.target_object for s in scenes]
    return Corpus(
        images=images_to_tensor(images, torch.uint8),
        input_ids=prompt.input_ids,
        attention_mask=prompt.attention_mask,
        language_mask=prompt.language_mask,
        position=torch.tensor([(o.x, o.y) for o in targets], dtype=torch.float32),
        colour=torch.tensor([COLOUR_NAMES.index(o.colour) for o in targets]),
        shape=torch.tensor([SHAPES.index(o.shape) for o in targets]),
        size=torch.tensor([SIZES.index(o.size) for o in targets]),
        patch_labels=patch_labels(scenes, grid),
        texts=texts,
    )
