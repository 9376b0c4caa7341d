"""APT as LeRobot policy types: what the ``lerobot_policy_apt`` plugin's ``pi0_apt``, ``pi05_apt`` and
``smolvla_apt`` share.

A policy type is LeRobot's own policy class (``PI0Policy``, ``PI05Policy``, ``SmolVLAPolicy``) with
:class:`APTPolicyMixin` in front, and its config LeRobot's config with :class:`APTPolicyOptions` in front. The
policy builds the family's adapter (:class:`~apt_lightning.integrations.lerobot.PI0APT`, ...) around itself and
lets it run every pass, so LeRobot's loop, optimizer, checkpoints and inference calls drive APT unchanged:

* ``forward(batch)`` is the adapter's flow-matching loss under APT's stage (noise and time from APT's per-step
  stream); ``update()``, which ``lerobot-train`` calls after every optimizer step, advances APT's step;
* ``get_optim_params()`` returns APT's per-role groups (expert, fusion, gates, vlm) with their learning rates, so
  LeRobot's preset optimizer gives the gates their larger rate; a group that takes no gradient in a stage (fusion
  and gates in Stage 1, a frozen VLM) is skipped by AdamW, so it does not move;
* ``predict_action_chunk`` / ``select_action`` sample through the adapter (the prefix cache once per chunk, fusion
  in Stage 2), LeRobot's action queue unchanged;
* ``save_pretrained`` writes every weight, fusion blocks and LoRA adapters included, into LeRobot's own
  ``model.safetensors``, APT's record (plan, step, fusion shape, VLM mode) into ``config.json`` (``apt_record``),
  and APT's own adapter files beside them (``apt_config.json``, ``apt_model.safetensors``: the format
  :meth:`APT.save_pretrained` writes for every model). ``from_pretrained`` verifies APT's files and their agreement
  with ``config.json`` before building anything, rebuilds the structure from ``apt_config.json``, loads
  ``model.safetensors`` strictly, then checks it against APT's files: the trained weights must be the same tensors
  and the rest of the VLM must have the recorded digest.

A directory saved this way names its type (``"type": "smolvla_apt"``): loading it through the plain class
(``SmolVLAPolicy.from_pretrained``) raises :class:`~apt_lightning.integrations.lerobot.APTPolicyLoadError` instead
of dropping the fusion blocks.
"""

from __future__ import annotations

import contextvars
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from apt_lightning import APTConfig, ContractError, StageMismatchError, StagePlan
from apt_lightning.errors import ConfigError, ExportError, UnverifiedCheckpointWarning
from apt_lightning.integrations.lerobot._compat import APTPolicyLoadError
from apt_lightning.schedule import check_resume, parse_stage
from apt_lightning.structure import is_fusion_key

__all__ = ["APTPolicyMixin", "APTPolicyOptions"]

_BUILDING = contextvars.ContextVar("apt_building_policy", default=False)
"""True while an APT policy class constructs LeRobot's policy (the config's guard lets only those through)."""
_DEFER = contextvars.ContextVar("apt_defer_structure", default=False)
"""True while a plain LeRobot checkpoint loads into an APT policy: its structure is built after the weights."""
RECORD_VERSION = 1


@dataclass
class APTPolicyOptions:
    """APT's fields on a LeRobot policy config (``--policy.apt_<name>=...`` on LeRobot's command line).

    Args:
        apt_stage: the stage the run starts in: ``"1"`` (vision-action prior), ``"2"`` or ``"joint"`` (the
            ordinary single-stage baseline, no APT).
        apt_switch_step: optimizer step at which Stage 2 starts (with ``apt_stage="1"``); ``None`` stays in
            ``apt_stage``.
        apt_finetune: the loaded weights (``--policy.path``) start a new run of this plan at step 0 (pretrain, then
            fine-tune); consumed when applied, so a resumed fine-tune continues.
        apt_warm_start: with ``apt_finetune``, allow a plan that sees the instruction differently from the one the
            weights were trained under (joint weights fine-tuned with APT).
        apt_vlm_mode: how the VLM trains in Stage 2: ``"frozen"``, ``"lora"`` or ``"full"``.
        apt_lr: expert learning rate; the policy's ``optimizer_lr`` when ``None``.
        apt_fusion_lr, apt_gate_lr, apt_vlm_lr: per-group learning rates (:class:`~apt_lightning.APTConfig`).
        apt_lora_rank: LoRA rank with ``apt_vlm_mode="lora"``.
        apt_language_dropout: fraction of Stage-2 samples whose instruction is hidden from the fusion blocks.
        apt_seed: seed of APT's per-step noise and time streams.
        apt_fusion_heads: attention heads of each fusion block.
        apt_fusion_ff_mult: feed-forward expansion of each fusion block (0: cross-attention only).
        apt_tokenizer_name: tokenizer the processors load instead of the policy's Hub default (a local directory
            works offline); ``None`` keeps LeRobot's.
        apt_record: written by ``save_pretrained`` (JSON: plan, step, fusion shape, VLM mode of the saved weights);
            leave it alone.
    """

    apt_stage: str = "1"
    apt_switch_step: int | None = None
    apt_finetune: bool = False
    apt_warm_start: bool = False
    apt_vlm_mode: str = "frozen"
    apt_lr: float | None = None
    apt_fusion_lr: float | None = None
    apt_gate_lr: float | None = None
    apt_vlm_lr: float | None = None
    apt_lora_rank: int = 16
    apt_language_dropout: float = 0.0
    apt_seed: int = 0
    apt_fusion_heads: int = 2
    apt_fusion_ff_mult: int = 4
    apt_tokenizer_name: str | None = None
    apt_record: str | None = None

    lerobot_type: ClassVar[str]
    """The LeRobot policy type this APT type extends (its processors are built with APT's steps)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # LeRobot's config
        self.apt_plan()
        self.apt_config()
        if isinstance(self.apt_fusion_heads, bool) or not isinstance(self.apt_fusion_heads, int):
            raise ConfigError(f"`apt_fusion_heads` must be a positive int, got {self.apt_fusion_heads!r}.")
        self.apt_saved_record()

    def apt_plan(self) -> StagePlan:
        """The :class:`~apt_lightning.StagePlan` of ``apt_stage`` and ``apt_switch_step``.

        Raises:
            ConfigError: naming the option and the accepted values.
        """
        stage_text = str(self.apt_stage).strip().lower()
        stage = parse_stage("joint" if stage_text in ("joint", "0") else _int_or(stage_text), "apt_stage")
        if self.apt_switch_step is not None and stage != 1:
            raise ConfigError(
                f"`apt_switch_step`={self.apt_switch_step} needs `apt_stage`='1' (a run that starts in Stage 1), got "
                f"`apt_stage`={self.apt_stage!r}."
            )
        return StagePlan(first_stage=stage, switch_step=self.apt_switch_step)

    def apt_config(self) -> APTConfig:
        """The :class:`~apt_lightning.APTConfig` of these options; learning rate and weight decay default to the
        policy's own ``optimizer_lr`` and ``optimizer_weight_decay``."""
        lora = (
            {"lora_rank": self.apt_lora_rank, "lora_alpha": self.apt_lora_rank} if self.apt_vlm_mode == "lora" else {}
        )
        return APTConfig(
            vlm_mode=self.apt_vlm_mode,  # type: ignore[arg-type]
            lr=float(self.apt_lr if self.apt_lr is not None else self.optimizer_lr),  # type: ignore[attr-defined]
            fusion_lr=self.apt_fusion_lr,
            gate_lr=self.apt_gate_lr,
            vlm_lr=self.apt_vlm_lr if self.apt_vlm_mode != "frozen" else None,
            weight_decay=float(self.optimizer_weight_decay),  # type: ignore[attr-defined]
            language_dropout=self.apt_language_dropout,
            seed=self.apt_seed,
            **lora,
        )

    def apt_fusion_options(self) -> dict[str, Any]:
        return {"ff_mult": self.apt_fusion_ff_mult}

    def apt_saved_record(self) -> dict[str, Any] | None:
        """The record ``save_pretrained`` wrote (``None`` for a config that never saved weights)."""
        if self.apt_record is None:
            return None
        try:
            record = json.loads(self.apt_record)
            saved_plan_and_step(record)
        except (ValueError, TypeError, KeyError) as error:
            raise ConfigError(
                f"`apt_record`={self.apt_record!r} is not a record written by an APT policy's save_pretrained "
                f"({error}); it is written, not set: remove it from the config to build a fresh policy."
            ) from error
        return record

    def validate_features(self) -> None:
        if not _BUILDING.get():
            raise APTPolicyLoadError(
                f"This is the config of an APT policy (type {self.type!r}), being built by a class that is not "  # type: ignore[attr-defined]
                f"APT's: a plain LeRobot {self.lerobot_type!r} policy would drop APT's fusion blocks, its "
                "language-blind masks and its plan, and act differently from the trained policy. Load it through its "
                f"registered type: `get_policy_class({self.type!r}).from_pretrained(path)` or `make_policy(cfg, ...)` "  # type: ignore[attr-defined]
                "(with `lerobot_policy_apt` installed, LeRobot's scripts do this)."
            )
        super().validate_features()  # type: ignore[misc]


def saved_plan_and_step(record: dict[str, Any]) -> tuple[StagePlan, int]:
    """The plan and step of an ``apt_record``."""
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"The APT record's `step` must be an int >= 0 (optimizer steps taken), got {step!r}.")
    return StagePlan(**record["plan"]), step


def _int_or(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


class APTPolicyMixin:
    """APT on a LeRobot policy class: put it first, ``class PI0APTPolicy(APTPolicyMixin, PI0Policy)``, and name the
    family's adapter in ``adapter_class``."""

    adapter_class: ClassVar[type]

    def __init__(self, config: Any, **kwargs: Any) -> None:
        token = _BUILDING.set(True)
        try:
            super().__init__(config, **kwargs)  # type: ignore[call-arg]  # LeRobot's policy, unchanged
        finally:
            _BUILDING.reset(token)
        adapter = self.adapter_class(
            self, config.apt_config(), fusion_heads=config.apt_fusion_heads, fusion_options=config.apt_fusion_options()
        )
        self.__dict__["_apt_adapter"] = adapter  # not a submodule: the adapter holds this policy
        if not _DEFER.get():
            self._apt_build()

    # ------------------------------------------------------------------ APT's structure and record
    @property
    def apt_adapter(self) -> Any:
        """The family's adapter (a LightningModule around this policy) that runs every pass."""
        return self.__dict__["_apt_adapter"]

    @property
    def apt(self) -> Any:
        """The :class:`~apt_lightning.APT` controller: plan, step, stage, fusion sites."""
        return self.apt_adapter.apt

    def _apt_build(self, saved: dict[str, Any] | None = None) -> None:
        """Build the structure the config asks for: the recorded plan and step when the config comes with saved
        weights, else the requested plan at step 0. ``saved`` is ``apt_config.json``'s record: the structure is then
        restored from it (:meth:`APT.load_state_dict`, which also checks fusion and LoRA configuration)."""
        config = self.config  # type: ignore[attr-defined]
        plan, record = config.apt_plan(), config.apt_saved_record()
        if record is None:
            self.apt.prepare(plan, step=0)
            return
        saved_plan, step = saved_plan_and_step(record)
        self._apt_check_shape(record)
        if not config.apt_finetune:
            try:
                check_resume(saved_plan, plan, step)
            except StageMismatchError as error:
                raise StageMismatchError(
                    f"{error} With LeRobot: to continue this run keep its `apt_stage`/`apt_switch_step` "
                    f"({saved_plan.to_dict()}); to start a new run of another plan from these weights add "
                    "`--policy.apt_finetune=true`."
                ) from error
        if saved is None:
            self.apt.prepare(saved_plan, step=step)  # the structure the saved weights have
        else:
            self.apt.load_state_dict(saved)

    def _apt_check_shape(self, record: dict[str, Any]) -> None:
        config = self.config  # type: ignore[attr-defined]
        now = {"fusion": config.apt_fusion_options() | {"num_heads": config.apt_fusion_heads}}
        now["vlm_mode"] = config.apt_vlm_mode
        for key, value in now.items():
            if key in record and record[key] != value:
                raise APTPolicyLoadError(
                    f"The saved weights were trained with {key}={record[key]!r}, but this config asks for {value!r}: "
                    "their modules differ. Keep the saved value (leave `apt_fusion_heads`, `apt_fusion_ff_mult` and "
                    "`apt_vlm_mode` as the directory's config.json has them)."
                )

    def _apt_after_load(self) -> None:
        """After the weights loaded: start the fine-tune plan (``apt_finetune``), then forget the request so that a
        resumed fine-tune continues instead of restarting."""
        config = self.config  # type: ignore[attr-defined]
        if config.apt_finetune:
            self.apt.start_finetune(config.apt_plan(), warm_start=config.apt_warm_start)
            config.apt_finetune = config.apt_warm_start = False
            config.apt_record = json.dumps(self.apt_record())

    def apt_record(self) -> dict[str, Any]:
        """What ``config.json`` records about the weights: plan, step, fusion shape, VLM mode."""
        config = self.config  # type: ignore[attr-defined]
        return {
            "plan": self.apt.plan.to_dict(),
            "step": self.apt.step,
            "stage": int(self.apt.stage),
            "fusion": config.apt_fusion_options() | {"num_heads": config.apt_fusion_heads},
            "vlm_mode": config.apt_vlm_mode,
            "version": RECORD_VERSION,
        }

    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.config.apt_record = json.dumps(self.apt_record())  # type: ignore[attr-defined]
        super()._save_pretrained(save_directory, state_dict=state_dict)  # type: ignore[misc]
        self.apt.save_pretrained(save_directory)  # APT's own files: one format with every other APT model

    def _apt_check_files(self, directory: Path, weights: str) -> None:
        """After ``model.safetensors`` loaded: its trained weights must equal ``apt_model.safetensors``'s and the rest
        of its VLM must be the base the APT files record."""
        from apt_lightning.pretrained import WEIGHTS_NAME, base_vlm_digest, pretrained_differences, read_pretrained

        try:
            differing = pretrained_differences(self.apt, directory, verify_base=False)
        except ExportError as error:
            raise APTPolicyLoadError(f"{directory} holds APT files that do not fit this policy: {error}") from error
        recorded = read_pretrained(directory)[0].get("base_vlm_sha256")
        if differing or (recorded is not None and base_vlm_digest(self.apt) != recorded):
            what = f"the trained weights {differing[:4]}" if differing else "the VLM weights APT does not train"
            raise APTPolicyLoadError(
                f"{weights} and {Path(directory) / WEIGHTS_NAME} disagree on {what}: one of them was modified or comes "
                "from another save. Copy the directory again from its source, or save the policy again."
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | Path,
        *,
        config: Any = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """LeRobot's ``from_pretrained`` for an APT policy directory: the structure of the config's ``apt_record``
        first, then every weight of ``model.safetensors``, strictly. A plain LeRobot checkpoint of the same family
        (no record, e.g. ``lerobot/pi0_base`` with ``--policy.type=pi0_apt --policy.pretrained_path=...``) loads the
        way LeRobot loads it, and APT's structure is built on top.

        Raises:
            APTPolicyLoadError: keys missing or unexpected, or APT weights without a record in the config.
        """
        from lerobot.configs import PreTrainedConfig
        from safetensors import safe_open
        from safetensors.torch import load_model

        hub = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "token": token}
        hub["local_files_only"] = local_files_only
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path, **hub)
        if not isinstance(config, cls.config_class):  # type: ignore[attr-defined]
            raise APTPolicyLoadError(
                f"{cls.__name__}.from_pretrained got a {type(config).__name__} ({config.type!r}); it needs a "
                f"{cls.config_class.__name__}. Use `get_policy_class({config.type!r})` for that directory."  # type: ignore[attr-defined]
            )
        weights = _weights_file(pretrained_name_or_path, hub)
        apt_files = _apt_files(pretrained_name_or_path, hub) if config.apt_saved_record() is not None else None
        saved = _saved_apt_record(apt_files, config) if apt_files is not None else None
        with safe_open(weights, framework="pt") as f:
            apt_keys = [k for k in f.keys() if is_fusion_key(k) or ".lora_" in k or ".base_layer." in k]  # noqa: SIM118
        if config.apt_saved_record() is None:
            if apt_keys:
                raise APTPolicyLoadError(
                    f"{weights} holds APT weights ({apt_keys[0]!r}, ...) but the config has no `apt_record` saying "
                    "which plan built them: load the directory with its own config.json (leave `config=` out, or use "
                    "`--policy.path=<dir>`) so that the structure can be rebuilt."
                )
            token_ = _DEFER.set(True)
            try:
                policy = super().from_pretrained(pretrained_name_or_path, config=config, **hub, **kwargs)  # type: ignore[misc]
            finally:
                _DEFER.reset(token_)
            policy._apt_build()
        else:
            token_ = _DEFER.set(saved is not None)
            try:
                policy = cls(config, **kwargs)
            finally:
                _DEFER.reset(token_)
            if saved is not None:
                policy._apt_build(saved)  # the structure apt_config.json describes
            from lerobot.utils.device_utils import resolve_safetensors_device

            missing, unexpected = load_model(
                policy, weights, strict=False, device=resolve_safetensors_device(config.device)
            )
            if strict and (missing or unexpected):
                raise APTPolicyLoadError(
                    f"{weights} does not fit the {config.type} policy its config describes: missing {missing[:5]} "
                    f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}). The config's `apt_record` and "
                    "APT options must be the ones saved with these weights."
                )
            if apt_files is not None:
                policy._apt_check_files(apt_files, weights)
            policy._apt_after_load()
        policy.to(config.device)
        policy.eval()
        return policy

    # ------------------------------------------------------------------ LeRobot's training hooks
    def get_optim_params(self) -> list[dict[str, Any]]:
        """APT's per-role parameter groups with their learning rates (LeRobot's preset optimizer takes them)."""
        return self.apt.param_groups()

    def update(self) -> None:
        """Called by ``lerobot-train`` after every optimizer step: APT's clock advances with the weights."""
        self.apt.advance()  # the one place the step advances: after LeRobot's optimizer step

    def train(self, mode: bool = True) -> Any:
        result = super().train(mode)  # type: ignore[misc]
        adapter = self.__dict__.get("_apt_adapter")
        if adapter is not None:  # the controller reads the adapter's flag (language dropout, VLM mode)
            adapter.training = mode
            adapter.apt._after_train_mode(mode)  # LeRobot calls train() every step: a frozen VLM stays in eval mode
        return result

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        time: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """LeRobot's training forward under APT's stage: ``(loss, logs)``; ``reduction="none"`` gives (B,) losses.

        Noise and time default to APT's per-step stream (a resumed run draws what the uninterrupted one drew).
        """
        if reduction not in ("mean", "none"):
            raise ConfigError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
        adapter = self.apt_adapter
        actions = adapter.padded_actions(batch)
        if noise is None or time is None:
            with self.apt.rng(0):
                drawn_noise, drawn_time = adapter.draw_noise_and_time(actions)
            noise = drawn_noise if noise is None else noise
            time = drawn_time if time is None else time
        loss = adapter.flow_loss(batch, noise, time, per_sample=reduction == "none")
        logs = {"loss": float(loss.detach().mean()), "apt_stage": int(self.apt.stage), "apt_step": self.apt.step}
        return loss, logs

    # ------------------------------------------------------------------ inference
    def apt_sample(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        """(B, chunk, action_dim) actions through the adapter (once-per-chunk prefix, fusion in Stage 2)."""
        rtc = getattr(self, "_rtc_enabled", lambda: False)()
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if rtc or extra:
            raise ContractError(
                f"APT policies sample without real-time chunking (got rtc_enabled={rtc}, options {sorted(extra)}): "
                "leave `rtc_config` unset and call predict_action_chunk(batch) or select_action(batch)."
            )
        self.eval()  # type: ignore[attr-defined]
        return self.apt_adapter.sample_actions(batch, noise)


def _apt_files(path: str | Path, hub: dict[str, Any]) -> Path | None:
    """The directory holding ``apt_config.json`` and ``apt_model.safetensors`` of a local directory or a Hub
    repository, or ``None`` (with :class:`~apt_lightning.errors.UnverifiedCheckpointWarning`) for a directory saved
    before APT's files were written beside LeRobot's."""
    import warnings

    from apt_lightning.pretrained import CONFIG_NAME, WEIGHTS_NAME

    if os.path.isdir(path):
        directory: Path | None = Path(path) if (Path(path) / CONFIG_NAME).is_file() else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            directory = Path(hf_hub_download(repo_id=str(path), filename=CONFIG_NAME, **hub)).parent
            hf_hub_download(repo_id=str(path), filename=WEIGHTS_NAME, **hub)
        except EntryNotFoundError:
            directory = None
    if directory is None:
        warnings.warn(
            f"{path} holds an APT policy saved without APT's own files ({CONFIG_NAME}, {WEIGHTS_NAME}): it loads "
            "from model.safetensors and config.json's `apt_record` alone, without their content checks. Save it again "
            "to add them.",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
    return directory


def _saved_apt_record(directory: Path, config: Any) -> dict[str, Any]:
    """``apt_config.json``'s record, verified (format, content hash of APT's weights) and consistent with the APT
    record of ``config`` (``config.json``): plan, step, stage, fusion shape and VLM mode, before anything is built."""
    from apt_lightning.pretrained import CONFIG_NAME, read_pretrained
    from apt_lightning.record import read_record

    try:
        files = read_pretrained(directory)[0]["record"]
        read_record(files, f"The record of {directory / CONFIG_NAME}")
    except (ExportError, ConfigError) as error:
        raise APTPolicyLoadError(str(error)) from error
    record = config.apt_saved_record()
    configuration = files.get("configuration") or {}
    fusion = configuration.get("fusion") or {}
    pairs = {
        "plan": (record.get("plan"), files.get("plan")),
        "step": (record.get("step"), files.get("step")),
        "vlm_mode": (record.get("vlm_mode"), configuration.get("vlm_mode")),
    }
    for key in ("num_heads", "ff_mult"):
        pairs[f"fusion.{key}"] = ((record.get("fusion") or {}).get(key), fusion.get(key))
    differ = [f"`{name}`: config.json {a!r}, {CONFIG_NAME} {b!r}" for name, (a, b) in pairs.items() if a != b]
    if differ:
        raise APTPolicyLoadError(
            f"{directory} holds APT files from another save than its config.json's `apt_record`: "
            + "; ".join(differ)
            + ". Copy the directory again from its source, or save the policy again."
        )
    return files


def _weights_file(path: str | Path, hub: dict[str, Any]) -> str:
    """``model.safetensors`` of a local directory or a Hub repository."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE

    if os.path.isdir(path):
        return os.path.join(path, SAFETENSORS_SINGLE_FILE)
    return hf_hub_download(repo_id=str(path), filename=SAFETENSORS_SINGLE_FILE, **hub)
