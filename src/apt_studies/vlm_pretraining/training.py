"""The pretraining run: configuration, optimisation loop and held-out evaluation (no caching here)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, PaliGemmaConfig, PaliGemmaModel

from apt_studies.tokenizer import WordTokenizer
from apt_studies.vlm_pretraining.corpus import (
    EVAL_REGISTERS,
    REGISTER_TEXT,
    build_corpus,
    pretraining_text,
    render_scenes,
)
from apt_studies.vlm_pretraining.language_prior import minilm_encoder, seed_word_embeddings
from apt_studies.vlm_pretraining.objectives import POSITION_SCALE, Heads, encode, pretraining_losses

__all__ = ["EVAL_SCENES", "VLMPretrainingConfig", "check_vlm_config", "evaluate", "lr_factor", "pretrain_vlm"]

EVAL_SCENES = 512
"""Held-out scenes of the evaluation reported in the metrics."""


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


def lr_factor(step: int, config: VLMPretrainingConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(
    vlm: PaliGemmaModel,
    heads: Heads,
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
    scenes, images = render_scenes((seed, 1), EVAL_SCENES, image_size)
    grid = math.isqrt(num_image_tokens)
    metrics: dict[str, float] = {}
    pooled_by_register: dict[str, torch.Tensor] = {}
    for r, register in enumerate(EVAL_REGISTERS):
        rng = np.random.default_rng([seed, 2, r])
        corpus = build_corpus(scenes, images, [REGISTER_TEXT[register](rng, s) for s in scenes], tokenizer, grid)
        predictions: dict[str, list[torch.Tensor]] = {"position": [], "colour": [], "shape": [], "size": []}
        states = []
        for start in range(0, len(corpus), 256):
            index = torch.arange(start, min(start + 256, len(corpus)))
            pooled, _ = encode(vlm, corpus, index, True, image_token_id, num_image_tokens)
            states.append(pooled)
            predictions["position"].append(heads.position(pooled) / POSITION_SCALE + 0.5)
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


def check_vlm_config(vlm_config: PaliGemmaConfig, tokenizer: WordTokenizer) -> tuple[int, int, int]:
    """``(image_token_id, num_image_tokens, image_size)``; rejects configs that cannot read the tokenizer's ids."""
    problems = tokenizer.vlm_mismatches(vlm_config)
    if problems:
        raise ValueError(
            "The VLM cannot read the tokenizer's ids: " + "; ".join(problems) + ". Build it with "
            "`tiny_paligemma_config(**tokenizer.vlm_vocabulary, ...)`."
        )
    vision = vlm_config.vision_config
    return vlm_config.image_token_id, (vision.image_size // vision.patch_size) ** 2, vision.image_size


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
        vlm_config: Architecture; it must read the tokenizer's ids (``tokenizer.vlm_vocabulary``).
        tokenizer: Word tokenizer of the benchmark (ids must match the ones used downstream).
        config: Pretraining settings; defaults to :class:`VLMPretrainingConfig`.
        progress: Show progress bars.

    Returns:
        ``(vlm, metrics)``: the model in eval mode, and final training losses (mean of the last 50 steps,
        ``train/<loss>``), held-out evaluation (``eval/<register>/<metric>``) and ``wall_s``.
    """
    config = config or VLMPretrainingConfig()
    start = time.perf_counter()
    image_token_id, num_image_tokens, image_size = check_vlm_config(vlm_config, tokenizer)

    scenes, images = render_scenes((config.seed, 0), config.n_scenes, image_size)
    text_rng = np.random.default_rng([config.seed, 3])
    grid = math.isqrt(num_image_tokens)
    corpus = build_corpus(scenes, images, [pretraining_text(text_rng, s) for s in scenes], tokenizer, grid)
    distill_target = None
    if config.distill_weight > 0:
        unique = sorted(set(corpus.texts))
        embedded = minilm_encoder()(unique, progress=progress)
        row = {text: i for i, text in enumerate(unique)}
        distill_target = embedded[torch.tensor([row[t] for t in corpus.texts])]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vlm = AutoModel.from_config(copy.deepcopy(vlm_config))
        heads = Heads(vlm_config.get_text_config().hidden_size)
        if config.seed_embeddings:
            seed_word_embeddings(vlm.get_input_embeddings(), tokenizer)
        parameters = [*vlm.parameters(), *heads.parameters()]
        optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, config))
        generator = torch.Generator().manual_seed(config.seed)
        history: dict[str, list[float]] = {}
        weights = {"distill": config.distill_weight, "patch": config.patch_weight}
        vlm.train()
        bar = tqdm(range(config.steps), desc="VLM pretraining", disable=not progress, leave=False)
        for step in bar:
            index = torch.randint(len(corpus), (config.batch_size,), generator=generator)
            blind = bool(torch.rand((), generator=generator) < config.blind_mask_prob)
            pooled, image = encode(vlm, corpus, index, blind, image_token_id, num_image_tokens)
            losses = pretraining_losses(heads, pooled, image, corpus, index, distill_target, config.patch_weight > 0)
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
        metrics.update(evaluate(vlm, heads, tokenizer, config.seed, image_size, image_token_id, num_image_tokens))
    metrics["n_texts"] = len(set(corpus.texts))
    metrics["wall_s"] = time.perf_counter() - start
    return vlm, metrics
