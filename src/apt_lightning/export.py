"""Export and load the Stage-1 VA prior and the Stage-2 fusion weights as safetensors.

Keys are those of the user's model *without* APT's wrappers (``.base_layer`` removed), so a prior loads into
a model with or without fusion sites injected, and into the next version of the same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from apt_lightning.errors import AptError
from apt_lightning.lora import merged_state_dict
from apt_lightning.mixin import APTMixin

FORMAT_KEY = "apt_format"
_BASE = ".base_layer"
_FUSION = ".apt_fusion."


def _clean(name: str) -> str:
    return name.replace(_BASE, "")


def _save(tensors: dict[str, torch.Tensor], path: str | Path, kind: str, extra: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    contiguous = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={FORMAT_KEY: kind, **extra})
    tmp.replace(path)  # atomic: a crash never leaves a half-written export under the final name
    return path


def _read(path: str | Path, kind: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        found = (handle.metadata() or {}).get(FORMAT_KEY)
    if found != kind:
        raise AptError(f"{path} is not an APT {kind!r} export (its {FORMAT_KEY} is {found!r}).")
    return load_file(str(path))


def _prior_keys(module: APTMixin) -> dict[str, str]:
    """``{clean name: state-dict key}`` of everything outside the VLM and the fusion blocks."""
    vlm = module.apt_vlm + "."
    return {_clean(k): k for k in module.state_dict() if not k.startswith(vlm) and _FUSION not in k}  # type: ignore[attr-defined]


def _fusion_keys(module: APTMixin) -> dict[str, str]:
    """``{clean name: state-dict key}`` of every fusion block parameter."""
    return {_clean(k): k for k in module.state_dict() if _FUSION in k}  # type: ignore[attr-defined]


def va_prior_state_dict(module: APTMixin) -> dict[str, torch.Tensor]:
    """Everything outside the VLM and the fusion blocks: the language-agnostic expert (Stage-1 result)."""
    state = module.state_dict()  # type: ignore[attr-defined]
    return {clean: state[key] for clean, key in _prior_keys(module).items()}


def export_va_prior(module: APTMixin, path: str | Path) -> Path:
    """Write the VA prior of ``module`` to ``path`` (safetensors), atomically."""
    return _save(va_prior_state_dict(module), path, "va_prior", {"vlm": module.apt_vlm})


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], select: dict[str, str], what: str) -> None:
    missing = sorted(set(select) - set(tensors))
    unexpected = sorted(set(tensors) - set(select))
    if missing or unexpected:
        raise AptError(
            f"The {what} export does not fit {type(module).__name__}: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}."
            " Was it exported from the same model class and config?"
        )
    state = module.state_dict()
    for clean, actual in select.items():
        if state[actual].shape != tensors[clean].shape:
            raise AptError(
                f"Shape mismatch for `{clean}` in the {what} export: {tuple(tensors[clean].shape)} vs the model's "
                f"{tuple(state[actual].shape)}."
            )
    with torch.no_grad():
        for clean, actual in select.items():
            state[actual].copy_(tensors[clean])


def load_va_prior(module: APTMixin, path: str | Path) -> None:
    """Load a prior written by :func:`export_va_prior` into ``module`` (fusion sites injected or not)."""
    _load_into(module, _read(path, "va_prior"), _prior_keys(module), "VA prior")  # type: ignore[arg-type]


def fusion_state_dict(module: APTMixin) -> dict[str, torch.Tensor]:
    """Weights and gates of every fusion block, keyed ``<site>.apt_fusion.<param>``."""
    state = module.state_dict()  # type: ignore[attr-defined]
    return {clean: state[key] for clean, key in _fusion_keys(module).items()}


def export_fusion(module: APTMixin, path: str | Path) -> Path:
    """Write the fusion blocks of ``module`` to ``path`` (safetensors), with the site list as metadata."""
    sites = json.dumps(sorted(module.apt_sites()))
    return _save(fusion_state_dict(module), path, "fusion", {"sites": sites})


def load_fusion(module: APTMixin, path: str | Path) -> None:
    """Load fusion weights written by :func:`export_fusion`; the module must have the same fusion sites."""
    _load_into(module, _read(path, "fusion"), _fusion_keys(module), "fusion")  # type: ignore[arg-type]


def export_vlm(module: APTMixin, path: str | Path) -> Path:
    """Write the VLM with LoRA adapters merged (if any), loadable into the plain VLM with ``load_state_dict``."""
    return _save(merged_state_dict(module.apt_vlm_module), path, "vlm", {"vlm": module.apt_vlm})


def load_vlm(module: APTMixin, path: str | Path) -> None:
    """Load a merged VLM export (from :func:`export_vlm`) into the VLM of ``module`` (which must have no LoRA)."""
    tensors = _read(path, "vlm")
    vlm = module.apt_vlm_module
    select = {k: k for k in vlm.state_dict()}
    _load_into(vlm, tensors, select, "VLM")
