"""Deterministic word-level tokenizer and the model-facing prompt layout.

The benchmark's language is closed (every generator draws from fixed word lists), so a word-level
vocabulary is exact, tiny and reproducible without downloading anything. The prompt layout fixed here is::

    [<image> x num_image_tokens] [<bos>] instruction words [<eos>] [<pad> ...]

Image placeholders come first so a model can overwrite them with patch embeddings; ``language_mask`` is True
exactly on the instruction words, which is what language-aware losses and fusion blocks need to know.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from apt_studies.vocabulary import vocabulary_words

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<bos>", "<eos>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
"""Special tokens; their ids are their positions here (``<pad>`` is 0)."""

_NON_WORD = re.compile(r"[\W_]+")


def fold(text: str) -> str:
    """Unicode-normalise and lower-case: NFKC compatibility forms, accents removed, case folded.

    ASCII text is only lower-cased, so every benchmark string is unchanged.

    Example::

        >>> fold("Grab the RÉD Cube"), fold("ｒｅｄ"), fold("naïve")
        ('grab the red cube', 'red', 'naive')
    """
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(char for char in decomposed if not unicodedata.combining(char))
    return unicodedata.normalize("NFKC", bare).casefold()


def normalise(text: str) -> list[str]:
    """Fold (:func:`fold`), turn punctuation and symbols into spaces and split into words.

    A letter outside ASCII that has no accent-free form (``"ø"``) stays in its word, so the word maps to
    ``<unk>`` rather than silently losing a letter.

    Example::

        >>> normalise("Pick up the réd, ＢＩＧ ball!")
        ['pick', 'up', 'the', 'red', 'big', 'ball']
    """
    return _NON_WORD.sub(" ", fold(text)).split()


class WordTokenizer:
    """Maps words to ids with a fixed vocabulary; unknown words become ``<unk>``.

    Args:
        words: Vocabulary words (order fixes the ids after the special tokens; duplicates are dropped).
            Defaults to :func:`~apt_studies.vocabulary.vocabulary_words`, which covers every word the
            benchmark's generators emit, so in-benchmark text never maps to ``<unk>``.
    """

    pad_id, bos_id, eos_id, unk_id, image_id = range(len(SPECIAL_TOKENS))

    def __init__(self, words: Iterable[str] | None = None) -> None:
        self._id_to_token: list[str] = list(SPECIAL_TOKENS)
        for word in vocabulary_words() if words is None else words:
            if word not in self._id_to_token:
                self._id_to_token.append(word)
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self._id_to_token)

    @property
    def vlm_vocabulary(self) -> dict[str, int]:
        """``vocab_size`` and ``image_token_id`` for a VLM config that reads this tokenizer's ids.

        As in PaliGemma, the image placeholder is a token of the tokenizer itself, so prompts laid out by
        :func:`build_prompt` with image placeholders are read by the model as images:
        ``tiny_paligemma_config(**tokenizer.vlm_vocabulary, hidden_size=64)``.
        """
        return {"vocab_size": self.vocab_size, "image_token_id": self.image_id}

    def vlm_mismatches(self, vlm_config: Any) -> list[str]:
        """Why a VLM config cannot read this tokenizer's ids (empty when it can): too small a vocabulary, or an
        ``image_token_id`` other than ``<image>``'s, which would read placeholder prompts as text."""
        problems = []
        vocab = vlm_config.get_text_config().vocab_size
        if vocab < self.vocab_size:
            problems.append(f"VLM vocabulary {vocab} < the tokenizer's {self.vocab_size} ids (prompt words + <image>)")
        image_token_id = getattr(vlm_config, "image_token_id", None)
        if image_token_id != self.image_id:
            problems.append(f"VLM image_token_id {image_token_id} != the tokenizer's <image> id {self.image_id}")
        return problems

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """All tokens, indexed by id."""
        return tuple(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        """Id of a token, ``unk_id`` when it is not in the vocabulary."""
        return self._token_to_id.get(token, self.unk_id)

    def tokenize(self, text: str) -> list[int]:
        """Word ids of ``text`` without special tokens."""
        return [self.token_to_id(w) for w in normalise(text)]

    def encode(
        self, text: str, max_len: int | None = None, add_special_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode one text.

        Args:
            text: Raw text (case and punctuation are ignored).
            max_len: Pad (or truncate words, keeping ``<eos>``) to this length; no padding when None.
            add_special_tokens: Wrap the words in ``<bos>`` ... ``<eos>``.

        Returns:
            ``(ids, mask)``: int64 ids ``(L,)`` and int64 attention mask ``(L,)`` (1 on tokens, 0 on pads).
        """
        ids, mask = self.batch_encode([text], max_len=max_len, add_special_tokens=add_special_tokens)
        return ids[0], mask[0]

    def batch_encode(
        self, texts: Sequence[str], max_len: int | None = None, add_special_tokens: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts, right-padded to ``max_len`` or to the longest one.

        Returns:
            ``(ids, mask)`` of shape ``(B, L)``, both int64.
        """
        rows = []
        for text in texts:
            words = self.tokenize(text)
            if add_special_tokens:
                if max_len is not None:
                    words = words[: max(max_len - 2, 0)]
                words = [self.bos_id, *words, self.eos_id]
            rows.append(words[:max_len] if max_len is not None else words)
        length = max_len if max_len is not None else max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Turn ids back into space-separated words (special tokens dropped unless asked for)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        tokens = [self._id_to_token[i] if 0 <= i < self.vocab_size else UNK for i in values]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in SPECIAL_TOKENS]
        return " ".join(tokens)


@dataclass(frozen=True)
class PromptTokens:
    """A batch of model-facing prompts (see the module docstring for the layout).

    Attributes:
        input_ids: ``(B, L)`` int64.
        attention_mask: ``(B, L)`` int64, 1 on image placeholders, ``<bos>``, words and ``<eos>``.
        language_mask: ``(B, L)`` bool, True only on instruction words.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    language_mask: torch.Tensor


def build_prompt(
    tokenizer: WordTokenizer, instructions: Sequence[str], num_image_tokens: int = 0, max_len: int | None = None
) -> PromptTokens:
    """Lay out ``[<image>]*n + [<bos>] + words + [<eos>]`` for a batch of instructions.

    Args:
        tokenizer: Word tokenizer.
        instructions: One instruction per sample.
        num_image_tokens: Image placeholders to put first; 0 means text only (the model inserts images).
        max_len: Total length including image placeholders; longest prompt when None.

    Returns:
        The padded prompt batch.
    """
    text_len = None if max_len is None else max_len - num_image_tokens
    if text_len is not None and text_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for <bos>/<eos> after {num_image_tokens} image tokens")
    ids, mask = tokenizer.batch_encode(instructions, max_len=text_len)
    language = mask.bool() & (ids != tokenizer.bos_id) & (ids != tokenizer.eos_id)
    batch = ids.shape[0]
    image_ids = torch.full((batch, num_image_tokens), tokenizer.image_id, dtype=torch.long)
    return PromptTokens(
        input_ids=torch.cat([image_ids, ids], dim=1),
        attention_mask=torch.cat([torch.ones_like(image_ids), mask], dim=1),
        language_mask=torch.cat([torch.zeros_like(image_ids, dtype=torch.bool), language], dim=1),
    )
