"""A checkpoint names the model it holds and is read without unpickling code (issue 26, items 1 and 5).

The digest covers every part that changes what the loaded model computes or where a resumed fit continues
(weights, APT's record, hyper-parameters, step, optimizer state); its own key name and shape are checked; every
loader of the reference policies (``load_policy``, ``load_from_checkpoint``, ``Trainer.fit(ckpt_path=)``) reads
with ``weights_only=True`` whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, and refuses a checkpoint whose
recorded configuration differs from the model it loads into. A failed checkpoint write leaves no partial file."""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import APTStageScheduler
from apt_lightning.checksum import (
    DIGEST_KEY,
    PARTS,
    RECORD_KEY,
    CheckpointWriteError,
    VerifiedCheckpointIO,
    atomic_torch_save,
    verify_checkpoint_digest,
)
from apt_lightning.errors import AptError, PolicyCheckpointError
from apt_lightning.models import PI0Policy, load_policy, tiny_pi0_config
from helpers import loader, make_batch, make_policy, trainer


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A pi0 checkpoint written by a Trainer after the switch (Stage 2), with optimizer state."""
    root = tmp_path_factory.mktemp("record")
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
    trainer(2, [APTStageScheduler(switch_at_step=1), checkpoint], enable_checkpointing=True).fit(
        make_policy("pi0"), loader(8)
    )
    return root / "last.ckpt"


def _rewritten(source: Path, target: Path, change) -> Path:
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)
    return target


def _first_exp_avg_sq(checkpoint: dict) -> torch.Tensor:
    state = checkpoint["optimizer_states"][0]["state"]
    return next(v["exp_avg_sq"] for v in state.values() if "exp_avg_sq" in v)


def _flip_exponent(tensor: torch.Tensor) -> None:
    tensor.view(-1)[:1].view(torch.int32).bitwise_xor_(1 << 27)  # one exponent bit: no NaN, no inf


CHANGES = {
    "global_step": lambda c: c.__setitem__("global_step", c["global_step"] ^ 1),
    "apt": lambda c: c.__setitem__("apt", {**c["apt"], "step": (c["apt"].get("step") or 0) ^ 4}),
    "hyper_parameters": lambda c: c["hyper_parameters"]["config"].__setitem__(
        "num_inference_steps", c["hyper_parameters"]["config"]["num_inference_steps"] ^ 8
    ),
    "optimizer_states": lambda c: _flip_exponent(_first_exp_avg_sq(c)),
}


def test_the_digest_records_every_part_of_the_checkpoint_that_changes_the_model_or_the_resume(saved):
    checkpoint = torch.load(saved, weights_only=True)
    record = checkpoint[RECORD_KEY]
    assert {"state_dict", "apt", "hyper_parameters", "policy_class", "global_step", "optimizer_states"} <= set(record)
    assert set(record) == {name for name in PARTS if name in checkpoint}
    assert record["state_dict"] == checkpoint[DIGEST_KEY]
    assert verify_checkpoint_digest(checkpoint, saved, parts=None) is True


@pytest.mark.parametrize("part", CHANGES)
def test_one_changed_value_outside_the_weights_is_refused_by_every_loader(saved, tmp_path, part):
    bad = _rewritten(saved, tmp_path / f"{part}.ckpt", CHANGES[part])
    what = f"`{part}` hash to"
    with pytest.raises(PolicyCheckpointError, match=rf"{part}\.ckpt failed its content check: its {what}"):
        load_policy(bad)
    with pytest.raises(PolicyCheckpointError, match=rf"{part}\.ckpt failed its content check"):
        PI0Policy.load_from_checkpoint(bad)
    with pytest.raises(PolicyCheckpointError, match=rf"{part}\.ckpt failed its content check"):
        VerifiedCheckpointIO().load_checkpoint(bad)
    policy = make_policy("pi0")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(PolicyCheckpointError, match=rf"{part}\.ckpt failed its content check"):
        trainer(4, [APTStageScheduler(switch_at_step=1)]).fit(policy, loader(8), ckpt_path=str(bad))
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (RECORD_KEY, "apt_checkpoint_sha257"),
        (RECORD_KEY, "apt_checkpoint_sh`256"),
        (DIGEST_KEY, "apt_state_dict_sha2v6"),
    ],
)
def test_a_flipped_bit_in_a_digest_key_name_does_not_turn_verification_off(saved, tmp_path, old, new):
    def rename(checkpoint):
        checkpoint[new] = checkpoint.pop(old)

    bad = _rewritten(saved, tmp_path / "renamed.ckpt", rename)
    for load in (load_policy, PI0Policy.load_from_checkpoint, VerifiedCheckpointIO().load_checkpoint):
        with pytest.raises(PolicyCheckpointError, match=rf"renamed\.ckpt holds the top-level key '{new}', a damaged"):
            load(bad)


@pytest.mark.parametrize(
    "value",
    [{"state_dict": "0" * 63}, {"state_dict": "A" * 64}, "0" * 64, {"stat_dict": "0" * 64}],
    ids=["short", "upper", "not-a-dict", "bad-part"],
)
def test_a_malformed_digest_record_is_refused(saved, tmp_path, value):
    bad = _rewritten(saved, tmp_path / "odd.ckpt", lambda c: c.__setitem__(RECORD_KEY, value))
    with pytest.raises(PolicyCheckpointError, match=r"odd\.ckpt has a malformed `apt_checkpoint_sha256` entry"):
        load_policy(bad)


def test_a_digest_made_invalid_utf8_is_one_line_naming_the_file_not_a_unicode_error(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    digest = torch.load(saved, weights_only=True)[DIGEST_KEY].encode()
    at = data.index(digest)  # the pickled string, stored uncompressed in data.pkl
    data[at + 5] = 0xFF
    bad = tmp_path / "utf8.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnicodeDecodeError):
        torch.load(bad, weights_only=True)  # what a raw load gives
    for load in (load_policy, PI0Policy.load_from_checkpoint, VerifiedCheckpointIO().load_checkpoint):
        with pytest.raises(PolicyCheckpointError) as info:
            load(bad)
        message = str(info.value)
        assert message.startswith(str(bad)) and "UnicodeDecodeError" in message and "\n" not in message
        assert not isinstance(info.value, UnicodeDecodeError)


# ---------------------------------------------------------------------------- weights_only, whatever the environment
class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint could run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _planted(saved: Path, target: Path, marker: Path) -> Path:
    checkpoint = torch.load(saved, weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = _Payload(marker)
    torch.save(checkpoint, target)
    return target


def test_a_planted_payload_never_runs_even_with_torch_force_no_weights_only_load(saved, tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    bad = _planted(saved, tmp_path / "planted.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    loaders = {
        "load_policy": lambda: load_policy(bad),
        "load_from_checkpoint": lambda: PI0Policy.load_from_checkpoint(bad),
        "checkpoint_io": lambda: VerifiedCheckpointIO().load_checkpoint(bad),
        "Trainer.fit": lambda: trainer(4, [APTStageScheduler(switch_at_step=1)]).fit(
            make_policy("pi0"), loader(8), ckpt_path=str(bad)
        ),
    }
    for name, load in loaders.items():
        with pytest.raises(PolicyCheckpointError, match=r"planted\.ckpt cannot be read.*never unpickled"):
            load()
        assert not marker.exists(), f"{name} ran the planted payload"


def test_weights_only_false_is_refused_by_the_reference_loaders(saved):
    with pytest.raises(PolicyCheckpointError, match=r"weights_only=False"):
        PI0Policy.load_from_checkpoint(saved, weights_only=False)
    with pytest.raises(PolicyCheckpointError, match=r"weights_only=False"):
        VerifiedCheckpointIO().load_checkpoint(saved, weights_only=False)


# ---------------------------------------------------------------------------- the checkpoint names its model
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fusion_heads=4), r"`fusion_heads`: checkpoint 2, here 4"),
        (dict(fusion_options={"gate": "sigmoid"}), r"`fusion_options`: checkpoint None, here \{'gate': 'sigmoid'\}"),
        (dict(config=tiny_pi0_config(num_inference_steps=9)), r"`config.num_inference_steps`: checkpoint 5, here 9"),
    ],
    ids=["fusion_heads", "fusion_options", "config"],
)
def test_load_from_checkpoint_refuses_arguments_the_checkpoint_was_not_trained_with(saved, kwargs, match):
    with pytest.raises(PolicyCheckpointError, match=rf"last\.ckpt was trained as a different model.*{match}"):
        PI0Policy.load_from_checkpoint(saved, **kwargs)


def test_load_from_checkpoint_with_the_recorded_values_loads_the_same_model(saved):
    reference = load_policy(saved)
    same = PI0Policy.load_from_checkpoint(saved, fusion_heads=2, per_site_language=False).eval()
    batch, noise = make_batch(["left", "right"]), torch.randn(2, 4, reference.noise_dim)
    assert torch.equal(reference.sample_actions(batch, noise), same.sample_actions(batch, noise))


def test_resuming_into_a_differently_built_model_is_refused_before_any_weight_loads(saved):
    torch.manual_seed(0)
    policy = PI0Policy(tiny_pi0_config(), fusion_heads=4)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(PolicyCheckpointError, match=r"trained as a different PI0Policy.*`fusion_heads`: checkpoint 2"):
        trainer(4, [APTStageScheduler(switch_at_step=1)]).fit(policy, loader(8), ckpt_path=str(saved))
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)


# ---------------------------------------------------------------------------- atomic writes
def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "step=4.ckpt"
    atomic_torch_save({"a": torch.zeros(3)}, target)
    real_save = torch.save

    def disk_full(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"step=4\.ckpt \(OSError: No space left on device\); no partial"):
        atomic_torch_save({"a": torch.ones(3)}, target)
    assert isinstance(CheckpointWriteError("x"), (AptError, OSError))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=4.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(3))


def test_a_full_disk_during_a_trainer_checkpoint_leaves_no_truncated_file(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def full_on_the_second(obj, file, *args, **kwargs):
        calls.append(1)
        real_save(obj, file, *args, **kwargs)
        if len(calls) == 2:
            file.truncate(100)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_on_the_second)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(CheckpointWriteError, match=r"step=2\.ckpt"):
        trainer(4, [APTStageScheduler(switch_at_step=1), checkpoint], enable_checkpointing=True).fit(
            make_policy("groot"), loader(8)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt"]
    monkeypatch.setattr(torch, "save", real_save)
    assert load_policy(tmp_path / "step=1.ckpt") is not None
