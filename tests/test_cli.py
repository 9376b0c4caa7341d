"""LightningCLI entry point with the bundled YAML configs, and checkpoint evaluation from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from apt_lightning.bench import InstructionResolutionError
from apt_lightning.cli import APTLightningCLI, evaluate_main, main
from apt_lightning.bench.datamodule import TabletopDataModule
from apt_lightning.models import FlowMatchingPolicy, tiny_paligemma_config

CONFIGS = Path(__file__).parents[1] / "configs"


def _cli(config: Path, *extra: str) -> APTLightningCLI:
    return APTLightningCLI(FlowMatchingPolicy, TabletopDataModule, subclass_mode_model=True, run=False,
                           args=["--config", str(config), *extra])


@pytest.mark.parametrize("name", ["pi0_apt", "pi0_baseline", "groot_apt", "groot_baseline"])
def test_bundled_configs_build_a_model_that_matches_the_benchmark(name):
    cli = _cli(CONFIGS / f"{name}.yaml", "--data.episodes", "1")
    reference = tiny_paligemma_config(vocab_size=cli.datamodule.vocab_size, hidden_size=64)
    vlm = cli.model.apt_vlm_module
    assert vlm.config.get_text_config().vocab_size == cli.datamodule.vocab_size
    assert {k: v.shape for k, v in vlm.state_dict().items()} == {
        k: v.shape for k, v in type(vlm)(reference).state_dict().items()
    }  # the cached pretrained VLM loads into it
    assert cli.model.chunk_size == cli.datamodule.hparams.chunk_size
    scheduler = next(c for c in cli.trainer.callbacks if type(c).__name__ == "APTStageScheduler")
    assert scheduler.plan.is_joint == name.endswith("baseline")


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
    instructions.write_text("# two of mine\npick up the red circle\nfetch the tiny blue square\n")
    out = tmp_path / "eval.json"
    results = evaluate_main([str(checkpoint), "--instructions", str(instructions), "--per-instruction", "2",
                             "--splits", "seen", "--episodes", "2", "--json", str(out)])
    assert set(results["success"]) == {"seen", "user"}
    assert json.loads(out.read_text())["success"] == results["success"]


def test_cli_refuses_model_and_data_that_disagree(tmp_path):
    with pytest.raises(ValueError, match="chunk size 8 != data.chunk_size 4"):
        main(["fit", "--config", str(_small_config(tmp_path, "groot_baseline", chunk_size=4))])


def test_evaluate_names_the_bad_line_of_an_instruction_file(tmp_path):
    checkpoint = tmp_path / "x.ckpt"
    checkpoint.write_bytes(b"")
    bad = tmp_path / "bad.txt"
    bad.write_text("pick up the red circle\nplease do something\n")
    with pytest.raises(InstructionResolutionError, match="bad.txt:2"):
        evaluate_main([str(checkpoint), "--instructions", str(bad)])
