"""Stage-1 feature cache: run the frozen VLM once per sample, not once per epoch.

In Stage 1 the VLM is frozen and the instruction is hidden, so what the expert reads from it (pi0's per-layer
keys/values of the non-language prefix, a GR00T head's selected-layer features) depends on the observation
alone. :class:`Stage1FeatureCache` stores those outputs per sample on first use and serves them on every later
visit, so a cached Stage-1 step costs the expert's forward and backward plus a lookup. A model opts in by
wrapping its VLM pass in :meth:`~apt_lightning.APT.cached_vlm`.

Safety rules, each enforced rather than documented:

* used only in Stage-1 *training*; bypassed (and emptied) from the switch on, in validation and sampling;
  refused at fit start for a plan without Stage 1 (joint baseline, Stage 2 only);
* every hit re-checks a fingerprint of the sample's inputs (``check_keys``, e.g. the pixels): a sample whose
  image changed between visits (random augmentation, a changed transform) raises instead of training on a
  stale draw;
* a fingerprint of the VLM's weights is taken at fit start and re-checked every epoch: changed weights empty
  the cache;
* bounded: ``max_memory`` bytes in RAM (or on the accelerator), the rest spilled to ``spill_dir`` as one
  safetensors file per sample; without ``spill_dir`` an overflow is refused at fit start when the dataset's
  size is known (else at the first sample that does not fit), with the bytes per sample in the message;
* per process: under DDP each rank caches the samples its sampler gives it (and spills under ``rank<N>/``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from apt_lightning.controller import APT
from apt_lightning.errors import FeatureCacheError
from apt_lightning.sharding import local_shard

T = TypeVar("T")

_FINGERPRINT_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def visible_first(visible: torch.Tensor) -> torch.Tensor:
    """(B, L) gather order that moves each row's visible tokens to the front, keeping their order.

    Storing a prefix in this order makes it independent of where the instruction sat (and how long it was),
    and the expert's positions (counted over visible keys) are unchanged. No host synchronisation.
    """
    return torch.argsort((~visible).to(torch.int8), dim=1, stable=True)


def gather_tokens(x: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its token dimension ``dim`` permuted per row by ``order`` (B, L); batch is dim 0."""
    shape = [1] * x.ndim
    shape[0], shape[dim] = order.shape[0], order.shape[1]
    index = order.view(shape).expand(*[x.shape[i] if i != dim else order.shape[1] for i in range(x.ndim)])
    return torch.gather(x, dim, index)


def input_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) int64 per-sample fingerprint of ``x``'s bits: their sum and a position-weighted sum (so a flip
    or crop that keeps the pixel histogram still changes it).

    Integer arithmetic on the raw bits is exact and order-free, so a sample gets the same fingerprint in any
    row of any batch (float sums would differ in the last bit with the row's position).
    """
    flat = x.detach().flatten(1).contiguous()
    if flat.is_floating_point():
        flat = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    flat = flat.long()
    key = (flat.shape[1], str(flat.device))
    weights = _FINGERPRINT_WEIGHTS.get(key)
    if weights is None:
        weights = torch.arange(flat.shape[1], device=flat.device) % 251 + 1
        _FINGERPRINT_WEIGHTS[key] = weights
    return torch.stack([flat.sum(1), (flat * weights).sum(1)], 1)


def weights_fingerprint(module: torch.nn.Module) -> tuple[float, ...]:
    """Per-parameter sums of ``module`` (one host sync): changes when any weight does."""
    with torch.no_grad():  # this rank's shard of sharded (FSDP2) parameters: each rank checks its own
        sums = [local_shard(p.detach()).double().sum() for p in module.parameters()]
    return tuple(torch.stack(sums).cpu().tolist()) if sums else ()


class Stage1FeatureCache(Callback):
    """Serve the frozen VLM's Stage-1 outputs from memory (or disk) after the first epoch.

    Add it to the Trainer next to :class:`~apt_lightning.APTStageScheduler`; the model must route its VLM pass
    through :meth:`~apt_lightning.APT.cached_vlm` (both reference policies do). Exact: a cached run's
    losses equal an uncached run's (the stored tensors are the ones the VLM computed).

    Args:
        max_memory: bytes kept in ``device`` memory; ``"4GiB"``-style strings work too.
        spill_dir: where samples beyond ``max_memory`` go (one safetensors file each, under ``rank<N>/``);
            ``None`` refuses an overflow. Emptied at fit start and at the end of Stage 1.
        device: ``"cpu"`` (default; copied to the accelerator on each hit) or ``"accelerator"`` (kept where the
            VLM ran: fastest, costs accelerator memory).
        sample_key: batch key of the per-sample identity (int tensor or list of ints), e.g. the dataset index.
        check_keys: batch keys whose per-sample fingerprint must match on every hit (augmentation guard).

    Raises:
        FeatureCacheError: at setup for a module that is not an :class:`~apt_lightning.APTMixin`; at fit start
            for a plan without Stage 1 or a dataset whose features cannot fit; during Stage 1 for a batch without
            ``sample_key`` or a sample whose inputs changed between visits.
    """

    def __init__(
        self,
        max_memory: int | str = "4GiB",
        spill_dir: str | Path | None = None,
        device: Literal["cpu", "accelerator"] = "cpu",
        sample_key: str = "sample_id",
        check_keys: Sequence[str] = ("pixel_values",),
    ) -> None:
        if device not in ("cpu", "accelerator"):
            raise ValueError(f"`device` must be 'cpu' or 'accelerator', got {device!r}.")
        self.max_memory = parse_bytes(max_memory)
        self.spill_root = Path(spill_dir) if spill_dir is not None else None
        self.device = device
        self.sample_key = sample_key
        self.check_keys = tuple(check_keys)
        self._memory: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._spilled: dict[int, torch.Tensor] = {}  # sample id -> input fingerprint; tensors on disk
        self._spec: Any = None
        self._bytes_in_memory = 0
        self._bytes_per_sample: int | None = None
        self._vlm_fingerprint: tuple[float, ...] | None = None
        self._spill_dir: Path | None = None
        self._samples_expected: int | None = None
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    @property
    def bytes_in_memory(self) -> int:
        return self._bytes_in_memory

    @property
    def bytes_per_sample(self) -> int | None:
        """Bytes one sample's cached features take (known after the first fill)."""
        return self._bytes_per_sample

    def clear(self) -> None:
        """Drop every cached sample (memory and spill files)."""
        self._memory.clear()
        self._spilled.clear()
        self._bytes_in_memory = 0
        if self._spill_dir is not None and self._spill_dir.exists():
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "apt", None), APT):
            raise FeatureCacheError(
                f"{type(pl_module).__name__} has no APT controller: the Stage-1 feature cache serves "
                "`self.apt.cached_vlm`. Assign `self.apt = APT(self, ...)` or remove Stage1FeatureCache from the "
                "callbacks."
            )
        if stage == "fit":
            pl_module.apt.attach_feature_cache(self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = pl_module.apt.plan
        if plan.is_joint or plan.first_stage != 1:
            raise FeatureCacheError(
                f"Stage1FeatureCache was added to a run whose plan has no Stage 1 ({plan}): the VLM's outputs "
                "depend on the instruction (and, in joint training, on trainable weights), so nothing may be "
                "cached. Remove the cache from this run's callbacks."
            )
        self.clear()
        if self.spill_root is not None:
            self._spill_dir = self.spill_root / f"rank{trainer.global_rank}"
        self._vlm_fingerprint = weights_fingerprint(pl_module.apt.vlm_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples_expected = _dataset_size(trainer)
        if self._bytes_per_sample is not None:
            self._check_budget()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(self) and pl_module.apt.stage == 1:
            fingerprint = weights_fingerprint(pl_module.apt.vlm_module)
            if fingerprint != self._vlm_fingerprint:
                self.clear()  # weights changed under us (a callback loaded new ones): recompute, never serve stale
                self._vlm_fingerprint = fingerprint

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hits + self.misses == 0 and pl_module.apt.stage == 1:
            rank_zero_warn(
                f"Stage1FeatureCache served no sample in a Stage-1 epoch: {type(pl_module).__name__} does not route "
                "its VLM pass through `self.apt.cached_vlm(batch, compute)`, so the cache does nothing."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if len(self) and pl_module.apt.stage != 1:
            self.clear()  # the switch: nothing cached is valid in Stage 2, free the memory

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clear()
        if pl_module.apt.feature_cache is self:
            pl_module.apt.attach_feature_cache(None)

    def state_dict(self) -> dict[str, Any]:
        return {}  # contents are recomputed after a resume: the frozen VLM gives the same values

    # ------------------------------------------------------------------ lookup
    def get_or_compute(self, batch: Any, compute: Callable[[], T], stage: int, device: torch.device) -> T:
        """``compute()`` for a batch with an uncached sample (storing each sample), else the stored values.

        Raises:
            FeatureCacheError: outside Stage 1, without ``sample_key`` in the batch, or for a sample whose
                inputs differ from when it was cached.
        """
        if stage != 1:
            raise FeatureCacheError(
                f"The Stage-1 feature cache was asked for features in stage {stage}: VLM outputs are only "
                "instruction-free and frozen in Stage 1. Call `apt.cached_vlm`, which bypasses the cache outside it."
            )
        ids = self._sample_ids(batch)
        fingerprints = self._fingerprints(batch, len(ids))
        if all(i in self._memory or i in self._spilled for i in ids):
            self._check_inputs(ids, fingerprints)
            self.hits += len(ids)
            leaves = [self._load(i) for i in ids]
            stacked = [
                _stack_padded([sample[j] for sample in leaves]).to(device, non_blocking=True)
                for j in range(len(leaves[0]))
            ]
            return pytree.tree_unflatten(stacked, self._spec)
        value = compute()
        self.misses += len(ids)
        leaves, spec = pytree.tree_flatten(value)
        if not all(isinstance(leaf, torch.Tensor) and leaf.shape[:1] == (len(ids),) for leaf in leaves):
            raise FeatureCacheError(
                "`apt.cached_vlm`'s compute() must return tensors (in tuples, lists or dicts) whose first dimension "
                f"is the batch ({len(ids)}); got {[type(leaf).__name__ for leaf in leaves]}."
            )
        self._spec = spec
        for row, sample in enumerate(ids):
            if sample not in self._memory and sample not in self._spilled:
                self._store(sample, [leaf[row].detach() for leaf in leaves], fingerprints[row])
        return value

    def _sample_ids(self, batch: Any) -> list[int]:
        if not isinstance(batch, dict) or self.sample_key not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise FeatureCacheError(
                f"The batch has no `{self.sample_key}` (keys: {keys}): the Stage-1 feature cache needs each sample's "
                "identity. Return the dataset index from `__getitem__` (e.g. `sample['sample_id'] = index`) or set "
                "`Stage1FeatureCache(sample_key=...)`."
            )
        ids = batch[self.sample_key]
        return [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]

    def _fingerprints(self, batch: dict[str, Any], size: int) -> torch.Tensor:
        parts = [input_fingerprint(batch[key]) for key in self.check_keys if isinstance(batch.get(key), torch.Tensor)]
        if not parts:
            return torch.zeros(size, 0, dtype=torch.int64)
        return torch.cat(parts, 1).cpu()

    def _check_inputs(self, ids: list[int], fingerprints: torch.Tensor) -> None:
        for row, sample in enumerate(ids):
            stored = self._memory[sample][1] if sample in self._memory else self._spilled[sample]
            if not torch.equal(stored, fingerprints[row]):
                raise FeatureCacheError(
                    f"Sample {sample}'s {list(self.check_keys)} differ from when its VLM features were cached: "
                    "random augmentation or a changed image transform. The cache would train on a stale draw. "
                    "Remove the random augmentation from Stage 1 (or make it a deterministic function of the "
                    "sample), or remove Stage1FeatureCache."
                )

    def _store(self, sample: int, tensors: list[torch.Tensor], fingerprint: torch.Tensor) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._bytes_per_sample is None:
            self._bytes_per_sample = size
            self._check_budget()
        if self._bytes_in_memory + size <= self.max_memory:
            # a copy, never a view: a view would keep the whole batch's tensor alive
            kept = [t.to("cpu" if self.device == "cpu" else t.device, copy=True) for t in tensors]
            self._memory[sample] = (kept, fingerprint)
            self._bytes_in_memory += size
            return
        if self._spill_dir is None:
            raise FeatureCacheError(self._budget_message(len(self) + 1))
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {str(j): t.contiguous().cpu() for j, t in enumerate(tensors)}, self._spill_dir / f"{sample}.safetensors"
        )
        self._spilled[sample] = fingerprint

    def _load(self, sample: int) -> list[torch.Tensor]:
        if sample in self._memory:
            return self._memory[sample][0]
        assert self._spill_dir is not None
        stored = load_file(self._spill_dir / f"{sample}.safetensors")
        return [stored[str(j)] for j in range(len(stored))]

    def _check_budget(self) -> None:
        if self._samples_expected is None or self.spill_root is not None:
            return
        if self._bytes_per_sample * self._samples_expected > self.max_memory:  # type: ignore[operator]
            raise FeatureCacheError(self._budget_message(self._samples_expected))

    def _budget_message(self, samples: int) -> str:
        per = self._bytes_per_sample or 0
        return (
            f"The Stage-1 feature cache needs {per:,} bytes per sample ({human_bytes(per)}), "
            f"{human_bytes(per * samples)} for {samples:,} samples, but max_memory is {human_bytes(self.max_memory)}. "
            "Raise `max_memory`, give `spill_dir=` (a local disk with that much room), or train Stage 1 without "
            "the cache."
        )


def parse_bytes(value: int | str) -> int:
    """``4096``, ``"512MiB"``, ``"4GiB"``, ``"2GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"A size in bytes is an int or a string like '4GiB', got {value!r}.")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"A size in bytes must be >= 0, got {value}.")
        return value
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = str(value).strip().upper().replace(" ", "")
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise ValueError(f"Cannot read {value!r} as a size: use an int (bytes) or a string like '512MiB' or '4GiB'.")


def human_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample tensors, right-padding every dimension to the largest (zeros / False)."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors), strict=True)]
    if all(list(t.shape) == shape for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), *shape))
    for row, t in enumerate(tensors):
        out[(row, *(slice(0, n) for n in t.shape))] = t
    return out


def _dataset_size(trainer: pl.Trainer) -> int | None:
    """Samples one rank may cache: the whole dataset (a shuffling distributed sampler deals every rank a new
    share each epoch), when the train dataloader knows its size."""
    try:
        return len(trainer.train_dataloader.dataset)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError):  # iterable datasets, custom loaders: checked at the first overflow instead
        return None
