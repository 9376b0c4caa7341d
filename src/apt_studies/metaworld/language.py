"""The study's word tokenizer extended with Meta-World's words, and how much of that language the pretrained VLM knows.

The tabletop's closed vocabulary (:func:`~apt_studies.vocabulary.vocabulary_words`) keeps its ids; every word of the
Meta-World instruction table (:mod:`apt_studies.metaworld.tasks`, training wordings and paraphrases) that it lacks is
appended after it, sorted. So the pretrained VLM's embedding rows keep their meaning and the new words get new rows
(:mod:`apt_studies.metaworld.vlm`).

*Coverage* says how much of the Meta-World language the VLM met before robot training, two ways:

* ``vocabulary``: the word is in the tabletop vocabulary, so its embedding row was seeded from MiniLM and trained by the
  VLM pretraining (rows of words no pretraining text used still move through weight decay only);
* ``pretraining_text``: the word occurs in at least one text of the VLM's pretraining corpus (regenerated here from
  the corpus seed, without rendering).
"""

from __future__ import annotations

import functools

import numpy as np

from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.tasks import wording_words
from apt_studies.tokenizer import WordTokenizer, normalise
from apt_studies.vocabulary import vocabulary_words

__all__ = ["REGISTERS", "metaworld_tokenizer", "new_words", "pretraining_text_words", "vocabulary_coverage"]

REGISTERS: tuple[str, ...] = ("training", "paraphrase", "all")


def new_words() -> tuple[str, ...]:
    """Meta-World words missing from the tabletop vocabulary, sorted: the ids appended after the tabletop's."""
    return tuple(sorted(wording_words("all") - set(vocabulary_words())))


@functools.cache
def metaworld_tokenizer() -> WordTokenizer:
    """The tabletop tokenizer's words (same ids) followed by :func:`new_words`: every Meta-World word has an id."""
    return WordTokenizer([*vocabulary_words(), *new_words()])


@functools.cache
def pretraining_text_words(n_scenes: int | None = None, seed: int | None = None) -> frozenset[str]:
    """Every word of the VLM pretraining corpus's texts (:func:`~apt_studies.vlm_pretraining.training.pretrain_vlm`).

    The texts are regenerated exactly as the pretraining draws them (scene stream ``[seed, 0]``, text stream
    ``[seed, 3]``), without rendering. Defaults: :class:`~apt_studies.vlm_pretraining.VLMPretrainingConfig`'s.
    """
    from apt_studies.vlm_pretraining.corpus import pretraining_text, random_corpus_scene
    from apt_studies.vlm_pretraining.training import VLMPretrainingConfig

    defaults = VLMPretrainingConfig()
    n_scenes = defaults.n_scenes if n_scenes is None else n_scenes
    seed = defaults.seed if seed is None else seed
    scene_rng = np.random.default_rng([seed, 0])
    scenes = [random_corpus_scene(scene_rng)[0] for _ in range(n_scenes)]
    text_rng = np.random.default_rng([seed, 3])
    return frozenset(word for scene in scenes for word in normalise(pretraining_text(text_rng, scene)))


def vocabulary_coverage(n_scenes: int | None = None, seed: int | None = None) -> dict[str, dict[str, float]]:
    """Share of Meta-World words the pretrained VLM knows, per register (``training``, ``paraphrase``, ``all``).

    Returns:
        ``{register: {"words": n, "vocabulary": share in the tabletop vocabulary, "pretraining_text": share seen in
        the VLM's pretraining texts}}``.
    """
    vocabulary = set(vocabulary_words())
    seen = pretraining_text_words(n_scenes, seed)
    out = {}
    for register in REGISTERS:
        words = wording_words(register)
        if not words:
            raise MetaWorldConfigError(f"the instruction table has no words in register {register!r}.")
        out[register] = {
            "words": float(len(words)),
            "vocabulary": len(words & vocabulary) / len(words),
            "pretraining_text": len(words & seen) / len(words),
        }
    return out
