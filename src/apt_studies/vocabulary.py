"""Word lists and sentence frames of the benchmark's language (pure data, no logic).

Three registers are kept deliberately apart:

* **training** wording: two sentence frames, one verb ("pick up") and canonical attribute words. This is the
  narrow language of real robot demonstration data.
* **paraphrase** wording: synonyms and sentence frames that never occur in training data. It shares no verb,
  no attribute word and no frame with the training register (only function words such as "the").
* **diverse** wording: the union of everything plus extra frames and verbs, for vision-language pretraining,
  so a pretrained model *can* know that "crimson" means red even though robot data never says so.

Every string that any generator can emit is assembled from the lists below, which is how the tokenizer's
vocabulary is guaranteed to be closed (see :func:`vocabulary_words`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from apt_studies.scene import COLOURS, SHAPES, SIZES

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("tangerine", "amber"),
}
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "square": ("box", "cube", "block"),
    "circle": ("ball", "disc", "disk"),
    "triangle": ("pyramid", "wedge"),
    "diamond": ("rhombus", "lozenge"),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {"small": ("little", "tiny"), "large": ("big", "huge")}
GENERIC_NOUNS: tuple[str, ...] = ("one", "object", "thing", "item", "shape")
"""Head nouns used when a referring expression leaves the shape out ("the red one")."""

# --- training register -------------------------------------------------------------------------------
TRAIN_TEMPLATES: tuple[str, ...] = ("pick up the {obj}", "pick the {obj} up")
"""Training instruction frames; ``{obj}`` is always ``"<colour> <shape>"`` with canonical words."""

# --- paraphrase register (never seen in training) -------------------------------------------------------
PARAPHRASE_VERBS: tuple[str, ...] = ("grab", "fetch", "reach for", "go to", "move to", "get", "take", "grasp")
PARAPHRASE_FRAMES: tuple[str, ...] = (
    "could you {verb} the {obj}",
    "the {obj}, {verb} it",
    "i need you to {verb} the {obj}",
    "please {verb} the {obj}",
    "{verb} the {obj} for me",
    "i want the {obj}",
)
"""Paraphrase frames; ``{obj}`` is ``"<colour synonym> <shape synonym>"``."""

# --- diverse register (pretraining) ---------------------------------------------------------------------
DIVERSE_VERBS: tuple[str, ...] = (
    *PARAPHRASE_VERBS,
    "pick up",
    "pick",
    "touch",
    "approach",
    "find",
    "select",
    "navigate to",
    "head to",
    "collect",
    "retrieve",
    "point at",
)
DIVERSE_FRAMES: tuple[str, ...] = (
    *PARAPHRASE_FRAMES,
    "{verb} the {obj}",
    "{verb} the {obj} now",
    "can you {verb} the {obj}",
    "your task is to {verb} the {obj}",
    "now {verb} the {obj}",
    "go and {verb} the {obj}",
    "i would like you to {verb} the {obj}",
    "{verb} the {obj} on the table",
    "the robot should {verb} the {obj}",
    "find the {obj} and {verb} it",
)

CAPTION_FRAMES: tuple[str, ...] = (
    "there is {list} on the table",
    "the table has {list}",
    "i can see {list}",
    "this scene contains {list}",
    "on the table there are {count} objects: {list}",
    "{count} objects lie on the table: {list}",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")

QA_FRAMES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is the {ref}", "what color is the {ref}"),
    "shape": ("what shape is the {ref}", "what kind of shape is the {ref}"),
    "size": ("what size is the {ref}", "is the {ref} small or large"),
    "count": ("how many objects are on the table", "how many objects are there"),
    "count_colour": ("how many {colour} objects are there",),
    "exists": ("is there a {colour} {shape} on the table", "is there a {colour} {shape}"),
    "where": ("where is the {ref}", "in which part of the table is the {ref}"),
    "nearest": ("which object is closest to the gripper", "what is the gripper nearest to"),
}
ANSWER_WORDS: tuple[str, ...] = ("yes", "no", "top", "bottom", "left", "right", "middle", "a", "an", "and")


def all_colour_words() -> dict[str, str]:
    """Map every colour word (canonical or synonym) to its canonical colour."""
    words = {c: c for c in COLOURS}
    words.update({syn: c for c, syns in COLOUR_SYNONYMS.items() for syn in syns})
    return words


def all_shape_words() -> dict[str, str]:
    """Map every shape word (canonical or synonym) to its canonical shape."""
    words = {s: s for s in SHAPES}
    words.update({syn: s for s, syns in SHAPE_SYNONYMS.items() for syn in syns})
    return words


def all_size_words() -> dict[str, str]:
    """Map every size word (canonical or synonym) to its canonical size."""
    words = {z: z for z in SIZES}
    words.update({syn: z for z, syns in SIZE_SYNONYMS.items() for syn in syns})
    return words


def template_words(templates: Sequence[str]) -> set[str]:
    """Lower-case words of sentence frames, placeholders and punctuation removed."""
    return {w for t in templates for w in re.findall(r"[a-z0-9]+", re.sub(r"\{\w+\}", " ", t.lower()))}


def vocabulary_words() -> list[str]:
    """Every word any language generator can emit, sorted: the tokenizer's closed vocabulary."""
    words: set[str] = set()
    for lexicon in (all_colour_words(), all_shape_words(), all_size_words()):
        words.update(lexicon)
    words.update(GENERIC_NOUNS, NUMBER_WORDS, ANSWER_WORDS)
    words.update(template_words(DIVERSE_VERBS))
    frames = TRAIN_TEMPLATES + DIVERSE_FRAMES + CAPTION_FRAMES + tuple(f for fs in QA_FRAMES.values() for f in fs)
    words.update(template_words(frames))
    return sorted(words)
