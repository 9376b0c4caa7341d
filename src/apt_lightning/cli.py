"""Command-line entry points: ``apt-lightning`` (LightningCLI with YAML configs) and ``apt-evaluate``.

Training runs through the ordinary LightningCLI, so every Trainer, model and data option is a flag or a
YAML key::

    apt-lightning fit --config configs/pi0_apt.yaml
    apt-lightning fit --config configs/groot_baseline.yaml --trainer.max_steps 800 --seed_everything 1

The model's own ``configure_optimizers`` (the mixin's expert/fusion/gates/vlm groups with their stage-aware
schedule) is kept: do not add ``--optimizer``/``--lr_scheduler``, which would replace it with a single group.
``--pretrained_vlm true`` starts from the benchmark's pretrained VLM (trained once, then cached).

Evaluation of a saved checkpoint, on the benchmark splits and/or on a file of your own instructions::

    apt-evaluate runs/study/checkpoints/pi0-apt-seed0.ckpt --instructions my_instructions.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from apt_lightning.bench.datamodule import TabletopDataModule
from apt_lightning.models.base import FlowMatchingPolicy

__all__ = ["APTLightningCLI", "evaluate_entry", "evaluate_main", "main"]


class APTLightningCLI(LightningCLI):
    """LightningCLI for the reference policies on the tabletop benchmark, with early consistency checks."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--pretrained_vlm", type=bool, default=False,
            help="Load the VLM pretrained on the benchmark's diverse language (pretrains and caches it if needed).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if not config.get("pretrained_vlm"):
            return
        from apt_lightning.bench.vlm_pretraining import pretrained_vlm
        from apt_lightning.models import tiny_paligemma_config

        model = config["model"]
        args = model["init_args"]
        hidden = _vlm_width(model)
        data = TabletopDataModule()
        path, _ = pretrained_vlm(tiny_paligemma_config(vocab_size=data.vocab_size, hidden_size=hidden), data.tokenizer)
        key = "vlm_pretrained" if model["class_path"].endswith("PI0Policy") else "pretrained"
        args[key] = str(path)

    def before_fit(self) -> None:
        _check_model_matches_data(self.model, self.datamodule)


def _vlm_width(model: Any) -> int:
    args = model["init_args"]
    if model["class_path"].endswith("PI0Policy"):
        return int(args["config"]["vlm_config"]["text_config"]["hidden_size"])
    return int(args["vlm_config"]["text_config"]["hidden_size"])


def _check_model_matches_data(model: FlowMatchingPolicy, data: Any) -> None:
    """Chunk length and vocabulary must agree before step 0, not fail inside the first forward."""
    if not isinstance(data, TabletopDataModule):
        return
    problems = []
    if model.chunk_size != data.hparams.chunk_size:
        problems.append(f"model chunk size {model.chunk_size} != data.chunk_size {data.hparams.chunk_size}")
    vlm_config = model.apt_vlm_module.config
    vocab = vlm_config.get_text_config().vocab_size
    if vocab < data.vocab_size:
        problems.append(f"VLM vocabulary {vocab} < benchmark vocabulary {data.vocab_size} (prompt words + image token)")
    if problems:
        raise ValueError(
            "Model and data do not match: " + "; ".join(problems) + ". Set the model config to the data "
            "(see configs/*.yaml) or change --data.chunk_size."
        )


def main(args: list[str] | None = None) -> None:
    """``apt-lightning``: LightningCLI over any reference policy and the tabletop data."""
    APTLightningCLI(
        FlowMatchingPolicy, TabletopDataModule, subclass_mode_model=True, args=args,
        save_config_kwargs={"overwrite": True},
    )


def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``apt-evaluate``: success per split (and on your instruction file) of a saved policy checkpoint."""
    from apt_lightning.bench.evaluation import evaluate_policy
    from apt_lightning.bench.splits import EVAL_SPLITS
    from apt_lightning.bench.user_file import load_instruction_file, user_episodes
    from apt_lightning.models import load_policy

    parser = argparse.ArgumentParser(prog="apt-evaluate", description=evaluate_main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by Trainer for a reference policy")
    parser.add_argument(
        "--instructions", type=Path,
        help="text file, one instruction per line (or .jsonl with an 'instruction' field); evaluated as split 'user'",
    )
    parser.add_argument("--per-instruction", type=int, default=5, help="scenes per user instruction")
    parser.add_argument(
        "--splits", nargs="*", default=list(EVAL_SPLITS), help=f"benchmark splits (default: all of {list(EVAL_SPLITS)})"
    )
    parser.add_argument("--episodes", type=int, default=100, help="rollouts per benchmark split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    extra = {}
    if args.instructions is not None:
        if not args.instructions.is_file():
            parser.error(f"instruction file {args.instructions} does not exist")
        instructions = load_instruction_file(args.instructions)  # names file:line of any bad instruction
        if not instructions:
            parser.error(f"{args.instructions} holds no instruction (blank lines and # comments are skipped)")
        extra["user"] = user_episodes(instructions, per_instruction=args.per_instruction, seed=args.seed)
    policy = load_policy(args.checkpoint)
    results = evaluate_policy(
        policy, args.splits, args.episodes, seed=args.seed, extra_splits=extra, progress=True
    )
    stage = {0: "joint baseline", 1: "APT stage 1", 2: "APT stage 2"}[policy.apt_stage]
    print(f"{type(policy).__name__} ({stage}) from {args.checkpoint}")
    for split, rate in results["success"].items():
        count = len(extra[split]) if split in extra else args.episodes
        print(f"  {split:<20} success {rate:.3f}  ({count} episodes)")
    for key in ("instruction_sensitivity", "action_error"):
        if key in results:
            print(f"  {key:<20} {results[key]:.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def evaluate_entry() -> None:
    """Console-script wrapper: ``sys.exit`` would print a returned dict and exit with status 1."""
    evaluate_main()


if __name__ == "__main__":
    main()
