"""LightningCLI entry point with the bundled YAML configs, and checkpoint evaluation from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel

from apt_lightning.models import FlowMatchingPolicy, GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_studies import InstructionResolutionError, vlm_pretraining
from apt_studies.cli import APTLightningCLI, _check_model_matches_data, evaluate_main, main, model_vlm_width
from apt_studies.datamodule import TabletopDataModule

CONFIGS = Path(__file__).parents[1] / "configs"


def _cli(config: Path, *extra: str) -> APTLightningCLI:
    return APTLightningCLI(
        FlowMatchingPolicy,
        TabletopDataModule,
        subclass_mode_model=True,
        run=False,
        args=["--config", str(config), *extra],
    )


@pytest.mark.parametrize("name", ["pi0_apt", "pi0_baseline", "groot_apt", "groot_baseline"])
def test_bundled_configs_build_a_model_that_matches_the_benchmark(name):
    cli = _cli(CONFIGS / f"{name}.yaml", "--data.episodes", "1")
    reference = tiny_paligemma_config(**cli.datamodule.tokenizer.vlm_vocabulary, hidden_size=64)
    vlm = cli.model.apt.vlm_module
    assert vlm.config.get_text_config().vocab_size == cli.datamodule.vocab_size
    assert vlm.config.image_token_id == cli.datamodule.image_token_id == cli.datamodule.tokenizer.image_id
    assert {k: v.shape for k, v in vlm.state_dict().items()} == {
        k: v.shape for k, v in type(vlm)(reference).state_dict().items()
    }  # the cached pretrained VLM loads into it
    assert cli.model.chunk_size == cli.datamodule.hparams.chunk_size
    scheduler = next(c for c in cli.trainer.callbacks if type(c).__name__ == "APTStageScheduler")
    assert scheduler.plan.is_joint == name.endswith("baseline")
    assert model_vlm_width(cli.config["model"]) == 64  # from the parsed config alone, asking the policy class


def test_a_vlm_that_reads_other_image_ids_than_the_tokenizer_is_refused_before_fit():
    data = TabletopDataModule(episodes=1, chunk_size=4)
    stale = PI0Policy(tiny_pi0_config(vocab_size=data.vocab_size + 1))  # image id past the tokenizer's <image>
    with pytest.raises(ValueError, match=r"image_token_id 130 != the tokenizer's <image> id 4"):
        _check_model_matches_data(stale, data)
    _check_model_matches_data(PI0Policy(tiny_pi0_config(**data.tokenizer.vlm_vocabulary)), data)


@pytest.mark.parametrize(
    ("cls", "init_args", "width"),
    [
        (PI0Policy, {}, 32),
        (PI0Policy, {"config": tiny_pi0_config(hidden_size=48)}, 48),
        (PI0Policy, {"config": tiny_pi0_config(hidden_size=48).to_dict()}, 48),
        (GR00TStylePolicy, {"vlm_config": None}, 32),
        (GR00TStylePolicy, {"vlm_config": tiny_paligemma_config(hidden_size=48)}, 48),
        (GR00TStylePolicy, {"vlm_config": tiny_paligemma_config(hidden_size=48).to_dict()}, 48),
    ],
)
def test_each_policy_class_reads_its_vlm_width_from_its_own_arguments(cls, init_args, width):
    assert cls.vlm_text_width(init_args) == width


def test_a_policy_without_vlm_text_width_says_what_to_implement():
    class NoWidth(FlowMatchingPolicy):
        pass

    with pytest.raises(NotImplementedError, match="does not implement the classmethod `vlm_text_width"):
        NoWidth.vlm_text_width({})


@pytest.mark.parametrize("name", ["pi0_apt", "groot_apt"])
def test_pretrained_vlm_is_sized_by_the_policy_and_passed_as_vlm_pretrained(tmp_path, monkeypatch, name):
    asked = []

    def fake_pretrained_vlm(vlm_config, tokenizer):  # the real one pretrains for minutes, then caches
        asked.append(vlm_config.text_config.hidden_size)
        AutoModel.from_config(vlm_config).save_pretrained(tmp_path / "vlm")
        return tmp_path / "vlm", {}

    monkeypatch.setattr(vlm_pretraining, "pretrained_vlm", fake_pretrained_vlm)
    cli = _cli(CONFIGS / f"{name}.yaml", "--data.episodes", "1", "--pretrained_vlm", "true")
    assert asked == [64]
    assert cli.config["model"]["init_args"]["vlm_pretrained"] == str(tmp_path / "vlm")
    saved = AutoModel.from_pretrained(tmp_path / "vlm").state_dict()
    loaded = cli.model.apt.vlm_module.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in saved.items())


def _small_config(tmp_path: Path, name: str, **data: int) -> Path:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["trainer"].update(max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("APTStageScheduler") and "switch_at_step" in callback["init_args"]:
            callback["init_args"]["switch_at_step"] = 2
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    config["model"]["init_args"]["apt_config"]["warmup_steps"] = 0
    config["data"].update(episodes=4, **data)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_keeps_param_groups_then_evaluates_a_user_file(tmp_path):
    main(["fit", "--config", str(_small_config(tmp_path, "groot_apt"))])
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    names = [g["name"] for g in saved["optimizer_states"][0]["param_groups"]]
    assert names == ["expert", "fusion", "gates"]  # the mixin's groups, not one CLI optimiser group
    instructions = tmp_path / "mine.txt"
    instructions.write_text("# two of mine\npick up the red square\nfetch the tiny blue circle\n")
    out = tmp_path / "eval.json"
    results = evaluate_main(
        [
            str(checkpoint),
            "--instructions",
            str(instructions),
            "--per-instruction",
            "2",
            "--splits",
            "seen",
            "--episodes",
            "2",
            "--json",
            str(out),
        ]
    )
    assert set(results["success"]) == {"seen", "user"}
    assert json.loads(out.read_text())["success"] == results["success"]


def test_cli_refuses_model_and_data_that_disagree(tmp_path):
    with pytest.raises(ValueError, match=r"chunk size 8 != data\.chunk_size 4"):
        main(["fit", "--config", str(_small_config(tmp_path, "groot_baseline", chunk_size=4))])


def test_evaluate_names_the_bad_line_of_an_instruction_file(tmp_path):
    checkpoint = tmp_path / "x.ckpt"
    checkpoint.write_bytes(b"")
    bad = tmp_path / "bad.txt"
    bad.write_text("pick up the red circle\nplease do something\n")
    with pytest.raises(InstructionResolutionError, match=r"bad\.txt:2"):
        evaluate_main([str(checkpoint), "--instructions", str(bad)])


# ---------------------------------------------------------------------------- one-line errors (issue 26, item 4)
def _run_cli(entry, argv, capsys) -> list[str]:
    """Run a console script; return its stderr lines after checking it exited 2 with one error line."""
    with pytest.raises(SystemExit) as info:
        entry(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert sum(line.startswith(("apt-lightning: error:", "apt-evaluate: error:")) for line in err) == 1
    return err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.init_args.apt_config.lr", "-1"], "`lr` must be a finite number >= 0, got -1.0"),
        (["--model.init_args.apt_config.vlm_mode", "bogus"], "`vlm_mode` must be one of ('frozen', 'lora', 'full')"),
        (["--model.init_args.apt_config.bogus", "1"], "invalid configuration: APTConfig.__init__() got an unexpected"),
        (["--data.batch_size", "0"], "`data.batch_size` must be a positive integer, got 0"),
        (["--data.val_split", "sen"], "`data.val_split`='sen' is no benchmark split. Choose one of ['seen'"),
    ],
    ids=["negative-lr", "bad-vlm-mode", "unknown-key", "batch-size-0", "unknown-split"],
)
def test_bad_config_values_end_apt_lightning_with_one_line(tmp_path, capsys, flags, expected):
    from apt_studies.cli import cli_entry

    err = _run_cli(cli_entry, ["fit", "--config", str(_small_config(tmp_path, "groot_apt")), *flags], capsys)
    assert err[-1].startswith("apt-lightning: error:") and expected in err[-1], err[-1]
    assert not list(tmp_path.rglob("*.ckpt"))  # no step ran


def test_an_unwritable_output_directory_is_one_line_before_anything_is_built(tmp_path, capsys):
    from apt_studies.cli import cli_entry

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    flags = ["--trainer.default_root_dir", str(blocker / "runs")]
    err = _run_cli(cli_entry, ["fit", "--config", str(_small_config(tmp_path, "groot_apt")), *flags], capsys)
    assert f"`trainer.default_root_dir` {blocker / 'runs'} cannot be written (NotADirectoryError" in err[-1]
    assert "Choose a writable directory" in err[-1]


def test_a_model_flag_beside_ckpt_path_is_refused_not_dropped(tmp_path, capsys):
    from apt_studies.cli import cli_entry

    config = _small_config(tmp_path, "groot_apt")
    main(["fit", "--config", str(config)])
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    argv = ["fit", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.max_steps", "4"]
    err = _run_cli(cli_entry, [*argv, "--model.init_args.head_depth", "2"], capsys)
    assert "`--model.init_args.head_depth`: checkpoint 4, command line 2" in err[-1] and "Drop those flags" in err[-1]
    main([*argv, "--model.init_args.head_depth", "4"])  # the checkpoint's own value resumes


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--episodes", "-1"], "--episodes -1 is not a number of rollouts: pass an integer from 1 to 100,000"),
        (["--episodes", "0"], "--episodes 0 is not a number of rollouts"),
        (["--episodes", "1000000000"], "--episodes 1000000000 is not a number of rollouts"),
        (["--per-instruction", "0"], "--per-instruction 0 is not a number of rollouts"),
        (["--splits", "seen", "bogus"], "--splits bogus: no such benchmark split. Choose from seen paraphrase"),
    ],
    ids=["negative", "zero", "huge", "per-instruction", "unknown-split"],
)
def test_apt_evaluate_refuses_bad_counts_and_splits_before_loading_anything(tmp_path, capsys, flags, expected):
    from apt_studies.cli import evaluate_entry

    err = _run_cli(evaluate_entry, [str(tmp_path / "missing.ckpt"), *flags], capsys)  # checked before the file
    assert err[-1].startswith("apt-evaluate: error:") and expected in err[-1], err[-1]


@pytest.mark.parametrize("where", ["missing-dir", "directory"])
def test_apt_evaluate_json_that_cannot_be_written_fails_before_the_evaluation(tmp_path, capsys, where):
    from apt_studies.cli import evaluate_entry

    target = tmp_path / "no-such-dir" / "out.json" if where == "missing-dir" else tmp_path
    err = _run_cli(evaluate_entry, [str(tmp_path / "missing.ckpt"), "--json", str(target)], capsys)
    assert f"--json file {target}" in err[-1] and "missing.ckpt" not in err[-1]


def test_a_results_file_is_complete_or_absent_when_the_disk_fills(tmp_path, monkeypatch):
    import errno
    import os

    from apt_studies.errors import OutputPathError
    from apt_studies.output import atomic_write_text

    target = tmp_path / "eval.json"
    atomic_write_text(target, '{"old": 1}')

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputPathError, match=r"eval\.json \(OSError: No space left on device\); no partial file"):
        atomic_write_text(target, '{"new": 2}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"] and target.read_text() == '{"old": 1}'


def test_a_checkpoint_write_that_fails_is_one_line_in_the_cli():
    from apt_lightning.checksum import CheckpointWriteError
    from apt_studies.cli import user_error

    message = user_error(RuntimeError("outer").with_traceback(None))
    assert message is None  # a bug keeps its traceback
    error = CheckpointWriteError("Could not write the checkpoint x.ckpt (OSError: No space left on device)")
    assert user_error(error) == str(error)
