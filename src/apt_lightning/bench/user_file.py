"""Evaluate on instructions written by a user.

File format (UTF-8), chosen by extension:

* ``.jsonl``: one JSON value per line, either a string or an object with an ``"instruction"`` string
  (other keys are ignored), e.g. ``{"instruction": "could you grab the crimson ball"}``.
* anything else: plain text, one instruction per line.

In both formats blank lines and lines starting with ``#`` are skipped. Every instruction must name its
object through colour, shape and/or size words (canonical words or any synonym the benchmark knows, see
:mod:`apt_lightning.bench.vocabulary`). For each instruction, :func:`user_episodes` builds fresh scenes in
which it resolves to exactly one object (the target) and no distractor matches it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apt_lightning.bench.language import (
    AttributeQuery,
    InstructionResolutionError,
    parse_referring_expression,
    resolve_instruction,
)
from apt_lightning.bench.scene import COLOURS, SHAPES, SIZES, Attributes, Episode, place_objects, sample_ee_start

USER_SPLIT = "user"


@dataclass(frozen=True)
class UserInstruction:
    """An instruction and where it came from (for error messages)."""

    text: str
    line: int
    query: AttributeQuery


def _parse_line(raw: str, json_lines: bool, where: str) -> str:
    if not json_lines:
        return raw
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise InstructionResolutionError(f"{where}: invalid JSON ({error.msg})") from error
    text = value.get("instruction") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise InstructionResolutionError(f"{where}: expected a string or an object with an 'instruction' string")
    return text


def load_instruction_file(path: str | Path) -> list[UserInstruction]:
    """Read and validate a user instruction file (format in the module docstring).

    Raises:
        InstructionResolutionError: Naming ``path:line`` for malformed JSON, or an instruction without
            attribute words or with contradictory ones.
    """
    path = Path(path)
    json_lines = path.suffix.lower() == ".jsonl"
    result = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{number}"
        text = _parse_line(stripped, json_lines, where).strip()
        try:
            query = parse_referring_expression(text)
        except InstructionResolutionError as error:
            raise InstructionResolutionError(f"{where}: {error}") from error
        if query.is_empty:
            raise InstructionResolutionError(
                f"{where}: cannot resolve {text!r} to an object: it names no colour, shape or size"
            )
        result.append(UserInstruction(text=text, line=number, query=query))
    return result


def _matching_attributes(rng: np.random.Generator, query: AttributeQuery) -> Attributes:
    pick = lambda fixed, options: fixed if fixed is not None else options[int(rng.integers(len(options)))]  # noqa: E731
    return (pick(query.colour, tuple(COLOURS)), pick(query.shape, SHAPES), pick(query.size, SIZES))


def _distractor(rng: np.random.Generator, query: AttributeQuery, taken: list[Attributes]) -> Attributes:
    while True:
        candidate = _matching_attributes(rng, AttributeQuery())
        fits_query = all(
            v is None or v == c for v, c in zip((query.colour, query.shape, query.size), candidate, strict=True)
        )
        if not fits_query and all(candidate[:2] != t[:2] for t in taken):
            return candidate


def user_episodes(
    instructions: Sequence[UserInstruction | str], per_instruction: int = 1, seed: int = 0
) -> list[Episode]:
    """Pair each instruction with ``per_instruction`` fresh scenes in which it names exactly one object.

    Args:
        instructions: Output of :func:`load_instruction_file`, or raw strings.
        per_instruction: Scenes per instruction.
        seed: Makes the scenes deterministic.

    Raises:
        InstructionResolutionError: If a raw string names no attribute.
    """
    rng = np.random.default_rng([seed, 7])
    episodes = []
    for item in instructions:
        text = item.text if isinstance(item, UserInstruction) else item
        query = item.query if isinstance(item, UserInstruction) else parse_referring_expression(text)
        if query.is_empty:
            raise InstructionResolutionError(f"cannot resolve {text!r} to an object: it names no colour, shape or size")
        for _ in range(per_instruction):
            attributes = [_matching_attributes(rng, query)]
            for _ in range(int(rng.integers(2, 4))):
                attributes.append(_distractor(rng, query, attributes))
            order = rng.permutation(len(attributes))
            scene = place_objects(rng, [attributes[i] for i in order], target=int(np.argmin(order)))
            if resolve_instruction(text, scene) != scene.target:  # construction guarantees this; keep it honest
                raise RuntimeError(f"internal error: {text!r} does not resolve to the planted target")
            episodes.append(
                Episode(scene=scene, instruction=text, ee_start=sample_ee_start(rng, scene), split=USER_SPLIT)
            )
    return episodes
