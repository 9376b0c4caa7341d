"""Checkpoints carry a content digest of their weights, and a checkpoint that fails it is never loaded (issue 20,
item 4): ``load_policy`` and ``apt-lightning fit --ckpt_path`` refuse flipped bytes inside weight storage, naming
the file; a checkpoint written before digests existed still loads, with a warning naming what is not verified."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import APTStageScheduler
from apt_lightning.checksum import DIGEST_KEY, RECORD_KEY, state_dict_digest, verify_checkpoint_digest
from apt_lightning.errors import PolicyCheckpointError, UnverifiedCheckpointWarning
from apt_lightning.models import load_policy
from apt_studies.cli import _check_resume_checkpoint, cli_entry
from helpers import loader, make_policy, trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, object]:
    """A Stage-2 GR00T-style checkpoint written by a Trainer, and the policy that wrote it."""
    root = tmp_path_factory.mktemp("digest")
    policy = make_policy("groot")
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    trainer(2, [APTStageScheduler(switch_at_step=1), checkpoint], enable_checkpointing=True).fit(policy, loader(8))
    return root / "last.ckpt", policy


def flip_weight_byte(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` with one byte flipped in the middle of the largest tensor's storage (the zip
    entry's CRC left as it was, as a disk or copy error would); returns the entry's name."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    data[start + entry.file_size // 2 + 3] ^= 0x7F  # an exponent byte of a float32: a huge or tiny weight
    target.write_bytes(bytes(data))
    return entry.filename


def test_a_library_checkpoint_records_the_digest_of_its_weights(saved):
    path, _ = saved
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[DIGEST_KEY] == state_dict_digest(checkpoint["state_dict"])
    assert verify_checkpoint_digest(checkpoint, path) is True


def test_flipped_bytes_inside_weight_storage_are_refused_and_nothing_is_built(saved, tmp_path, monkeypatch):
    path, policy = saved
    bad = tmp_path / "flipped.ckpt"
    flip_weight_byte(path, bad)
    torch.load(bad, weights_only=True)  # torch itself reads the damaged file without complaint
    built = []
    monkeypatch.setattr(type(policy), "load_from_checkpoint", classmethod(lambda cls, *a, **k: built.append(a)))
    with pytest.raises(PolicyCheckpointError, match=r"flipped\.ckpt failed its content check.*Nothing was loaded"):
        load_policy(bad)
    assert built == []


def test_a_checkpoint_without_a_digest_loads_with_a_warning_naming_what_is_unverified(saved, tmp_path):
    path, _ = saved
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint[DIGEST_KEY], checkpoint[RECORD_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UnverifiedCheckpointWarning, match=r"old\.ckpt records no content digest.*without a corruption"):
        load_policy(tmp_path / "old.ckpt")


def test_a_malformed_digest_entry_is_refused(saved, tmp_path):
    path, _ = saved
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[DIGEST_KEY] = 12345
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(PolicyCheckpointError, match=r"odd\.ckpt has a malformed `apt_state_dict_sha256`"):
        load_policy(tmp_path / "odd.ckpt")


def test_the_digest_covers_dtype_shape_and_names_not_only_values():
    base = state_dict_digest({"a": torch.zeros(4)})
    assert base != state_dict_digest({"a": torch.zeros(4, dtype=torch.float64)})
    assert base != state_dict_digest({"a": torch.zeros(2, 2)})
    assert base != state_dict_digest({"b": torch.zeros(4)})
    assert state_dict_digest({"x": torch.ones(3), "y": torch.zeros(1)}) == state_dict_digest(
        {"y": torch.zeros(1), "x": torch.ones(3)}
    )
    assert state_dict_digest({"x": torch.arange(6.0).view(2, 3).t()}) == state_dict_digest(
        {"x": torch.arange(6.0).view(2, 3).t().contiguous()}
    )


def _written(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.ckpt", r"--ckpt_path .*missing\.ckpt does not exist"),
        (lambda d: d, r"--ckpt_path .* is a directory; pass the \.ckpt file inside it"),
        (lambda d: _written(d / "empty.ckpt", b""), r"empty\.ckpt cannot be read as a PyTorch checkpoint"),
        (lambda d: _written(d / "text.ckpt", b"not a zip"), r"text\.ckpt cannot be read as a PyTorch checkpoint"),
    ],
    ids=["missing", "directory", "empty", "not-a-checkpoint"],
)
def test_a_bad_resume_checkpoint_is_named_before_the_fit(tmp_path, make, match):
    with pytest.raises(PolicyCheckpointError, match=match):
        _check_resume_checkpoint(make(tmp_path))


@pytest.mark.parametrize("damage", ["flipped", "empty"])
def test_cli_fit_with_a_bad_ckpt_path_prints_one_line_and_exits_2(saved, tmp_path, capsys, damage):
    from test_cli import _small_config

    path, _ = saved
    bad = tmp_path / f"{damage}.ckpt"
    flip_weight_byte(path, bad) if damage == "flipped" else bad.write_bytes(b"")
    config = _small_config(tmp_path, "groot_apt")
    with pytest.raises(SystemExit) as exit_info:
        cli_entry(["fit", "--config", str(config), "--ckpt_path", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = "failed its content check" if damage == "flipped" else "cannot be read as a PyTorch checkpoint"
    assert err[-1].startswith(f"apt-lightning: error: {bad}") and expected in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "ckpt").exists()  # no step ran, nothing was written


def test_resuming_a_fit_from_a_corrupted_checkpoint_is_refused_before_any_weight_loads(saved, tmp_path):
    path, _ = saved
    bad = tmp_path / "flipped.ckpt"
    flip_weight_byte(path, bad)
    policy = make_policy("groot")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(PolicyCheckpointError, match=r"flipped\.ckpt failed its content check"):
        trainer(4, [APTStageScheduler(switch_at_step=1)]).fit(policy, loader(8), ckpt_path=str(bad))
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)
