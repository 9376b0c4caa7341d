"""What the cost benchmarks share: model geometry at real proportions, synthetic batches and timed modes.

Geometry follows the released models, with widths divided by ``scale`` (depths, token counts and the
VLM:expert parameter ratio kept):

* pi0: PaliGemma 3B (SigLIP so400m at 224 px = 256 image tokens, Gemma 2B: width 2048, 18 layers) beside a
  Gemma-300M expert (width 1024, 18 layers), action chunk 50, 32-d padded actions (``transformers.PI0Config``).
* GR00T N1.5: Eagle 2.5 (SigLIP at 224 px, Qwen3-1.7B truncated to the 12 layers below ``select_layer``;
  width 2048, 16 query / 8 key-value heads, MLP 6144) and a DiT head of 16 blocks, 32 heads x 48 = width 1536,
  4 VL self-attention layers, chunk 16. The backbone here is a PaliGemma with Qwen3's text geometry (its
  projector gives 256 image tokens; Eagle's pixel shuffle gives 64).

Modes (each one training step of the same batch, median of ``steps`` after warm-up):
``joint`` everything trainable, language visible (ordinary fine-tuning); ``stage1`` APT Stage 1;
``stage1_cached`` Stage 1 served by :class:`~apt_lightning.Stage1FeatureCache` (filled during warm-up);
``expert_only`` Stage 1 on VLM outputs computed once and held (no VLM, no lookup: the physical limit);
``stage2`` APT Stage 2; ``stage2_bypassed`` the same with every fusion site switched off.

Every mode proves it ran as named (:func:`check_mode`), or the measurement fails with
:class:`ModeNotInEffectError` instead of reporting another mode's time: the stage the controller is in, how many
times the fusion blocks ran (every step in ``stage2``, never elsewhere), and for the cached modes how many samples
the cache computed and served (one fill, then every step served). The cache is attached through
:class:`~apt_lightning.Stage1FeatureCache`'s own callback hooks (``setup``/``on_fit_start``), as a Trainer would;
an earlier harness set a private attribute the controller no longer read, and ``stage1_cached`` ran uncached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from apt_lightning import JOINT, APTConfig, StagePlan
from apt_lightning.errors import AptError
from apt_lightning.feature_cache import Stage1FeatureCache
from apt_lightning.models import GR00TStylePolicy, PI0Policy
from apt_lightning.models.base import FlowMatchingPolicy

MODES = ("joint", "stage1", "stage1_cached", "expert_only", "stage2", "stage2_bypassed")
TEXT_TOKENS = 48


def _div(value: int, scale: int, minimum: int = 1) -> int:
    return max(minimum, value // scale)


def siglip(scale: int) -> dict[str, Any]:
    """SigLIP so400m/14 at 224 px, width divided by ``scale``."""
    heads = _div(16, max(1, scale // 4))
    return dict(
        model_type="siglip_vision_model",
        hidden_size=_div(1152, scale, heads) // heads * heads,
        intermediate_size=_div(4304, scale),
        num_hidden_layers=27,
        num_attention_heads=heads,
        image_size=224,
        patch_size=14,
        vision_use_head=False,
    )


def gemma(
    width: int, mlp: int, layers: int, heads: int, kv_heads: int, head_dim: int, scale: int, **extra: Any
) -> dict[str, Any]:
    """A Gemma-style text config: real depth and head counts, widths (model, MLP, head) divided by ``scale``."""
    return dict(
        model_type="gemma",
        hidden_size=_div(width, scale),
        intermediate_size=_div(mlp, scale),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_div(head_dim, scale),
        **extra,
    )


def pi0_config(scale: int = 1, vocab_size: int | None = None):
    """``transformers.PI0Config`` of pi0's geometry, widths divided by ``scale`` (1 = the real model); the
    vocabulary shrinks with the width so the embedding keeps its share of the parameters."""
    from transformers import PI0Config

    vocab_size = vocab_size or 257_152 // scale

    text = gemma(2048, 16384, 18, 8, 1, 256, scale, vocab_size=vocab_size)
    expert = gemma(1024, 4096, 18, 8, 1, 256, scale)
    return PI0Config(
        vlm_config=dict(
            model_type="paligemma",
            text_config=text,
            vision_config=siglip(scale),
            projection_dim=text["hidden_size"],
            image_token_id=vocab_size - 1,
        ),
        dit_config=expert,
        chunk_size=50,
        max_state_dim=32,
        max_action_dim=32,
        num_inference_steps=10,
    )


def groot_vlm_config(scale: int = 1, vocab_size: int | None = None):
    """Backbone of GR00T N1.5's geometry (12 Qwen3-1.7B-shaped layers), widths divided by ``scale``."""
    from transformers import PaliGemmaConfig

    vocab_size = vocab_size or 151_936 // scale

    width = _div(2048, scale)
    return PaliGemmaConfig(
        text_config=gemma(2048, 6144, 12, 16, 8, 128, scale, vocab_size=vocab_size),
        vision_config=siglip(scale),
        projection_dim=width,
        image_token_id=vocab_size - 1,
    )


def build(
    arch: str,
    mode: str,
    scale: int,
    vocab_size: int | None = None,
    ff_mult: int = 4,
    fusion_options: dict[str, Any] | None = None,
) -> FlowMatchingPolicy:
    """A reference policy of ``arch``'s geometry, prepared for ``mode`` (random weights); ``ff_mult`` is the
    fusion blocks' feed-forward expansion, ``fusion_options`` any other :class:`~apt_lightning.FusionConfig`
    fields (they win over ``ff_mult``)."""
    joint = mode == "joint"
    apt_config = APTConfig(vlm_mode="full" if joint else "frozen")
    if arch == "pi0":
        policy: FlowMatchingPolicy = PI0Policy(
            pi0_config(scale, **({"vocab_size": vocab_size} if vocab_size else {})),
            apt_config=apt_config,
            fusion_heads=8,
        )
    else:
        policy = GR00TStylePolicy(
            groot_vlm_config(scale, vocab_size),
            select_layer=-1,
            action_dim=32,
            state_dim=64,
            chunk_size=16,
            head_width=_div(1536, scale),
            head_depth=16,
            head_heads=_div(32, max(1, scale // 4)),
            vl_self_attention_depth=4,
            apt_config=apt_config,
        )
    policy.apt.fusion = dataclasses.replace(policy.apt.fusion, **{"ff_mult": ff_mult, **(fusion_options or {})})
    first = JOINT if joint else 2 if mode.startswith("stage2") else 1
    policy.apt.prepare(StagePlan(first_stage=first))
    return policy


def make_batch(policy: FlowMatchingPolicy, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A batch of the policy's geometry: one 224 px camera, ``TEXT_TOKENS`` prompt tokens (instruction inside)."""
    generator = torch.Generator().manual_seed(0)
    vocab = policy.image_token_id  # the image token is the last id
    ids = torch.randint(3, vocab - 1, (batch_size, TEXT_TOKENS), generator=generator)
    ids[:, 0] = 2
    language = torch.zeros_like(ids, dtype=torch.bool)
    language[:, 1:-1] = True
    state_dim = policy.pi0.config.max_state_dim if isinstance(policy, PI0Policy) else policy.hparams["state_dim"]
    batch = {
        "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator),
        "state": torch.randn(batch_size, state_dim, generator=generator),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "language_mask": language,
        "actions": torch.randn(batch_size, policy.chunk_size, policy.action_dim, generator=generator),
        "sample_id": torch.arange(batch_size),
    }
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


class ModeNotInEffectError(AptError, RuntimeError):
    """A benchmark mode did not run as named (no cache hit, fusion skipped, no compiled graph): its time would
    measure something else."""


class HeldFeatures(Stage1FeatureCache):
    """Stands in for the feature cache with one precomputed value: Stage 1 with no VLM and no lookup. Counts
    what it computed and served, as the real cache does (``misses``/``hits``, in samples)."""

    def __init__(self) -> None:
        super().__init__(max_memory="64GiB")
        self.value: Any = None

    def get_or_compute(self, batch: Any, compute: Callable[[], Any], stage: int, device: torch.device) -> Any:
        rows = batch["state"].shape[0]
        if self.value is None:
            self.value = compute()
            self.misses += rows
        else:
            self.hits += rows
        return self.value


def attach_cache(policy: FlowMatchingPolicy, cache: Stage1FeatureCache) -> None:
    """Attach ``cache`` through its public callback hooks, as a ``Trainer`` fit would (no trainer needed without
    a spill directory), and check that the controller now serves from it."""
    cache.setup(None, policy, "fit")  # type: ignore[arg-type]
    cache.on_fit_start(None, policy)  # type: ignore[arg-type]
    if policy.apt._feature_cache is not cache:
        raise ModeNotInEffectError(
            f"{type(cache).__name__} is not attached to the controller after its setup hook (the controller serves "
            f"{policy.apt._feature_cache!r}): a cached mode would run uncached."
        )


class FusionCalls:
    """Counts the forward calls of every fusion block of ``policy`` while entered."""

    def __init__(self, policy: FlowMatchingPolicy) -> None:
        self.blocks = [site.apt_fusion for site in policy.apt.sites.values()]
        self.calls = 0
        self._handles: list[Any] = []

    def __enter__(self) -> FusionCalls:
        self._handles = [block.register_forward_hook(self._count) for block in self.blocks]
        return self

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


EXPECTED_STAGE = {
    "joint": 0,
    "stage1": 1,
    "stage1_cached": 1,
    "expert_only": 1,
    "stage2": 2,
    "stage2_bypassed": 2,
}


def check_mode(
    policy: FlowMatchingPolicy, mode: str, runs: int, batch_size: int, fusion_calls: int, cache: Any = None
) -> dict[str, int]:
    """Evidence that ``mode`` ran as named over ``runs`` training steps of ``batch_size`` samples.

    Raises:
        ModeNotInEffectError: the controller is in another stage, the fusion blocks ran outside ``stage2`` or
            not at every ``stage2`` step, or a cached mode did not fill once and serve every later step.
    """
    problems = []
    if policy.apt.stage != EXPECTED_STAGE[mode]:
        problems.append(f"the controller is in stage {policy.apt.stage}, not {EXPECTED_STAGE[mode]}")
    sites = len(policy.apt.sites)
    if mode == "stage2" and fusion_calls < runs * sites:
        problems.append(f"the fusion blocks ran {fusion_calls} times, expected >= {runs} steps x {sites} sites")
    if mode != "stage2" and fusion_calls:
        problems.append(f"the fusion blocks ran {fusion_calls} times, expected none")
    evidence = {"fusion_calls": fusion_calls}
    if mode in ("stage1_cached", "expert_only"):
        hits, misses = cache.hits, cache.misses
        evidence.update(cache_hits=hits, cache_misses=misses)
        if misses != batch_size or hits != (runs - 1) * batch_size:
            problems.append(
                f"the cache computed {misses} and served {hits} samples; expected one fill ({batch_size}) and "
                f"{(runs - 1) * batch_size} served"
            )
    if problems:
        raise ModeNotInEffectError(f"Benchmark mode `{mode}` was not in effect: " + "; ".join(problems) + ".")
    return evidence


def train_step(policy: FlowMatchingPolicy, batch: dict, optimizer: torch.optim.Optimizer, autocast) -> Callable:
    generator = torch.Generator(device=batch["state"].device).manual_seed(0)
    b = batch["state"].shape[0]

    def run() -> None:
        noise = torch.randn(
            b, policy.chunk_size, policy.noise_dim, generator=generator, device=batch["state"].device
        ).to(batch["state"].dtype)
        t = policy.sample_time(b).to(batch["state"].device)
        with autocast():
            loss = policy.flow_loss(batch, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


class PeakMemory:
    """Peak memory of a block: the accelerator allocator's peak, or on CPU the process's peak resident set
    (``ru_maxrss``) above the resident set at entry. The CPU figure is only meaningful in a fresh process
    (``measure(..., isolate=True)``), since the peak never resets."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = _rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(step: Callable[[], None], steps: int, device: torch.device, warmup: int = 3) -> float:
    """Median seconds of ``step`` over ``steps`` runs after ``warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_mode(
    arch: str,
    mode: str,
    scale: int,
    batch_size: int,
    steps: int,
    device: torch.device,
    precision: str = "32",
    sampling: bool = True,
    ff_mult: int = 4,
    warmup: int = 3,
) -> dict[str, Any]:
    """Median step time (s) and peak memory (bytes) of one mode, in this process, with the evidence that the mode
    was in effect (:func:`check_mode`: ``<mode>_cache_hits`` ...)."""
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if precision == "bf16-mixed"
        else contextlib.nullcontext
    )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result: dict[str, Any] = {}
    with PeakMemory(device) as memory:
        with torch.device(device):
            policy = build(arch, mode, scale, ff_mult=ff_mult).to(dtype)
        policy.train()
        cache: Stage1FeatureCache | None = None
        if mode == "stage1_cached":
            cache = Stage1FeatureCache(max_memory="64GiB", device="accelerator" if device.type == "cuda" else "cpu")
        elif mode == "expert_only":
            cache = HeldFeatures()
        if cache is not None:
            attach_cache(policy, cache)
        if mode == "stage2_bypassed":
            for site in policy.apt.sites.values():
                site.active = False
        batch = make_batch(policy, batch_size, device, dtype)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        with FusionCalls(policy) as fusion:
            result[f"{mode}_s"] = timed(train_step(policy, batch, optimizer, autocast), steps, device, warmup)
        evidence = check_mode(policy, mode, warmup + steps, batch_size, fusion.calls, cache)
        result.update({f"{mode}_{key}": value for key, value in evidence.items()})
    result[f"{mode}_peak_bytes"] = memory.peak
    if mode == "joint":
        result["vlm_params"] = sum(p.numel() for p in policy.apt.vlm_module.parameters())
        result["expert_params"] = sum(p.numel() for p in policy.parameters()) - result["vlm_params"]
        result["tokens_per_step"] = batch_size * (policy.num_image_tokens + TEXT_TOKENS + policy.chunk_size)
    if sampling and mode in ("stage2", "stage2_bypassed"):
        policy.eval()

        def sample() -> None:
            with autocast():
                policy.sample_actions(batch)

        with FusionCalls(policy) as fusion:
            result[f"sample_{mode}_s"] = timed(sample, steps, device)
        if (mode == "stage2") != (fusion.calls > 0):
            raise ModeNotInEffectError(
                f"Sampling in benchmark mode `{mode}` ran the fusion blocks {fusion.calls} times: expected "
                f"{'some' if mode == 'stage2' else 'none'}."
            )
    return result


def measure(
    arch: str,
    scale: int,
    batch_size: int,
    steps: int,
    device: torch.device,
    precision: str = "32",
    modes: tuple[str, ...] = MODES,
    sampling: bool = True,
    isolate: bool = False,
    ff_mult: int = 4,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """:func:`measure_mode` for every mode of ``arch``; ratios are computed by :func:`ratios`.

    ``precision``: ``"32"``, ``"bf16-true"`` (weights and optimiser states in bf16) or ``"bf16-mixed"``
    (fp32 weights, bf16 autocast). ``isolate`` runs each mode in a fresh process (true CPU peak memory).
    """
    result: dict[str, Any] = {
        "model": arch,
        "precision": precision,
        "batch": batch_size,
        "scale": scale,
        "fusion_ff_mult": ff_mult,
    }
    for mode in modes:
        args = (arch, mode, scale, batch_size, steps, str(device), precision, sampling, ff_mult)
        if isolate:
            child = subprocess.run(
                [sys.executable, __file__, json.dumps(args)], capture_output=True, text=True, check=False
            )
            if child.returncode != 0:
                raise RuntimeError(f"{arch} {mode} failed:\n{child.stderr[-2000:]}")
            part = json.loads(child.stdout.strip().splitlines()[-1])
        else:
            part = measure_mode(arch, mode, scale, batch_size, steps, device, precision, sampling, ff_mult)
        result.update(part)
        log(f"{arch} {mode}: {part[f'{mode}_s'] * 1e3:.1f} ms/step, peak {part[f'{mode}_peak_bytes'] / 2**20:.0f} MiB")
    return result


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's headline ratios from :func:`measure`'s times (only those whose modes ran)."""
    out = dict(result)
    pairs = {
        "stage1_over_joint": ("stage1_s", "joint_s"),
        "stage1_cached_over_joint": ("stage1_cached_s", "joint_s"),
        "stage1_cached_over_expert_only": ("stage1_cached_s", "expert_only_s"),
        "stage2_over_joint": ("stage2_s", "joint_s"),
        "fusion_overhead": ("stage2_s", "stage2_bypassed_s"),
        "sampling_overhead": ("sample_stage2_s", "sample_stage2_bypassed_s"),
    }
    for name, (num, den) in pairs.items():
        if num in result and den in result:
            out[name] = round(result[num] / result[den], 3)
    if "tokens_per_step" in result:
        for mode in MODES:
            if f"{mode}_s" in result:
                out[f"{mode}_tokens_per_s"] = round(result["tokens_per_step"] / result[f"{mode}_s"])
    return out


if __name__ == "__main__":  # one mode in a fresh process: measure(..., isolate=True)
    arch, mode, scale, batch_size, steps, device, precision, sampling, ff_mult = json.loads(sys.argv[1])
    torch.manual_seed(0)
    device = torch.device(device)
    print(json.dumps(measure_mode(arch, mode, scale, batch_size, steps, device, precision, sampling, ff_mult)))
