"""Content digest of a checkpoint: written when a library module saves, verified before anything is built from it.

A ``.ckpt`` is a zip of pickled plain data and raw tensor storage. ``torch.load`` reads flipped bytes inside a
weight's storage without complaint (a bit flip in an exponent turns 0.01 into 3.4e38), and a flipped bit in the
recorded step, a hyper-parameter or an optimizer moment loads as silently. :func:`add_checkpoint_digest` (called
last by the module's ``on_save_checkpoint``) records, under :data:`RECORD_KEY`, one sha256 per *part* of the
checkpoint (:data:`PARTS`):

* ``state_dict``: the weights (:func:`state_dict_digest`: keys, dtypes, shapes, raw bytes);
* ``apt``: APT's record (plan, step, configuration), which decides the stage the loaded model runs in;
* ``hyper_parameters`` (and ``datamodule_hyper_parameters``): the model configuration, incl. fusion options,
  ``num_inference_steps`` and every other sampling setting a reference policy stores there;
* ``policy_class``, ``global_step``, ``epoch``: which class is built and where a resumed fit starts;
* ``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``: what a resumed fit continues from (a flipped
  exponent in Adam's ``exp_avg_sq`` need not give a NaN: it changes the resumed weights silently).

The weights' digest is also kept under the older :data:`DIGEST_KEY`, which earlier releases verify.

:func:`verify_checkpoint_digest` checks the entry's own shape first: a top-level key that looks like a damaged
digest key (a flipped bit in its name) or a digest that is not 64 hex digits is refused, not read as "no digest";
then every recorded part must be present and hash to its record. :class:`VerifiedCheckpointIO` is the
Trainer-side loader/saver: it always reads with ``weights_only=True`` (whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
says), verifies every part before Lightning uses the file, and writes through a temporary file and a rename, so a
full disk leaves no truncated checkpoint.

Not covered: parts outside :data:`PARTS` (a user's own top-level keys, precision-plugin state), and state dicts of
sharded tensors (FSDP2 ``DTensor``: each rank sees only its shard); such a checkpoint records no digest and loads
with an :class:`~apt_lightning.errors.UnverifiedCheckpointWarning`.

Cost: one sha256 pass over the tensors' bytes on the host: 0.06 s for 10M float32 parameters (38 MiB) on the
development machine's CPU (docs/reliability.md), about three times that with Adam's two moments; accelerator
tensors are copied to the host first.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import math
import re
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO as _TorchCheckpointIO

from apt_lightning.atomic import atomic_write
from apt_lightning.errors import CheckpointWriteError, PolicyCheckpointError, UnverifiedCheckpointWarning

DIGEST_KEY = "apt_state_dict_sha256"
"""Top-level checkpoint key holding :func:`state_dict_digest` of the checkpoint's ``state_dict`` (weights only)."""

RECORD_KEY = "apt_checkpoint_sha256"
"""Top-level checkpoint key holding ``{part: sha256}`` for every part of :data:`PARTS` the checkpoint holds."""

PARTS = (
    "state_dict",
    "apt",
    "hyper_parameters",
    "datamodule_hyper_parameters",
    "policy_class",
    "global_step",
    "epoch",
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "callbacks",
)
"""Top-level checkpoint keys the digest covers, whenever the checkpoint holds them."""

LOAD_HOOK_PARTS = ("state_dict", "apt", "policy_class", "global_step", "epoch", "optimizer_states", "lr_schedulers")
"""Parts still as written when ``on_load_checkpoint`` runs: Lightning merges ``load_from_checkpoint``'s keyword
arguments into ``hyper_parameters`` and migrates ``loops``/``callbacks`` of older versions before that hook, so
those are verified where the file is read (:func:`apt_lightning.models.base.read_checkpoint`,
:class:`VerifiedCheckpointIO`)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def digestible(state_dict: Mapping[str, Any]) -> bool:
    """Whether every tensor is a plain (unsharded) one, so the digest covers the full weights. Non-tensor entries
    (a module's ``_extra_state``) are allowed and not hashed."""
    return all(
        type(value) in (torch.Tensor, torch.nn.Parameter)
        for value in state_dict.values()
        if isinstance(value, torch.Tensor)
    )


def _tensor_bytes(digest: Any, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(json.dumps([str(tensor.dtype), list(tensor.shape)]).encode())
    if tensor.numel():
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.dtype != torch.uint8 else flat.numpy())


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
            digest.update((flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat).numpy().data)  # not copied
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` (plain data and tensors, as a checkpoint holds them) with a type tag before every item, so
    ``1``, ``1.0``, ``True`` and ``"1"`` differ, and mappings independently of their order."""
    if isinstance(value, torch.Tensor):
        digest.update(b"T")
        _tensor_bytes(digest, value)
    elif isinstance(value, Mapping):
        digest.update(b"D%d:" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"L" if isinstance(value, list) else b"U")
        digest.update(b"%d:" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        digest.update(b"S%d:" % len(data) + data)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(b"B%d:" % len(value) + bytes(value))
    elif value is None or isinstance(value, bool):
        digest.update(b"N" if value is None else (b"t" if value else b"f"))
    elif isinstance(value, enum.Enum):
        digest.update(b"E" + type(value).__qualname__.encode())
        _feed(digest, value.value)
    elif isinstance(value, int):
        digest.update(b"I%d;" % value)
    elif isinstance(value, float):
        digest.update(b"F" + (repr(value) if not math.isfinite(value) else value.hex()).encode() + b";")
    else:  # torch.dtype, torch.device, torch.Size, and what a weights-only load could not read anyway
        text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode("utf-8", "backslashreplace")
        digest.update(b"O%d:" % len(text) + text)


def part_digest(name: str, value: Any) -> str:
    """sha256 of one checkpoint part (:data:`PARTS`); ``state_dict`` is :func:`state_dict_digest`."""
    if name == "state_dict":
        return state_dict_digest(value)
    digest = hashlib.sha256(name.encode() + b"\0")
    _feed(digest, value)
    return digest.hexdigest()


def add_checkpoint_digest(checkpoint: dict[str, Any]) -> None:
    """Record the digest of every part of :data:`PARTS` that ``checkpoint`` holds under :data:`RECORD_KEY`, and
    that of the weights under :data:`DIGEST_KEY` (a module's ``on_save_checkpoint`` calls this last). Sharded
    state dicts get no digest (see the module docstring)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not digestible(state):
        checkpoint.pop(DIGEST_KEY, None)
        checkpoint.pop(RECORD_KEY, None)
        return
    record = {name: part_digest(name, checkpoint[name]) for name in PARTS if name in checkpoint}
    checkpoint[RECORD_KEY] = record
    checkpoint[DIGEST_KEY] = record["state_dict"]


def _looks_like_a_digest_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    return any(
        key != known and difflib.SequenceMatcher(None, key, known).ratio() >= 0.75 for known in (DIGEST_KEY, RECORD_KEY)
    )


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _refuse_damaged_entries(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """A digest entry whose key or value is damaged must not read as "no digest" (which would skip the check)."""
    for key in checkpoint:
        if _looks_like_a_digest_key(key):
            raise PolicyCheckpointError(
                f"{path} holds the top-level key {key!r}, a damaged copy of the digest key `{DIGEST_KEY}` or "
                f"`{RECORD_KEY}`: the file was modified or corrupted after it was written. Nothing was loaded. Copy "
                "it again from its source, or use an earlier checkpoint."
            )
    legacy = checkpoint.get(DIGEST_KEY)
    if legacy is not None and not _is_hex_digest(legacy):
        raise PolicyCheckpointError(
            f"{path} has a malformed `{DIGEST_KEY}` entry ({_describe(legacy)}; a digest is 64 lowercase hex digits): "
            "the file was modified or corrupted after it was written. Use the original checkpoint file."
        )
    record = checkpoint.get(RECORD_KEY)
    if record is None:
        return
    if (
        not isinstance(record, Mapping)
        or "state_dict" not in record
        or not all(isinstance(k, str) and k in PARTS and _is_hex_digest(v) for k, v in record.items())
    ):
        raise PolicyCheckpointError(
            f"{path} has a malformed `{RECORD_KEY}` entry ({_describe(record)}; expected a dict from part names "
            f"{list(PARTS)} to 64-digit hex digests, incl. `state_dict`): the file was modified or corrupted after it "
            "was written. Use the original checkpoint file."
        )
    missing = [name for name in record if name not in checkpoint]
    # Lightning's load_from_checkpoint adds `hyper_parameters` (empty, or its keyword arguments) to a checkpoint whose
    # module saved none, before any hook sees it: its absence from the record is not damage.
    unrecorded = [name for name in PARTS if name in checkpoint and name not in record and name != "hyper_parameters"]
    if missing or unrecorded:
        raise PolicyCheckpointError(
            f"{path} does not match its digest record: parts {missing or unrecorded} are "
            f"{'recorded but missing' if missing else 'present but not recorded'} (a damaged key name): the file was "
            "modified or corrupted after it was written. Nothing was loaded. Use the original checkpoint file."
        )


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"a str of {len(value)} characters"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))[:12]}"
    return type(value).__name__


def verify_checkpoint_digest(
    checkpoint: Mapping[str, Any], path: str | Path, parts: Collection[str] | None = LOAD_HOOK_PARTS
) -> bool:
    """Check a loaded checkpoint against its recorded digests, before anything is built from it.

    Args:
        checkpoint: the dict ``torch.load`` returned.
        path: named in every message.
        parts: which recorded parts to check (``None``: all of them). The default, :data:`LOAD_HOOK_PARTS`, is
            what is still as written inside ``on_load_checkpoint``; where the file itself is read, pass ``None``.

    Returns:
        True when the digest was checked and matches; False (with an :class:`UnverifiedCheckpointWarning`)
        for a checkpoint that records none (written before digests existed, or with sharded weights).

    Raises:
        PolicyCheckpointError: a recorded digest does not match its part (the file was modified or corrupted
            after it was written), the digest entry is malformed, or a key looks like a damaged digest key.
            The message names ``path`` and the part.
    """
    _refuse_damaged_entries(checkpoint, path)
    record = checkpoint.get(RECORD_KEY)
    legacy = checkpoint.get(DIGEST_KEY)
    if record is None and legacy is None:
        warnings.warn(
            f"{path} records no content digest ({RECORD_KEY}): it was written before apt_lightning checkpoints "
            "carried one, or from sharded weights. It is loaded without a corruption check; load and save it once "
            "to add one.",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
        return False
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not digestible(state):
        raise PolicyCheckpointError(
            f"{path} records a digest but its `state_dict` is {_describe(state)} with sharded or no tensors: it was "
            "not written by apt_lightning as it is. Use the original checkpoint file."
        )
    expected: dict[str, Any] = dict(record) if record is not None else {"state_dict": legacy}
    if record is not None and legacy is not None and legacy != record["state_dict"]:
        raise PolicyCheckpointError(
            f"{path} records two different digests of its weights (`{DIGEST_KEY}` and `{RECORD_KEY}`): the file was "
            "modified or corrupted after it was written. Use the original checkpoint file."
        )
    for name, recorded in expected.items():
        if parts is not None and name not in parts:
            continue
        actual = part_digest(name, checkpoint[name])
        if actual != recorded:
            what = "weights" if name == "state_dict" else f"`{name}`"
            raise PolicyCheckpointError(
                f"{path} failed its content check: its {what} hash to {actual[:16]}... but the checkpoint records "
                f"{recorded[:16]}...: the file was modified or corrupted after it was written. Nothing was loaded. "
                "Copy it again from its source, or use an earlier checkpoint."
            )
    if record is None:
        warnings.warn(
            f"{path} records the digest of its weights only (`{DIGEST_KEY}`, an earlier apt_lightning): its "
            "hyper-parameters, APT record and optimizer state are loaded without a corruption check; load and save "
            "it once to cover them.",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
    return True


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure turned into one :class:`PolicyCheckpointError`
    naming ``path``. ``weights_only=True`` is passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot
    turn it off: a checkpoint holding Python objects other than tensors and plain data is refused, never run."""
    import pickle

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise PolicyCheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint: it is not one, or it holds Python objects other than "
            "tensors and plain data, which are never unpickled here. Pass a .ckpt file written by a Lightning Trainer."
        ) from error
    except (OSError, EOFError, RuntimeError, ValueError, UnicodeDecodeError, KeyError, IndexError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "empty or truncated file"
        raise PolicyCheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint ({type(error).__name__}: {reason[:200]}): it is "
            "truncated or corrupted. Pass a .ckpt file written by a Lightning Trainer, or an earlier checkpoint."
        ) from error
    if not isinstance(checkpoint, dict):
        raise PolicyCheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict: pass a .ckpt file written by a "
            "Lightning Trainer."
        )
    return checkpoint


def _save_to_file(obj: Any, path: str) -> None:
    with open(path, "wb") as file:
        torch.save(obj, file)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory and a rename: ``path`` is either
    the complete new file or untouched (the previous file, or none), never a truncated one.

    Raises:
        CheckpointWriteError: the directory is missing or unwritable, or the disk filled up (the temporary file
            is removed), naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temporary: _save_to_file(obj, temporary))
    except OSError as error:
        raise CheckpointWriteError(
            f"Could not write the checkpoint {path} ({type(error).__name__}: {error.strerror or error}); no partial "
            "file was left. Free disk space or choose a writable directory (`dirpath`, `default_root_dir`)."
        ) from error


class VerifiedCheckpointIO(_CheckpointIO):
    """A Trainer ``CheckpointIO`` that never unpickles objects, verifies every digest part and writes atomically.

    * load: ``weights_only=True`` always (an explicit ``weights_only=False`` is refused), then
      :func:`verify_checkpoint_digest` over every recorded part, before Lightning restores anything;
    * save: :func:`atomic_torch_save` (temporary file + rename) when the wrapped IO is Lightning's plain
      ``TorchCheckpointIO``; another IO saves itself;
    * remove: delegated.

    The reference policies install it in ``setup`` around whatever IO the strategy holds, so ``Trainer.fit(model,
    ckpt_path=...)`` is covered with a user's own Trainer; pass it yourself with ``Trainer(plugins=[...])``.

    Example::

        >>> io = VerifiedCheckpointIO()
        >>> isinstance(io.inner, _TorchCheckpointIO)
        True
    """

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner if inner is not None else _TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or type(self.inner) is not _TorchCheckpointIO:
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise PolicyCheckpointError(
                f"Refusing to load {path} with `weights_only=False`: apt_lightning never unpickles Python objects "
                "from a checkpoint (a crafted file runs code). Drop `weights_only=False`; a checkpoint written by "
                "a Lightning Trainer loads with `weights_only=True`."
            )
        checkpoint = load_checkpoint_file(path, map_location if map_location is not None else "cpu")
        verify_checkpoint_digest(checkpoint, path, parts=None)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
