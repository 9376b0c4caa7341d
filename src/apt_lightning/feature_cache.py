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

import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from apt_lightning.controller import APT
from apt_lightning.errors import ConfigError, FeatureCacheError
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
        FeatureCacheError: at setup for a module without an :class:`~apt_lightning.APT` controller; at fit start
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
            raise ConfigError(f"`device` must be 'cpu' or 'accelerator', got {device!r}.")
        if isinstance(check_keys, str):
            raise ConfigError(
                f"`check_keys`={check_keys!r} is a string: pass a tuple of batch keys, e.g. "
                f"check_keys=({check_keys!r},)."
            )
        if not isinstance(sample_key, str) or not sample_key:
            raise ConfigError(f"`sample_key` must be a batch key (a non-empty str), got {sample_key!r}.")
        self.max_memory = parse_bytes(max_memory)
        self.spill_root = Path(spill_dir) if spill_dir is not None else None
        self.device = device
        self.sample_key = sample_key
        self.check_keys = tuple(check_keys)
        if not self.check_keys:
            rank_zero_warn(
                "Stage1FeatureCache(check_keys=()) turns the augmentation guard off: a sample whose inputs change "
                "between epochs (random augmentation) would be served stale features. Name the image key(s) unless "
                "your Stage-1 inputs are fixed per sample."
            )
        self._checked_batch_keys = False
        self._stage1_started = False
        self._served_before_first: int | None = None
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
        apt = _controller(pl_module)
        if stage == "fit":
            apt._attach_feature_cache(self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        apt = _controller(pl_module)
        plan = apt.plan
        if plan.is_joint or plan.first_stage != 1:
            raise FeatureCacheError(
                f"Stage1FeatureCache was added to a run whose plan has no Stage 1 ({plan}): the VLM's outputs "
                "depend on the instruction (and, in joint training, on trainable weights), so nothing may be "
                "cached. Remove the cache from this run's callbacks."
            )
        self.clear()
        if self.spill_root is not None:
            self._spill_dir = self.spill_root / f"rank{trainer.global_rank}"
            _check_spill_dir(self._spill_dir)
        self._checked_batch_keys = False
        self._stage1_started, self._served_before_first = False, None
        self._vlm_fingerprint = weights_fingerprint(apt.vlm_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples_expected = _dataset_size(trainer)
        if self._bytes_per_sample is not None:
            self._check_budget()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        apt = _controller(pl_module)
        if len(self) and apt.stage == 1:
            fingerprint = weights_fingerprint(apt.vlm_module)
            if fingerprint != self._vlm_fingerprint:
                self.clear()  # weights changed under us (a callback loaded new ones): recompute, never serve stale
                self._vlm_fingerprint = fingerprint

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._served_before_first is not None:
            served, self._served_before_first = self.hits + self.misses - self._served_before_first, None
            if served:
                return
            rank_zero_warn(
                f"Stage1FeatureCache served no sample in the first Stage-1 training batch: {type(pl_module).__name__} "
                "does not route its VLM pass through `self.apt.cached_vlm(batch, compute)`, so the cache does nothing. "
                "Wrap the VLM pass in it, or remove Stage1FeatureCache."
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        stage = _controller(pl_module).stage
        if len(self) and stage != 1:
            self.clear()  # the switch: nothing cached is valid in Stage 2, free the memory
        if stage == 1 and not self._stage1_started:  # the first Stage-1 batch of this fit: did it ask the cache?
            self._stage1_started, self._served_before_first = True, self.hits + self.misses

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clear()
        apt = _controller(pl_module)
        if apt._feature_cache is self:
            apt._attach_feature_cache(None)

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
        ids = sample_ids(batch[self.sample_key], self.sample_key)
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise FeatureCacheError(
                f"Batch `{self.sample_key}` repeats {twice[:8]}: two samples of one batch share an identity, so the "
                "cache would serve one sample's VLM features to the other. Make the identity unique per dataset item "
                "(the index passed to `__getitem__`), or remove Stage1FeatureCache."
            )
        return ids

    def _fingerprints(self, batch: dict[str, Any], size: int) -> torch.Tensor:
        if not self._checked_batch_keys:  # once per fit: a guard that matches no key would be silently off
            missing = [key for key in self.check_keys if not isinstance(batch.get(key), torch.Tensor)]
            if missing:
                tensors = sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor) and k != self.sample_key)
                raise FeatureCacheError(
                    f"Stage1FeatureCache(check_keys={list(self.check_keys)}): the batch has no tensor {missing} (its "
                    f"tensors: {tensors}), so the augmentation guard would be silently off and random augmentation "
                    "served stale. Name the batch's image key(s), e.g. `check_keys=('images',)`, or pass "
                    "`check_keys=()` to turn the guard off knowingly."
                )
            self._checked_batch_keys = True
        parts = [input_fingerprint(batch[key]) for key in self.check_keys]
        if not parts:
            return torch.zeros(size, 0, dtype=torch.int64)
        if any(part.shape[0] != size for part in parts):
            sizes = {key: tuple(batch[key].shape) for key in self.check_keys}
            raise FeatureCacheError(
                f"The batch holds {size} `{self.sample_key}` values but its checked inputs have shapes {sizes}: "
                f"give one `{self.sample_key}` per sample (a (B,) tensor or a list of B ints)."
            )
        return torch.cat(parts, 1).cpu()

    def _check_inputs(self, ids: list[int], fingerprints: torch.Tensor) -> None:
        for row, sample in enumerate(ids):
            stored = self._memory[sample][1] if sample in self._memory else self._spilled[sample]
            if not torch.equal(stored, fingerprints[row]):
                raise FeatureCacheError(
                    f"Sample {sample}'s {list(self.check_keys)} differ from when its VLM features were cached: "
                    "random augmentation, a changed image transform, or two different samples sharing the "
                    f"`{self.sample_key}` {sample}. The cache would train on a stale draw or on another sample's "
                    "features. Remove the random augmentation from Stage 1 (or make it a deterministic function of the "
                    "sample), give every dataset item its own identity, or remove Stage1FeatureCache."
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
        path = self._spill_dir / f"{sample}.safetensors"
        try:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            save_file({str(j): t.contiguous().cpu() for j, t in enumerate(tensors)}, path)
        except (OSError, SafetensorError) as error:
            self.clear()  # no spill file is left behind
            raise FeatureCacheError(
                f"Stage1FeatureCache could not write sample {sample} ({human_bytes(size)}) to spill_dir {path.parent} "
                f"({type(error).__name__}: {error}). The disk may be full or not writable; the spill files were "
                "removed. Give `spill_dir=` a local disk with room for the dataset's features, raise `max_memory`, or "
                "remove the cache."
            ) from error
        self._spilled[sample] = fingerprint

    def _load(self, sample: int) -> list[torch.Tensor]:
        if sample in self._memory:
            return self._memory[sample][0]
        assert self._spill_dir is not None
        path = self._spill_dir / f"{sample}.safetensors"
        try:
            stored = load_file(path)
        except (OSError, SafetensorError) as error:
            raise FeatureCacheError(
                f"Stage1FeatureCache could not read sample {sample}'s spill file {path} ({type(error).__name__}: "
                f"{error}): it was removed or damaged while training ran. Keep spill_dir private to this run (it is "
                "emptied at fit start), or remove the cache."
            ) from error
        return [stored[str(j)] for j in range(len(stored))]

    def _check_budget(self) -> None:
        if self._samples_expected is None or self._bytes_per_sample is None:
            return
        needed = self._bytes_per_sample * self._samples_expected
        if self._spill_dir is None:
            if needed > self.max_memory:
                raise FeatureCacheError(self._budget_message(self._samples_expected))
            return
        spill = needed - self.max_memory
        free = _free_bytes(self._spill_dir)
        if spill > 0 and free is not None and spill > free:
            raise FeatureCacheError(
                f"The Stage-1 feature cache needs {human_bytes(spill)} of spill space for {self._samples_expected:,} "
                f"samples ({human_bytes(self._bytes_per_sample)} each, {human_bytes(self.max_memory)} kept in memory), "
                f"but {self._spill_dir} has {human_bytes(free)} free. Point `spill_dir=` at a disk with room, raise "
                "`max_memory`, or remove the cache."
            )

    def _budget_message(self, samples: int) -> str:
        per = self._bytes_per_sample or 0
        return (
            f"The Stage-1 feature cache needs {per:,} bytes per sample ({human_bytes(per)}), "
            f"{human_bytes(per * samples)} for {samples:,} samples, but max_memory is {human_bytes(self.max_memory)}. "
            "Raise `max_memory`, give `spill_dir=` (a local disk with that much room), or train Stage 1 without "
            "the cache."
        )


def parse_bytes(value: int | str, name: str = "max_memory") -> int:
    """``4096``, ``"512MiB"``, ``"4GiB"``, ``"2GB"`` -> bytes.

    Raises:
        ConfigError: a negative, non-finite or unreadable size, or a bool; the message names ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"`{name}` is a size in bytes: an int or a string like '4GiB', got {value!r}.")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"`{name}` must be >= 0 bytes, got {value}.")
        return value
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = value.strip().upper().replace(" ", "")
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                number = float(text[: -len(unit)])
            except ValueError:
                break
            if not math.isfinite(number) or number < 0:
                raise ConfigError(f"`{name}`={value!r} must be a finite size >= 0, e.g. '512MiB' or '4GiB'.")
            return int(number * factor)
    raise ConfigError(
        f"Cannot read `{name}`={value!r} as a size: use an int (bytes) or a string like '512MiB' or '4GiB'."
    )


def human_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def sample_ids(ids: Any, key: str = "sample_id") -> list[int]:
    """The per-sample identities of a batch as ints: a (B,) integer tensor or a list/tuple of ints.

    Raises:
        FeatureCacheError: for float or bool ids (which collide through ``int()``), strings, or a tensor that is not
            1-D, naming the key and the fix.
    """
    fix = f"Return an int per sample (the dataset index) as `{key}`: `torch.tensor(index)` collates to a (B,) tensor."
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise FeatureCacheError(
                f"Batch `{key}` is a {ids.dtype} tensor: float or bool identities collide when read as ints (1.2 and "
                f"1.7 are both 1). {fix}"
            )
        if ids.ndim != 1:
            raise FeatureCacheError(
                f"Batch `{key}` has shape {tuple(ids.shape)}; the cache needs one identity per sample, shape (B,). "
                f"Squeeze it (`ids.view(-1)` for (B, 1)) or {fix[0].lower() + fix[1:]}"
            )
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, (list, tuple)):
        values = [i.item() if isinstance(i, torch.Tensor) and i.numel() == 1 else i for i in ids]
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            return [int(v) for v in values]
    kinds = sorted({type(i).__name__ for i in ids}) if isinstance(ids, (list, tuple)) else type(ids).__name__
    raise FeatureCacheError(f"Batch `{key}` holds {kinds}, not integer identities. {fix}")


def _check_spill_dir(path: Path) -> None:
    """Create ``path`` and prove it writable at fit start, not at the first overflow in the middle of Stage 1."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".apt_probe_", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise FeatureCacheError(
            f"Stage1FeatureCache(spill_dir=...) cannot write to {path} ({type(error).__name__}: {error}). Give "
            "`spill_dir` a writable directory (not a file, not read-only), or `spill_dir=None` to keep everything in "
            "memory."
        ) from error


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample tensors, right-padding every dimension to the largest (zeros / False)."""
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors), strict=True)]
    if all(list(t.shape) == shape for t in tensors):
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), *shape))
    for row, t in enumerate(tensors):
        index: tuple[int | slice, ...] = (row, *(slice(0, n) for n in t.shape))
        out[index] = t
    return out


def _controller(pl_module: pl.LightningModule) -> APT:
    """The module's :class:`APT` controller (``self.apt``), or a :class:`FeatureCacheError` that says how to add one."""
    controller = getattr(pl_module, "apt", None)
    if not isinstance(controller, APT):
        raise FeatureCacheError(
            f"{type(pl_module).__name__} has no APT controller: the Stage-1 feature cache serves "
            "`self.apt.cached_vlm`. Assign `self.apt = APT(self, ...)` or remove Stage1FeatureCache from the "
            "callbacks."
        )
    return controller


def _dataset_size(trainer: pl.Trainer) -> int | None:
    """Samples one rank may cache: the whole dataset (a shuffling distributed sampler deals every rank a new
    share each epoch), when the train dataloader knows its size."""
    try:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        return len(dataset) if isinstance(dataset, Sized) else None
    except (AttributeError, TypeError):  # iterable datasets, custom loaders: checked at the first overflow instead
        return None
