"""Faulty exports are refused with an error that names the file and says what to do, never loaded silently."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from apt_lightning import (
    AptError,
    __version__,
    export_fusion,
    export_va_prior,
    export_vlm,
    load_fusion,
    load_va_prior,
)
from apt_lightning.errors import ExportError, UnverifiedExportWarning
from apt_lightning.export import (
    HASH_KEY,
    content_hash,
    fusion_geometry,
    load_vlm,
    verify_export,
)
from apt_lightning.models import GR00TStylePolicy, tiny_paligemma_config
from apt_lightning.schedule import StagePlan
from helpers import make_policy


def stage2_policy(num_heads: int | None = None):
    """Tiny GR00T-style policy with fusion sites injected; ``num_heads`` overrides the fusion heads."""
    policy = make_policy("groot")
    if num_heads is not None:
        policy.apt.fusion = dataclasses.replace(policy.apt.fusion, num_heads=num_heads)
    policy.apt.prepare(StagePlan(first_stage=2))
    return policy


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()
        return {k: handle.get_tensor(k) for k in names}, dict(handle.metadata())


def named(path: Path) -> str:
    return re.escape(str(path))


def test_fusion_heads_mismatch_with_equal_shapes_is_refused_naming_both(tmp_path):
    two, one = stage2_policy(num_heads=2), stage2_policy(num_heads=1)
    assert {k: v.shape for k, v in two.state_dict().items()} == {k: v.shape for k, v in one.state_dict().items()}
    assert next(iter(fusion_geometry(two).values()))["head_dim"] == 16
    path = export_fusion(two, tmp_path / "fusion.safetensors")
    before = {k: v.clone() for k, v in one.state_dict().items()}
    with pytest.raises(ExportError, match=r"num_heads=2, head_dim=16 vs model num_heads=1, head_dim=32") as info:
        load_fusion(one, path)
    message = str(info.value)
    assert str(path) in message and "Build the model with the export's FusionConfig" in message
    assert '"num_heads": 2' in message  # the recorded config, so the user can rebuild the right model
    assert all(torch.equal(v, before[k]) for k, v in one.state_dict().items())  # nothing was loaded
    load_fusion(stage2_policy(num_heads=2), path)  # the matching model loads it


def test_fusion_export_into_a_model_without_sites_says_to_inject_first(tmp_path):
    path = export_fusion(stage2_policy(), tmp_path / "fusion.safetensors")
    with pytest.raises(ExportError, match=r"has fusion sites \[\]\. Inject fusion first"):
        load_fusion(make_policy("groot"), path)


def test_prior_with_other_expert_heads_but_equal_shapes_is_refused(tmp_path):
    def policy(heads: int) -> GR00TStylePolicy:
        torch.manual_seed(0)
        return GR00TStylePolicy(tiny_paligemma_config(), select_layer=1, head_width=32, head_depth=2, head_heads=heads)

    path = export_va_prior(policy(2), tmp_path / "prior.safetensors")
    with pytest.raises(
        ExportError,
        match=r"action_head\.blocks\.0\.attn`: export \{'num_heads': 2\} vs model "
        r"\{'num_heads': 1\}.*Build the model with the configuration",
    ):
        load_va_prior(policy(1), path)


def test_prior_ignores_fusion_geometry_and_loads_with_or_without_sites(tmp_path):
    with_sites = export_va_prior(stage2_policy(num_heads=2), tmp_path / "a.safetensors")
    without = export_va_prior(make_policy("groot"), tmp_path / "b.safetensors")
    load_va_prior(make_policy("groot"), with_sites)
    load_va_prior(stage2_policy(num_heads=1), without)


def flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_tensor_data_fail_the_content_hash(tmp_path):
    path = export_fusion(stage2_policy(), tmp_path / "fusion.safetensors")
    flip_byte(path, 7)  # inside the last tensor's raw data; the header still parses
    with pytest.raises(
        ExportError,
        match=named(path) + r" failed its content check.*modified or corrupted after "
        r"export: copy it again from its source, or re-export it",
    ):
        load_fusion(stage2_policy(), path)


def test_edited_metadata_fails_the_content_hash(tmp_path):
    path = export_fusion(stage2_policy(num_heads=2), tmp_path / "fusion.safetensors")
    tensors, metadata = read(path)
    metadata["apt_fusion_geometry"] = metadata["apt_fusion_geometry"].replace('"num_heads": 2', '"num_heads": 1')
    save_file(tensors, str(path), metadata=metadata)  # someone "fixes" the geometry to force a load
    with pytest.raises(ExportError, match="failed its content check"):
        load_fusion(stage2_policy(num_heads=1), path)


def test_nan_written_into_an_export_is_refused_by_hash_then_by_finiteness(tmp_path):
    path = export_va_prior(make_policy("groot"), tmp_path / "prior.safetensors")
    tensors, metadata = read(path)
    key = min(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)  # metadata kept: the recorded hash no longer matches
    with pytest.raises(ExportError, match=r"failed its content check.*re-export it with export_va_prior\(\)"):
        load_va_prior(make_policy("groot"), path)

    metadata[HASH_KEY] = content_hash(tensors, metadata)  # a consistent hash: only the finiteness check is left
    save_file(tensors, str(path), metadata=metadata)
    expected = rf" contains NaN or Inf in 1 tensor\(s\): \['{re.escape(key)}'\].*re-export from a healthy checkpoint"
    with pytest.raises(ExportError, match=named(path) + expected):
        load_va_prior(make_policy("groot"), path)


def test_export_of_a_nan_weight_is_refused_and_writes_nothing(tmp_path):
    policy = stage2_policy()
    site = next(iter(policy.apt.sites.values()))
    with torch.no_grad():
        site.apt_fusion.apt_gate_ff.fill_(float("inf"))
    target = tmp_path / "out" / "fusion.safetensors"
    with pytest.raises(
        ExportError,
        match=r"Refusing to export fusion to .*contain NaN or Inf: \[.*apt_gate_ff'\]\. "
        r"Nothing was written\. Export from the last checkpoint",
    ):
        export_fusion(policy, target)
    assert not target.exists() and not any(tmp_path.rglob("*"))  # no final file, no temporary left behind


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:-100])
    return path


def random_bytes(path: Path) -> Path:
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def directory(path: Path) -> Path:
    path.unlink()
    path.mkdir()
    return path


def missing(path: Path) -> Path:
    path.unlink()
    return path


@pytest.mark.parametrize(
    ("damage", "advice"),
    [
        (truncated, r"truncated, corrupt or not a safetensors file\. Copy it again from its source, or re-export"),
        (random_bytes, r"truncated, corrupt or not a safetensors file\. Copy it again"),
        (empty, r"truncated, corrupt or not a safetensors file"),
        (directory, r"is a directory, not an export: pass the \.safetensors file written by export_fusion\(\)"),
        (missing, r"the file does not exist\. Check the path, or write it with export_fusion\(\)"),
    ],
    ids=lambda case: getattr(case, "__name__", ""),
)
def test_unreadable_file_error_names_the_file(tmp_path, damage, advice):
    policy = stage2_policy()
    path = damage(export_fusion(policy, tmp_path / "fusion.safetensors"))
    with pytest.raises(ExportError, match=named(path) + ".*" + advice):
        load_fusion(policy, path)
    with pytest.raises(ValueError):  # ExportError is also a ValueError for callers who do not know it
        verify_export(path)


def test_wrong_kind_is_refused_with_the_right_loader(tmp_path):
    policy = stage2_policy()
    path = export_fusion(policy, tmp_path / "fusion.safetensors")
    with pytest.raises(ExportError, match=named(path) + r" is not an APT 'va_prior' export .*load it with load_fusion"):
        load_va_prior(policy, path)
    with pytest.raises(ExportError, match=r"is not an APT 'vlm' export"):
        load_vlm(policy, path)


def test_export_into_a_directory_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"it is a directory\. Pass a file path"):
        export_fusion(stage2_policy(), tmp_path)


@pytest.mark.parametrize("export", [export_va_prior, export_fusion, export_vlm], ids=lambda f: f.__name__)
def test_every_export_records_version_geometry_and_hash(tmp_path, export):
    policy = stage2_policy(num_heads=2)
    metadata = verify_export(export(policy, tmp_path / "x.safetensors"))
    assert metadata["apt_version"] == __version__ and metadata["apt_format_version"] == "2"
    geometry = json.loads(metadata["apt_fusion_geometry"])
    assert geometry == fusion_geometry(policy) and len(geometry) == 2
    assert {g["num_heads"] for g in geometry.values()} == {2}
    assert json.loads(metadata["apt_fusion_config"])["num_heads"] == 2
    assert len(metadata[HASH_KEY]) == 64


def test_old_format_export_loads_with_a_warning(tmp_path):
    policy = stage2_policy()
    path = tmp_path / "old.safetensors"
    tensors, _ = read(export_fusion(policy, path))
    save_file(tensors, str(path), metadata={"apt_format": "fusion", "sites": "[]"})  # as written before 0.2
    with pytest.warns(
        UnverifiedExportWarning,
        match=named(path) + r" was written before verified exports.*export "
        r"it again",
    ):
        load_fusion(policy, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedExportWarning)  # the strict opt-in refuses it
        with pytest.raises(UnverifiedExportWarning):
            load_fusion(policy, path)


def test_export_error_is_an_apt_error_and_a_value_error():
    assert issubclass(ExportError, AptError) and issubclass(ExportError, ValueError)
