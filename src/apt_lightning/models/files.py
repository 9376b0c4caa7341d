"""A reference policy as a directory: its constructor config, its base weights and APT's adapter files.

``policy.save_pretrained(dir)`` writes four files (transformers' and peft's layout side by side):

* ``policy_config.json``: the policy class by its registered name and its constructor arguments (transformers-config
  style: ``{"policy_class": ..., "init_args": {...}}``), the digests of the three other files, and a digest of
  itself;
* ``policy_model.safetensors``: every weight the APT files do not hold (the base VLM a frozen or LoRA run leaves
  untouched), under the policy's own keys;
* ``apt_config.json`` and ``apt_model.safetensors``: :meth:`APT.save_pretrained`'s files, the same format a user's
  own model writes (plan, step, fusion structure; the weights the plan trains).

:func:`load_policy_directory` (what :func:`~apt_lightning.models.load_policy` does with a directory, and
:meth:`FlowMatchingPolicy.from_pretrained`) keeps ``load_policy``'s safety rules: every file is verified against its
digest before anything is built; the class is looked up among the registered policies, never imported by name; the
arguments that would download weights are set to ``None``; tensors are read from safetensors only. It then builds the
policy with its own constructor, loads the base weights, and hands the rest to :meth:`APT.load_pretrained`, which
rebuilds the fusion blocks and LoRA adapters from ``apt_config.json`` and checks keys, shapes, geometry and the base
VLM's digest. Files are written atomically, ``policy_config.json`` last: an interrupted save is refused on load.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from apt_lightning.atomic import atomic_write
from apt_lightning.errors import ExportError, PolicyCheckpointError
from apt_lightning.export import content_hash, non_finite_keys
from apt_lightning.pretrained import CONFIG_NAME, read_pretrained, trained_keys
from apt_lightning.saved_files import library_version, read_verified_tensors, read_versioned_json
from apt_lightning.structure import original_state_dict_keys

if TYPE_CHECKING:
    from apt_lightning.models.base import FlowMatchingPolicy

POLICY_CONFIG_NAME = "policy_config.json"
POLICY_WEIGHTS_NAME = "policy_model.safetensors"
FORMAT = "apt_policy"
FORMAT_VERSION = 1
_RESAVE = "Copy the directory again from its source, or save it again with `policy.save_pretrained(dir)`."


def config_digest(body: dict[str, Any]) -> str:
    """sha256 of ``body`` as canonical JSON (sorted keys, no spaces), without its own ``config_sha256``."""
    rest = {k: v for k, v in body.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_key_names(policy: torch.nn.Module) -> dict[str, str]:
    """``{key as the policy's constructor names it: state-dict key}``: APT's fusion wrappers and peft's LoRA wrappers
    (their ``.base_layer.`` segment) removed. The loader builds the policy without either, then
    :meth:`APT.load_pretrained` wraps those layers again."""
    from peft.tuners.lora import LoraLayer

    wrapped = [f"{name}.base_layer." for name, m in policy.named_modules() if isinstance(m, LoraLayer)]

    def unwrapped(key: str) -> str:
        for prefix in wrapped:
            if key.startswith(prefix):
                return prefix[: -len("base_layer.")] + key[len(prefix) :]
        return key

    return {unwrapped(clean): key for clean, key in original_state_dict_keys(policy).items()}


def save_policy_directory(policy: FlowMatchingPolicy, directory: str | Path) -> Path:
    """Write the four files of the module docstring for ``policy`` (prepared: it has a stage plan).

    Raises:
        NotPreparedError: the policy has no plan yet.
        ExportError: a weight is NaN or infinite (nothing is written), or ``directory`` is a file.
    """
    from apt_lightning.models.base import policy_class_name

    apt = policy.apt
    apt.plan  # noqa: B018 -- NotPreparedError before anything is written
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"Cannot save a policy to {directory}: it is a file. Pass a directory path.")
    state = policy.state_dict()
    in_apt_files = set(trained_keys(apt).values())
    base = {
        name: state[key].detach().to("cpu").contiguous().clone()
        for name, key in base_key_names(policy).items()
        if key not in in_apt_files
    }
    bad = non_finite_keys(base)
    if bad:
        raise ExportError(
            f"Refusing to save {type(policy).__name__} to {directory}: {len(bad)} weight(s) hold NaN or Inf "
            f"({bad[:4]}). Nothing was written: save from the last healthy checkpoint."
        )
    init_args = {k: v for k, v in dict(policy.hparams).items() if k != "_class_path"}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / POLICY_WEIGHTS_NAME, lambda tmp: save_file(base, tmp))
    apt.save_pretrained(directory)
    body: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "apt_version": library_version(),
        "policy_class": policy_class_name(type(policy)),
        "init_args": init_args,
        "weights_sha256": content_hash(base),
        "apt_config_sha256": _file_digest(directory / CONFIG_NAME),
    }
    body["config_sha256"] = config_digest(body)
    text = json.dumps(body, indent=2, sort_keys=True)
    atomic_write(directory / POLICY_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def load_policy_directory(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    expected: type[FlowMatchingPolicy] | None = None,
) -> FlowMatchingPolicy:
    """Build the policy :func:`save_policy_directory` wrote to ``directory``, in its saved stage (eval mode).

    Args:
        directory: the directory.
        map_location: device the loaded policy is moved to.
        expected: refuse a directory whose class is not this one or a subclass (``PI0Policy.from_pretrained``).

    Raises:
        PolicyCheckpointError: a missing, modified or corrupted file (named, with the fix), a class that is not a
            registered policy, or weights that do not fit the policy its config builds.
    """
    from apt_lightning.models.base import registered_policy

    directory = Path(directory)
    body = _read_policy_config(directory)
    cls = registered_policy(body.get("policy_class"), directory / POLICY_CONFIG_NAME)
    if expected is not None and not issubclass(cls, expected):
        raise PolicyCheckpointError(
            f"{directory} holds a {cls.__name__}, not a {expected.__name__}: load it with "
            f"`{cls.__name__}.from_pretrained(dir)` or `load_policy(dir)`."
        )
    base, apt_keys = _verified_files(directory, body)
    init_args = dict(body["init_args"])
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(init_args) - set(parameters))
    if unknown:
        raise PolicyCheckpointError(
            f"{directory / POLICY_CONFIG_NAME} passes {unknown} to {cls.__name__}, which takes no such arguments "
            "(saved by another version of the class?). Load it with the apt_lightning that saved it."
        )
    init_args.update({arg: None for arg in cls.pretrained_arguments if arg in parameters})  # never download
    policy = cls(**init_args)
    state = policy.state_dict()
    unexpected = sorted(set(base) - set(state))
    not_covered = sorted(set(state) - set(base) - apt_keys)
    wrong = [
        f"`{k}` {tuple(base[k].shape)} vs {tuple(state[k].shape)}"
        for k in base
        if k in state and state[k].shape != base[k].shape
    ]
    if unexpected or not_covered or wrong:
        raise PolicyCheckpointError(
            f"{directory / POLICY_WEIGHTS_NAME} does not fit the {cls.__name__} its config builds: unexpected "
            f"{unexpected[:5]}, in neither weights file {not_covered[:5]}, other shapes {wrong[:4]}. Load it with "
            "the apt_lightning that saved it."
        )
    policy.load_state_dict(base, strict=False)
    try:
        policy.apt.load_pretrained(directory)  # structure from apt_config.json, then every check, then the weights
    except ExportError as error:
        raise PolicyCheckpointError(str(error)) from error
    return policy.to(map_location).eval()


def _read_policy_config(directory: Path) -> dict[str, Any]:
    path = directory / POLICY_CONFIG_NAME
    if not path.is_file():
        raise PolicyCheckpointError(
            f"No {POLICY_CONFIG_NAME} in {directory}: it is not a directory written by `policy.save_pretrained`. "
            "Check the path (a Lightning checkpoint is a .ckpt file)."
        )
    body = read_versioned_json(path, FORMAT, FORMAT_VERSION, PolicyCheckpointError, "a policy config", _RESAVE)
    if body.get("config_sha256") != config_digest(body) or not isinstance(body.get("init_args"), dict):
        raise PolicyCheckpointError(
            f"{path} failed its content check: it was edited or corrupted after saving. {_RESAVE} To change the "
            "model, build it with the new arguments and train it."
        )
    return body


def _verified_files(directory: Path, body: dict[str, Any]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Check APT's two files and read the base weights, all against the digests ``body`` records: the base weights
    and the keys of APT's weights file."""
    apt_config = directory / CONFIG_NAME
    if not apt_config.is_file() or _file_digest(apt_config) != body.get("apt_config_sha256"):
        raise PolicyCheckpointError(
            f"{apt_config} is missing or differs from the one saved with {POLICY_CONFIG_NAME} (edited, corrupted or "
            f"from another save). {_RESAVE}"
        )
    try:
        _, apt_tensors = read_pretrained(directory)
    except ExportError as error:
        raise PolicyCheckpointError(str(error)) from error
    recorded = body.get("weights_sha256")
    base = read_verified_tensors(
        directory / POLICY_WEIGHTS_NAME, recorded, POLICY_CONFIG_NAME, PolicyCheckpointError, _RESAVE
    )
    return base, set(apt_tensors)
