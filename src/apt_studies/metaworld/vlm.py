"""The study's pretrained VLM, adapted to Meta-World: the benchmark's frame size and the extended vocabulary.

The tabletop VLM (:func:`~apt_studies.study.prepare_vlm`) reads 32 px frames and the tabletop's words. Meta-World
frames are 96 px and its instructions use words the tabletop never had (:mod:`apt_studies.metaworld.language`).
:func:`metaworld_vlm` writes a copy that reads both, changing nothing it already knew:

* **Position embeddings** of the vision tower are resized (bicubic) from the source grid to the new one (4x4 patches
  of 8 px at 32 px -> 12x12 at 96 px), as ViTs are run at a higher resolution than they were trained at.
* **Word embeddings** of the tabletop's ids are kept. A new word's row is predicted from its MiniLM embedding by a
  ridge regression fitted on the tabletop words (MiniLM embedding -> trained row), so new words land where the
  VLM's geometry puts words of similar meaning (the tabletop's rows started from MiniLM too).

The copy is cached on disk next to the source, under a key of the source directory, the vocabulary, the size and
:data:`FORMAT_VERSION`; it loads with ``AutoModel.from_pretrained`` like the source (``vlm_pretrained=``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from apt_studies.disk_cache import cache_key, cached_directory, default_cache_dir
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.tokenizer import SPECIAL_TOKENS, WordTokenizer

__all__ = ["FORMAT_VERSION", "RIDGE", "adapt_vlm", "metaworld_vlm"]

FORMAT_VERSION = 1
RIDGE = 1e-2
"""Ridge penalty of the MiniLM -> embedding-row regression (on unit-norm MiniLM vectors)."""
_FILES = ("config.json", "model.safetensors", "adaptation.json")


def _resize_positions(weight: torch.Tensor, grid: int) -> torch.Tensor:
    old = math.isqrt(weight.shape[0])
    if old * old != weight.shape[0]:
        raise MetaWorldConfigError(f"position embeddings of {weight.shape[0]} rows are not a square grid.")
    square = weight.T.reshape(1, weight.shape[1], old, old)
    resized = F.interpolate(square.double(), size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.reshape(weight.shape[1], grid * grid).T.to(weight.dtype).contiguous()


def _new_rows(old: torch.Tensor, old_words: list[str], old_ids: list[int], words: list[str]) -> torch.Tensor:
    """Rows for ``words``: ridge regression from MiniLM embeddings to ``old``'s rows of ``old_words``."""
    from apt_studies.vlm_pretraining.language_prior import minilm_encoder

    encoder = minilm_encoder()
    x = encoder(old_words).double()
    y = old[old_ids].double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    eye = torch.eye(x1.shape[1], dtype=x.dtype)
    eye[-1, -1] = 0  # no penalty on the bias
    coef = torch.linalg.solve(x1.T @ x1 + RIDGE * len(x) * eye, x1.T @ y)
    z = encoder(words).double()
    return (torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1) @ coef).to(old.dtype)


def adapt_vlm(source: Any, source_words: tuple[str, ...], tokenizer: WordTokenizer, image_size: int) -> Any:
    """A copy of the PaliGemma ``source`` (reading ids of ``source_words``) for ``tokenizer``'s ids and ``image_size``.

    Raises:
        MetaWorldConfigError: ``tokenizer`` does not start with ``source_words`` (ids would change meaning), or
            ``image_size`` is not a multiple of the patch size.
    """
    from transformers import AutoModel

    vocabulary = tokenizer.vocabulary
    if tuple(vocabulary[: len(source_words)]) != tuple(source_words):
        raise MetaWorldConfigError(
            "the tokenizer must keep the source VLM's ids: its first "
            f"{len(source_words)} tokens must be the source vocabulary (use metaworld_tokenizer())."
        )
    config = copy.deepcopy(source.config)
    patch = config.vision_config.patch_size
    if image_size % patch:
        raise MetaWorldConfigError(f"`image_size`={image_size} is not a multiple of the patch size {patch}.")
    old_vocab = config.text_config.vocab_size
    config.text_config.vocab_size = max(tokenizer.vocab_size, old_vocab)
    config.vision_config.image_size = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        target = AutoModel.from_config(config)
    state = source.state_dict()
    new_state = target.state_dict()
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    pos_key = next(k for k in state if k.endswith("position_embedding.weight"))
    state[pos_key] = _resize_positions(state[pos_key], image_size // patch)
    rows = new_state[embed_key].clone()
    rows[:old_vocab] = state[embed_key]
    added = list(range(len(source_words), tokenizer.vocab_size))
    if added:
        old_ids = [i for i, w in enumerate(source_words) if w not in SPECIAL_TOKENS]
        rows[added] = _new_rows(
            state[embed_key], [source_words[i] for i in old_ids], old_ids, [vocabulary[i] for i in added]
        )
    state[embed_key] = rows
    parameters = {name for name, _ in target.named_parameters()}
    for key, value in new_state.items():  # buffers sized by the config (position ids) come from the new model
        if key not in parameters and (key not in state or state[key].shape != value.shape):
            state[key] = value
    target.load_state_dict(state, strict=True)
    return target.eval()


def metaworld_vlm(
    source_dir: str | Path,
    source_words: tuple[str, ...],
    tokenizer: WordTokenizer,
    image_size: int,
    cache_dir: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Directory of :func:`adapt_vlm` of the VLM saved in ``source_dir``, built once (see the module docstring)."""
    from transformers import AutoModel

    payload = {
        "source": Path(source_dir).name,
        "vocabulary": list(tokenizer.vocabulary),
        "image_size": image_size,
        "ridge": RIDGE,
        "format_version": FORMAT_VERSION,
    }
    key = cache_key(payload)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory = root / f"vlm-metaworld-{key}"

    def build(staging: Path) -> None:
        adapted = adapt_vlm(AutoModel.from_pretrained(source_dir), source_words, tokenizer, image_size)
        adapted.save_pretrained(staging)
        added = tokenizer.vocab_size - len(source_words)
        record = {**payload, "vocabulary": tokenizer.vocab_size, "added_words": added}
        (staging / "adaptation.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")

    cached_directory(directory, _FILES, build)
    return directory, json.loads((directory / "adaptation.json").read_text())
