"""Command-line entry points of the benchmark: ``apt-lightning`` (LightningCLI with YAML configs) and ``apt-evaluate``.

They live in :mod:`apt_studies` because they are bound to the tabletop data; the core library never
imports them. Install them with the ``bench`` extra (``pip install "apt_lightning[bench]"``).

Training runs through the ordinary LightningCLI, so every Trainer, model and data option is a flag or a
YAML key::

    apt-lightning fit --config configs/pi0_apt.yaml
    apt-lightning fit --config configs/groot_baseline.yaml --trainer.max_steps 800 --seed_everything 1
    python -m apt_studies.cli fit --config configs/groot_apt.yaml   # the same without the script

A killed run resumes exactly from its last checkpoint with ``--ckpt_path``::

    apt-lightning fit --config configs/groot_apt.yaml --ckpt_path runs/cli/groot_apt/checkpoints/last.ckpt

The model's own ``configure_optimizers`` (the mixin's expert/fusion/gates/vlm groups with their stage-aware
schedule) is kept: do not add ``--optimizer``/``--lr_scheduler``, which would replace it with a single group.
``--pretrained_vlm true`` starts from the benchmark's pretrained VLM (trained once, then cached).

Evaluation of a saved checkpoint, on the benchmark splits and/or on a file of your own instructions::

    apt-evaluate runs/study/checkpoints/pi0-apt-seed0.ckpt --instructions my_instructions.txt

A bad checkpoint or instruction file ends ``apt-evaluate`` with one line, ``apt-evaluate: error: <what and how to
fix>``, and exit status 2; warnings (unknown words, JSON in a ``.txt`` file) print as ``apt-evaluate: warning:``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from apt_lightning.checksum import CheckpointWriteError
from apt_lightning.errors import AptError, ConfigError
from apt_lightning.models.base import (
    FlowMatchingPolicy,
    PolicyCheckpointError,
    configuration_differences,
    read_checkpoint,
)
from apt_studies.datamodule import TabletopDataModule
from apt_studies.errors import OutputPathError
from apt_studies.language import InstructionResolutionError
from apt_studies.output import atomic_write_text, check_writable_dir, check_writable_file
from apt_studies.user_file import InstructionFileError

__all__ = [
    "USER_ERRORS",
    "APTLightningCLI",
    "ModelDataMismatchError",
    "cli_entry",
    "evaluate_entry",
    "evaluate_main",
    "main",
    "model_vlm_width",
]

_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself (not files)."""


class ModelDataMismatchError(AptError, ValueError):
    """The model's chunk size or vocabulary does not match the data module's (checked before step 0)."""


USER_ERRORS: tuple[type[Exception], ...] = (
    InstructionFileError,
    InstructionResolutionError,
    PolicyCheckpointError,
    ModelDataMismatchError,
    ConfigError,
    OutputPathError,
    CheckpointWriteError,
)

MAX_EPISODES = 100_000
"""Most rollouts ``apt-evaluate`` runs per split or per user instruction (about a day on 2 CPU cores)."""
"""Errors caused by the command's inputs: the console scripts print them as one line, not a traceback."""


class APTLightningCLI(LightningCLI):
    """LightningCLI for the reference policies on the tabletop benchmark, with early consistency checks."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--pretrained_vlm",
            type=bool,
            default=False,
            help="Load the VLM pretrained on the benchmark's diverse language (pretrains and caches it if needed).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        _check_output_dirs(config)
        if not config.get("pretrained_vlm"):
            return
        from apt_lightning.models import tiny_paligemma_config
        from apt_studies.vlm_pretraining import pretrained_vlm

        model = config["model"]
        hidden = model_vlm_width(model)
        data = TabletopDataModule()
        path, _ = pretrained_vlm(
            tiny_paligemma_config(**data.tokenizer.vlm_vocabulary, hidden_size=hidden), data.tokenizer
        )
        model["init_args"]["vlm_pretrained"] = str(path)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (readable, weights pass their content digest) before LightningCLI reads the
        file's hyper-parameters (a raw ``torch.load`` there) and before any class is built from them."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path):
            _check_resume_checkpoint(Path(ckpt_path))
            # LightningCLI now replaces the model's arguments by the checkpoint's: refuse flags it would drop
            _check_overrides_match_checkpoint(self.config[subcommand], self._explicit_model_arguments())
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        _check_model_matches_data(self.model, self.datamodule)

    def _explicit_model_arguments(self) -> set[str]:
        """``--model.init_args.NAME`` flags given on the command line (what a ``--ckpt_path`` must not drop)."""
        argv = self._cli_args if self._cli_args is not None else sys.argv[1:]
        prefix = "--model.init_args."
        return {arg[len(prefix) :].split("=", 1)[0].split(".", 1)[0] for arg in argv if str(arg).startswith(prefix)}

    def parse_arguments(self, parser: Any, args: Any) -> None:
        self._cli_args = [str(a) for a in args] if isinstance(args, (list, tuple)) else None
        super().parse_arguments(parser, args)

    _cli_args: list[str] | None = None


def _check_output_dirs(config: Any) -> None:
    """The Trainer's ``default_root_dir`` and every ``ModelCheckpoint.dirpath`` can be written, before anything is
    built (an unwritable directory otherwise fails with a traceback, or after the first steps)."""
    trainer = config.get("trainer") or {}
    root = trainer.get("default_root_dir")
    if root:
        check_writable_dir(root, "`trainer.default_root_dir`")
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args") if hasattr(callback, "get") else None
        dirpath = init_args.get("dirpath") if init_args is not None and hasattr(init_args, "get") else None
        if dirpath:
            check_writable_dir(dirpath, "`ModelCheckpoint.dirpath`")


def _check_overrides_match_checkpoint(config: Any, explicit: set[str]) -> None:
    """With ``--ckpt_path``, LightningCLI builds the model from the checkpoint's hyper-parameters: a
    ``--model.init_args.X`` flag that differs from the checkpoint's value would be dropped without a word. Refuse
    it, naming both values."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or not explicit or str(ckpt_path) in _SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
        return
    recorded = read_checkpoint(Path(ckpt_path), verify=False).get("hyper_parameters") or {}
    init_args = config["model"]["init_args"]
    init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    given = {name: init_args.get(name) for name in explicit if name in init_args}
    differences = configuration_differences(recorded, given)
    if differences:
        shown = "; ".join(
            f"`--model.init_args.{n}`: checkpoint {a!r}, command line {b!r}" for n, a, b in differences[:4]
        )
        raise PolicyCheckpointError(
            f"--ckpt_path {ckpt_path} resumes a model trained with other values than the command line asks for "
            f"({shown}); resuming would ignore them. Drop those flags to resume as trained, or drop --ckpt_path to "
            "train a new model with them."
        )


def _check_resume_checkpoint(path: Path) -> None:
    """``--ckpt_path`` names a readable checkpoint whose weights pass their content check, before the fit starts.

    Raises:
        PolicyCheckpointError: a directory, a missing file, not a checkpoint, or a failed content check.
    """
    if path.is_dir():
        raise PolicyCheckpointError(f"--ckpt_path {path} is a directory; pass the .ckpt file inside it.")
    if not path.is_file():
        raise PolicyCheckpointError(
            f"--ckpt_path {path} does not exist; check the path (e.g. .../checkpoints/last.ckpt)."
        )
    read_checkpoint(path)


def model_vlm_width(model: Any) -> int:
    """Hidden size of the VLM text model of the parsed ``model`` config (``class_path`` + ``init_args``).

    Asks the policy class (:meth:`~apt_lightning.models.FlowMatchingPolicy.vlm_text_width`), so the command line
    knows no policy by name.
    """
    cls = _import(model["class_path"])
    if not (isinstance(cls, type) and issubclass(cls, FlowMatchingPolicy)):
        raise TypeError(
            f"`model.class_path`={model['class_path']!r} is not a FlowMatchingPolicy; --pretrained_vlm needs one."
        )
    init_args = model["init_args"]
    init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    return cls.vlm_text_width({key: _build_spec(value) for key, value in init_args.items()})


def _import(class_path: str) -> Any:
    """The object a ``class_path`` of the user's own config names (the parser has imported it already)."""
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _build_spec(value: Any) -> Any:
    """An argument as the class receives it: jsonargparse keeps a typed config (``PI0Config``) as a spec."""
    if isinstance(value, dict) and "class_path" in value and set(value) <= {"class_path", "init_args", "dict_kwargs"}:
        return _import(value["class_path"])(**value.get("init_args", {}), **value.get("dict_kwargs", {}))
    return value


def _check_model_matches_data(model: FlowMatchingPolicy, data: Any) -> None:
    """Chunk length and vocabulary must agree before step 0, not fail inside the first forward."""
    if not isinstance(data, TabletopDataModule):
        return
    problems = []
    if model.chunk_size != data.hparams.chunk_size:
        problems.append(
            f"model chunk size {model.chunk_size} != data.chunk_size {data.hparams.chunk_size} (set "
            f"--model.init_args.chunk_size {data.hparams.chunk_size} or --data.chunk_size {model.chunk_size})"
        )
    vocabulary = data.tokenizer.vlm_mismatches(model.apt.vlm_module.config)
    if vocabulary:
        problems.append(
            "; ".join(vocabulary) + " (build the model's VLM config from the data's tokenizer: see configs/*.yaml, or "
            "`tiny_*_config(**data.tokenizer.vlm_vocabulary)` in Python)"
        )
    if problems:
        raise ModelDataMismatchError("Model and data do not match: " + "; ".join(problems) + ".")


def main(args: list[str] | None = None) -> None:
    """LightningCLI over any reference policy and the tabletop data (raises; :func:`cli_entry` is the script)."""
    APTLightningCLI(
        FlowMatchingPolicy,
        TabletopDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def cli_entry(argv: list[str] | None = None) -> None:
    """Console script ``apt-lightning``: input errors (a model that does not match the data, a bad
    ``--ckpt_path``) print as ``apt-lightning: error: ...`` and exit with status 2, as ``apt-evaluate`` does."""
    _one_line_errors("apt-lightning", main, argv)


def _one_line_errors(prog: str, run: Any, argv: list[str] | None) -> None:
    try:
        run(argv)
    except Exception as error:  # re-raised below unless the user's input caused it
        cause = user_error(error)
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error(error: BaseException) -> str | None:
    """The one-line message for an error caused by the command's input, or ``None`` for a bug (a traceback).

    Input errors are :data:`USER_ERRORS` (and any :class:`~apt_lightning.errors.ConfigError`), also when
    jsonargparse wraps them while it builds the model or data from the config ("Does not validate against any of
    the Union subtypes"); a wrapped ``TypeError`` of a config class (an unknown key) and jsonargparse's own
    "Option ... is not accepted" count too.
    """
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for link in chain:
        if isinstance(link, USER_ERRORS):
            return " ".join(str(link).split())
    wrapped = any(
        type(link).__module__.startswith("jsonargparse")
        or str(link).startswith(
            ("Does not validate against any of the Union subtypes", "Problem with given class_path")
        )
        for link in chain
    )
    if not wrapped:
        return None
    innermost = " ".join(str(chain[-1]).split())
    return (
        f"invalid configuration: {innermost}. Correct or remove that key in the config file or flag (`apt-lightning "
        "fit --print_config` shows every accepted key)."
    )


def evaluate_main(argv: list[str] | None = None) -> dict[str, Any]:
    """``apt-evaluate``: success per split (and on your instruction file) of a saved policy checkpoint.

    Raises:
        PolicyCheckpointError: If the checkpoint is missing, a directory or not a reference policy's.
        InstructionFileError, InstructionResolutionError: If the instruction file cannot be read or names
            ``file:line`` of an instruction that resolves to no object.
    """
    from apt_lightning.models import load_policy
    from apt_studies.evaluation import evaluate_policy
    from apt_studies.splits import EVAL_SPLITS
    from apt_studies.user_file import load_instruction_file, user_episodes

    parser = argparse.ArgumentParser(prog="apt-evaluate", description=evaluate_main.__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by Trainer for a reference policy")
    parser.add_argument(
        "--instructions",
        type=Path,
        help="text file, one instruction per line (or .jsonl with an 'instruction' field); evaluated as split 'user'",
    )
    parser.add_argument("--per-instruction", type=int, default=5, help="scenes per user instruction")
    parser.add_argument(
        "--layouts",
        choices=["train", "novel"],
        default="train",
        help="scenes for user instructions: training layouts in which the instruction names exactly one object "
        "(default; measures language on familiar scenes), or fresh random scenes ('novel')",
    )
    parser.add_argument(
        "--splits", nargs="*", default=list(EVAL_SPLITS), help=f"benchmark splits (default: all of {list(EVAL_SPLITS)})"
    )
    parser.add_argument("--episodes", type=int, default=100, help="rollouts per benchmark split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    _check_evaluate_arguments(args, EVAL_SPLITS)
    if args.json is not None:
        check_writable_file(args.json, "--json file")  # before the evaluation, not after it
    if args.checkpoint.is_dir():
        raise PolicyCheckpointError(f"checkpoint {args.checkpoint} is a directory; pass the .ckpt file inside it.")
    if not args.checkpoint.is_file():
        raise PolicyCheckpointError(f"checkpoint {args.checkpoint} does not exist; check the path.")
    extra = {}
    if args.instructions is not None:
        instructions = load_instruction_file(args.instructions)  # names file:line of any bad instruction
        extra["user"] = user_episodes(
            instructions, per_instruction=args.per_instruction, seed=args.seed, layouts=args.layouts
        )
    policy = load_policy(args.checkpoint)
    results = evaluate_policy(policy, args.splits, args.episodes, seed=args.seed, extra_splits=extra, progress=True)
    stage = {0: "joint baseline", 1: "APT stage 1", 2: "APT stage 2"}[policy.apt.stage]
    print(f"{type(policy).__name__} ({stage}) from {args.checkpoint}")
    for split, rate in results["success"].items():
        count = len(extra[split]) if split in extra else args.episodes
        print(f"  {split:<20} success {rate:.3f}  ({count} episodes)")
    for key in ("instruction_sensitivity", "action_error"):
        if key in results:
            print(f"  {key:<20} {results[key]:.4f}")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(results, indent=1), "--json file")
    return results


def _check_evaluate_arguments(args: argparse.Namespace, splits: tuple[str, ...]) -> None:
    """Counts are integers in ``[1, MAX_EPISODES]`` and splits exist, before anything is loaded.

    Raises:
        ConfigError: naming the flag, the value, what is accepted and the fix.
    """
    for flag, value in (("--episodes", args.episodes), ("--per-instruction", args.per_instruction)):
        if not 1 <= value <= MAX_EPISODES:
            raise ConfigError(
                f"{flag} {value} is not a number of rollouts: pass an integer from 1 to {MAX_EPISODES:,} "
                f"(e.g. {flag} 100)."
            )
    unknown = [split for split in args.splits if split not in splits]
    if unknown:
        raise ConfigError(
            f"--splits {' '.join(unknown)}: no such benchmark split. Choose from {' '.join(splits)} (or omit "
            "--splits for all of them)."
        )


def _one_line_warning(message: Any, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"apt-evaluate: warning: {message}", file=sys.stderr)


def evaluate_entry(argv: list[str] | None = None) -> None:
    """Console script ``apt-evaluate``: input errors print as ``apt-evaluate: error: ...`` and exit with status 2.

    (Returning the results dict would make ``sys.exit`` print it and exit with status 1.)
    """
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        _one_line_errors("apt-evaluate", evaluate_main, argv)


if __name__ == "__main__":
    cli_entry()
