"""A reference policy as a directory (``policy.save_pretrained`` / ``load_policy(dir)`` / ``from_pretrained``): the
policy's config and base weights beside APT's own adapter files, reloaded exactly, and refused when any file changed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from apt_lightning import NotPreparedError, StagePlan
from apt_lightning.models import FlowMatchingPolicy, GR00TStylePolicy, PI0Policy, PolicyCheckpointError, load_policy
from apt_lightning.models.files import POLICY_CONFIG_NAME, POLICY_WEIGHTS_NAME, config_digest
from apt_lightning.pretrained import CONFIG_NAME, WEIGHTS_NAME
from helpers import make_batch, make_policy

FILES = [POLICY_CONFIG_NAME, POLICY_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME]
STAGE_PLANS = {1: StagePlan(first_stage=1, switch_step=10), 2: StagePlan(first_stage=1, switch_step=2)}


def trained_like(arch: str, stage: int, seed: int = 0, **apt) -> FlowMatchingPolicy:
    """A policy prepared at step 3 of a plan in ``stage``, every weight moved off its init (gates and LoRA's zero
    ``lora_B`` included, so the fusion blocks and adapters change the actions)."""
    policy = make_policy(arch, **apt)
    policy.apt.prepare(STAGE_PLANS[stage], step=3)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return policy.eval()


def actions(policy: FlowMatchingPolicy) -> torch.Tensor:
    noise = torch.randn(2, policy.chunk_size, policy.noise_dim, generator=torch.Generator().manual_seed(7))
    return policy.sample_actions(make_batch(["left", "right"]), noise)


def assert_same(loaded: FlowMatchingPolicy, policy: FlowMatchingPolicy) -> None:
    ours, theirs = policy.state_dict(), loaded.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert torch.equal(actions(loaded), actions(policy))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_a_saved_policy_reloads_exactly_in_its_stage(arch, stage, tmp_path):
    policy = trained_like(arch, stage)
    policy.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    base, adapter = load_file(tmp_path / POLICY_WEIGHTS_NAME), load_file(tmp_path / WEIGHTS_NAME)
    vlm = policy.apt.vlm + "."
    assert base and all(k.startswith(vlm) for k in base), "the base file holds the frozen VLM, nothing APT trains"
    assert adapter and not [k for k in adapter if k.startswith(vlm)] and not set(base) & set(adapter)
    assert any("apt_gate" in k for k in adapter)

    loaded = load_policy(tmp_path)
    assert type(loaded) is type(policy) and not loaded.training
    assert (loaded.apt.plan, loaded.apt.step, loaded.apt.stage) == (policy.apt.plan, 3, stage)
    assert_same(loaded, policy)
    assert_same(type(policy).from_pretrained(tmp_path), policy)

    other = trained_like(arch, stage, seed=1)  # same structure, other weights: the checks above can fail
    assert not torch.equal(actions(other), actions(policy))
    with pytest.raises(AssertionError):
        assert_same(other, policy)


def test_lora_adapters_travel_in_the_apt_files_and_the_base_vlm_in_the_policy_file(tmp_path):
    policy = trained_like("groot", 2, vlm_mode="lora")
    policy.save_pretrained(tmp_path)
    base, adapter = load_file(tmp_path / POLICY_WEIGHTS_NAME), load_file(tmp_path / WEIGHTS_NAME)
    vlm = policy.apt.vlm + "."
    lora = [k for k in adapter if k.startswith(vlm)]
    assert lora and all(".lora_" in k for k in lora)
    assert not [k for k in base if "lora_" in k or "base_layer" in k], "base weights under the VLM's own keys"
    loaded = GR00TStylePolicy.from_pretrained(tmp_path)
    assert_same(loaded, policy)
    assert not torch.equal(actions(trained_like("groot", 2, seed=1, vlm_mode="lora")), actions(policy))


def flip_a_byte(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    trained_like("pi0", 2).save_pretrained(directory)
    return directory


def copy_of(saved, tmp_path):
    for name in FILES:
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    return tmp_path


@pytest.mark.parametrize("at", [0.002, 0.3, 0.97])
@pytest.mark.parametrize("name", FILES)
def test_a_flipped_byte_in_any_file_is_refused_naming_the_file(saved, tmp_path, name, at):
    directory = copy_of(saved, tmp_path)
    flip_a_byte(directory / name, at)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as refused:
        load_policy(directory)
    message = str(refused.value)
    assert "\n" not in message and "again" in message, message  # one line, with the fix


@pytest.mark.parametrize("name", FILES)
def test_one_file_of_a_directory_passed_to_load_policy_names_the_directory_to_pass(saved, name):
    with pytest.raises(PolicyCheckpointError, match=r"is one file of a policy directory.*pass the directory"):
        load_policy(saved / name)


def test_an_edited_config_is_refused_and_a_crafted_one_downloads_nothing(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    path = directory / POLICY_CONFIG_NAME
    body = json.loads(path.read_text())
    edited = {**body, "init_args": {**body["init_args"], "fusion_heads": 4}}
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"policy_config\.json failed its content check"):
        load_policy(directory)

    record = json.loads((directory / CONFIG_NAME).read_text())
    record["record"]["step"] = 5
    path.write_text(json.dumps(body))
    (directory / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"apt_config\.json is missing or differs"):
        load_policy(directory)
    (directory / CONFIG_NAME).write_bytes((saved / CONFIG_NAME).read_bytes())

    # a file crafted with a valid digest still cannot choose code or a download
    crafted = {**body, "policy_class": "os.system"}
    crafted["config_sha256"] = config_digest(crafted)
    path.write_text(json.dumps(crafted))
    with pytest.raises(ValueError, match=r"`policy_class`='os\.system', which is not a subclass"):
        load_policy(directory)
    crafted = {**body, "init_args": {**body["init_args"], "vlm_pretrained": str(tmp_path / "nowhere")}}
    crafted["config_sha256"] = config_digest(crafted)
    path.write_text(json.dumps(crafted))
    assert load_policy(directory).apt.stage == 2  # the path was set to None, never read


def test_loading_needs_the_saved_class_and_a_prepared_policy_to_save(saved, tmp_path):
    with pytest.raises(ValueError, match="holds a PI0Policy, not a GR00TStylePolicy"):
        GR00TStylePolicy.from_pretrained(saved)
    assert type(FlowMatchingPolicy.from_pretrained(saved)) is PI0Policy
    with pytest.raises(ValueError, match=r"No policy_config\.json"):
        load_policy(tmp_path)
    with pytest.raises(NotPreparedError):
        make_policy("pi0").save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
