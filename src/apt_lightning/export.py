"""Export and load the Stage-1 VA prior, the Stage-2 fusion weights and the merged VLM as verified safetensors.

Keys are those of the user's model *without* APT's wrappers (named by
:func:`~apt_lightning.structure.original_state_dict_keys`), so a prior loads into a model with or without
fusion sites injected, and into the next version of the same model.

Every export is verified, in the file and against the model it is loaded into. The safetensors metadata holds:

* ``apt_format`` (the kind: ``va_prior``, ``fusion`` or ``vlm``), ``apt_format_version`` and ``apt_version``
  (the library version that wrote it);
* ``apt_fusion_geometry``: per fusion site, the geometry read from the block itself (``dim``, ``context_dim``,
  ``num_heads``, ``head_dim``, ``ff_hidden``, gate names), and ``apt_fusion_config``, the ``FusionConfig``;
* ``apt_layout``: the head counts and widths (``num_heads``, ``head_dim`` ...) of the exported modules;
* ``apt_context_sources``: per fusion site, which VLM states it reads (:func:`context_sources`): a fusion
  block trained on layer 4's states gives other actions when fed the last layer's, with equal shapes;
* ``apt_sha256``: a hash over the sorted keys, dtypes, shapes and raw bytes of every tensor and over the
  other metadata entries.

Writing refuses non-finite tensors (no NaN export is ever written) and is atomic. Loading raises
:class:`~apt_lightning.errors.ExportError`, naming the file, when the file is missing, unreadable, truncated
or of another kind, when its hash does not match its content, when a tensor is NaN or infinite, and when the
model differs from the exporting one: fusion geometry (2 heads of 16 and 1 head of 32 have the same tensor
shapes but different outputs) and the VLM states each site reads for fusion exports, head layout of the
exported modules for prior and VLM exports.
The fusion geometry stored in a prior or VLM export is provenance only: those tensors do not depend on it.

Exports written before verification existed (no ``apt_format_version``) still load, with an
:class:`~apt_lightning.errors.UnverifiedExportWarning`: the kind, finiteness, key and shape checks run, the hash
and geometry checks cannot. Load and export such a file once to upgrade it, or make the warning an error with
``warnings.simplefilter("error", UnverifiedExportWarning)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from apt_lightning.atomic import atomic_write
from apt_lightning.errors import ExportError, UnverifiedExportWarning
from apt_lightning.fusion import GatedCrossAttentionBlock
from apt_lightning.lora import merged_state_dict
from apt_lightning.saved_files import library_version
from apt_lightning.structure import (
    fusion_sites,
    is_fusion_key,
    original_named_modules,
    original_state_dict_keys,
)

if TYPE_CHECKING:  # for annotations only: export reads a controller's attributes and never builds one
    from apt_lightning.controller import APT

FORMAT_KEY = "apt_format"
FORMAT_VERSION_KEY = "apt_format_version"
FORMAT_VERSION = 2
VERSION_KEY = "apt_version"
HASH_KEY = "apt_sha256"
GEOMETRY_KEY = "apt_fusion_geometry"
FUSION_CONFIG_KEY = "apt_fusion_config"
LAYOUT_KEY = "apt_layout"
CONTEXT_SOURCES_KEY = "apt_context_sources"
KINDS = ("va_prior", "fusion", "vlm")
LAYOUT_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "head_dim")
"""Integer module attributes that change outputs without changing tensor shapes; recorded in ``apt_layout``."""
_COMPARED = ("dim", "context_dim", "num_heads", "head_dim", "ff_hidden", "gates", "gate", "gate_shape")


def _head(items: Iterable[str], n: int = 6) -> str:
    items = list(items)
    return f"{items[:n]}{f' and {len(items) - n} more' if len(items) > n else ''}"


# ---------------------------------------------------------------------------------------------- what is recorded
def block_geometry(block: GatedCrossAttentionBlock) -> dict[str, Any]:
    """Geometry of one gated cross-attention block, read from the block (the truth, whatever the config said).

    Example::

        >>> geometry = block_geometry(GatedCrossAttentionBlock(dim=8, context_dim=4, num_heads=2))
        >>> geometry["num_heads"], geometry["head_dim"], geometry["ff_hidden"], geometry["gates"]
        (2, 4, 32, ['apt_gate_attn', 'apt_gate_ff'])
    """
    linears = [m for m in block.ff.modules() if isinstance(m, nn.Linear)]
    gates = {id(g) for g in block.gate_parameters()}
    return {
        "dim": int(block.attn_norm.normalized_shape[-1]),
        "context_dim": int(block.context_norm.normalized_shape[-1]),
        "num_heads": int(block.num_heads),
        "head_dim": int(block.head_dim),
        "ff_hidden": int(linears[0].out_features) if linears else None,
        "gates": [name for name, p in block.named_parameters() if id(p) in gates],
        "gate": block.gate,
        "gate_shape": block.gate_shape,
        "dropout": float(getattr(block.dropout, "p", 0.0)),
    }


def fusion_geometry(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{site: block geometry}`` of every injected fusion site of ``model`` (empty before injection).

    Example::

        >>> from apt_lightning import FusionConfig
        >>> from apt_lightning.inject import inject_fusion
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = inject_fusion(model, FusionConfig(target_modules=["0"], hidden_dim=4, context_dim=3, num_heads=1))
        >>> fusion_geometry(model)["0"]["num_heads"], fusion_geometry(model)["0"]["head_dim"]
        (1, 4)
    """
    return {name: block_geometry(site.apt_fusion) for name, site in fusion_sites(model)}


def attention_layout(model: nn.Module, skip: str | None = None) -> dict[str, dict[str, int]]:
    """``{module: {attr: value}}`` for the :data:`LAYOUT_ATTRS` set on modules of ``model`` (original names,
    APT blocks excluded); modules under ``skip`` (a module path) are left out.

    Example::

        >>> attention_layout(nn.MultiheadAttention(8, 2))
        {'': {'num_heads': 2, 'head_dim': 4}}
    """
    layout: dict[str, dict[str, int]] = {}
    for name, module in original_named_modules(model):
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        attrs = vars(module)  # own attributes only: no forwarding through wrappers' __getattr__
        found = {a: attrs[a] for a in LAYOUT_ATTRS if type(attrs.get(a)) is int}
        if found:
            layout[name] = found
    return layout


def context_sources(module: nn.Module) -> dict[str, str] | None:
    """``{site: the VLM states it reads}`` for every fusion site, or ``None`` when the model does not say.

    A model declares it with a method ``apt_context_sources() -> dict[str, str]``; the reference policies are read
    from their ``per_site_language`` flag: every site reads the same tensor (``hidden_states[select_layer]`` or
    ``last_hidden_state``), or each its own VLM layer (``hidden_states[k]``).

    Example::

        >>> from apt_lightning import FusionConfig
        >>> from apt_lightning.inject import inject_fusion
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> _ = inject_fusion(model, FusionConfig(target_modules=["0"], hidden_dim=4, context_dim=3, num_heads=1))
        >>> context_sources(model) is None
        True
    """
    declared = getattr(module, "apt_context_sources", None)
    if callable(declared):
        return {str(site): str(source) for site, source in declared().items()}
    per_site = getattr(module, "per_site_language", None)
    if not isinstance(per_site, bool):
        return None
    sites = [name for name, _ in fusion_sites(module)]
    controller = getattr(module, "apt", None)
    vlm = controller.vlm_module if controller is not None else None
    config = getattr(vlm, "config", None)
    layers = getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", None)
    if not per_site:
        select = getattr(module, "select_layer", None)
        if isinstance(select, int) and isinstance(layers, int):
            return dict.fromkeys(sites, f"hidden_states[{select % (layers + 1)}]")
        return dict.fromkeys(sites, "last_hidden_state" if select is None else f"hidden_states[{select}]")
    if not isinstance(layers, int):
        return dict.fromkeys(sites, "per-site")
    count = len(sites)
    return {site: f"hidden_states[{-(-(i + 1) * layers // count)}]" for i, site in enumerate(sites)}


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over the sorted keys, dtypes, shapes and raw bytes of ``tensors`` and over ``metadata`` (less the
    hash entry itself); what ``apt_sha256`` records.

    Example::

        >>> a = content_hash({"w": torch.zeros(2)})
        >>> a == content_hash({"w": torch.zeros(2)}), a == content_hash({"w": torch.zeros(2, dtype=torch.float64)})
        (True, False)
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # `.data`: the array's buffer, not copied
    rest = {k: v for k, v in (metadata or {}).items() if k != HASH_KEY}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    return digest.hexdigest()


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Sorted keys of the floating or complex tensors holding a NaN or an infinity."""
    return sorted(
        k for k, t in tensors.items() if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    )


def _fusion_config(module: Any) -> str:
    config = getattr(getattr(module, "apt", None), "fusion", None)
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else None
    return json.dumps(fields, sort_keys=True, default=repr)


# ---------------------------------------------------------------------------------------------- file level
def _save(tensors: dict[str, torch.Tensor], path: str | Path, kind: str, extra: dict[str, str]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(
            f"Cannot write the {kind} export to {path}: it is a directory. Pass a file path, e.g. "
            f"{path / (kind + '.safetensors')}."
        )
    contiguous = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    bad = non_finite_keys(contiguous)
    if bad:
        raise ExportError(
            f"Refusing to export {kind} to {path}: {len(bad)} tensor(s) contain NaN or Inf: {_head(bad)}. Nothing "
            "was written. Export from the last checkpoint taken before training diverged (GateMonitor reports "
            "non-finite gates), or lower the learning rate and retrain."
        )
    metadata = {FORMAT_KEY: kind, FORMAT_VERSION_KEY: str(FORMAT_VERSION), VERSION_KEY: library_version(), **extra}
    metadata[HASH_KEY] = content_hash(contiguous, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata))  # never a half-written export
    return path


def _read(path: str | Path, kind: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a verified export of ``kind`` (any APT kind when ``None``)."""
    path = Path(path)
    writer = f"export_{kind}()" if kind else "the matching export_* function"
    if not path.exists():
        raise ExportError(f"No export at {path}: the file does not exist. Check the path, or write it with {writer}.")
    if path.is_dir():
        raise ExportError(f"{path} is a directory, not an export: pass the .safetensors file written by {writer}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            names = handle.keys()
            tensors = {k: handle.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as err:
        raise ExportError(
            f"Cannot read {path} as safetensors ({err}): the file is truncated, corrupt or not a safetensors file. "
            f"Copy it again from its source, or re-export it with {writer}."
        ) from err
    found = metadata.get(FORMAT_KEY)
    if found not in KINDS or (kind is not None and found != kind):
        hint = f"load it with load_{found}() instead" if found in KINDS else f"write one with {writer}"
        wanted = f"APT {kind!r} export" if kind else f"APT export (one of {KINDS})"
        raise ExportError(f"{path} is not an {wanted} (its {FORMAT_KEY} is {found!r}): {hint}.")
    version = metadata.get(FORMAT_VERSION_KEY)
    if version is None:
        warnings.warn(
            f"{path} was written before verified exports (no {FORMAT_VERSION_KEY}): its content hash and fusion "
            f"geometry cannot be checked. Load it and export it again with apt_lightning {library_version()} to "
            "add them.",
            UnverifiedExportWarning,
            stacklevel=3,
        )
    elif not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ExportError(
            f"{path} has {FORMAT_VERSION_KEY}={version!r}, written by apt_lightning {metadata.get(VERSION_KEY)!r}; "
            f"this apt_lightning {library_version()} reads up to {FORMAT_VERSION}. Upgrade apt_lightning."
        )
    else:
        recorded, actual = metadata.get(HASH_KEY), content_hash(tensors, metadata)
        if recorded != actual:
            raise ExportError(
                f"{path} failed its content check: {HASH_KEY} recorded {recorded!r} but the tensors and metadata hash "
                f"to {actual!r}. The file was modified or corrupted after export: copy it again from its source, "
                f"or re-export it with {writer}."
            )
    bad = non_finite_keys(tensors)
    if bad:
        raise ExportError(
            f"{path} contains NaN or Inf in {len(bad)} tensor(s): {_head(bad)}. Loading it would break the model: "
            f"re-export from a healthy checkpoint with {writer}."
        )
    return tensors, metadata


def verify_export(path: str | Path, kind: str | None = None) -> dict[str, str]:
    """Check an export without a model (readable, known kind, hash, finite tensors) and return its metadata.

    Args:
        path: the ``.safetensors`` file.
        kind: ``"va_prior"``, ``"fusion"`` or ``"vlm"``; any of them when ``None``.

    Raises:
        ExportError: the file is missing, unreadable, of another kind, modified after export or non-finite.

    Example::

        >>> import tempfile
        >>> from apt_lightning.export import _save
        >>> path = _save({"w": torch.ones(2)}, tempfile.mkdtemp() + "/w.safetensors", "fusion", {})
        >>> verify_export(path, "fusion")["apt_format"]
        'fusion'
    """
    if kind is not None and kind not in KINDS:
        raise ExportError(f"`kind` must be one of {KINDS} or None, got {kind!r}.")
    return _read(path, kind)[1]


def _recorded(metadata: dict[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: metadata `{key}` is not valid JSON ({err}). Re-export the file.") from err


# ---------------------------------------------------------------------------------------------- model level
def _check_geometry(module: nn.Module, metadata: dict[str, str], path: Path) -> None:
    recorded = _recorded(metadata, GEOMETRY_KEY, path)
    if recorded is None:
        return  # a pre-verification export; already warned
    current = fusion_geometry(module)
    config = metadata.get(FUSION_CONFIG_KEY, "unknown")
    model = type(module).__name__
    if set(recorded) != set(current):
        raise ExportError(
            f"{path} holds fusion weights for sites {_head(sorted(recorded))}, but {model} has fusion sites "
            f"{_head(sorted(current))}. Inject fusion first (`model.apt.prepare` with a Stage-2 plan) using the "
            f"FusionConfig the export was written with ({config}), then load."
        )
    diffs = []
    for site in sorted(recorded):
        fields = [f for f in _COMPARED if recorded[site].get(f) != current[site].get(f)]
        if fields:
            ours = ", ".join(f"{f}={recorded[site].get(f)!r}" for f in fields)
            theirs = ", ".join(f"{f}={current[site].get(f)!r}" for f in fields)
            diffs.append(f"site `{site}`: export {ours} vs model {theirs}")
    if diffs:
        raise ExportError(
            f"{path} was exported from fusion blocks of another geometry than {model}'s: {'; '.join(diffs[:4])}"
            f"{' ...' if len(diffs) > 4 else ''}. Equal tensor shapes do not make it fit: loading would change the "
            f"actions. Build the model with the export's FusionConfig ({config}), or load an export made with "
            "this model's configuration."
        )


def _check_context_sources(module: nn.Module, metadata: dict[str, str], path: Path) -> None:
    model = type(module).__name__
    current = context_sources(module)
    if FORMAT_VERSION_KEY not in metadata:
        return  # a pre-verification export; already warned
    if CONTEXT_SOURCES_KEY not in metadata:
        if current is not None:
            warnings.warn(
                f"{path} does not record which VLM states each fusion site reads (written before "
                f"{CONTEXT_SOURCES_KEY} existed): loading it into {model}, whose sites read "
                f"{_head(current.values(), 3)}, cannot be checked. Re-export it to add the record.",
                UnverifiedExportWarning,
                stacklevel=3,
            )
        return
    recorded = _recorded(metadata, CONTEXT_SOURCES_KEY, path)
    if recorded is None or current is None:
        if recorded is not None or current is not None:
            if current is None:
                silent = f"{model} does not declare its own (no `apt_context_sources()` method or `per_site_language`)"
            else:
                read = _head(current.values(), 3)
                silent = f"the exporting model did not declare them, but {model}'s sites read {read}"
            warnings.warn(
                f"{path}: which VLM states each fusion site reads cannot be compared: {silent}.",
                UnverifiedExportWarning,
                stacklevel=3,
            )
        return
    diffs = [
        f"site `{site}`: export read {recorded.get(site)!r}, model reads {current.get(site)!r}"
        for site in sorted(set(recorded) | set(current))
        if recorded.get(site) != current.get(site)
    ]
    if diffs:
        raise ExportError(
            f"{path} holds fusion blocks trained on other VLM states than {model}'s sites read: "
            f"{'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}. Equal shapes do not make it fit: the gates "
            "would mix features they never saw, and the actions change. Build the model as the export was made "
            "(e.g. the same `per_site_language` and `select_layer`), or export again from this configuration."
        )


def _check_layout(layout: dict[str, dict[str, int]], metadata: dict[str, str], path: Path, model: str) -> None:
    recorded = _recorded(metadata, LAYOUT_KEY, path)
    if recorded is None:
        return
    diffs = [
        f"`{name or '<root>'}`: export {recorded.get(name, {})} vs model {layout.get(name, {})}"
        for name in sorted(set(recorded) | set(layout))
        if recorded.get(name, {}) != layout.get(name, {})
    ]
    if diffs:
        raise ExportError(
            f"{path} was exported from modules with other head counts or widths than {model}'s: "
            f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}. Equal tensor shapes do not make it fit. "
            "Build the model with the configuration the export was made with, or re-export from this one."
        )


def _load_into(
    module: nn.Module, tensors: dict[str, torch.Tensor], select: dict[str, str], what: str, path: Path
) -> None:
    missing = sorted(set(select) - set(tensors))
    unexpected = sorted(set(tensors) - set(select))
    if missing or unexpected:
        raise ExportError(
            f"The {what} export does not fit {type(module).__name__}: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
            f" ({path}). Was it exported from the same model class and config?"
        )
    state = module.state_dict()
    for clean, actual in select.items():
        if state[actual].shape != tensors[clean].shape:
            raise ExportError(
                f"Shape mismatch for `{clean}` in the {what} export {path}: {tuple(tensors[clean].shape)} vs the "
                f"model's {tuple(state[actual].shape)}. Build the model with the config the export was made with."
            )


def _copy(module: nn.Module, tensors: dict[str, torch.Tensor], select: dict[str, str]) -> None:
    state = module.state_dict()
    with torch.no_grad():
        for clean, actual in select.items():
            state[actual].copy_(tensors[clean])


def _apt(module: nn.Module) -> APT:
    """``module.apt``: the APT controller of a model built with one (``nn.Module.__getattr__`` types it loosely)."""
    return cast("APT", module.apt)


def _prior_keys(module: nn.Module) -> dict[str, str]:
    """``{original key: state-dict key}`` of everything outside the VLM and the fusion blocks."""
    vlm = _apt(module).vlm + "."
    keys = original_state_dict_keys(module)
    return {k: v for k, v in keys.items() if not k.startswith(vlm) and not is_fusion_key(k)}


def _fusion_keys(module: nn.Module) -> dict[str, str]:
    """``{original key: state-dict key}`` of every fusion block parameter."""
    return {k: v for k, v in original_state_dict_keys(module).items() if is_fusion_key(k)}


def _provenance(module: nn.Module) -> dict[str, str]:
    return {
        GEOMETRY_KEY: json.dumps(fusion_geometry(module), sort_keys=True),
        FUSION_CONFIG_KEY: _fusion_config(module),
        CONTEXT_SOURCES_KEY: json.dumps(context_sources(module), sort_keys=True),
    }


# ---------------------------------------------------------------------------------------------- public API
def va_prior_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Everything outside the VLM and the fusion blocks: the language-agnostic expert (Stage-1 result)."""
    state = module.state_dict()
    return {clean: state[key] for clean, key in _prior_keys(module).items()}


def export_va_prior(module: nn.Module, path: str | Path) -> Path:
    """Write the VA prior of ``module`` to ``path`` (safetensors), verified and atomically.

    Raises:
        ExportError: a prior tensor is NaN or infinite (nothing is written), or ``path`` is a directory.
    """
    layout = attention_layout(module, skip=_apt(module).vlm)
    extra = {"vlm": _apt(module).vlm, LAYOUT_KEY: json.dumps(layout, sort_keys=True), **_provenance(module)}
    return _save(va_prior_state_dict(module), path, "va_prior", extra)


def load_va_prior(module: nn.Module, path: str | Path) -> None:
    """Load a prior written by :func:`export_va_prior` into ``module`` (fusion sites injected or not).

    Raises:
        ExportError: the file is missing, corrupt, modified, non-finite or another kind of export, or its keys,
            shapes or head layout differ from ``module``'s.
    """
    path = Path(path)
    tensors, metadata = _read(path, "va_prior")
    select = _prior_keys(module)
    _load_into(module, tensors, select, "VA prior", path)
    layout = attention_layout(module, skip=_apt(module).vlm)
    _check_layout(layout, metadata, path, type(module).__name__)
    _copy(module, tensors, select)


def fusion_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights and gates of every fusion block, keyed ``<site>.apt_fusion.<param>``."""
    state = module.state_dict()
    return {clean: state[key] for clean, key in _fusion_keys(module).items()}


def export_fusion(module: nn.Module, path: str | Path) -> Path:
    """Write the fusion blocks of ``module`` to ``path`` (safetensors) with the sites and their geometry.

    Raises:
        ExportError: a fusion tensor is NaN or infinite (nothing is written), or ``path`` is a directory.
    """
    sites = json.dumps(sorted(_apt(module).sites))
    return _save(fusion_state_dict(module), path, "fusion", {"sites": sites, **_provenance(module)})


def load_fusion(module: nn.Module, path: str | Path) -> None:
    """Load fusion weights written by :func:`export_fusion`; ``module`` must have the same sites and geometry.

    Raises:
        ExportError: the file is missing, corrupt, modified, non-finite or another kind of export, or the
            fusion sites of ``module`` differ from the export's in placement, geometry (heads, widths) or the VLM
            states they read (:func:`context_sources`).
    """
    path = Path(path)
    tensors, metadata = _read(path, "fusion")
    _check_geometry(module, metadata, path)
    _check_context_sources(module, metadata, path)
    select = _fusion_keys(module)
    _load_into(module, tensors, select, "fusion", path)
    _copy(module, tensors, select)


def export_vlm(module: nn.Module, path: str | Path) -> Path:
    """Write the VLM with LoRA adapters merged (if any), loadable into the plain VLM with ``load_state_dict``.

    Raises:
        ExportError: a VLM tensor is NaN or infinite (nothing is written), or ``path`` is a directory.
    """
    layout = attention_layout(_apt(module).vlm_module)
    extra = {"vlm": _apt(module).vlm, LAYOUT_KEY: json.dumps(layout, sort_keys=True), **_provenance(module)}
    return _save(merged_state_dict(_apt(module).vlm_module), path, "vlm", extra)


def load_vlm(module: nn.Module, path: str | Path) -> None:
    """Load a merged VLM export (from :func:`export_vlm`) into the VLM of ``module`` (which must have no LoRA).

    Raises:
        ExportError: the file is missing, corrupt, modified, non-finite or another kind of export, or its keys,
            shapes or head layout differ from the VLM's.
    """
    path = Path(path)
    tensors, metadata = _read(path, "vlm")
    vlm = _apt(module).vlm_module
    select = {k: k for k in vlm.state_dict()}
    _load_into(vlm, tensors, select, "VLM", path)
    _check_layout(attention_layout(vlm), metadata, path, type(vlm).__name__)
    _copy(vlm, tensors, select)
