"""One-off vision-language pretraining of a tiny PaliGemma on the tabletop, with diverse language.

Real VLAs start from a VLM that has read far more language than robot data contains: it knows that
"crimson" is red and that "grab the ball" and "pick up the circle" ask for the same thing. The benchmark's
VLA training data has two templates and canonical words only, so a randomly initialised tiny VLM would never
learn that. This module gives the tiny VLM that prior, cheaply and reproducibly, before any VLA training:

* **Corpus.** Fresh random scenes (3 objects with distinct colour/shape pairs, any size, random gripper),
  each rendered once, with one object picked at random and a text that refers to it in the *diverse*
  register (:func:`~apt_studies.language.diverse_instruction`: every synonym, verb and frame, any
  uniquely identifying attribute subset; or a :func:`~apt_studies.language.describe_object` phrase).
* **Grounding objectives.** The last hidden states of the language tokens are mean-pooled; linear heads
  predict the referred object's position (MSE) and its colour, shape and size (cross-entropy each). Since the
  text may leave attributes out ("the big one"), the language tokens must look at the image to answer, and
  since synonyms must map to the same answers, they end up with shared meanings.
* **Patch labelling.** Each image token's last hidden state predicts the colour, shape and size of the
  object centred in its patch (or "nothing") and the patch's own location. Without it the referred object's
  position is not learned at all in the default budget (held-out error stays at chance, about 0.30, while
  the training error falls by memorising scenes); with it, image tokens become object- and location-aware,
  which both lets language tokens find the object and is what an action expert reading them needs.
* **Distillation.** A linear map of the same pooled state is pulled (cosine loss) towards the MiniLM sentence
  embedding of the text, a cheap stand-in for web-scale language knowledge about the wording itself.
* **Seeded word embeddings.** Word embeddings start from a PCA of MiniLM embeddings of each word, so that
  synonyms start close (:func:`seed_word_embeddings`).
* **Both attention layouts.** Downstream, APT runs the VLM with the language-blind mask and the baseline
  with the standard bidirectional prefix mask; a ``blind_mask_prob`` fraction of batches uses the former, so
  the language states are meaningful under either.

The heads are discarded: what is kept is the ``PaliGemmaModel``, cached on disk by
:func:`pretrained_vlm` under a key of everything that determines it, so later runs just load it.

Modules: :mod:`.corpus` (scenes, texts, labels), :mod:`.language_prior` (MiniLM), :mod:`.objectives`
(heads and losses), :mod:`.training` (the run and its evaluation); caching is :mod:`apt_studies.disk_cache`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PaliGemmaConfig

from apt_studies.determinism import STUDY_THREADS, fixed_threads
from apt_studies.disk_cache import cache_key, cached_directory, default_cache_dir
from apt_studies.tokenizer import WordTokenizer
from apt_studies.vlm_pretraining.corpus import EVAL_REGISTERS
from apt_studies.vlm_pretraining.language_prior import MiniLMEncoder, minilm_encoder, seed_word_embeddings
from apt_studies.vlm_pretraining.training import VLMPretrainingConfig, pretrain_vlm

__all__ = [
    "EVAL_REGISTERS",
    "FORMAT_VERSION",
    "MiniLMEncoder",
    "VLMPretrainingConfig",
    "default_cache_dir",
    "minilm_encoder",
    "pretrain_vlm",
    "pretrained_vlm",
    "seed_word_embeddings",
]

FORMAT_VERSION = 3
"""Bumped whenever the corpus, objectives or cache layout change, so stale caches are never reused (3: built
with a fixed thread count and deterministic algorithms, :func:`~apt_studies.determinism.fixed_threads`)."""

CACHE_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "pretraining.json")


def _cache_key(vlm_config: PaliGemmaConfig, tokenizer: WordTokenizer, config: VLMPretrainingConfig) -> str:
    return cache_key(
        {
            "vlm_config": vlm_config.to_json_string(),
            "vocabulary": list(tokenizer.vocabulary),
            "config": dataclasses.asdict(config),
            "format_version": FORMAT_VERSION,
            "threads": STUDY_THREADS,
            "versions": _versions(),
        }
    )


def _versions() -> dict[str, str]:
    """Library versions whose kernels or initialisers shape the weights (another version: another VLM)."""
    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def pretrained_vlm(
    vlm_config: PaliGemmaConfig,
    tokenizer: WordTokenizer,
    config: VLMPretrainingConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Directory of the pretrained VLM for these arguments, training it only if it is not cached yet.

    The directory is ``<cache_dir>/vlm-<key>/`` where the key hashes the architecture, the tokenizer's
    vocabulary, the pretraining config, :data:`FORMAT_VERSION`, the thread count it is trained with
    (:data:`~apt_studies.determinism.STUDY_THREADS`, fixed whatever the caller's torch settings) and the
    torch and transformers versions; it holds ``save_pretrained`` output and
    ``pretraining.json`` (config and metrics). It is written atomically (:func:`~apt_studies.disk_cache.
    cached_directory`): an interrupted run never leaves a directory that a later call would accept, and a
    directory missing any file is retrained and replaced.

    Args:
        vlm_config: Architecture of the VLM (see :func:`pretrain_vlm`).
        tokenizer: Word tokenizer whose ids the VLM reads.
        config: Pretraining settings; defaults to :class:`VLMPretrainingConfig`.
        cache_dir: Cache root; :func:`~apt_studies.disk_cache.default_cache_dir` when None.
        progress: Show progress bars while training.

    Returns:
        ``(directory, metrics)``; the directory loads with ``PaliGemmaModel.from_pretrained`` or
        ``AutoModel.from_pretrained`` (e.g. ``GR00TStylePolicy(vlm_pretrained=str(directory))``).
    """
    config = config or VLMPretrainingConfig()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key(vlm_config, tokenizer, config)
    directory = root / f"vlm-{key}"

    def build(staging: Path) -> None:
        with fixed_threads(STUDY_THREADS):  # the weights depend on the thread count: fix it, and key on it
            vlm, metrics = pretrain_vlm(vlm_config, tokenizer, config, progress=progress)
        vlm.save_pretrained(staging)
        record = {
            "format_version": FORMAT_VERSION,
            "threads": STUDY_THREADS,
            "key": key,
            "config": dataclasses.asdict(config),
            "metrics": metrics,
        }
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    cached_directory(directory, CACHE_FILES, build)
    return directory, json.loads((directory / "pretraining.json").read_text())["metrics"]
