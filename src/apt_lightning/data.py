"""A DataLoader that resumes mid-epoch exactly, so "resume behaves like the uninterrupted run" holds for data too.

Lightning restarts a plain DataLoader from its first batch when resuming mid-epoch. This loader's order is a
pure function of ``(seed, epoch)``, it shards itself across DDP ranks, and it implements Lightning's
``state_dict``/``load_state_dict`` interface, so a checkpoint records how far into the epoch it was.
Use it with ``Trainer(use_distributed_sampler=False)`` under DDP (it shards itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from apt_lightning.errors import ConfigError


class _EpochSampler(Sampler[int]):
    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch, self.skip = 0, 0

    def _shard(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        rank, world = self._shard()
        per_rank = self.size // world  # equal length on every rank, or DDP deadlocks
        return order[rank * per_rank : (rank + 1) * per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip :])

    def __len__(self) -> int:
        return len(self.indices()) - self.skip


def _rebuilt_over_own_sampler(kwargs: dict[str, Any]) -> _EpochSampler | None:
    """The loader's own sampler when ``kwargs`` only wrap it in a batch sampler, as Lightning does for predict."""
    batch_sampler = kwargs.get("batch_sampler")
    inner = getattr(batch_sampler, "sampler", None)
    return inner if kwargs.get("sampler") is None and isinstance(inner, _EpochSampler) else None


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with a deterministic per-epoch order that Lightning can checkpoint and resume mid-epoch.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch (per rank).
        shuffle: reshuffle every epoch with ``seed + epoch``.
        seed: base seed of the order.
        **kwargs: passed to ``DataLoader`` (``collate_fn``, ``num_workers``, ``drop_last`` ...); not ``sampler``
            (a ``DistributedSampler``, which Lightning adds under DDP/FSDP, is replaced by the loader's own
            rank-sharded order).

    Example::

        >>> loader = ResumableDataLoader(list(range(6)), batch_size=2)
        >>> it = iter(loader); _ = next(it); loader.state_dict()
        {'epoch': 0, 'batches': 1}
    """

    def __init__(
        self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0, **kwargs: Any
    ) -> None:
        for key in ("sampler", "batch_sampler"):  # Lightning re-creates loaders passing these explicitly as None
            if key in kwargs and kwargs[key] is None:
                kwargs.pop(key)
        if isinstance(kwargs.get("sampler"), DistributedSampler):
            # Lightning's `use_distributed_sampler=True` (its default under DDP/FSDP) re-creates the loader with a
            # DistributedSampler; this loader already shards its own order across ranks, so it keeps that one.
            kwargs.pop("sampler")
            kwargs.pop("shuffle", None)
        rebuilt = _rebuilt_over_own_sampler(kwargs)
        if rebuilt is not None:  # Lightning re-creating the loader around our sampler (e.g. predict's index tracking)
            self._order = rebuilt
            super().__init__(dataset, batch_size=batch_size, **kwargs)
        else:
            if "sampler" in kwargs or "batch_sampler" in kwargs:
                raise ConfigError("ResumableDataLoader owns its sampler; remove `sampler`/`batch_sampler`.")
            size = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style ones have it
            self._order = _EpochSampler(size, shuffle, seed)
            super().__init__(dataset, batch_size=batch_size, sampler=self._order, **kwargs)
        self._epoch, self._batches = 0, 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # a generator: it counts batches
        self._order.epoch, self._order.skip = self._epoch, self._batches * (self.batch_size or 1)
        for batch in super().__iter__():
            self._batches += 1
            yield batch
        self._epoch, self._batches = self._epoch + 1, 0

    def __len__(self) -> int:
        self._order.epoch, self._order.skip = self._epoch, 0
        return super().__len__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._epoch, self._batches = int(state_dict["epoch"]), int(state_dict["batches"])
