"""Content digest of a checkpoint's ``state_dict``: written when a library module saves, verified before loading.

A ``.ckpt`` is a zip of pickled plain data and raw tensor storage. ``torch.load`` reads flipped bytes inside a
weight's storage without complaint (a bit flip in an exponent turns 0.01 into 3.4e38), so a corrupted copy would
load and act. :func:`state_dict_digest` hashes every tensor's key, dtype, shape and raw bytes; the module's
``on_save_checkpoint`` stores it under :data:`DIGEST_KEY`; :func:`verify_checkpoint_digest` recomputes it before
a loader builds anything from the file.

What it covers and what it does not: the model weights (``state_dict``) only; optimizer and loop state are not
hashed (a resumed fit re-reads them, and a corrupted moment estimate shows as a non-finite loss, which training
already stops on). A state dict holding sharded tensors (FSDP2 ``DTensor``) is not hashed: each rank sees only
its shard.

Cost: one sha256 pass over the tensors' bytes on the host: 0.06 s for 10M float32 parameters (38 MiB) on the
development machine's CPU (docs/reliability.md); accelerator tensors are copied to the host first.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from apt_lightning.errors import PolicyCheckpointError, UnverifiedCheckpointWarning

DIGEST_KEY = "apt_state_dict_sha256"
"""Top-level checkpoint key holding :func:`state_dict_digest` of the checkpoint's ``state_dict``."""


def digestible(state_dict: Mapping[str, Any]) -> bool:
    """Whether every tensor is a plain (unsharded) one, so the digest covers the full weights. Non-tensor entries
    (a module's ``_extra_state``) are allowed and not hashed."""
    return all(
        type(value) in (torch.Tensor, torch.nn.Parameter)
        for value in state_dict.values()
        if isinstance(value, torch.Tensor)
    )


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and raw bytes of every tensor of ``state_dict`` (non-tensor
    entries are skipped).

    Order-free (keys are sorted) and exact (raw bytes, no float arithmetic), so the same weights give the same
    digest on any device and in any process.

    Example::

        >>> a = state_dict_digest({"w": torch.zeros(2)})
        >>> a == state_dict_digest({"w": torch.zeros(2)}), a == state_dict_digest({"w": torch.ones(2)})
        (True, False)
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if not isinstance(state_dict[key], torch.Tensor):
            continue  # non-tensor extra state: not weights
        tensor = state_dict[key].detach()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            flat = tensor.to("cpu").contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy() if flat.dtype != torch.uint8 else flat.numpy())
    return digest.hexdigest()


def add_checkpoint_digest(checkpoint: dict[str, Any]) -> None:
    """Record the digest of ``checkpoint["state_dict"]`` under :data:`DIGEST_KEY` (a module's
    ``on_save_checkpoint`` calls this last). Sharded state dicts get no digest (see the module docstring)."""
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping) and digestible(state):
        checkpoint[DIGEST_KEY] = state_dict_digest(state)
    else:
        checkpoint.pop(DIGEST_KEY, None)


def verify_checkpoint_digest(checkpoint: Mapping[str, Any], path: str | Path) -> bool:
    """Check a loaded checkpoint's ``state_dict`` against its recorded digest, before anything is built from it.

    Returns:
        True when the digest was checked and matches; False (with an :class:`UnverifiedCheckpointWarning`)
        for a checkpoint that records none (written before digests existed, or with sharded weights).

    Raises:
        PolicyCheckpointError: the recorded digest does not match the weights (the file was modified or
            corrupted after it was written), or the digest entry is not a string. The message names ``path``.
    """
    recorded = checkpoint.get(DIGEST_KEY)
    state = checkpoint.get("state_dict")
    if recorded is None:
        warnings.warn(
            f"{path} records no content digest ({DIGEST_KEY}): it was written before apt_lightning checkpoints "
            "carried one, or from sharded weights. Its weights are loaded without a corruption check; load and save "
            "it once to add one.",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
        return False
    if not isinstance(recorded, str) or not isinstance(state, Mapping) or not digestible(state):
        raise PolicyCheckpointError(
            f"{path} has a malformed `{DIGEST_KEY}` entry ({type(recorded).__name__}) or state_dict: it was not "
            "written by apt_lightning as it is. Use the original checkpoint file."
        )
    actual = state_dict_digest(state)
    if actual != recorded:
        raise PolicyCheckpointError(
            f"{path} failed its content check: the checkpoint records {DIGEST_KEY}={recorded[:16]}... but its weights "
            f"hash to {actual[:16]}...: the file was modified or corrupted after it was written. Nothing was "
            "loaded. Copy it again from its source, or use an earlier checkpoint."
        )
    return True
