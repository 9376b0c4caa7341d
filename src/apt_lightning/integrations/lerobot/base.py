"""What every LeRobot adapter shares: the LightningModule around the user's ``PreTrainedPolicy``, exact-resume
noise, sampling and saving back to LeRobot's own format.

The adapter *holds* the policy (``self.policy``): the parameters it trains are LeRobot's own modules, and
:meth:`LeRobotAPTModule.save_pretrained` writes a directory that ``<Policy>.from_pretrained`` loads unchanged. The
Stage-2 fusion blocks are not part of LeRobot's model: APT's own adapter files go beside it (``apt_config.json``,
``apt_model.safetensors``: :meth:`APT.save_pretrained`, the format of every APT model), and
``adapter.apt.load_pretrained(dir)`` on an adapter around the reloaded policy rebuilds the fusion blocks (plan, step
and structure from ``apt_config.json``) and loads them. Directories written before hold ``apt_fusion.safetensors``
instead, which :meth:`LeRobotAPTModule.load_fusion_from` still reads.

Batches are LeRobot's processed batches (what its pre-processor returns, or
:class:`~apt_lightning.integrations.lerobot.data.LeRobotDataModule` yields): ``observation.images.<camera>``,
``observation.state``, ``action``, ``observation.language.tokens``/``attention_mask``, plus
``observation.language.instruction_mask`` (bool, True on the instruction's tokens) where the prompt holds more
than the instruction (PI05's prompt embeds the discretised state).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from apt_lightning import (
    APT,
    APTConfig,
    APTMixin,
    FusionConfig,
    StageMismatchError,
    load_fusion,
)
from apt_lightning.inject import unload_fusion
from apt_lightning.integrations.lerobot._compat import LeRobotBatchError, require_lerobot

__all__ = ["FUSION_FILE", "INSTRUCTION_MASK", "LeRobotAPTModule"]

FUSION_FILE = "apt_fusion.safetensors"
"""File name of the Stage-2 fusion weights that :meth:`LeRobotAPTModule.save_pretrained` wrote beside LeRobot's before
it wrote APT's own adapter files (``apt_config.json``, ``apt_model.safetensors``); read by
:meth:`LeRobotAPTModule.load_fusion_from`."""
INSTRUCTION_MASK = "observation.language.instruction_mask"
"""Batch key of the (B, L) bool mask of instruction tokens within ``observation.language.tokens``."""


def _without_lora(module: nn.Module) -> None:
    """Merge every peft LoRA adapter of ``module`` into its base weight and put the base layer back (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.get_base_layer())


class LeRobotAPTModule(APTMixin, L.LightningModule):
    """APT on a LeRobot ``PreTrainedPolicy``; subclasses say where its VLM, expert and prompt are.

    Subclasses name their VLM and fusion targets (passed to :class:`~apt_lightning.APT` here), give
    :meth:`language_mask` and implement three hooks:
    :meth:`encode` (the VLM pass, once per batch), :meth:`fusion_context` (the language it offers Stage 2) and
    :meth:`velocity` (one expert pass over the batch).

    Args:
        policy: the LeRobot policy (built from its config or ``from_pretrained``); trained in place.
        apt_config: APT settings; the policy's own ``optimizer_lr`` is the expert learning rate when ``None``.
    """

    def __init__(self, policy: nn.Module, apt_config: APTConfig | None, vlm: str, fusion: FusionConfig) -> None:
        require_lerobot()
        super().__init__()
        self.policy = policy
        config = apt_config or APTConfig(lr=float(getattr(policy.config, "optimizer_lr", 1e-4)))
        self.apt = APT(self, vlm=vlm, fusion=fusion, config=config)
        self.chunk_size = int(policy.config.chunk_size)
        self.action_dim = int(policy.config.output_features["action"].shape[0])
        config = policy.config  # PI0/PI05 name their Euler steps `num_inference_steps`, SmolVLA `num_steps`
        self.num_steps = int(getattr(config, "num_inference_steps", None) or config.num_steps)

    # ------------------------------------------------------------------ hooks of each policy family
    def language_mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, L) bool over the whole VLM prefix, True on the instruction's tokens."""
        raise NotImplementedError

    def encode(self, batch: dict[str, Any]) -> Any:
        """The VLM pass: whatever :meth:`velocity` needs, computed once per batch (and once per sampling call)."""
        raise NotImplementedError

    def velocity(self, prefix: Any, batch: dict[str, Any], x_t: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """The expert's (B, chunk, max_action_dim) velocity at ``x_t``, ``time``; called inside the fusion context."""
        raise NotImplementedError

    def fusion_context(self, prefix: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Language features and their key mask for :meth:`apt_fusion_context`, from :meth:`encode`'s output."""
        raise NotImplementedError

    # ------------------------------------------------------------------ flow matching (the policy's conventions)
    def padded_actions(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's (B, chunk, action_dim) actions padded to ``max_action_dim``, after checking their shape.

        Raises:
            LeRobotBatchError: the actions' width is not the policy's action dimension (a dataset built for another
                robot would otherwise train silently on padded or cut vectors), or their chunk length is not the
                policy's ``chunk_size``.
        """
        from lerobot.policies.common.vla_utils import pad_vector

        actions = batch["action"]
        if actions.ndim != 3 or actions.shape[-1] != self.action_dim or actions.shape[1] != self.chunk_size:
            raise LeRobotBatchError(
                f"The batch's `action` has shape {tuple(actions.shape)}, but {type(self.policy).__name__} predicts "
                f"chunks of {self.chunk_size} actions of dimension {self.action_dim} (its config's "
                f"`output_features['action'].shape` and `chunk_size`): a dataset for another robot or action space. "
                "Build the policy for this dataset's features (LeRobot's `make_policy(cfg, ds_meta=dataset.meta)` "
                "does), or select the matching action keys."
            )
        return pad_vector(actions, self.policy.config.max_action_dim)

    def draw_noise_and_time(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, then time, drawn by the policy's own samplers in the order its ``forward`` draws them."""
        model = self.policy.model
        noise = model.sample_noise(actions.shape, actions.device)
        return noise, model.sample_time(actions.shape[0], actions.device)

    def flow_loss(
        self, batch: dict[str, Any], noise: torch.Tensor, time: torch.Tensor, per_sample: bool = False
    ) -> torch.Tensor:
        """LeRobot's loss (mean squared velocity error over the real action dimensions) under APT's stage;
        ``per_sample`` gives the (B,) losses LeRobot's ``forward(batch, reduction="none")`` returns."""
        actions = self.padded_actions(batch)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        prefix = self.encode(batch)
        with self.apt.fusion_context(*self.fusion_context(prefix)):
            v_t = self.velocity(prefix, batch, x_t, time)
        return self.reduce_loss(nn.functional.mse_loss(noise - actions, v_t, reduction="none"), batch, per_sample)

    def reduce_loss(self, losses: torch.Tensor, batch: dict[str, Any], per_sample: bool = False) -> torch.Tensor:
        """The policy's reduction of the (B, chunk, max_action_dim) squared errors: PI0/PI05 average the real
        action dimensions (padded chunk steps included, as LeRobot does); ``per_sample`` gives (B,) means."""
        losses = losses[:, :, : self.action_dim]
        return losses.mean(dim=(1, 2)) if per_sample else losses.mean()

    def loss(self, batch: dict[str, Any], micro_batch: int = 0) -> torch.Tensor:
        """The training loss of ``batch`` at the controller's step, for a loop of your own (no Trainer needed).

        Noise and flow-matching time come from APT's per-step stream (``apt.rng``), so a resumed loop draws what
        the uninterrupted one drew. Call ``apt.prepare(plan)`` once before the first batch and advance the step
        after each optimizer step.
        """
        actions = self.padded_actions(batch)
        with self.apt.rng(micro_batch):
            noise, time = self.draw_noise_and_time(actions)
        return self.flow_loss(batch, noise, time)

    @torch.no_grad()
    def sample_actions(
        self, batch: dict[str, Any], noise: torch.Tensor | None = None, num_steps: int | None = None
    ) -> torch.Tensor:
        """(B, chunk, action_dim) actions by the policy's Euler steps from ``noise`` (t = 1) to t = 0; the VLM
        pass runs once and its cache is reused by every step. ``noise`` may have the real or the padded width."""
        from lerobot.policies.common.flow_matching import euler_integrate
        from lerobot.policies.common.vla_utils import pad_vector

        config = self.policy.config
        state = batch["observation.state"]
        device = next(self.policy.parameters()).device  # the policy's, wherever LeRobot moved it
        if noise is None:
            noise = self.policy.model.sample_noise((state.shape[0], self.chunk_size, config.max_action_dim), device)
        noise = pad_vector(noise.to(device, torch.float32), config.max_action_dim)
        prefix = self.encode(batch)
        with self.apt.fusion_context(*self.fusion_context(prefix)):
            actions = euler_integrate(
                lambda x_t, t: self.velocity(prefix, batch, x_t, t),
                noise,
                num_steps or self.num_steps,
            )
        return actions[:, :, : self.action_dim]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, batch_idx)  # noise and time depend on the step only: exact resume
        self.log("train/loss", loss, batch_size=batch["action"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        actions = self.padded_actions(batch)
        with self.apt.rng(batch_idx, 1):
            noise, time = self.draw_noise_and_time(actions)
        loss = self.flow_loss(batch, noise, time)
        self.log("val/loss", loss, batch_size=actions.shape[0])
        return loss

    # ------------------------------------------------------------------ LeRobot's format
    def lerobot_policy(self) -> nn.Module:
        """A copy of the policy as LeRobot builds it: fusion wrappers removed, LoRA merged into the VLM weights."""
        clean = copy.deepcopy(self.policy)
        unload_fusion(clean)
        _without_lora(clean)
        return clean

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the policy with LeRobot's ``save_pretrained`` (loads with ``<Policy>.from_pretrained`` unchanged:
        fusion wrappers removed, LoRA merged) and APT's own files beside it (:meth:`APT.save_pretrained`:
        ``apt_config.json`` and ``apt_model.safetensors``, what the plan trains, LoRA adapters unmerged).

        Reload with ``adapter = PI0APT(PI0Policy.from_pretrained(base)); adapter.apt.load_pretrained(directory)``,
        where ``base`` holds the VLM the run started from: ``directory`` itself when the VLM stayed frozen or
        trained fully; the original pretrained policy after a LoRA run (``directory``'s VLM has the adapters merged
        in, which the base VLM digest refuses).
        """
        directory = Path(directory)
        self.lerobot_policy().save_pretrained(directory)
        if self.apt.is_prepared:  # an adapter never prepared has no plan to record: LeRobot's files only
            self.apt.save_pretrained(directory)
        return directory

    def load_fusion_from(self, directory: str | Path) -> None:
        """Load the fusion blocks of a :meth:`save_pretrained` directory into this adapter.

        A directory with APT's files (``apt_config.json``) is loaded by :meth:`APT.load_pretrained` (structure, plan
        and step from the file; prefer calling ``adapter.apt.load_pretrained(directory)`` directly). One written
        before holds :data:`FUSION_FILE`; then prepare the controller first with the plan and step the weights were
        trained to, so that the blocks exist and are active:
        ``adapter.apt.prepare(StagePlan(first_stage=1, switch_step=S), step=N)`` with ``N >= S``, or
        ``StagePlan(first_stage=2)``.

        Raises:
            StageMismatchError: (:data:`FUSION_FILE`) the controller is not in Stage 2, so the loaded fusion would sit
                unused and the adapter would silently act as the Stage-1 prior.
        """
        from apt_lightning.pretrained import CONFIG_NAME

        if (Path(directory) / CONFIG_NAME).is_file():
            self.apt.load_pretrained(directory)
            return
        plan, step = self.apt.plan, self.apt.step
        if self.apt.stage != 2:
            raise StageMismatchError(
                f"{FUSION_FILE} holds Stage-2 fusion weights, but this adapter's plan {plan.to_dict()} is in Stage "
                f"{self.apt.stage} at step {step}: the fusion would load and stay inactive. Prepare the controller at "
                "the step the weights reached (`apt.prepare(StagePlan(first_stage=1, switch_step=S), step=N)` with "
                "N >= S) or with `StagePlan(first_stage=2)` before loading."
            )
        load_fusion(self, Path(directory) / FUSION_FILE)
