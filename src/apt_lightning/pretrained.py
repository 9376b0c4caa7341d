"""peft-style adapter files: APT's configuration and trained weights in a directory your own model reloads.

``apt.save_pretrained(dir)`` writes two files:

* ``apt_config.json``: APT's record (plan, step, fine-tune flag, and the structure-defining configuration: VLM
  name, resolved :class:`~apt_lightning.FusionConfig`, VLM mode, LoRA shape), the fusion sites with the geometry
  read from each block and the VLM states each reads, the weights file's content hash, and a digest of the base
  VLM weights the file does not hold;
* ``apt_model.safetensors``: every weight the plan trains, under the model's own keys (APT's wrappers removed):
  the expert, the fusion blocks and gates, and the VLM's LoRA adapters (``vlm_mode="lora"``) or the whole VLM
  (``vlm_mode="full"``). A frozen VLM is not copied: it is the pretrained one your code loads.

``model.apt.load_pretrained(dir)`` on a freshly built model (its own ``__init__``, its pretrained VLM) restores the
record through :meth:`~apt_lightning.APT.load_state_dict` (the one load path: the same configuration and plan
checks as a checkpoint), which rebuilds the fusion blocks and LoRA adapters, then checks the weights (keys, shapes,
hash, finiteness, block geometry, context sources, base VLM digest) before copying any. Both files are written
atomically (temporary file, then rename), the weights first: an interrupted save leaves the previous pair or a
config whose hash names weights that are not there, which loading refuses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from apt_lightning.atomic import atomic_write
from apt_lightning.errors import ExportError
from apt_lightning.export import content_hash, context_sources, fusion_geometry, non_finite_keys
from apt_lightning.record import StateRecord
from apt_lightning.saved_files import library_version, read_verified_tensors, read_versioned_json
from apt_lightning.structure import lora_parameters, original_state_dict_keys

if TYPE_CHECKING:
    from apt_lightning.controller import APT

CONFIG_NAME = "apt_config.json"
WEIGHTS_NAME = "apt_model.safetensors"
FORMAT = "apt_pretrained"
FORMAT_VERSION = 1


def trained_keys(apt: APT) -> dict[str, str]:
    """``{original key: state-dict key}`` of every weight the plan trains (what :data:`WEIGHTS_NAME` holds)."""
    vlm = apt.vlm + "."
    keys = original_state_dict_keys(apt.model)
    selected = {clean: key for clean, key in keys.items() if not clean.startswith(vlm)}
    if apt.plan.trains_vlm and apt.config.vlm_mode == "full":
        selected.update({clean: key for clean, key in keys.items() if clean.startswith(vlm)})
    elif apt.plan.trains_vlm and apt.config.vlm_mode == "lora":
        adapters = {id(p) for p in lora_parameters(apt.vlm_module)}
        names = {name for name, p in apt.model.named_parameters() if id(p) in adapters}
        selected.update({clean: key for clean, key in keys.items() if key in names})
    return selected


def base_vlm_digest(apt: APT) -> str | None:
    """Content hash of the VLM weights the files do not hold (the pretrained base), or ``None`` when the whole VLM
    is saved."""
    if apt.plan.trains_vlm and apt.config.vlm_mode == "full":
        return None
    saved = set(trained_keys(apt).values())
    prefix = apt.vlm + "."
    state = apt.model.state_dict()
    return content_hash({k: v for k, v in state.items() if k.startswith(prefix) and k not in saved})


def save_pretrained(apt: APT, directory: str | Path) -> Path:
    """Write :data:`CONFIG_NAME` and :data:`WEIGHTS_NAME` for ``apt``'s model (see the module docstring).

    Raises:
        NotPreparedError: the model has no plan yet (nothing to describe).
        ExportError: a weight is NaN or infinite (nothing is written), or ``directory`` is a file.
    """
    apt.plan  # noqa: B018 -- NotPreparedError before anything is written
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"Cannot save APT files to {directory}: it is a file. Pass a directory path.")
    state = apt.model.state_dict()
    tensors = {clean: state[key].detach().to("cpu").contiguous().clone() for clean, key in trained_keys(apt).items()}
    bad = non_finite_keys(tensors)
    if bad:
        raise ExportError(
            f"Refusing to save APT files to {directory}: {len(bad)} weight(s) hold NaN or Inf ({bad[:4]}). Nothing "
            "was written: save from the last healthy checkpoint."
        )
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "apt_version": library_version(),
        "record": StateRecord.of(apt).to_dict(),
        "sites": list(apt.sites),
        "geometry": fusion_geometry(apt.model),
        "context_sources": context_sources(apt.model),
        "weights_sha256": content_hash(tensors),
        "base_vlm_sha256": base_vlm_digest(apt),
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def read_pretrained(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The configuration and weights :func:`save_pretrained` wrote to ``directory``, verified (format, version,
    content hash, finiteness) without touching any model: what a loader checks before it builds anything.

    Raises:
        ExportError: a missing, unreadable, modified or corrupted file, naming it and the fix.
    """
    directory = Path(directory)
    config = _read_config(directory)
    return config, _read_weights(directory, config)


def load_pretrained(apt: APT, directory: str | Path, verify_base: bool = True) -> None:
    """Load what :func:`save_pretrained` wrote into ``apt``'s model (see the module docstring)."""
    select, tensors, state = _checked(apt, Path(directory), verify_base)
    with torch.no_grad():
        for clean, key in select.items():
            state[key].copy_(tensors[clean])


def pretrained_differences(apt: APT, directory: str | Path, verify_base: bool = True) -> list[str]:
    """Rebuild and check ``apt``'s model against :func:`save_pretrained`'s files like :func:`load_pretrained`, but
    compare instead of copying: the sorted original keys whose weights in the model differ from the file's.

    For a loader that read the weights from another file first (LeRobot's ``model.safetensors``): an empty list
    says both files hold the same trained weights.
    """
    select, tensors, state = _checked(apt, Path(directory), verify_base)
    return sorted(clean for clean, key in select.items() if not torch.equal(state[key].detach().cpu(), tensors[clean]))


def _checked(
    apt: APT, directory: Path, verify_base: bool
) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read and verify the files, restore the record (structure), then check keys, shapes and the base VLM:
    ``(trained keys, file tensors, model state)`` ready to copy or compare."""
    config, tensors = read_pretrained(directory)
    apt.load_state_dict(config["record"])  # configuration and plan checks, then the structure
    _check_structure(apt, config, directory)
    select = trained_keys(apt)
    missing, unexpected = sorted(set(select) - set(tensors)), sorted(set(tensors) - set(select))
    if missing or unexpected:
        raise ExportError(
            f"{directory / WEIGHTS_NAME} does not fit {type(apt.model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Build the model with the same code and configuration it was saved from."
        )
    state = apt.model.state_dict()
    wrong = [
        f"`{k}` {tuple(tensors[k].shape)} vs {tuple(state[v].shape)}"
        for k, v in select.items()
        if state[v].shape != tensors[k].shape
    ]
    if wrong:
        raise ExportError(f"{directory / WEIGHTS_NAME}: shapes differ from the model's: {wrong[:4]}.")
    recorded_base = config.get("base_vlm_sha256")
    if verify_base and recorded_base is not None and base_vlm_digest(apt) != recorded_base:
        raise ExportError(
            f"The VLM weights of {type(apt.model).__name__} are not the base VLM {directory} was trained on (their "
            "digest differs): its adapter weights would give other actions. Load the same pretrained VLM, or pass "
            "`verify_base=False` if you changed the base on purpose."
        )
    return select, tensors, state


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ExportError(
            f"No {CONFIG_NAME} in {directory}: it is not a directory written by `apt.save_pretrained`. Check the path."
        )
    config = read_versioned_json(
        path, FORMAT, FORMAT_VERSION, ExportError, "an APT adapter config", "Copy the directory again from its source."
    )
    if not isinstance(config.get("record"), dict):
        raise ExportError(f"{path} holds no APT `record` (plan and step): copy the directory again from its source.")
    return config


def _read_weights(directory: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    fix = "Copy the directory again from its source, or save it again with `apt.save_pretrained`."
    return read_verified_tensors(directory / WEIGHTS_NAME, config.get("weights_sha256"), CONFIG_NAME, ExportError, fix)


def _check_structure(apt: APT, config: dict[str, Any], directory: Path) -> None:
    """The rebuilt fusion blocks must be the saved ones: same sites, same geometry, same VLM states read."""
    checks = (
        ("fusion sites", config.get("sites"), list(apt.sites)),
        ("fusion block geometry", config.get("geometry"), fusion_geometry(apt.model)),
        ("VLM states each site reads", config.get("context_sources"), context_sources(apt.model)),
    )
    for what, saved, current in checks:
        if saved != json.loads(json.dumps(current)):
            raise ExportError(
                f"{directory} was saved from a model whose {what} differ from {type(apt.model).__name__}'s: saved "
                f"{saved!r}, this model {current!r}. Build the model with the code and configuration it was saved from."
            )
