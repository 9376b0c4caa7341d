"""``load_policy`` builds only registered policy classes and never contacts a hub, whatever a checkpoint says."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint

from apt_lightning import AptError, APTStageScheduler
from apt_lightning.checksum import add_checkpoint_digest
from apt_lightning.models import FlowMatchingPolicy, PolicyCheckpointError, load_policy, registered_policies
from helpers import loader, make_batch, make_policy, trainer


def _fake_checkpoint(path, policy_class):
    torch.save({"policy_class": policy_class, "state_dict": {}, "hyper_parameters": {}}, path)
    return path


def test_registry_holds_the_reference_policies_and_not_the_base():
    names = registered_policies()
    assert names["apt_lightning.models.pi0.PI0Policy"].__name__ == "PI0Policy"
    assert names["apt_lightning.models.groot.GR00TStylePolicy"].__name__ == "GR00TStylePolicy"
    assert all(issubclass(cls, FlowMatchingPolicy) and cls is not FlowMatchingPolicy for cls in names.values())


@pytest.mark.parametrize(
    "policy_class",
    [
        "os.system",  # a function, not a class
        "subprocess.Popen",  # a class, not a policy
        "collections.OrderedDict",
        "apt_lightning.models.base.FlowMatchingPolicy",  # the abstract base is not buildable
        "apt_lightning.models.pi0.PI0Policy.__init__",
        "",
        42,
    ],
)
def test_a_checkpoint_naming_something_else_than_a_policy_is_refused(tmp_path, policy_class):
    path = _fake_checkpoint(tmp_path / "crafted.ckpt", policy_class)
    known = r"not a subclass of FlowMatchingPolicy.*known classes: .*PI0Policy"
    with pytest.raises(PolicyCheckpointError, match=known) as error:
        load_policy(path)
    assert isinstance(error.value, AptError) and isinstance(error.value, ValueError)
    assert "import the module that defines it" in str(error.value)


def test_the_module_a_checkpoint_names_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "planted_policy_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\nclass Policy: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _fake_checkpoint(tmp_path / "crafted.ckpt", "planted_policy_module.Policy")
    with pytest.raises(PolicyCheckpointError, match=r"planted_policy_module\.Policy"):
        load_policy(path)
    assert not marker.exists() and "planted_policy_module" not in sys.modules


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "cannot be read as a PyTorch checkpoint"), (b"not a zip file", "cannot be read as a PyTorch checkpoint")],
)
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_error(tmp_path, content, message):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(PolicyCheckpointError, match=f"broken.ckpt {message}.*Pass a .ckpt file"):
        load_policy(path)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(PolicyCheckpointError, match=r"missing\.ckpt cannot be read.*No such file"):
        load_policy(tmp_path / "missing.ckpt")


def _refuse_downloads(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError(f"from_pretrained called with {args} while loading a checkpoint")

    for cls in (transformers.AutoModel, transformers.PI0ForConditionalGeneration, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", no_hub)


def test_hub_ids_in_a_checkpoint_are_never_fetched(arch, tmp_path, monkeypatch):
    policy = make_policy(arch)
    trainer(
        2,
        [APTStageScheduler(switch_at_step=1), ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_checkpointing=True,
    ).fit(policy, loader(size=8))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"].update(
        pretrained="attacker/pi0-weights",
        vlm_pretrained="attacker/vlm-weights",
        _instantiator="builtins.exec",
        _class_path="os.system",  # not Lightning's trusted instantiator either
    )
    add_checkpoint_digest(checkpoint)  # the digest is no signature: an attacker recomputes it
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    _refuse_downloads(monkeypatch)
    loaded = load_policy(tmp_path / "crafted.ckpt")
    assert type(loaded) is type(policy) and loaded.apt.stage == policy.apt.stage == 2
    batch, noise = make_batch(["left", "right"]), torch.randn(2, policy.chunk_size, policy.noise_dim)
    assert torch.equal(loaded.sample_actions(batch, noise), policy.eval().sample_actions(batch, noise))
