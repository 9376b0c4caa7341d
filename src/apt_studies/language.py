"""Instruction, caption and question generators, and a parser for referring expressions.

Instructions always name the scene's target through a *referring expression* that matches exactly one
object in the scene. Training and paraphrase instructions use colour + shape, which is unique in every
benchmark scene; diverse instructions use any attribute subset that is still unique ("the big one").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apt_studies import vocabulary as V
from apt_studies.scene import COLOURS, SHAPES, Scene, SceneObject
from apt_studies.tokenizer import WordTokenizer, normalise
from apt_studies.vocabulary import vocabulary_words

ATTRIBUTE_ORDER: tuple[str, ...] = ("size", "colour", "shape")
"""Order of adjectives in a referring expression ("small red circle")."""


class InstructionResolutionError(ValueError):
    """An instruction does not name exactly one object of a scene (or names no attribute at all)."""


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _word(rng: np.random.Generator, attribute: str, value: str, register: str) -> str:
    """Realise an attribute value in a register: canonical, paraphrase (synonyms only) or diverse (any)."""
    synonyms = {"colour": V.COLOUR_SYNONYMS, "shape": V.SHAPE_SYNONYMS, "size": V.SIZE_SYNONYMS}[attribute][value]
    if register == "canonical":
        return value
    if register == "paraphrase":
        return _choice(rng, synonyms)
    return _choice(rng, (value, *synonyms))


def _expression(rng: np.random.Generator, obj: SceneObject, attributes: Sequence[str], register: str) -> str:
    """Words naming ``obj`` by ``attributes`` ("small red circle", "big one")."""
    values = {"size": obj.size, "colour": obj.colour, "shape": obj.shape}
    words = [_word(rng, a, values[a], register) for a in ATTRIBUTE_ORDER if a in attributes]
    if "shape" not in attributes:
        words.append(_choice(rng, V.GENERIC_NOUNS))
    return " ".join(words)


def _values(obj: SceneObject) -> dict[str, str]:
    return {"size": obj.size, "colour": obj.colour, "shape": obj.shape}


def unique_attribute_sets(scene: Scene, index: int) -> list[tuple[str, ...]]:
    """All non-empty attribute subsets that single out object ``index`` among the scene's objects."""
    target = _values(scene.objects[index])
    others = [_values(o) for j, o in enumerate(scene.objects) if j != index]
    return [
        subset
        for k in (1, 2, 3)
        for subset in itertools.combinations(ATTRIBUTE_ORDER, k)
        if not any(all(other[a] == target[a] for a in subset) for other in others)
    ]


def _unique_reference(rng: np.random.Generator, scene: Scene, index: int, exclude: str | None = None) -> str | None:
    """A diverse expression naming object ``index`` without using ``exclude``; None if impossible."""
    subsets = [s for s in unique_attribute_sets(scene, index) if exclude not in s]
    if not subsets:
        return None
    return _expression(rng, scene.objects[index], subsets[int(rng.integers(len(subsets)))], "diverse")


def canonical_expression(obj: SceneObject) -> str:
    """The training-register referring expression: ``"<colour> <shape>"``."""
    return f"{obj.colour} {obj.shape}"


def training_instruction(rng: np.random.Generator, obj: SceneObject) -> str:
    """A training-register instruction (one of :data:`~apt_studies.vocabulary.TRAIN_TEMPLATES`)."""
    return _choice(rng, V.TRAIN_TEMPLATES).format(obj=canonical_expression(obj))


def paraphrase_instruction(rng: np.random.Generator, obj: SceneObject) -> str:
    """An instruction in the paraphrase register: unseen frame, unseen verb, synonyms for colour and shape."""
    frame = _choice(rng, V.PARAPHRASE_FRAMES)
    return frame.format(
        verb=_choice(rng, V.PARAPHRASE_VERBS), obj=_expression(rng, obj, ("colour", "shape"), "paraphrase")
    )


def diverse_instruction(rng: np.random.Generator, target: int, scene: Scene) -> str:
    """A pretraining-style instruction: any frame, any verb, any uniquely identifying attribute subset."""
    subsets = unique_attribute_sets(scene, target)
    subset = subsets[int(rng.integers(len(subsets)))]
    obj = _expression(rng, scene.objects[target], subset, "diverse")
    return _choice(rng, V.DIVERSE_FRAMES).format(verb=_choice(rng, V.DIVERSE_VERBS), obj=obj)


def describe_object(obj: SceneObject, rng: np.random.Generator) -> str:
    """A diverse noun phrase naming the object, with article ("a tiny crimson ball")."""
    attributes = ("colour", "shape") if rng.random() < 0.3 else ATTRIBUTE_ORDER
    return f"a {_expression(rng, obj, attributes, 'diverse')}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A diverse caption listing every object of the scene."""
    phrases = [describe_object(o, rng) for o in scene.objects]
    listing = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    frame = _choice(rng, V.CAPTION_FRAMES)
    return frame.format(list=listing, count=V.NUMBER_WORDS[len(scene.objects)])


def _location(obj: SceneObject) -> str:
    vertical = "top" if obj.y < 0.4 else "bottom" if obj.y > 0.6 else ""
    horizontal = "left" if obj.x < 0.4 else "right" if obj.x > 0.6 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "middle"


def question_answer(scene: Scene, rng: np.random.Generator, ee_pos: Sequence[float] | None = None) -> tuple[str, str]:
    """A question about the scene and its short answer (visual question answering for pretraining).

    Args:
        scene: The scene asked about.
        rng: Source of randomness.
        ee_pos: Gripper position; enables "which object is closest to the gripper" questions.

    Returns:
        ``(question, answer)``, both lower-case word sequences.
    """
    kinds = ["colour", "shape", "size", "count", "count_colour", "exists", "where"]
    kind = _choice(rng, kinds + (["nearest"] if ee_pos is not None else []))
    frame = _choice(rng, V.QA_FRAMES[kind])
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if kind in ("colour", "shape", "size"):
        ref = _unique_reference(rng, scene, index, exclude=kind)
        if ref is not None:  # otherwise the asked attribute is needed to identify the object: ask "where"
            return frame.format(ref=ref), _values(obj)[kind]
        kind, frame = "where", _choice(rng, V.QA_FRAMES["where"])
    if kind == "where":
        return frame.format(ref=_unique_reference(rng, scene, index)), _location(obj)
    if kind == "count":
        return frame, V.NUMBER_WORDS[len(scene.objects)]
    if kind == "count_colour":
        colour = _choice(rng, tuple(COLOURS))
        count = sum(o.colour == colour for o in scene.objects)
        return frame.format(colour=_word(rng, "colour", colour, "diverse")), V.NUMBER_WORDS[count]
    if kind == "exists":
        colour, shape = _choice(rng, tuple(COLOURS)), _choice(rng, SHAPES)
        present = any(o.pair == (colour, shape) for o in scene.objects)
        question = frame.format(
            colour=_word(rng, "colour", colour, "diverse"), shape=_word(rng, "shape", shape, "diverse")
        )
        return question, "yes" if present else "no"
    gaps = np.linalg.norm(scene.centres() - np.asarray(ee_pos, dtype=np.float64), axis=1) - scene.radii()
    nearest = scene.objects[int(np.argmin(gaps))]
    return frame, f"the {_expression(rng, nearest, ATTRIBUTE_ORDER, 'canonical')}"


# --- parsing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttributeQuery:
    """Attribute constraints read from a referring expression; ``None`` means unconstrained."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` satisfies every constraint."""
        return all(
            v is None or v == getattr(obj, a)
            for a, v in (("colour", self.colour), ("shape", self.shape), ("size", self.size))
        )

    @property
    def is_empty(self) -> bool:
        """True when the expression constrains nothing (no attribute word found)."""
        return self.colour is None and self.shape is None and self.size is None


def parse_referring_expression(text: str) -> AttributeQuery:
    """Read colour, shape and size constraints from any instruction (all registers and synonyms).

    Raises:
        InstructionResolutionError: If an attribute is given two different values ("the red blue cube").
    """
    lexicons = {"colour": V.all_colour_words(), "shape": V.all_shape_words(), "size": V.all_size_words()}
    found: dict[str, set[str]] = {a: set() for a in lexicons}
    for word in normalise(text):
        for attribute, lexicon in lexicons.items():
            if word in lexicon:
                found[attribute].add(lexicon[word])
    for attribute, values in found.items():
        if len(values) > 1:
            raise InstructionResolutionError(f"{text!r} gives several {attribute}s: {sorted(values)}")
    return AttributeQuery(**{a: next(iter(v)) if v else None for a, v in found.items()})


def resolve_instruction(text: str, scene: Scene) -> int:
    """Index of the single scene object an instruction names.

    Raises:
        InstructionResolutionError: If no attribute word is found, or zero or several objects match.
    """
    query = parse_referring_expression(text)
    if query.is_empty:
        raise InstructionResolutionError(f"{text!r} names no colour, shape or size")
    matches = [i for i, o in enumerate(scene.objects) if query.matches(o)]
    if len(matches) != 1:
        raise InstructionResolutionError(f"{text!r} matches {len(matches)} objects of the scene, expected 1")
    return matches[0]


# --- register bookkeeping ------------------------------------------------------------------------------


def training_content_words() -> frozenset[str]:
    """Words that carry meaning in training instructions: the verb and canonical attribute words."""
    return frozenset(V.template_words(V.TRAIN_TEMPLATES) - {"the"}) | frozenset(COLOURS) | frozenset(SHAPES)


def matches_training_wording(text: str) -> bool:
    """Whether ``text`` is exactly a training-register instruction (any template, any canonical object)."""
    words = " ".join(normalise(text))
    for template in V.TRAIN_TEMPLATES:
        pattern = re.escape(template).replace(re.escape("{obj}"), r"(\w+) (\w+)")
        m = re.fullmatch(pattern, words)
        if m and m.group(1) in COLOURS and m.group(2) in SHAPES:
            return True
    return False


def default_tokenizer() -> WordTokenizer:
    """A tokenizer whose vocabulary is exactly :func:`vocabulary_words` (deterministic ids)."""
    return WordTokenizer(vocabulary_words())
