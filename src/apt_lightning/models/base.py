"""Shared Lightning plumbing of the reference policies: batch layout, training/validation steps, sampling API.

Batch layout (what :mod:`apt_studies` produces and what a user's collate should return):

* ``pixel_values`` (B, 3, H, W) float, ``state`` (B, S) float, ``actions`` (B, T, A) float;
* ``input_ids`` (B, L), ``attention_mask`` (B, L) and ``language_mask`` (B, L) bool for the *text* prompt;
  each policy prepends its image tokens itself, as a VLM processor would.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from abc import abstractmethod
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from apt_lightning.checksum import load_checkpoint_file, verify_checkpoint_digest
from apt_lightning.config import APTConfig
from apt_lightning.errors import ConfigError, ContractError, LanguageMaskError, PolicyCheckpointError
from apt_lightning.guidance import PriorGuidance
from apt_lightning.masking import check_language_mask
from apt_lightning.mixin import APTMixin
from apt_lightning.models.sampling import SamplingCondition, pad_prompt, prime_fusion_context

_POLICY_CLASSES: dict[str, type[FlowMatchingPolicy]] = {}
"""Every subclass of :class:`FlowMatchingPolicy`, by ``module.qualname``: the only classes a checkpoint can name."""


def policy_class_name(cls: type) -> str:
    """The name a checkpoint stores in ``policy_class`` for ``cls`` (``"module.QualName"``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_policies() -> dict[str, type[FlowMatchingPolicy]]:
    """Policy classes :func:`load_policy` can build, by the name their checkpoints store (sorted)."""
    return dict(sorted(_POLICY_CLASSES.items()))


def registered_policy(name: Any, source: str | Path) -> type[FlowMatchingPolicy]:
    """The registered policy class that a saved file (``source``) names: a file never chooses code to import.

    Raises:
        PolicyCheckpointError: ``name`` is not a registered policy; the message lists the known ones.
    """
    cls = _POLICY_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise PolicyCheckpointError(
            f"{source} names `policy_class`={name!r}, which is not a subclass of FlowMatchingPolicy defined in this "
            f"process; known classes: {sorted(_POLICY_CLASSES)}. A saved file never chooses code to import: if the "
            "class is your own, import the module that defines it before loading."
        )
    return cls


def plain_data(value: Any) -> Any:
    """``value`` with every mapping key a string and every tuple a list, recursively.

    Hyper-parameters in this form survive YAML/JSON, so LightningCLI can parse a checkpoint's back (transformers
    configs store ``id2label`` with integer keys, and read them back as integers from string keys).

    Example::

        >>> plain_data({"id2label": {0: "LABEL_0"}, "sizes": (1, 2)})
        {'id2label': {'0': 'LABEL_0'}, 'sizes': [1, 2]}
    """
    if isinstance(value, Mapping):
        return {str(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return value


def as_apt_config(value: APTConfig | dict[str, Any] | None) -> APTConfig:
    """Accept an :class:`APTConfig`, its fields as a dict (YAML, checkpoints) or ``None`` (defaults)."""
    if value is None:
        return APTConfig()
    return value if isinstance(value, APTConfig) else APTConfig(**value)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """A Lightning checkpoint's content, read without unpickling code and checked against its content digest.

    What :func:`load_policy`, :meth:`FlowMatchingPolicy.load_from_checkpoint` and ``apt-lightning fit
    --ckpt_path`` read first: a file that is missing, truncated, not a checkpoint, not a dict, or whose digest
    (weights, APT record, hyper-parameters, optimizer state: :mod:`apt_lightning.checksum`) does not match is
    refused here, before any model is built from it. ``weights_only=True`` is passed explicitly, so
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` does not turn it off. ``verify=False`` leaves the digest to the caller
    (:func:`~apt_lightning.checksum.verify_checkpoint_digest` with ``parts=None``).

    Raises:
        PolicyCheckpointError: naming ``path``, with what is wrong and what to pass instead.
    """
    checkpoint = load_checkpoint_file(path, map_location)
    if verify:
        verify_checkpoint_digest(checkpoint, path, parts=None)
    return checkpoint


def _as_hyperparameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments as :meth:`FlowMatchingPolicy.save_policy_hyperparameters` stores them (configs as
    dicts, plain data)."""
    out = {}
    for name, value in values.items():
        if hasattr(value, "to_dict") and callable(value.to_dict):
            value = value.to_dict()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        out[name] = plain_data(value)
    return out


def configuration_differences(
    recorded: Mapping[str, Any], given: Mapping[str, Any], ignore: Collection[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``(name, recorded, given)`` for every hyper-parameter both hold with different values (recursively into
    dicts, by dotted name); names only one side holds are skipped (a newer release may add defaults), and so are
    ``ignore`` and ``transformers_version``.

    Example::

        >>> configuration_differences({"fusion_heads": 2, "config": {"a": 1}}, {"fusion_heads": 4, "config": {"a": 1}})
        [('fusion_heads', 2, 4)]
    """
    differences: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, name: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in a:
                if key in b and key not in ("transformers_version",) and f"{name}{key}" not in ignore:
                    walk(a[key], b[key], f"{name}{key}.")
        elif plain_data(a) != plain_data(b):
            differences.append((name.rstrip("."), a, b))

    walk(recorded, given, "")
    return differences


def _describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
    shown = "; ".join(f"`{name}`: checkpoint {old!r}, here {new!r}" for name, old, new in differences[:4])
    return shown + (f" (and {len(differences) - 4} more)" if len(differences) > 4 else "")


def load_policy(path: str | Path, map_location: str | torch.device = "cpu") -> FlowMatchingPolicy:
    """Load a reference policy saved by a ``Trainer`` checkpoint or :meth:`FlowMatchingPolicy.save_pretrained`,
    whichever class it is, in its saved stage.

    A directory is read by :func:`apt_lightning.models.files.load_policy_directory`: its config, base weights and
    APT adapter files are verified against their digests before the policy is built, under the same rules as below.

    The checkpoint is self-contained: the model config and APT settings are in its hyper-parameters and the
    weights in its state dict. Loading it is safe against a crafted file:

    * its ``policy_class`` is looked up among the subclasses of :class:`FlowMatchingPolicy` already defined
      (:func:`registered_policies`); no module the checkpoint names is ever imported;
    * every constructor argument that would download weights (``pretrained_arguments``, e.g. ``pretrained``,
      ``vlm_pretrained``) is set to ``None``, so no hub or path of the checkpoint's choosing is contacted;
    * tensors are read with ``weights_only=True``, passed explicitly (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot
      turn it off);
    * the weights, APT record, hyper-parameters and optimizer state are checked against the digests the module
      recorded when it saved (:mod:`apt_lightning.checksum`) before anything is built: a modified or corrupted file
      is never loaded;
    * the model built is compared with the checkpoint's recorded configuration
      (:meth:`FlowMatchingPolicy.on_load_checkpoint`).
      A checkpoint without a digest (older versions) loads with an
      :class:`~apt_lightning.errors.UnverifiedCheckpointWarning`.

    Raises:
        PolicyCheckpointError: If ``path`` is not a readable checkpoint, holds no ``policy_class``, names a
            class that is not a registered policy (the message lists the known ones), or fails its content check.
    """
    if isinstance(path, (str, os.PathLike)):
        from apt_lightning.models.files import POLICY_CONFIG_NAME, load_policy_directory

        if Path(path).is_dir():
            return load_policy_directory(path, map_location)
        if (Path(path).parent / POLICY_CONFIG_NAME).is_file():  # a file of a directory, e.g. its safetensors
            raise PolicyCheckpointError(
                f"{path} is one file of a policy directory written by `policy.save_pretrained`: pass the directory, "
                f"`load_policy({str(Path(path).parent)!r})`."
            )
    checkpoint = read_checkpoint(path, map_location, verify=False)
    name = checkpoint.get("policy_class")
    if name is None:
        raise PolicyCheckpointError(
            f"{path} holds no `policy_class`: it was not saved from a reference policy of apt_lightning.models. "
            "Load your own module with `YourModule.load_from_checkpoint(path)`."
        )
    cls = registered_policy(name, path)
    verify_checkpoint_digest(checkpoint, path, parts=None)  # before anything is built from the file
    parameters = inspect.signature(cls.__init__).parameters
    offline = {arg: None for arg in cls.pretrained_arguments if arg in parameters}
    # `_instantiator=None` also keeps Lightning from building the class through an instantiator the file names.
    policy = cls.load_from_checkpoint(path, map_location=map_location, weights_only=True, _instantiator=None, **offline)
    return policy.eval()


def check_bucket(bucket: int | None) -> None:
    """Refuse a sampling bucket that is not ``None`` or a positive ``int`` (a float would pad to fractions)."""
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
        raise ConfigError(
            f"`bucket` must be a positive int number of tokens or None, got {bucket!r}. Pass e.g. `bucket=16`."
        )


def tiny_gemma(hidden_size: int, num_layers: int, **extra: Any) -> dict[str, Any]:
    """Kwargs of a tiny Gemma text config (random weights; tests and examples)."""
    return dict(
        model_type="gemma",
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        **extra,
    )


def tiny_siglip(hidden_size: int, num_layers: int, image_size: int) -> dict[str, Any]:
    """Kwargs of a tiny SigLIP vision config with 8-pixel patches."""
    return dict(
        model_type="siglip_vision_model",
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        vision_use_head=False,
    )


def site_layers(num_sites: int, num_layers: int) -> list[int]:
    """Hidden-states index (1..num_layers) each of ``num_sites`` fusion sites reads, spread evenly by depth:
    expert layer i reads VLM layer ceil((i + 1) * num_layers / num_sites).

    Example::

        >>> site_layers(4, 2), site_layers(18, 18)[:3]
        ([1, 1, 2, 2], [1, 2, 3])
    """
    return [-(-(i + 1) * num_layers // num_sites) for i in range(num_sites)]


def per_site_text(hidden_states: Sequence[torch.Tensor], num_sites: int, start: int) -> list[torch.Tensor]:
    """The text part (from token ``start``) of the VLM layer each fusion site reads (:func:`site_layers`)."""
    return [hidden_states[k][:, start:] for k in site_layers(num_sites, len(hidden_states) - 1)]


def chunk_mse(prediction: torch.Tensor, target: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the chunk steps that exist.

    A chunk that runs past the end of its episode is padded (``pad_mask`` ``(B, T)`` True there, LeRobot's
    ``action_is_pad``); those steps carry no demonstration, so they do not count, as in LeRobot's pi0 and GR00T.
    Without a mask every step counts (``F.mse_loss``).
    """
    if pad_mask is None:
        return torch.nn.functional.mse_loss(prediction, target)
    keep = (~pad_mask.bool()).unsqueeze(-1).to(prediction.dtype)
    squared = (prediction - target).square() * keep
    return squared.sum() / (keep.sum() * prediction.shape[-1]).clamp(min=1)


def pad_last_dim(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` to ``size`` (pi0 pads state/actions to ``max_*_dim``)."""
    if x.shape[-1] > size:
        raise ConfigError(f"Last dimension {x.shape[-1]} exceeds the model's maximum {size}.")
    return torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def check_prompt_batch(batch: Mapping[str, Any]) -> torch.Tensor:
    """``batch["input_ids"]`` after checking the text prompt's three tensors agree (the batch layout above).

    Runs before a policy prepends its image tokens, so a 1-D, transposed or numpy mask is named here instead of
    failing inside ``torch.cat``. Reads no values (no host sync); the rows are checked by ``apt.masks``.

    Raises:
        LanguageMaskError: naming the key, what it is and the fix.
    """
    if not isinstance(batch, Mapping):
        raise LanguageMaskError(
            f"The batch must be a dict of tensors (see the batch layout), got {type(batch).__name__}."
        )
    missing = [key for key in ("input_ids", "attention_mask", "language_mask") if key not in batch]
    if missing:
        raise LanguageMaskError(
            f"The batch has no {missing} (keys: {sorted(batch)}): a reference policy needs the text prompt's "
            "`input_ids`, `attention_mask` and `language_mask` (B, L), the last True on instruction tokens."
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        what = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise LanguageMaskError(
            f"`input_ids` must be a (B, L) torch.Tensor, got {what}. Convert with `torch.as_tensor` in your collate "
            "function and keep one row per sample."
        )
    attention = batch["attention_mask"]
    if isinstance(attention, torch.Tensor) and attention.shape != ids.shape:
        raise LanguageMaskError(
            f"`attention_mask` has shape {tuple(attention.shape)} but `input_ids` {tuple(ids.shape)}: give one mask "
            "value per token, shape (B, L)."
        )
    language = batch["language_mask"]
    if not isinstance(language, torch.Tensor) or language.ndim != 2 or language.shape[0] != ids.shape[0]:
        # would fail inside torch.cat; a mask of the right rank is checked against the full prompt by apt.masks
        check_language_mask(language, attention, check_rows=False)
    return ids


class FlowMatchingPolicy(APTMixin, pl.LightningModule):
    """Base of the reference policies: they differ in how they condition, not in how they train."""

    action_dim: int
    chunk_size: int
    image_token_id: int
    num_image_tokens: int
    pretrained_arguments: ClassVar[tuple[str, ...]] = ("pretrained", "vlm_pretrained")
    """Constructor arguments that load weights from a path or hub id; :func:`load_policy` sets them to ``None``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _POLICY_CLASSES[policy_class_name(cls)] = cls

    @classmethod
    @abstractmethod
    def vlm_text_width(cls, init_args: Mapping[str, Any]) -> int:
        """Hidden size of the VLM's text model for these constructor arguments, without building the model.

        Lets a command line size a pretrained VLM to fit the policy before instantiating it.

        Args:
            init_args: The constructor arguments as a plain dict (configs as config objects or dicts); missing
                ones take their defaults. ``apt_studies.cli.model_vlm_width`` turns a parsed
                LightningCLI ``model`` config into this form.
        """
        raise NotImplementedError(
            f"{cls.__name__} does not implement the classmethod `vlm_text_width(init_args)`: return the hidden "
            "size of its VLM's text model from its constructor arguments."
        )

    def apt_language_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.prompt(batch)["language_mask"]

    def prompt(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full VLM prompt: ``input_ids``, ``attention_mask``, ``language_mask`` with image tokens first.

        A batch that already holds image tokens (from a PaliGemma processor) is used as it is.

        Raises:
            LanguageMaskError: a missing prompt key, a non-tensor (numpy) mask, or masks whose shape is not
                ``input_ids``' (B, L) (1-D, transposed), before any tensor is concatenated.
        """
        ids = check_prompt_batch(batch)
        if (ids == self.image_token_id).any():
            return {k: batch[k] for k in ("input_ids", "attention_mask", "language_mask")}
        image = torch.full(
            (ids.shape[0], self.num_image_tokens), self.image_token_id, dtype=ids.dtype, device=ids.device
        )
        return {
            "input_ids": torch.cat([image, ids], 1),
            "attention_mask": torch.cat(
                [torch.ones_like(image, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1
            ),
            "language_mask": torch.cat([torch.zeros_like(image, dtype=torch.bool), batch["language_mask"]], 1),
        }

    @abstractmethod
    def flow_loss(self, batch: dict[str, torch.Tensor], noise: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss for given noise (B, T, A_model) and time (B,)."""

    @abstractmethod
    def sample_time(self, batch_size: int) -> torch.Tensor:
        """Flow-matching time (B,) in the model's own convention."""

    # ------------------------------------------------------------------ sampling (one loop for every policy)
    @torch.no_grad()
    def sample_actions(
        self,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        num_steps: int | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Action chunk (B, T, action_dim) by Euler integration from ``noise``; ``guidance_scale`` > 1 contrasts
        the conditional velocity with the model's own vision-action prior (:mod:`apt_lightning.guidance`).

        Conditions once (:meth:`sampling_condition`), primes the fusion blocks' context keys/values once, then
        runs :meth:`denoising_step` (compiled after :meth:`compile_sampling`) at every step of
        :meth:`sampling_times`.

        The text prompt is right-padded to a multiple of :attr:`sampling_bucket` tokens (16 unless
        :meth:`compile_sampling` or :meth:`eager_sampling` says otherwise), eager or compiled. Every instruction
        length inside one bucket then gives the same tensor shapes, hence the same kernels and the same summation
        order: in Stage 1 the actions are bit-identical across such instructions on every CPU, in bf16 too (the
        instruction's tokens are masked, and masked terms add exact zeros). Unpadded, the expert's action keys sit
        after the prompt, so their position in every reduction moved with the prompt's length, and a vectorised
        kernel (ATen's AVX2 bf16 path) grouped the sums differently (1.2e-4 apart, issue 26). Prompts in different
        buckets agree up to summation order (bound in ``tests/faults/test_numerics.py``).
        """
        num_steps = num_steps or self.default_sampling_steps
        if self.sampling_bucket is not None:
            batch = pad_prompt(batch, self.sampling_bucket)
        b = batch["state"].shape[0]
        if noise is None:
            noise = torch.randn(b, self.chunk_size, self.noise_dim, device=self.device)
        x = pad_last_dim(noise.to(self.dtype), self.noise_dim)  # the weights' dtype (bf16-true samples in bf16)
        condition = self.sampling_condition(batch)
        with self.apt.fusion_context(condition.features, condition.language_mask, guidance_scale) as guide:
            prime_fusion_context(self, x.dtype)  # the context is the same at every step: keys/values once
            inputs = self.denoising_inputs(batch, condition.encoded, guide)
            step = self._apt_compiled_step or self.denoising_step
            times, dt = self.sampling_times(num_steps)
            rows = b * 2 if guide.active else b
            for time in times:
                t = torch.full((rows,), time, device=x.device)
                x = x + dt * guide.combine(step(guide.expand(x), t, *inputs))
        return x[..., : self.action_dim]

    @property
    def default_sampling_steps(self) -> int:
        """Euler steps of :meth:`sample_actions` when ``num_steps`` is not given."""
        raise NotImplementedError(f"{type(self).__name__} does not define `default_sampling_steps`.")

    def sampling_times(self, num_steps: int) -> tuple[list[float], float]:
        """The flow-matching times of the Euler steps, in order, and the step ``dt`` (the model's convention)."""
        raise NotImplementedError(f"{type(self).__name__} does not define `sampling_times`.")

    def sampling_condition(self, batch: dict[str, torch.Tensor]) -> SamplingCondition:
        """One VLM pass for a sampling call: fusion context, its key mask and the policy's own conditioning."""
        raise NotImplementedError(f"{type(self).__name__} does not define `sampling_condition`.")

    def denoising_inputs(self, batch: dict[str, torch.Tensor], encoded: Any, guide: PriorGuidance) -> tuple[Any, ...]:
        """The per-call inputs of :meth:`denoising_step` after ``x`` and ``t`` (expanded for guidance)."""
        raise NotImplementedError(f"{type(self).__name__} does not define `denoising_inputs`.")

    def denoising_step(self, x: torch.Tensor, time: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """Velocity (B', T, A) at ``x`` (B', T, A) and ``time`` (B',): one expert pass, what compilation covers."""
        raise NotImplementedError(f"{type(self).__name__} does not define `denoising_step`.")

    def compile_sampling(self, bucket: int | None = 16, **compile_kwargs: Any) -> FlowMatchingPolicy:
        """Compile the denoising step with ``torch.compile`` (full graph, static shapes) for :meth:`sample_actions`.

        The step compiles on first use and again only when a guard changes: the number of rows (batch size,
        doubled under guidance), the prompt length after padding to a multiple of ``bucket`` tokens (``None``: no
        padding, every length compiles once), the stage (fusion sites active or not), the dtype or the device.
        Within one bucket every instruction length reuses one graph. Returns ``self``.

        Args:
            bucket: pad text prompts to a multiple of this many tokens (masked out: the same actions up to
                floating-point summation order).
            compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode`` ...); ``fullgraph=True`` and
                ``dynamic=False`` unless given.
        """
        check_bucket(bucket)
        options = {"fullgraph": True, "dynamic": False, **compile_kwargs}
        self._apt_compiled_step = torch.compile(self.denoising_step, **options)
        self._apt_sampling_bucket = bucket
        return self

    def eager_sampling(self, bucket: int | None = 16) -> FlowMatchingPolicy:
        """Undo :meth:`compile_sampling`: eager steps, prompts padded to a multiple of ``bucket`` tokens (the
        default, as compiled; ``None``: prompts as given, whose Stage-1 actions then agree across prompt lengths
        only up to summation order). Returns ``self``."""
        check_bucket(bucket)
        self._apt_compiled_step = None
        self._apt_sampling_bucket = bucket
        return self

    @property
    def sampling_bucket(self) -> int | None:
        """Text prompts are right-padded to a multiple of this many tokens when sampling (``None``: not padded)."""
        return self._apt_sampling_bucket

    _apt_compiled_step: Any = None
    _apt_sampling_bucket: int | None = 16

    @property
    def noise_dim(self) -> int:
        return self.action_dim

    def draw_noise_time(self, batch_size: int, *keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and time from the per-step stream (:meth:`apt_rng`): exact on resume and across ranks."""
        with self.apt.rng(*keys):
            noise = torch.randn(batch_size, self.chunk_size, self.noise_dim, device=self.device)
            time = self.sample_time(batch_size).to(self.device)
        return noise, time

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        noise, time = self.draw_noise_time(batch["state"].shape[0], batch_idx)
        loss = self.flow_loss(batch, noise, time)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["state"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        noise, time = self.draw_noise_time(batch["state"].shape[0], batch_idx, 7)
        loss = self.flow_loss(batch, noise, time)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["state"].shape[0])
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        return self.sample_actions(batch)

    def save_policy_hyperparameters(self, **overrides: Any) -> None:
        """Store the calling constructor's arguments as plain data, so checkpoints load without pickles.

        Every argument of the constructor that calls this is stored, so a new argument cannot be forgotten,
        except :attr:`pretrained_arguments` (paths that need not exist where the checkpoint is loaded; the
        weights they loaded are in the checkpoint). ``overrides`` replace arguments by what was built from them
        (a config as a dict). Configs are stored as dicts with string keys (:func:`plain_data`), and the class
        under ``_class_path`` (LightningCLI's own key), so ``LightningCLI`` parses them back when a run resumes
        with ``--ckpt_path``.
        """
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:  # pragma: no cover -- an interpreter without Python frames
            raise ContractError("save_policy_hyperparameters() needs the calling constructor's frame.")
        arguments = inspect.getargvalues(caller)
        values = {name: arguments.locals[name] for name in arguments.args[1:] if name not in self.pretrained_arguments}
        values.update(overrides)
        values["apt_config"] = dataclasses.asdict(as_apt_config(values.get("apt_config")))
        values["_class_path"] = policy_class_name(type(self))
        self.save_hyperparameters(plain_data(values))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this policy to ``directory``: ``policy_config.json`` (class and constructor arguments),
        ``policy_model.safetensors`` (the base weights) and APT's own ``apt_config.json`` / ``apt_model.safetensors``
        (:meth:`APT.save_pretrained`), each verified by a digest; :meth:`from_pretrained` or :func:`load_policy`
        reads it back exactly (:mod:`apt_lightning.models.files`).

        Raises:
            NotPreparedError: the policy has no stage plan yet.
            ExportError: a weight is NaN or infinite (nothing is written), or ``directory`` is a file.
        """
        from apt_lightning.models.files import save_policy_directory

        return save_policy_directory(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> FlowMatchingPolicy:
        """Load what :meth:`save_pretrained` wrote, in its saved stage and eval mode; ``cls`` must be the saved class
        or a base of it (``FlowMatchingPolicy.from_pretrained`` takes any reference policy).

        Raises:
            PolicyCheckpointError: a missing, modified or corrupted file (named, with the fix), or another class.
        """
        from apt_lightning.models.files import load_policy_directory

        return load_policy_directory(directory, map_location, expected=cls)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["policy_class"] = policy_class_name(type(self))
        super().on_save_checkpoint(checkpoint)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]  # Lightning's and APTMixin's orders cannot both hold
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, made safe: the file is read with ``weights_only=True`` (explicitly,
        whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says) and checked against every digest part before anything
        is built; a keyword argument that contradicts the checkpoint's recorded configuration (``fusion_heads=4``
        on a 2-head checkpoint, other ``fusion_options``, another ``config``) is refused instead of silently
        building a model the weights were not trained as. Arguments the checkpoint does not record, equal values,
        :attr:`pretrained_arguments` and ``apt_config`` (checked by APT's own record) pass.

        Raises:
            PolicyCheckpointError: ``weights_only=False``, an ``hparams_file``, a path that is not a local file, a
                file that fails to read or to verify, or a contradicting argument (both values named).
        """
        if weights_only is False:
            raise PolicyCheckpointError(
                f"Refusing `{cls.__name__}.load_from_checkpoint(..., weights_only=False)`: a reference policy's "
                "checkpoint holds only tensors and plain data, and unpickling anything else runs code from the file. "
                "Drop `weights_only=False`."
            )
        if hparams_file is not None:
            raise PolicyCheckpointError(
                f"`hparams_file`={str(hparams_file)!r} is not supported: the checkpoint records the configuration "
                "its weights were trained with, and another one would build a different model. Drop `hparams_file`."
            )
        if not isinstance(checkpoint_path, (str, os.PathLike)):
            raise PolicyCheckpointError(
                f"`checkpoint_path` must be the path of a local .ckpt file, got {type(checkpoint_path).__name__}: "
                "save the stream to a file first."
            )
        checkpoint = read_checkpoint(checkpoint_path, map_location if map_location is not None else "cpu")
        recorded = checkpoint.get("hyper_parameters") or {}
        overrides = {k: v for k, v in kwargs.items() if not k.startswith("_") and k not in cls.pretrained_arguments}
        differences = configuration_differences(recorded, _as_hyperparameters(overrides), ignore=("apt_config",))
        if differences:
            raise PolicyCheckpointError(
                f"{checkpoint_path} was trained as a different model than these arguments build: "
                f"{_describe_differences(differences)}. Load it as saved (drop those arguments), or build "
                f"`{cls.__name__}(...)` with the new values and train it."
            )
        del checkpoint
        return super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, strict=strict, weights_only=True, **kwargs
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose recorded configuration differs from this module's (``Trainer.fit(ckpt_path=)``
        with a model built with other ``fusion_heads``, ``fusion_options``, ``per_site_language``, model config
        ...), before APT's record or any weight is restored; then the mixin's checks."""
        recorded = checkpoint.get("hyper_parameters")
        if isinstance(recorded, Mapping):
            ignore = ("apt_config", "_class_path", *self.pretrained_arguments)
            differences = configuration_differences(recorded, dict(self.hparams), ignore=ignore)
            if differences:
                raise PolicyCheckpointError(
                    f"The checkpoint being loaded was trained as a different {type(self).__name__} than this one: "
                    f"{_describe_differences(differences)}. Build the model with the checkpoint's values (or drop "
                    "the overriding arguments, e.g. `--model.init_args.*` beside `--ckpt_path`), or start a new "
                    "training without `ckpt_path`."
                )
        super().on_load_checkpoint(checkpoint)
