"""Inputs that used to pass silently or crash with a raw error are named with the fix (issue 20, items 3, 7, 8):
config values, target regexes, the reference policies' batch masks, fusion exports that read other VLM layers,
the CLI's model/data check and ``combine_studies`` files."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from apt_lightning import APTConfig, APTStageScheduler, FusionConfig, LanguageMaskError, StagePlan
from apt_lightning.config import fusion_config_with_options
from apt_lightning.errors import AptError, ConfigError, ExportError, UnverifiedExportWarning
from apt_lightning.export import (
    CONTEXT_SOURCES_KEY,
    HASH_KEY,
    content_hash,
    context_sources,
    export_fusion,
    load_fusion,
)
from apt_lightning.inject import resolve_targets
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.schedule import parse_stage
from apt_studies.cli import ModelDataMismatchError, cli_entry
from apt_studies.combine import combine_studies, read_study
from apt_studies.errors import StudyFileError
from helpers import make_batch, make_policy

EXAMPLES = Path(__file__).parents[2] / "examples"


# ---------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: APTConfig(vlm_mode="lora", lora_alpha=-16), r"`lora_alpha` must be a finite number > 0, got -16"),
        (lambda: APTConfig(vlm_mode="lora", lora_alpha=0), r"`lora_alpha` .* got 0: .* 0 switches the adapters off"),
        (lambda: APTConfig(vlm_mode="lora", lora_rank=True), r"`lora_rank` must be a positive integer, got True"),
        (lambda: APTConfig(vlm_mode="lora", lora_dropout=1.0), r"`lora_dropout` must be in \[0, 1\), got 1.0"),
        (lambda: APTConfig(warmup_steps=2.5), r"`warmup_steps` must be an int >= 0, got 2.5"),
        (lambda: APTStageScheduler(stage=1.0), r"`stage` must be 1, 2 or 'joint' \(0\), got 1.0 \(a float is not"),
        (lambda: APTStageScheduler(stage="2"), r"got '2' \(a str is not a stage"),
        (lambda: FusionConfig(target_modules="layers.[0-", num_heads=2), r"`target_modules`='layers.\[0-' is not a"),
        (lambda: FusionConfig(target_modules=["a"], exclude_modules="(b"), r"`exclude_modules`='\(b' is not a valid"),
        (lambda: FusionConfig(target_modules=["a"], num_heads=2.0), r"`num_heads` must be a positive integer"),
        (lambda: APTConfig(vlm_mode="lora", lora_target_modules="q_proj("), r"`lora_target_modules`='q_proj\(' is"),
    ],
    ids=[
        "lora_alpha<0",
        "lora_alpha=0",
        "lora_rank-bool",
        "lora_dropout=1",
        "warmup-float",
        "stage=1.0",
        "stage='2'",
        "target-regex",
        "exclude-regex",
        "num_heads-float",
        "lora-regex",
    ],
)
def test_config_values_that_used_to_pass_or_crash_are_config_errors(build, match):
    with pytest.raises(ConfigError, match=match) as info:
        build()
    assert isinstance(info.value, AptError) and isinstance(info.value, ValueError)


def test_the_int_stages_still_parse():
    assert (parse_stage(1), parse_stage(2), parse_stage("joint"), parse_stage(0)) == (1, 2, 0, 0)


def test_an_invalid_regex_passed_to_resolve_targets_is_a_config_error_not_re_error():
    with pytest.raises(ConfigError, match=r"`target_modules`='\*\.layers' is not a valid regular expression"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)), "*.layers")


def test_a_language_dropout_the_gates_cannot_learn_under_is_warned():
    with pytest.warns(UserWarning, match=r"`language_dropout`=0.999 hides the instruction from 99.9%"):
        APTConfig(language_dropout=0.999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        APTConfig(language_dropout=0.2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_heads": 2}, r"`fusion_options` sets \['num_heads'\], which the policy already sets .*num_heads=4"),
        ({"heads": 2}, r"`fusion_options` has \['heads'\], which FusionConfig does not accept; its fields are"),
    ],
    ids=["clash", "unknown"],
)
def test_fusion_options_that_clash_or_do_not_exist_are_named(options, match):
    with pytest.raises(ConfigError, match=match):
        fusion_config_with_options(options, target_modules=["x"], num_heads=4)
    assert fusion_config_with_options({"gate_shape": "channel"}, target_modules=["x"], num_heads=4).num_heads == 4


# ---------------------------------------------------------------------------------------------- batch masks
@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (lambda m: m[0], r"has shape \(4,\) but the token sequence has shape \(2, 4\).*It is 1-D"),
        (lambda m: m.T, r"has shape \(4, 2\) but the token sequence has shape \(2, 4\).*looks transposed"),
        (lambda m: m.numpy(), r"must be a torch.Tensor, got ndarray.*torch.as_tensor"),
    ],
    ids=["1-D", "transposed", "numpy"],
)
@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_bad_language_masks_through_the_reference_policies_batch_path_are_named(arch, mask, match):
    policy = make_policy(arch)
    policy.apt.prepare(StagePlan(first_stage=1))
    batch = make_batch("left")
    batch["language_mask"] = mask(batch["language_mask"])
    with pytest.raises(LanguageMaskError, match=match):
        policy.flow_loss(batch, torch.zeros(2, policy.chunk_size, policy.noise_dim), torch.rand(2))


def test_a_batch_without_its_prompt_keys_is_named():
    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1))
    batch = make_batch("left")
    del batch["language_mask"]
    with pytest.raises(LanguageMaskError, match=r"The batch has no \['language_mask'\]"):
        policy.flow_loss(batch, torch.zeros(2, policy.chunk_size, 2), torch.rand(2))


# ---------------------------------------------------------------------------------------------- fusion exports
def _groot(per_site: bool, select_layer: int = 1) -> GR00TStylePolicy:
    torch.manual_seed(0)
    policy = GR00TStylePolicy(
        tiny_paligemma_config(), select_layer=select_layer, head_width=32, head_depth=2, per_site_language=per_site
    )
    policy.apt.prepare(StagePlan(first_stage=2))
    return policy


def test_exports_record_which_vlm_states_each_site_reads():
    assert set(context_sources(_groot(True)).values()) == {"hidden_states[1]", "hidden_states[2]"}
    assert set(context_sources(_groot(False, select_layer=-1)).values()) == {"hidden_states[2]"}
    pi0 = PI0Policy(tiny_pi0_config())
    pi0.apt.prepare(StagePlan(first_stage=2))
    assert set(context_sources(pi0).values()) == {"last_hidden_state"}


@pytest.mark.parametrize(
    ("writer", "reader"),
    [((True, 1), (False, 1)), ((False, 1), (True, 1)), ((False, 1), (False, 2))],
    ids=["per-site->shared", "shared->per-site", "other-select_layer"],
)
def test_a_fusion_export_never_loads_into_a_model_whose_sites_read_other_layers(tmp_path, writer, reader):
    path = export_fusion(_groot(*writer), tmp_path / "fusion.safetensors")
    model = _groot(*reader)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=r"fusion\.safetensors holds fusion blocks trained on other VLM states"):
        load_fusion(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    load_fusion(_groot(*writer), path)  # the same configuration loads


def test_an_export_written_before_the_record_existed_loads_with_a_warning(tmp_path):
    path = export_fusion(_groot(True), tmp_path / "fusion.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    del metadata[CONTEXT_SOURCES_KEY]
    metadata[HASH_KEY] = content_hash(tensors, metadata)
    save_file(tensors, tmp_path / "old.safetensors", metadata=metadata)
    with pytest.warns(UnverifiedExportWarning, match=r"old\.safetensors does not record which VLM states"):
        load_fusion(_groot(True), tmp_path / "old.safetensors")


def test_an_export_from_a_model_that_did_not_declare_its_sources_warns_instead_of_guessing(tmp_path, monkeypatch):
    monkeypatch.setattr("apt_lightning.export.context_sources", lambda module: None)
    path = export_fusion(_groot(True), tmp_path / "fusion.safetensors")
    monkeypatch.undo()
    with pytest.warns(UnverifiedExportWarning, match=r"cannot be compared: the exporting model did not declare"):
        load_fusion(_groot(True), path)


def test_a_model_that_does_not_declare_its_sources_loads_a_declaring_export_with_a_warning(tmp_path, monkeypatch):
    """The reverse case: the export records its sources, the loading model does not (once an AttributeError)."""
    path = export_fusion(_groot(True), tmp_path / "fusion.safetensors")
    monkeypatch.setattr("apt_lightning.export.context_sources", lambda module: None)
    with pytest.warns(UnverifiedExportWarning, match=r"cannot be compared: GR00TStylePolicy does not declare its own"):
        load_fusion(_groot(True), path)


# ---------------------------------------------------------------------------------------------- CLI and studies
def test_cli_model_data_mismatch_is_one_line_with_the_matching_fix(tmp_path, capsys):
    from test_cli import _small_config

    with pytest.raises(SystemExit) as exit_info:
        cli_entry(["fit", "--config", str(_small_config(tmp_path, "groot_baseline", chunk_size=4))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("apt-lightning: error: Model and data do not match: model chunk size 8 != data")
    assert "--model.init_args.chunk_size 4 or --data.chunk_size 8" in err[-1] and "Traceback" not in "".join(err)
    assert issubclass(ModelDataMismatchError, ValueError)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"broken\.json is empty"),
        ('{"config": {"archs": ["pi0"], "meth', r"broken\.json is not valid JSON .*truncated"),
        ("[1, 2]", r"broken\.json holds a list, not a study record"),
        ('{"runs": []}', r"broken\.json lacks \['config'\]"),
        (
            '{"config": {"archs": [], "methods": [], "seeds": []}, "runs": [{"arch": "pi0"}]}',
            r"broken\.json: run 0 lacks \['method', 'seed', 'success'\]",
        ),
    ],
    ids=["empty", "truncated", "not-an-object", "no-config", "run-without-fields"],
)
def test_combine_studies_names_the_file_that_cannot_be_combined(tmp_path, content, match, capsys):
    spec = importlib.util.spec_from_file_location("combine_studies_example", EXAMPLES / "combine_studies.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(StudyFileError, match=match):
        read_study(path)
    with pytest.raises(SystemExit):
        example.main([str(path), "--out", str(tmp_path / "out")])
    assert "broken.json" in capsys.readouterr().err


def test_combine_studies_checks_records_given_in_python_too():
    with pytest.raises(StudyFileError, match=r"a\.json: run 0 lacks \['success'\]"):
        combine_studies(
            [{"config": {"archs": [], "methods": [], "seeds": []}, "runs": [{"arch": 1, "method": 2, "seed": 3}]}],
            names=["a.json"],
        )
