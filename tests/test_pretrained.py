"""peft-style adapter files: ``apt.save_pretrained(dir)`` and ``model.apt.load_pretrained(dir)`` into a model the
user's own code built fresh, exactly, and refused when the files do not describe that model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt_lightning import APTConfig, ConfigError, ExportError, FusionConfig, StageMismatchError, StagePlan
from apt_lightning.pretrained import CONFIG_NAME, WEIGHTS_NAME
from plain_vla import DIM, SWITCH, PlainVLA, build, optimizer_of, sample, train


def trained(steps: int = SWITCH + 2) -> PlainVLA:
    model = build()
    optimizer, scheduler = optimizer_of(model)
    train(model, optimizer, scheduler, steps)
    return model


def fresh(seed: int = 1, **fusion_changes) -> PlainVLA:
    """The user's own constructor with another seed, but the same pretrained VLM (copied from seed 0's)."""
    torch.manual_seed(0)
    vlm = PlainVLA().vlm.state_dict()
    torch.manual_seed(seed)
    model = PlainVLA()
    model.vlm.load_state_dict(vlm)
    if fusion_changes:
        model.apt.fusion = FusionConfig(
            **{
                "target_modules": r"blocks\.\d+",
                "num_heads": 2,
                "hidden_dim": DIM,
                "context_dim": DIM,
                **fusion_changes,
            }
        )
    return model


def test_a_saved_model_reloads_into_a_fresh_one_exactly(tmp_path):
    model = trained()
    model.apt.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    stored = load_file(tmp_path / WEIGHTS_NAME)
    assert not [k for k in stored if k.startswith("vlm.")], "a frozen VLM is the user's pretrained one: not copied"
    assert "blocks.0.apt_fusion.apt_gate_attn" in stored and "blocks.0.self_attn.in_proj_weight" in stored
    reloaded = fresh()
    reloaded.apt.load_pretrained(tmp_path)
    assert reloaded.apt.plan == model.apt.plan and reloaded.apt.step == model.apt.step and reloaded.apt.stage == 2
    for word in (0, 1):
        assert torch.equal(sample(reloaded, word), sample(model, word))


def test_a_differently_configured_model_is_refused_by_name(tmp_path):
    trained().apt.save_pretrained(tmp_path)
    other = fresh(num_heads=4)
    with pytest.raises(ConfigError, match=r"`fusion\.num_heads`: saved 2, this model 4"):
        other.apt.load_pretrained(tmp_path)
    assert not other.apt.is_prepared and not other.apt.sites, "a refusal changes nothing"


def test_another_base_vlm_is_refused(tmp_path):
    trained().apt.save_pretrained(tmp_path)
    other = fresh()
    with torch.no_grad():
        other.vlm["patch"].weight.add_(1e-3)
    with pytest.raises(ExportError, match=r"not the base VLM .* was trained on"):
        other.apt.load_pretrained(tmp_path)


def test_modified_weights_or_config_are_refused(tmp_path):
    trained().apt.save_pretrained(tmp_path)
    weights = load_file(tmp_path / WEIGHTS_NAME)
    weights["action_out.bias"] = weights["action_out.bias"] + 1
    save_file(weights, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ExportError, match="failed its content check"):
        fresh().apt.load_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(ExportError, match="cannot be read as JSON"):
        fresh().apt.load_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"No apt_config\.json"):
        fresh().apt.load_pretrained(tmp_path / "nowhere")


def test_a_corrupted_record_is_refused_before_anything_changes(tmp_path):
    trained().apt.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["record"]["step"] = SWITCH - 1  # one flipped field: the record's stage no longer follows from its plan
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    other = fresh()
    with pytest.raises(ConfigError, match="inconsistent: it records `stage`=2"):
        other.apt.load_pretrained(tmp_path)
    assert not other.apt.is_prepared


def test_a_model_prepared_under_another_plan_is_refused(tmp_path):
    trained().apt.save_pretrained(tmp_path)
    other = fresh()
    other.apt.prepare(StagePlan(first_stage=2))
    with pytest.raises(StageMismatchError):
        other.apt.load_pretrained(tmp_path)


def test_lora_adapters_travel_and_the_base_vlm_does_not(tmp_path):
    def lora_model(seed: int) -> PlainVLA:
        model = fresh(seed)
        model.apt.config = APTConfig(lr=3e-3, warmup_steps=0, vlm_mode="lora", lora_target_modules=["patch"])
        return model

    model = lora_model(0)
    model.apt.prepare(StagePlan(first_stage=2))
    optimizer, scheduler = optimizer_of(model)
    train(model, optimizer, scheduler, 3)
    model.apt.save_pretrained(tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    vlm_keys = sorted(k for k in stored if k.startswith("vlm."))
    assert vlm_keys and all("lora_" in k for k in vlm_keys)
    reloaded = lora_model(1)
    reloaded.apt.load_pretrained(tmp_path)
    assert torch.equal(sample(reloaded, 0), sample(model, 0))
    model.apt.unload()
    assert not model.apt.is_prepared and not model.apt.sites
    assert not [k for k in model.state_dict() if "lora_" in k or "apt_" in k or "base_layer" in k]
