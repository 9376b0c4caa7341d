"""Evaluate on instructions written by a user.

File format (UTF-8, a byte-order mark is allowed), chosen by extension:

* ``.jsonl``: one JSON value per line, either a string or an object with an ``"instruction"`` string
  (other keys are ignored), e.g. ``{"instruction": "could you grab the crimson ball"}``.
* anything else: plain text, one instruction per line (a line that looks like JSON is read as text, with a
  warning).

In both formats blank lines and lines starting with ``#`` are skipped, and an instruction holds at most
:data:`MAX_LINE_CHARS` characters. Text is Unicode-normalised as the tokenizer does (NFKC, accents folded,
see :func:`~apt_studies.tokenizer.fold`), so ``"réd"`` and full-width ``"ｒｅｄ"`` read as ``"red"``.
Every instruction must name its object through colour, shape and/or size words (canonical words or any
synonym the benchmark knows, see :mod:`apt_studies.vocabulary`); a word the vocabulary does not hold
reaches the policy as ``<unk>`` and is reported with :class:`UnknownWordWarning`. For each instruction,
:func:`user_episodes` builds fresh scenes in which it resolves to exactly one object (the target) and no
distractor matches it.
"""

from __future__ import annotations

import codecs
import difflib
import json
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from apt_studies.language import (
    AttributeQuery,
    InstructionResolutionError,
    parse_referring_expression,
    resolve_instruction,
)
from apt_studies.layouts import TRAIN_LAYOUTS
from apt_studies.scene import Attributes, Episode, random_scene, sample_ee_start
from apt_studies.tokenizer import fold, normalise
from apt_studies.vocabulary import vocabulary_words

USER_SPLIT = "user"
MAX_LINE_CHARS = 1000
"""Longest instruction accepted: the prompt, and the policy's attention over it, grow with every word."""

_UTF16_32_BOMS = {
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}  # UTF-32 first: its little-endian mark starts with UTF-16's


class InstructionFileError(ValueError):
    """An instruction file cannot be read: missing, a directory, not UTF-8 text, empty or a line too long."""


class UnknownWordWarning(UserWarning):
    """An instruction holds words that map to no token of the benchmark vocabulary (the policy sees ``<unk>``)."""


class InstructionFormatWarning(UserWarning):
    """A file is read in a format its content does not look like (JSON lines in a plain-text file)."""


class InstructionLayoutWarning(UserWarning):
    """An instruction names exactly one object in no training layout, so ``layouts="train"`` skips it."""


@dataclass(frozen=True)
class UserInstruction:
    """An instruction and where it came from (for error messages).

    Attributes:
        text: The instruction as written (normalised only when tokenized).
        line: 1-based line number in the file.
        query: The attributes it constrains.
        unknown_words: Its words (after normalisation) that map to ``<unk>``.
    """

    text: str
    line: int
    query: AttributeQuery
    unknown_words: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def _known_words() -> frozenset[str]:
    return frozenset(vocabulary_words())


def unknown_words(text: str) -> list[str]:
    """Words of ``text`` that no token of the benchmark vocabulary covers, in order, without repeats.

    Non-ASCII symbols (emoji, ``"■"``) count as words too: the tokenizer drops them.

    Example::

        >>> unknown_words("grab the réd cube"), unknown_words("grab the rød 🟥 cube")
        ([], ['rød', '🟥'])
    """
    words = [w for w in normalise(text) if w not in _known_words()]
    words += [c for c in fold(text) if not c.isascii() and unicodedata.category(c).startswith("S")]
    return list(dict.fromkeys(words))


def _describe(query: AttributeQuery) -> str:
    return f"colour={query.colour or 'any'}, shape={query.shape or 'any'}, size={query.size or 'any'}"


def _warn_unknown(where: str, text: str, words: list[str], query: AttributeQuery) -> None:
    hints = []
    for word in words:
        close = difflib.get_close_matches(word, sorted(_known_words()), n=2)
        hints.append(f"{word!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(word))
    warnings.warn(
        f"{where}: {', '.join(hints)} map{'s' if len(words) == 1 else ''} to no token of the benchmark vocabulary: "
        f"the policy sees <unk> there, and {text!r} is evaluated as {_describe(query)}. Use words the benchmark "
        "knows (see apt_studies.vocabulary) or fix the spelling.",
        UnknownWordWarning,
        stacklevel=3,
    )


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (BOM allowed), or an error that names the file and the fix."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".txt", ".jsonl"))
        raise InstructionFileError(
            f"instruction file {path} is a directory, not a file; pass one file"
            + (f" inside it, e.g. {path / inside[0]} (candidates: {inside[:5]})." if inside else ".")
        )
    if not path.exists():
        raise InstructionFileError(f"instruction file {path} does not exist; check the path.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InstructionFileError(f"cannot read instruction file {path}: {error.strerror or error}.") from error
    for bom, encoding in _UTF16_32_BOMS.items():
        if data.startswith(bom):
            raise InstructionFileError(
                f"{path} is {encoding} text (it starts with a {encoding} byte-order mark); instruction files are "
                f"UTF-8. Save it as UTF-8, e.g. `iconv -f {encoding} -t UTF-8 {path.name} > fixed{path.suffix}`."
            )
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise InstructionFileError(
            f"{path}:{line}: contains NUL bytes, so it is a binary file or UTF-16/UTF-32 text without a "
            "byte-order mark; instruction files are UTF-8 text. Pass a text file or save this one as UTF-8."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InstructionFileError(
            f"{path}:{line}: byte 0x{data[error.start]:02x} is not valid UTF-8 ({error.reason}); instruction files "
            "are UTF-8 text. Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t UTF-8`)."
        ) from None


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


def _looks_like_json(line: str) -> bool:
    if not line.startswith(("{", '"')):
        return False
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(value, str) or (isinstance(value, dict) and "instruction" in value)


def load_instruction_file(path: str | Path) -> list[UserInstruction]:
    """Read and validate a user instruction file (format in the module docstring).

    Warns:
        UnknownWordWarning: Once per line whose words map to no vocabulary token (``path:line``, the words,
            close known words and how the instruction is then read).
        InstructionFormatWarning: If a non-``.jsonl`` file holds JSON lines (they are read as plain text).

    Raises:
        InstructionFileError: If ``path`` is missing, a directory, not UTF-8 text (binary, UTF-16), holds an
            instruction longer than :data:`MAX_LINE_CHARS`, or holds no instruction.
        InstructionResolutionError: Naming ``path:line`` for malformed JSON, or an instruction without
            attribute words or with contradictory ones.
    """
    path = Path(path)
    json_lines = path.suffix.lower() == ".jsonl"
    result, json_in_text = [], []
    for number, raw in enumerate(_read_text(path).splitlines(), start=1):
        where = f"{path}:{number}"
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not json_lines and len(stripped) <= MAX_LINE_CHARS and _looks_like_json(stripped):
            json_in_text.append(number)
        text = _parse_line(stripped, json_lines, where).strip()
        if len(text) > MAX_LINE_CHARS:
            raise InstructionFileError(
                f"{where}: instruction is {len(text):,} characters long; instructions are capped at "
                f"{MAX_LINE_CHARS:,} characters (the prompt grows with every word). Shorten it or split it into "
                "several lines."
            )
        try:
            query = parse_referring_expression(text)
        except InstructionResolutionError as error:
            raise InstructionResolutionError(f"{where}: {error}") from error
        if query.is_empty:
            raise InstructionResolutionError(
                f"{where}: cannot resolve {text!r} to an object: it names no colour, shape or size"
            )
        unknown = unknown_words(text)
        if unknown:
            _warn_unknown(where, text, unknown, query)
        result.append(UserInstruction(text=text, line=number, query=query, unknown_words=tuple(unknown)))
    if json_in_text:
        lines = ", ".join(map(str, json_in_text[:5])) + (", ..." if len(json_in_text) > 5 else "")
        warnings.warn(
            f"{path}:{json_in_text[0]}: {len(json_in_text)} line(s) ({lines}) look like JSON, but a "
            f"'{path.suffix or 'extension-less'}' file is read as plain text, braces and keys included. Rename "
            "it to .jsonl to read the 'instruction' field.",
            InstructionFormatWarning,
            stacklevel=2,
        )
    if not result:
        raise InstructionFileError(
            f"{path} holds no instruction (blank lines and # comments are skipped); write one instruction per line."
        )
    return result


def _names(query: AttributeQuery, attributes: Attributes) -> bool:
    """Whether ``query`` names an object of these ``(colour, shape, size)``."""
    wanted = (query.colour, query.shape, query.size)
    return all(v is None or v == a for v, a in zip(wanted, attributes, strict=True))


LAYOUTS = ("train", "novel")


def fitting_layouts(query: AttributeQuery) -> list[int]:
    """Indices of the training layouts in which ``query`` names exactly one object."""
    fits = []
    for index, layout in enumerate(TRAIN_LAYOUTS):
        if sum(_names(query, o) for o in layout.objects) == 1:
            fits.append(index)
    return fits


def user_episodes(
    instructions: Sequence[UserInstruction | str], per_instruction: int = 1, seed: int = 0, layouts: str = "train"
) -> list[Episode]:
    """Pair each instruction with ``per_instruction`` scenes in which it names exactly one object.

    Args:
        instructions: Output of :func:`load_instruction_file`, or raw strings.
        per_instruction: Scenes per instruction.
        seed: Makes the scenes deterministic.
        layouts: ``"train"`` (default): the training layouts (jittered, as in training) in which the instruction
            names exactly one present object, so a new wording is measured on familiar scenes and the result says
            something about language, not about layouts no policy has seen (novel-layout success is low for
            every trained policy). Instructions that fit no training layout are reported with an
            :class:`InstructionLayoutWarning` and skipped. ``"novel"``: fresh random scenes built around the
            instruction.

    Raises:
        InstructionResolutionError: If a raw string names no attribute.
        InstructionFileError: If ``layouts="train"`` and no instruction fits any training layout.
    """
    if layouts not in LAYOUTS:
        raise ValueError(f"`layouts` must be one of {LAYOUTS}, got {layouts!r}.")
    rng = np.random.default_rng([seed, 7])
    episodes, unfit = [], []
    for item in instructions:
        text = item.text if isinstance(item, UserInstruction) else item
        query = item.query if isinstance(item, UserInstruction) else parse_referring_expression(text)
        if query.is_empty:
            raise InstructionResolutionError(f"cannot resolve {text!r} to an object: it names no colour, shape or size")
        if layouts == "novel":
            episodes += [_novel_episode(rng, text, query) for _ in range(per_instruction)]
            continue
        fits = fitting_layouts(query)
        if not fits:
            unfit.append(f"line {item.line}: {text!r}" if isinstance(item, UserInstruction) else repr(text))
            continue
        episodes += [_layout_episode(rng, text, query, fits) for _ in range(per_instruction)]
    if unfit:
        warnings.warn(
            f"{len(unfit)} instruction(s) name exactly one object in no training layout and are skipped: "
            f"{unfit[:5]}{' ...' if len(unfit) > 5 else ''}. Evaluate them on fresh scenes with `--layouts novel`.",
            InstructionLayoutWarning,
            stacklevel=2,
        )
    if not episodes:
        raise InstructionFileError(
            "No instruction names exactly one object of any training layout; use `--layouts novel` (fresh scenes "
            "built around each instruction) to evaluate them."
        )
    return episodes


def _layout_episode(rng: np.random.Generator, text: str, query: AttributeQuery, fits: list[int]) -> Episode:
    """A jittered training layout in which ``text`` names exactly one object (its target)."""
    index = fits[int(rng.integers(len(fits)))]
    layout = TRAIN_LAYOUTS[index]
    target = next(i for i, o in enumerate(layout.objects) if _names(query, o))
    scene = layout.place(rng, target)
    return _checked(
        Episode(
            scene=scene,
            instruction=text,
            ee_start=sample_ee_start(rng, scene),
            split=USER_SPLIT,
            layout=index,
            canonical_target=layout.canonical,
        )
    )


def _novel_episode(rng: np.random.Generator, text: str, query: AttributeQuery) -> Episode:
    """A fresh scene of 3-4 objects in which ``text`` names exactly one object (its target)."""
    named = (query.colour, query.shape, query.size)
    scene = random_scene(rng, 1 + int(rng.integers(2, 4)), [named], accept=lambda a: not _names(query, a))
    return _checked(Episode(scene=scene, instruction=text, ee_start=sample_ee_start(rng, scene), split=USER_SPLIT))


def _checked(episode: Episode) -> Episode:
    if resolve_instruction(episode.instruction, episode.scene) != episode.scene.target:  # construction guarantees it
        raise RuntimeError(f"internal error: {episode.instruction!r} does not resolve to the planted target")
    return episode
