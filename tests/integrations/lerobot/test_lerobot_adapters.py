"""APT on LeRobot's own PI0, PI05 and SmolVLA policy objects (tiny, random, offline): the adapter reproduces LeRobot's
loss in the joint plan, Stage 1 is blind to the instruction, the VLM stays bit-identical, the switch and resume
are exact, LoRA trains only adapters, and what it saves loads into LeRobot unchanged."""

from __future__ import annotations

import ast
import contextlib
import copy
import re
from pathlib import Path

import pytest

pytest.importorskip(
    "lerobot",
    reason="LeRobot 0.6.1 is not installed here (it needs Python >= 3.12 and torch < 2.12): these tests run in the "
    "second step of .ci/run, in their own venv",
)

import torch
from lerobot_helpers import ADAPTERS, LossRecorder, loader, make_adapter, make_batch, noise, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from apt_lightning import (
    APTConfig,
    APTStageScheduler,
    ExportError,
    LanguageMaskError,
    StageMismatchError,
    StagePlan,
    export_fusion,
)
from apt_lightning.integrations.lerobot import FUSION_FILE
from apt_lightning.integrations.lerobot.tiny import tiny_builds
from apt_lightning.pretrained import CONFIG_NAME, WEIGHTS_NAME

KINDS = ["pi0", "pi05", "smolvla"]
SWITCH, TOTAL = 3, 6


@pytest.mark.parametrize("kind", KINDS)
def test_joint_plan_reproduces_lerobot_loss(kind):
    adapter = make_adapter(kind)
    adapter.apt.prepare(StagePlan(first_stage="joint"))
    batch = make_batch(["left", "right"])
    torch.manual_seed(3)
    expected, _ = adapter.policy.forward(batch)
    torch.manual_seed(3)
    noise_, time = adapter.draw_noise_and_time(adapter.padded_actions(batch))
    loss = adapter.flow_loss(batch, noise_, time)
    print(f"{kind}: LeRobot loss {expected.item():.8f}, adapter {loss.item():.8f}")
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_stage1_actions_ignore_the_instruction(kind):
    adapter = make_adapter(kind)
    adapter.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))
    adapter.eval()
    left, right = make_batch("left"), make_batch("right")  # 2 vs 3 instruction tokens, same images and state
    assert not torch.equal(left["observation.language.tokens"], right["observation.language.tokens"])
    assert torch.equal(adapter.sample_actions(left, noise()), adapter.sample_actions(right, noise()))
    other = make_batch("left", seed=5)  # the observation still matters
    assert not torch.equal(adapter.sample_actions(left, noise()), adapter.sample_actions(other, noise()))
    joint = make_adapter(kind)  # without APT the instruction reaches the actions
    joint.apt.prepare(StagePlan(first_stage="joint"))
    joint.eval()
    assert not torch.equal(joint.sample_actions(left, noise()), joint.sample_actions(right, noise()))


@pytest.mark.parametrize("kind", KINDS)
def test_stage1_fit_leaves_the_vlm_bit_identical(kind):
    adapter = make_adapter(kind)
    vlm_before = copy.deepcopy(adapter.apt.vlm_module.state_dict())
    expert = [(n, p) for n, p in adapter.named_parameters() if not n.startswith(adapter.apt.vlm + ".")]
    expert_before = {id(p): p.detach().clone() for _, p in expert}  # keys gain `.base_layer.`
    fit = trainer(3, [APTStageScheduler(stage=1)])
    fit.fit(adapter, loader())
    assert fit.global_step == 3 and adapter.apt.stage == 1
    for name, value in adapter.apt.vlm_module.state_dict().items():
        assert torch.equal(value, vlm_before[name]), name
    assert all(p.grad is None for p in adapter.apt.vlm_module.parameters())
    assert not any(m.training for m in adapter.apt.vlm_module.modules())
    assert [n for n, p in expert if not torch.equal(p, expert_before[id(p)])]


@pytest.mark.parametrize("kind", KINDS)
def test_switch_is_exact(kind):
    adapter = make_adapter(kind)
    adapter.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH), step=SWITCH - 1)
    adapter.eval()
    batch = make_batch(["left", "right"])
    stage1 = adapter.sample_actions(batch, noise())
    adapter.apt.advance()  # one optimizer step later: Stage 2
    assert adapter.apt.stage == 2 and len(adapter.apt.sites) > 0
    assert torch.equal(adapter.sample_actions(batch, noise()), stage1)
    for site in adapter.apt.sites.values():  # open gates: language now reaches the actions
        torch.nn.init.constant_(site.apt_fusion.apt_gate_attn, 0.5)
        torch.nn.init.normal_(site.apt_fusion.to_out.weight)
    assert not torch.equal(
        adapter.sample_actions(make_batch("left"), noise()), adapter.sample_actions(make_batch("right"), noise())
    )


def _fit(kind, steps, callbacks, ckpt_path=None, **kwargs):
    adapter = make_adapter(kind)
    recorder = LossRecorder()
    fit = trainer(steps, [APTStageScheduler(switch_at_step=SWITCH), recorder, *callbacks], **kwargs)
    fit.fit(adapter, loader(), ckpt_path=ckpt_path)
    return adapter, recorder.losses


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_stage1_and_mid_stage2_is_exact(kind, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full, losses = _fit(kind, TOTAL, [checkpoints], enable_checkpointing=True)
    assert len(losses) == TOTAL
    for resume_at in (SWITCH - 1, SWITCH + 1):  # mid-Stage-1, mid-Stage-2
        resumed, tail = _fit(kind, TOTAL, [], ckpt_path=str(tmp_path / f"step={resume_at}.ckpt"))
        assert sorted(tail) == list(range(resume_at, TOTAL))
        assert all(tail[s] == losses[s] for s in tail), (resume_at, tail, losses)
        for name, value in full.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[name]), (resume_at, name)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_mode_trains_only_adapters_in_the_vlm(kind):
    adapter = make_adapter(kind, vlm_mode="lora", lora_rank=2, vlm_lr=1e-2)
    base = {id(p): p.detach().clone() for p in adapter.apt.vlm_module.parameters()}  # keys gain `.base_layer.`
    fit = trainer(SWITCH + 2, [APTStageScheduler(switch_at_step=SWITCH)])
    fit.fit(adapter, loader())
    params = dict(adapter.apt.vlm_module.named_parameters())
    assert all(torch.equal(p, base[id(p)]) for p in params.values() if id(p) in base)  # base weights untouched
    lora_b = [p for n, p in params.items() if ".lora_B." in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # adapters trained (they start at zero)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_loads_into_lerobot_unchanged(kind, tmp_path):
    adapter = make_adapter(kind)
    trainer(SWITCH + 2, [APTStageScheduler(switch_at_step=SWITCH)]).fit(adapter, loader())
    assert any(site.apt_fusion.apt_gate_attn.item() != 0 for site in adapter.apt.sites.values())
    adapter.save_pretrained(tmp_path)
    assert {"model.safetensors", CONFIG_NAME, WEIGHTS_NAME} <= {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / FUSION_FILE).exists()
    policy_cls = type(adapter.policy)
    with tiny_builds(kind) if kind != "smolvla" else contextlib.nullcontext():
        reloaded = policy_cls.from_pretrained(tmp_path)  # LeRobot's own loader, strict keys
    clean = adapter.lerobot_policy().state_dict()
    assert set(reloaded.state_dict()) == set(clean)
    assert all(torch.equal(v, clean[k]) for k, v in reloaded.state_dict().items())
    legacy = ADAPTERS[kind](copy.deepcopy(reloaded))
    again = ADAPTERS[kind](reloaded)
    again.apt.load_pretrained(tmp_path)  # APT's own files: plan, step and fusion blocks rebuilt, no prepare needed
    assert (again.apt.plan, again.apt.step, again.apt.stage) == (adapter.apt.plan, SWITCH + 2, 2)
    adapter.eval(), again.eval()
    batch = make_batch(["left", "right"])
    expected = adapter.sample_actions(batch, noise())
    assert torch.equal(again.sample_actions(batch, noise()), expected)

    # a directory written before APT's files: apt_fusion.safetensors, loaded into a controller prepared by hand
    export_fusion(adapter, tmp_path / FUSION_FILE)
    (tmp_path / CONFIG_NAME).unlink()
    legacy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH))  # step 0: the fusion would sit inactive
    with pytest.raises(StageMismatchError, match="inactive"):
        legacy.load_fusion_from(tmp_path)
    legacy.apt.prepare(StagePlan(first_stage=1, switch_step=SWITCH), step=SWITCH + 2)
    legacy.load_fusion_from(tmp_path)
    legacy.eval()
    assert torch.equal(legacy.sample_actions(batch, noise()), expected)


def test_a_lora_run_reloads_onto_its_base_policy_not_onto_the_merged_one(tmp_path):
    base = make_adapter("smolvla").policy
    adapter = ADAPTERS["smolvla"](copy.deepcopy(base), APTConfig(lr=1e-3, vlm_mode="lora", lora_rank=2, vlm_lr=1e-2))
    trainer(SWITCH + 2, [APTStageScheduler(switch_at_step=SWITCH)]).fit(adapter, loader())
    adapter.save_pretrained(tmp_path)
    assert any(".lora_B." in k for k in load_file(tmp_path / WEIGHTS_NAME))
    merged = ADAPTERS["smolvla"](type(base).from_pretrained(tmp_path), APTConfig(vlm_mode="lora", lora_rank=2))
    with pytest.raises(ExportError, match="not the base VLM"):  # its VLM has the adapters merged in
        merged.apt.load_pretrained(tmp_path)
    again = ADAPTERS["smolvla"](base, APTConfig(vlm_mode="lora", lora_rank=2))
    again.apt.load_pretrained(tmp_path)
    adapter.eval(), again.eval()
    batch = make_batch(["left", "right"])
    assert torch.equal(again.sample_actions(batch, noise()), adapter.sample_actions(batch, noise()))


def test_pi05_needs_the_instruction_span():
    adapter = make_adapter("pi05")
    adapter.apt.prepare(StagePlan(first_stage=1))
    batch = make_batch()
    del batch["observation.language.instruction_mask"]
    with pytest.raises(LanguageMaskError, match="instruction_mask"):
        adapter.flow_loss(batch, noise(), torch.full((2,), 0.5))


def apt_lines(path: Path) -> int:
    """Code lines (docstrings, comments and imports left out) that use an APT name: the README's count."""
    text = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    pattern = re.compile(r"\bapt[_.]|\.apt\b|masks\.|APTMixin|\bAPT\(|APTConfig|FusionConfig")
    code = [line.split("#")[0] for i, line in enumerate(text.splitlines(), 1) if i not in docstrings]
    return sum(1 for line in code if pattern.search(line) and not line.lstrip().startswith(("import ", "from ")))


def test_adapter_lines_that_touch_apt():
    """What a user would write to adopt APT on PI0/PI05 and SmolVLA (the adapters ship, so they write none)."""
    source = Path(__file__).parents[3] / "src/apt_lightning/integrations/lerobot"
    counts = {name: apt_lines(source / name) for name in ("base.py", "pi.py", "smolvla.py")}
    print(f"lines touching APT: {counts}")
    assert counts["pi.py"] <= 20 and counts["smolvla.py"] <= 20
