"""The ``lerobot_policy_apt`` plugin through LeRobot's own entry points: ``lerobot-train`` (a subprocess, unchanged)
trains ``smolvla_apt`` through both stages and resumes exactly; ``PreTrainedPolicy.from_pretrained`` and
``make_pre_post_processors(cfg, pretrained_path=...)`` deploy what was saved, returning the trained policy's actions
exactly; a plain LeRobot class refuses an APT directory; bad input fails before step 0 with an AptError."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip(
    "lerobot",
    reason="LeRobot 0.6.1 is not installed here (it needs Python >= 3.12 and torch < 2.12): these tests run in the "
    "second step of .ci/run, in their own venv",
)

import lerobot_policy_apt  # the plugin distribution: `pip install -e plugins/lerobot_policy_apt` (.ci/run does)
import torch
from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import FeatureType
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
from lerobot.utils.feature_utils import dataset_to_policy_features
from lerobot_runs import REPO_ID, run_cli
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from apt_lightning import AptError, StageMismatchError, StagePlan, UnverifiedCheckpointWarning
from apt_lightning.integrations.lerobot import INSTRUCTION_MASK
from apt_lightning.integrations.lerobot._compat import APTPolicyLoadError, LeRobotBatchError, PromptTruncationError
from apt_lightning.integrations.lerobot.tiny import (
    tiny_builds,
    tiny_pi_config,
    tiny_smolvla_config,
)
from apt_lightning.pretrained import CONFIG_NAME, WEIGHTS_NAME

KINDS = ["pi0", "pi05", "smolvla"]
CONFIGS = {
    "pi0": lerobot_policy_apt.PI0APTConfig,
    "pi05": lerobot_policy_apt.PI05APTConfig,
    "smolvla": lerobot_policy_apt.SmolVLAAPTConfig,
}


def build_context(kind: str):
    """PI0/PI05 build tiny only inside :func:`tiny_builds` (LeRobot fixes their Gemma sizes)."""
    return contextlib.nullcontext() if kind == "smolvla" else tiny_builds(kind)


def plugin_config(kind: str, assets: Path, **options):
    """The plugin's config for ``kind``, with the dataset's features (as ``make_policy`` sets them)."""
    features = dataset_to_policy_features(LeRobotDatasetMetadata(REPO_ID, root=assets / "dataset").features)
    io = dict(
        input_features={k: f for k, f in features.items() if f.type is not FeatureType.ACTION},
        output_features={"action": features["action"]},
        config_class=CONFIGS[kind],
        **options,
    )
    if kind == "smolvla":
        return tiny_smolvla_config(assets / "smolvlm", **{"tokenizer_max_length": 24, **io})
    return tiny_pi_config(kind, **{"tokenizer_max_length": 32, "apt_tokenizer_name": str(assets / "tokenizer"), **io})


def build(kind: str, config, seed: int = 0):
    with build_context(kind):
        torch.manual_seed(seed)
        return get_policy_class(config.type)(config)


def load(kind: str, directory: Path, **kwargs):
    """LeRobot's loading path: the registered type's ``PreTrainedPolicy.from_pretrained``."""
    config = PreTrainedConfig.from_pretrained(directory)
    with build_context(kind):
        return get_policy_class(config.type).from_pretrained(directory, **kwargs)


def raw_batch(config, assets: Path, tasks: list[str] | None = None, start: int = 0):
    """Dataset frames as LeRobot's loader gives them (action chunks, task strings), before the pre-processor."""
    meta = LeRobotDatasetMetadata(REPO_ID, root=assets / "dataset")
    dataset = LeRobotDataset(REPO_ID, root=assets / "dataset", delta_timestamps=resolve_delta_timestamps(config, meta))
    batch = default_collate([dataset[start + i] for i in range(2)])
    if tasks is not None:
        batch["task"] = tasks
    return batch, meta


def chunk_noise(config, seed: int = 11) -> torch.Tensor:
    return torch.randn(2, config.chunk_size, config.max_action_dim, generator=torch.Generator().manual_seed(seed))


def train_steps(policy, batch, steps: int) -> None:
    """LeRobot's update: forward, backward, the preset AdamW over get_optim_params, then update()."""
    optimizer = torch.optim.AdamW(policy.get_optim_params())
    for _ in range(steps):
        policy.train()
        loss, _ = policy.forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        policy.update()


# ---------------------------------------------------------------------- lerobot-train, unchanged, in a subprocess
def _record(directory: Path) -> dict:
    return json.loads(json.loads((directory / "config.json").read_text())["apt_record"])


def test_lerobot_train_runs_both_stages_on_lerobots_optimizer_steps(smolvla_run):
    at2, at4 = (smolvla_run / f"00000{s}/pretrained_model" for s in (2, 4))
    assert _record(at2)["step"] == 2 and _record(at4)["step"] == 4 and _record(at4)["stage"] == 2
    assert json.loads((at4 / CONFIG_NAME).read_text())["record"]["step"] == 4  # APT's own files, beside LeRobot's
    w2, w4 = load_file(at2 / "model.safetensors"), load_file(at4 / "model.safetensors")
    gates = [k for k in w2 if ".apt_fusion.apt_gate_" in k]
    vlm = [k for k in w2 if ".vlm_with_expert.vlm." in k]
    assert gates and vlm
    assert all(torch.count_nonzero(w2[k]) == 0 for k in gates)  # Stage 1: the gates took no update
    assert any(torch.count_nonzero(w4[k]) > 0 for k in gates)  # Stage 2: they opened
    assert all(torch.equal(w2[k], w4[k]) for k in vlm)  # frozen VLM: bit-identical
    groups = json.loads((smolvla_run / "000004/training_state/optimizer_param_groups.json").read_text())
    lrs = {g["name"]: g["initial_lr"] for g in groups}
    assert set(lrs) == {"expert", "fusion", "gates"} and lrs["gates"] == pytest.approx(10 * lrs["expert"])
    state2 = load_file(smolvla_run / "000002/training_state/optimizer_state.safetensors")
    index = {g["name"]: {int(i) for i in g["params"]} for g in groups}
    stepped = {int(k.split("/")[1]) for k in state2 if k.startswith("state/") and k.endswith("/exp_avg")}
    assert stepped and stepped <= index["expert"]  # Stage 1: AdamW never touched fusion or gates


def test_lerobot_train_resume_continues_exactly(smolvla_run, tmp_path):
    uninterrupted = tmp_path / "000004"
    shutil.copytree(smolvla_run / "000004", uninterrupted)
    config = smolvla_run / "000002/pretrained_model/train_config.json"
    run_cli("lerobot-train", f"--config_path={config}", "--resume=true")
    for part in ("pretrained_model/model.safetensors", "training_state/optimizer_state.safetensors"):
        before, after = load_file(uninterrupted / part), load_file(smolvla_run / "000004" / part)
        assert set(before) == set(after)
        assert all(torch.equal(before[k], after[k]) for k in before), part
    assert _record(smolvla_run / "000004/pretrained_model")["step"] == 4


def test_deploy_lerobot_checkpoint_with_lerobots_loaders(smolvla_run, assets):
    directory = smolvla_run / "000004/pretrained_model"
    policy = load("smolvla", directory)
    assert (policy.apt.step, policy.apt.stage, type(policy).__name__) == (4, 2, "SmolVLAAPTPolicy")
    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=str(directory))
    batch = preprocessor(raw_batch(policy.config, assets)[0])
    assert INSTRUCTION_MASK in batch
    chunk = policy.predict_action_chunk(batch, noise=chunk_noise(policy.config))
    policy.reset()
    first = policy.select_action(batch, noise=chunk_noise(policy.config))
    assert torch.equal(first, chunk[:, 0])
    assert postprocessor(chunk).shape == (2, policy.config.chunk_size, 2)
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    with pytest.raises(APTPolicyLoadError, match="smolvla_apt"):
        SmolVLAPolicy.from_pretrained(directory)  # the plain class would drop the fusion blocks


# ---------------------------------------------------------------------- in process, every family
@pytest.mark.parametrize("kind", KINDS)
def test_saved_policy_acts_exactly_like_the_trained_one(kind, assets, tmp_path):
    config = plugin_config(kind, assets, apt_switch_step=2, apt_gate_lr=0.05)
    policy = build(kind, config)
    preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=raw_batch(config, assets)[1].stats)
    batch = preprocessor(raw_batch(config, assets)[0])
    train_steps(policy, batch, 4)
    assert (policy.apt.step, policy.apt.stage) == (4, 2)
    assert any(abs(g) > 0 for site in policy.apt.gate_values().values() for g in site.values())
    policy.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    preprocessor.save_pretrained(tmp_path), postprocessor.save_pretrained(tmp_path)
    policy.eval()
    expected = policy.predict_action_chunk(batch, noise=chunk_noise(config))

    again = load(kind, tmp_path)
    assert (again.apt.step, again.apt.stage, again.apt.plan) == (4, 2, StagePlan(1, switch_step=2))
    reloaded_pre, _ = make_pre_post_processors(again.config, pretrained_path=str(tmp_path))
    again_batch = reloaded_pre(raw_batch(config, assets)[0])
    assert torch.equal(again_batch[INSTRUCTION_MASK], batch[INSTRUCTION_MASK])
    assert torch.equal(again.predict_action_chunk(again_batch, noise=chunk_noise(config)), expected)
    other = preprocessor(raw_batch(config, assets, tasks=["pick the red cube", "push the blue ball"])[0])
    assert not torch.equal(again.predict_action_chunk(other, noise=chunk_noise(config)), expected)  # language acts


@pytest.mark.parametrize("kind", KINDS)
def test_stage1_actions_ignore_the_instruction_through_lerobots_processors(kind, assets):
    config = plugin_config(kind, assets)  # Stage 1
    policy = build(kind, config)
    preprocessor, _ = make_pre_post_processors(config, dataset_stats=raw_batch(config, assets)[1].stats)
    short = preprocessor(raw_batch(config, assets, tasks=["pick cube", "push ball"])[0])
    long = preprocessor(raw_batch(config, assets, tasks=["pick the red cube now", "push the big blue ball"])[0])
    assert short["observation.language.tokens"].shape == long["observation.language.tokens"].shape  # fixed length
    assert short[INSTRUCTION_MASK].sum() < long[INSTRUCTION_MASK].sum()
    a, b = (policy.predict_action_chunk(x, noise=chunk_noise(config)) for x in (short, long))
    assert torch.equal(a, b)


def test_finetune_from_a_checkpoint_starts_exactly_at_step_0(assets, tmp_path):
    config = plugin_config("pi05", assets, apt_switch_step=1, apt_gate_lr=0.05)
    policy = build("pi05", config)
    raw, meta = raw_batch(config, assets)
    preprocessor, _ = make_pre_post_processors(config, dataset_stats=meta.stats)
    batch = preprocessor(raw)
    train_steps(policy, batch, 3)
    policy.save_pretrained(tmp_path)
    policy.eval()
    expected = policy.predict_action_chunk(batch, noise=chunk_noise(config))
    # lerobot-train --policy.path=<dir> --policy.apt_stage=2 --policy.apt_finetune=true: the same config parse
    overrides = ["--apt_stage=2", "--apt_switch_step=null", "--apt_finetune=true"]
    finetune = PreTrainedConfig.from_pretrained(tmp_path, cli_overrides=overrides)
    with build_context("pi05"):
        tuned = get_policy_class("pi05_apt").from_pretrained(tmp_path, config=finetune)
    assert (tuned.apt.step, tuned.apt.stage, tuned.apt.plan) == (0, 2, StagePlan(first_stage=2))
    assert torch.equal(tuned.predict_action_chunk(batch, noise=chunk_noise(config)), expected)
    assert tuned.config.apt_finetune is False  # consumed: a resumed fine-tune continues at its own step
    with pytest.raises(StageMismatchError, match="apt_finetune"):  # another plan without the flag: refused
        stage2 = PreTrainedConfig.from_pretrained(tmp_path, cli_overrides=overrides[:2])
        with build_context("pi05"):
            get_policy_class("pi05_apt").from_pretrained(tmp_path, config=stage2)


# ---------------------------------------------------------------------- nothing silent
def test_action_dimension_mismatch_fails_before_step_0(assets):
    config = plugin_config("pi0", assets)
    policy = build("pi0", config)
    raw, meta = raw_batch(config, assets)
    batch = make_pre_post_processors(config, dataset_stats=meta.stats)[0](raw)
    batch["action"] = torch.cat([batch["action"], batch["action"][..., :1]], dim=-1)  # a 3-dimensional robot
    with pytest.raises(LeRobotBatchError, match=r"dimension 2") as error:
        policy.forward(batch)
    assert isinstance(error.value, AptError) and isinstance(error.value, ValueError)


def test_pi05_prompt_truncated_into_its_visible_part_is_refused(assets):
    config = plugin_config("pi05", assets, tokenizer_max_length=8)
    raw, meta = raw_batch(config, assets)
    preprocessor, _ = make_pre_post_processors(config, dataset_stats=meta.stats)
    with pytest.raises(PromptTruncationError, match=r"`tokenizer_max_length`=8 .* needs \d+ tokens"):
        preprocessor(raw)


def test_changed_fusion_shape_on_load_is_refused(assets, tmp_path):
    config = plugin_config("smolvla", assets, apt_stage="2")
    build("smolvla", config).save_pretrained(tmp_path)
    changed = PreTrainedConfig.from_pretrained(tmp_path, cli_overrides=["--apt_fusion_heads=4"])
    with pytest.raises(APTPolicyLoadError, match="num_heads"):
        get_policy_class("smolvla_apt").from_pretrained(tmp_path, config=changed)


@pytest.fixture
def saved_smolvla(assets, tmp_path):
    """A Stage-2 ``smolvla_apt`` directory (gates opened so the fusion weights matter)."""
    policy = build("smolvla", plugin_config("smolvla", assets, apt_stage="2"))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "apt_gate" in name:
                parameter.fill_(0.5)
    policy.save_pretrained(tmp_path)
    return tmp_path


def _edit_model_file(directory: Path, pick) -> str:
    weights = load_file(directory / "model.safetensors")
    key = next(k for k in sorted(weights) if pick(k))
    weights[key] = weights[key] + 1
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return key


def test_apt_files_are_verified_against_lerobots_on_load(saved_smolvla):
    loaded = load("smolvla", saved_smolvla)
    assert loaded.apt.stage == 2 and any(abs(g) > 0 for s in loaded.apt.gate_values().values() for g in s.values())
    original = (saved_smolvla / "model.safetensors").read_bytes()
    _edit_model_file(saved_smolvla, lambda k: ".apt_fusion." in k)  # a trained weight
    with pytest.raises(
        APTPolicyLoadError, match=r"model\.safetensors and .*apt_model\.safetensors disagree on the trained"
    ):
        load("smolvla", saved_smolvla)
    (saved_smolvla / "model.safetensors").write_bytes(original)
    _edit_model_file(saved_smolvla, lambda k: ".vlm_with_expert.vlm." in k)  # the frozen base VLM
    with pytest.raises(APTPolicyLoadError, match="disagree on the VLM weights APT does not train"):
        load("smolvla", saved_smolvla)
    (saved_smolvla / "model.safetensors").write_bytes(original)
    assert load("smolvla", saved_smolvla).apt.stage == 2  # restored: loads again


def test_modified_apt_files_are_refused_before_building(saved_smolvla):
    weights = saved_smolvla / WEIGHTS_NAME
    original = weights.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(APTPolicyLoadError, match=r"apt_model\.safetensors failed its content check"):
        load("smolvla", saved_smolvla)
    weights.write_bytes(original)
    config = json.loads((saved_smolvla / CONFIG_NAME).read_text())
    config["record"]["step"] = 5  # still Stage 2, but not the step config.json records
    (saved_smolvla / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(APTPolicyLoadError, match=r"`step`: config\.json 0, apt_config\.json 5"):
        get_policy_class("smolvla_apt").from_pretrained(saved_smolvla)


def test_a_directory_without_apt_files_loads_with_a_warning(saved_smolvla):
    (saved_smolvla / CONFIG_NAME).unlink(), (saved_smolvla / WEIGHTS_NAME).unlink()
    with pytest.warns(UnverifiedCheckpointWarning, match="without their content checks"):
        loaded = load("smolvla", saved_smolvla)
    assert loaded.apt.stage == 2
