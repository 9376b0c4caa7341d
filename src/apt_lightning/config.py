"""Configuration dataclasses, validated in ``__post_init__`` like transformers/peft configs."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from apt_lightning.errors import ConfigError

VLMMode = Literal["frozen", "lora", "full"]
_VLM_MODES = ("frozen", "lora", "full")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HIGH_LANGUAGE_DROPOUT = 0.5
"""``language_dropout`` above which :class:`APTConfig` warns: most samples then never reach the gates."""


def check_pattern(name: str, value: Any) -> None:
    """A ``str`` target pattern must compile as a regular expression (peft semantics: full match).

    Raises:
        ConfigError: naming the field, the pattern and the regex error, at construction instead of at injection.
    """
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ConfigError(
                f"`{name}`={value!r} is not a valid regular expression ({error}). A str is matched as a regex against "
                "the full module name; escape dots and brackets (r'layers\\.\\d+'), or pass a list of names."
            ) from error
    elif value is not None and (
        not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value)
    ):
        raise ConfigError(f"`{name}` must be a regex str or a list of module names / dotted suffixes, got {value!r}.")


@dataclass
class FusionConfig:
    """Where Stage-2 gated cross-attention goes in the action expert and how it is shaped.

    Target names follow peft's ``target_modules`` semantics: a ``str`` is a regular expression that must match
    the full module name; a ``list`` matches a name exactly or as a dotted suffix (``"blocks.0"`` matches
    ``"head.blocks.0"``). Names are relative to the LightningModule.

    Args:
        target_modules: modules whose output gets a gated cross-attention block appended (e.g. decoder layers).
        exclude_modules: names removed from the matches, same semantics.
        hidden_dim: width of the targets' output; inferred from ``module.hidden_size`` or ``module.config``.
        context_dim: width of the language features; inferred from the VLM config when ``None``. A list gives
            one width per site, in site (module) order, for per-site contexts read from VLM layers of
            different widths.
        num_heads: attention heads of each block.
        head_dim: width per head; ``hidden_dim // num_heads`` when ``None``.
        ff_mult: expansion of the gated feed-forward branch; ``0``: no feed-forward branch (cross-attention only).
        dropout: dropout on attention and feed-forward outputs (before the gate).
        gate: ``"tanh"`` (default; zero-initialised, the Stage-2 model starts as exactly the Stage-1 model) or
            ``"sigmoid"`` (initialised at 0.5 as in APT's released code: the switch changes the outputs).
        gate_shape: ``"scalar"`` (one gate per branch, Flamingo) or ``"channel"`` (one per branch and channel).

    Example::

        >>> FusionConfig(target_modules=r"head\\.blocks\\.\\d+", num_heads=2).num_heads
        2
    """

    target_modules: str | list[str] = field(metadata={"help": "regex (str) or names/suffixes (list)"})
    exclude_modules: str | list[str] | None = None
    hidden_dim: int | None = None
    context_dim: int | list[int] | None = None
    num_heads: int = 4
    head_dim: int | None = None
    ff_mult: int = 4
    dropout: float = 0.0
    gate: Literal["tanh", "sigmoid"] = "tanh"
    gate_shape: Literal["scalar", "channel"] = "scalar"

    def __post_init__(self) -> None:
        if self.gate not in ("tanh", "sigmoid"):
            raise ConfigError(f"`gate` must be 'tanh' or 'sigmoid', got {self.gate!r}.")
        if self.gate_shape not in ("scalar", "channel"):
            raise ConfigError(f"`gate_shape` must be 'scalar' or 'channel', got {self.gate_shape!r}.")
        if self.gate == "sigmoid":
            warnings.warn(
                "FusionConfig(gate='sigmoid') starts at 0.5: the Stage-2 switch changes the model's outputs (no exact "
                "identity). Use gate='tanh' unless you are reproducing APT's released code.",
                UserWarning,
                stacklevel=3,
            )
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ConfigError("`target_modules` is empty: name the expert modules that receive gated fusion.")
        check_pattern("target_modules", self.target_modules)
        check_pattern("exclude_modules", self.exclude_modules)
        if isinstance(self.context_dim, Sequence) and not isinstance(self.context_dim, str):
            self.context_dim = list(self.context_dim)
        widths = self.context_dim if isinstance(self.context_dim, list) else [self.context_dim]
        for name, values in (("hidden_dim", [self.hidden_dim]), ("context_dim", widths), ("head_dim", [self.head_dim])):
            for value in values:
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.context_dim, list) and not self.context_dim:
            raise ConfigError("`context_dim` is an empty list: give one width per fusion site, or one int for all.")
        for name in ("num_heads", "ff_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                kind = "a positive integer" if name == "num_heads" else "an integer >= 0"
                raise ConfigError(f"`{name}` must be {kind}, got {value!r}.")
        if self.num_heads <= 0 or self.ff_mult < 0:
            raise ConfigError(
                f"`num_heads` must be positive and `ff_mult` >= 0 (0: no feed-forward branch), got {self.num_heads!r}, "
                f"{self.ff_mult!r}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")


@dataclass
class APTConfig:
    """Optimisation and VLM settings of an APT run (both stages).

    Learning rates are per parameter group: ``expert`` (everything trainable outside the VLM and the fusion
    blocks), ``fusion`` (cross-attention and feed-forward weights of the gated blocks), ``gates`` (the tanh
    gates, which alone receive gradient on the first Stage-2 step, hence a larger default) and ``vlm``
    (LoRA adapters or all VLM weights, Stage 2 only).

    Args:
        vlm_mode: how the VLM trains in Stage 2: ``"frozen"`` (default, as in the paper's code), ``"lora"``
            (peft adapters) or ``"full"``. In Stage 1 the VLM is always frozen.
        lr: expert learning rate.
        fusion_lr: fusion block learning rate; ``lr`` when ``None``.
        gate_lr: gate learning rate; ``10 * lr`` when ``None``.
        vlm_lr: VLM learning rate; 5e-6 for LoRA and 1e-5 for full fine-tuning when ``None``.
        weight_decay: AdamW weight decay (not applied to the gates, so a closed gate stays exactly zero).
        warmup_steps: linear warm-up at the start of each stage, for every group active in it.
        lora_rank: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout.
        lora_target_modules: VLM modules that get LoRA adapters, peft semantics: a list/tuple of names or
            dotted suffixes, or one ``str`` as a regular expression over the full module name.
        seed: base seed of the per-step random streams (noise, flow-matching time) that make resume exact.
        language_dropout: fraction of the samples of each Stage-2 training batch whose instruction is hidden from
            the fusion blocks, so they take exactly the Stage-1 (prior) path. Keeps the gate-bypassed path a
            trained vision-action prior for prior-contrast guidance (``guidance_scale``). Drawn from the
            per-step stream: exact on resume.
        joint_prefix: how the joint baseline's VLM prefix attends (APT's stages always run language-blind):
            ``"full"`` (every token sees the instruction, as without APT) or ``"blind"`` (APT's language-blind
            prefix: image tokens never see the instruction, while the expert still reads the language tokens).
            An ablation that isolates what instruction-aware image features give a baseline.

    Example::

        >>> APTConfig(vlm_mode="lora").resolved_vlm_lr
        5e-06
    """

    vlm_mode: VLMMode = "frozen"
    lr: float = 1e-4
    fusion_lr: float | None = None
    gate_lr: float | None = None
    vlm_lr: float | None = None
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | list[str] | str = DEFAULT_LORA_TARGETS
    seed: int = 0
    language_dropout: float = 0.0
    joint_prefix: Literal["full", "blind"] = "full"

    def __post_init__(self) -> None:
        if self.joint_prefix not in ("full", "blind"):
            raise ConfigError(f"`joint_prefix` must be 'full' or 'blind', got {self.joint_prefix!r}.")
        if not (isinstance(self.language_dropout, (int, float)) and 0.0 <= self.language_dropout < 1.0):
            raise ConfigError(f"`language_dropout` must be in [0, 1), got {self.language_dropout!r}.")
        if self.vlm_mode not in _VLM_MODES:
            raise ConfigError(f"`vlm_mode` must be one of {_VLM_MODES}, got {self.vlm_mode!r}.")
        for name in ("lr", "fusion_lr", "gate_lr", "vlm_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"`warmup_steps` must be >= 0, got {self.warmup_steps!r}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ConfigError(f"`warmup_steps` must be an int >= 0, got {self.warmup_steps!r}.")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise ConfigError(f"`lora_rank` must be a positive integer, got {self.lora_rank!r}.")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ConfigError(
                f"`lora_alpha` must be a finite number > 0, got {alpha!r}: LoRA scales its update by lora_alpha / "
                "lora_rank, so 0 switches the adapters off and a negative value reverses every update. The usual "
                "choice is lora_alpha = lora_rank (16)."
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ConfigError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.lora_target_modules, str):  # a str is one regex (peft), never its letters
            self.lora_target_modules = tuple(self.lora_target_modules)
        if not self.lora_target_modules:
            raise ConfigError("`lora_target_modules` is empty: name the VLM modules that get LoRA adapters.")
        check_pattern("lora_target_modules", self.lora_target_modules)
        if self.language_dropout > HIGH_LANGUAGE_DROPOUT:
            warnings.warn(
                f"`language_dropout`={self.language_dropout!r} hides the instruction from {self.language_dropout:.1%} "
                "of the Stage-2 samples: the gates learn from the rest only, and near 1 they never open. Language "
                "dropout keeps a prior for guidance; 0.1-0.2 is typical.",
                UserWarning,
                stacklevel=3,
            )
        if self.vlm_mode != "lora":
            defaults = {f.name: f.default for f in fields(self)}
            changed = [n for n in ("lora_rank", "lora_alpha", "lora_dropout") if getattr(self, n) != defaults[n]]
            if changed:
                warnings.warn(
                    f"{changed} set but `vlm_mode`={self.vlm_mode!r}: LoRA options only apply with vlm_mode='lora'.",
                    UserWarning,
                    stacklevel=3,
                )
        if self.vlm_mode == "frozen" and self.vlm_lr is not None:
            warnings.warn("`vlm_lr` has no effect with vlm_mode='frozen'.", UserWarning, stacklevel=3)

    @property
    def resolved_fusion_lr(self) -> float:
        return self.lr if self.fusion_lr is None else self.fusion_lr

    @property
    def resolved_gate_lr(self) -> float:
        return 10 * self.lr if self.gate_lr is None else self.gate_lr

    @property
    def resolved_vlm_lr(self) -> float:
        if self.vlm_lr is not None:
            return self.vlm_lr
        return 5e-6 if self.vlm_mode == "lora" else 1e-5


def fusion_config_with_options(options: Mapping[str, Any] | None, **fixed: Any) -> FusionConfig:
    """``FusionConfig(**fixed, **options)`` for a policy's ``fusion_options`` argument, with one clear error for an
    option the policy already sets from its own argument (e.g. ``num_heads`` from ``fusion_heads``) or one that
    ``FusionConfig`` does not have.

    Raises:
        ConfigError: naming the option and, for an unknown one, the accepted fields.

    Example::

        >>> fusion_config_with_options({"gate_shape": "channel"}, target_modules=["x"], num_heads=2).gate_shape
        'channel'
    """
    options = dict(options or {})
    known = {f.name for f in fields(FusionConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"`fusion_options` has {unknown}, which FusionConfig does not accept; its fields are {sorted(known)}."
        )
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise ConfigError(
            f"`fusion_options` sets {clash}, which the policy already sets from its own arguments "
            f"({', '.join(f'{k}={fixed[k]!r}' for k in clash)}): set them through those arguments (e.g. `fusion_heads` "
            "for num_heads) and leave them out of `fusion_options`."
        )
    return FusionConfig(**fixed, **options)
