"""A local ``LeRobotDataset`` as the batches the LeRobot adapters train on, through LeRobot's own processors.

Every step that runs offline is LeRobot's: its dataset reader (action chunks from ``delta_timestamps`` resolved
from the policy config), its normalisation statistics (``dataset.meta.stats``) and the policy's own
pre-processor (``make_pre_post_processors``: rename, normalise, PI0's newline, PI05's state-in-prompt, ...). The
one substitution: the pre-processor's tokenizer step loads a Hub tokenizer by name, so the user's tokenizer
object is handed to it instead (same step class, same padding and length).

The batches also carry ``observation.language.instruction_mask``: True on the tokens that come from the frame's
``task`` (found by character offsets in the final prompt), which APT hides in Stage 1 while keeping the rest of
the prompt (PI05's discretised state) visible.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch.utils.data import default_collate

from apt_lightning.data import ResumableDataLoader
from apt_lightning.errors import LanguageMaskError
from apt_lightning.integrations.lerobot._compat import LeRobotBatchError, PromptTruncationError, require_lerobot
from apt_lightning.integrations.lerobot.base import INSTRUCTION_MASK

__all__ = [
    "LeRobotDataModule",
    "check_action_dimension",
    "instruction_mask_from_offsets",
    "instruction_token_mask",
    "lerobot_processors",
]


@contextlib.contextmanager
def _user_tokenizer(policy_type: str, tokenizer: Any) -> Iterator[None]:
    """While the block runs, the policy's processor module builds its tokenizer step around ``tokenizer``."""
    from lerobot.processor import TokenizerProcessorStep

    module = importlib.import_module(f"lerobot.policies.{policy_type}.processor_{policy_type}")
    real = getattr(module, "TokenizerProcessorStep", None)

    def step(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("tokenizer_name", None)
        return TokenizerProcessorStep(*args, tokenizer=tokenizer, **kwargs)

    if real is not None:
        module.TokenizerProcessorStep = step
    try:
        yield
    finally:
        if real is not None:
            module.TokenizerProcessorStep = real


def lerobot_processors(policy_config: Any, dataset_stats: dict[str, Any] | None, tokenizer: Any) -> tuple[Any, Any]:
    """LeRobot's pre- and post-processor for ``policy_config``, with ``tokenizer`` instead of a Hub download."""
    require_lerobot()
    from lerobot.policies.factory import make_pre_post_processors

    with _user_tokenizer(policy_config.type, tokenizer):
        return make_pre_post_processors(policy_config, dataset_stats=dataset_stats)


def instruction_token_mask(
    tokenizer: Any, prompts: Sequence[str], instructions: Sequence[str], max_length: int, padding: str = "max_length"
) -> torch.Tensor:
    """(B, L) bool: the tokens of each ``prompt`` whose characters lie in its ``instruction``.

    ``prompts`` are the texts the pre-processor tokenized (right padding, ``padding`` as its tokenizer step pads,
    truncated to ``max_length``); each must contain its instruction verbatim (PI05 replaces ``_`` and newlines in
    the task by spaces first: so does this).

    Raises:
        LanguageMaskError: a prompt does not contain its instruction, or the tokenizer gives no character
            offsets (a "fast" tokenizer is needed).
        PromptTruncationError: ``max_length`` cuts a part of a prompt that is not the instruction (PI05's state
            and ``Action:``): Stage 1 would then see more or less of it depending on the instruction's length.
    """
    encoded = tokenizer(
        list(prompts),
        max_length=max_length,
        truncation=True,
        padding=padding,
        padding_side="right",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    return instruction_mask_from_offsets(
        tokenizer, prompts, instructions, encoded["offset_mapping"], encoded["attention_mask"], max_length
    )


def instruction_mask_from_offsets(
    tokenizer: Any,
    prompts: Sequence[str],
    instructions: Sequence[str],
    offsets: torch.Tensor,
    attention_mask: torch.Tensor,
    max_length: int,
) -> torch.Tensor:
    """:func:`instruction_token_mask` from a tokenizer call's (B, L, 2) character offsets and (B, L) mask."""
    mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
    for row, (prompt, instruction) in enumerate(zip(prompts, instructions, strict=True)):
        text = instruction.strip().replace("_", " ").replace("\n", " ") if instruction not in prompt else instruction
        start = prompt.find(text.strip())
        if start < 0 or not text.strip():
            raise LanguageMaskError(
                f"Cannot find the instruction {instruction!r} in the prompt {prompt!r}: the instruction mask marks "
                "the tokens of the task inside the prompt the tokenizer sees."
            )
        end = start + len(text.strip())
        begin, stop = offsets[row, :, 0], offsets[row, :, 1]
        valid = attention_mask[row].bool()
        mask[row] = (stop > begin) & (begin < end) & (stop > start) & valid
        kept = int(stop[valid].max()) if bool(valid.any()) else 0
        cut_visible = (prompt[kept:start] if kept < start else "") + prompt[max(kept, end) :]
        if cut_visible.strip():
            needed = len(tokenizer(prompt, truncation=False)["input_ids"])
            raise PromptTruncationError(
                f"`tokenizer_max_length`={max_length} truncates the prompt {prompt!r} inside its visible part (it "
                f"drops {cut_visible.strip()!r}, which is not the instruction {instruction!r}): the tokens Stage 1 "
                "reads would then depend on the instruction's length. The prompt needs "
                f"{needed} tokens: raise `tokenizer_max_length` to at least that (for PI05, room for the longest "
                "task plus the state and `Action:`)."
            )
    return mask


def check_action_dimension(policy_config: Any, features: dict[str, Any], where: Any = "the dataset") -> None:
    """Raise :class:`LeRobotBatchError` unless the dataset's ``action`` width is the policy's action dimension.

    LeRobot pads actions to ``max_action_dim`` and cuts predictions back to the policy's own width, so a dataset of
    another width would train without any error on vectors that mean something else.
    """
    feature = (features or {}).get("action")
    expected = policy_config.output_features["action"].shape[0]
    if feature is not None and tuple(feature["shape"])[-1] != expected:
        raise LeRobotBatchError(
            f"The dataset at {where} has actions of dimension {tuple(feature['shape'])[-1]}, but the "
            f"{policy_config.type} policy predicts {expected} (`output_features['action'].shape`). Build the policy "
            "for this dataset's features (LeRobot's `make_policy(cfg, ds_meta=dataset.meta)` does) or use a dataset "
            "of this robot."
        )


class LeRobotDataModule(L.LightningDataModule):
    """A local ``LeRobotDataset`` (offline) as processed batches for a LeRobot policy's APT adapter.

    Args:
        root: the dataset's directory (``LeRobotDataset(repo_id, root=root)``; nothing is downloaded).
        policy_config: the policy's config (chunk size, features, normalisation modes, tokenizer length).
        tokenizer: a Hugging Face "fast" tokenizer (character offsets mark the instruction), e.g. the policy's own
            saved locally, or :func:`~apt_lightning.integrations.lerobot.tiny.tiny_tokenizer`.
        repo_id: the dataset's ``repo_id`` (as written in its metadata).
        batch_size: samples per step.
        seed: shuffling seed of the resumable loader (mid-epoch resume sees the same order).
        episodes: episode indices to use (all when ``None``).

    After ``setup``: ``dataset``, ``preprocessor``, ``postprocessor`` (LeRobot's, with this dataset's statistics).
    """

    def __init__(
        self,
        root: str | Path,
        policy_config: Any,
        tokenizer: Any,
        repo_id: str = "local/dataset",
        batch_size: int = 8,
        seed: int = 0,
        episodes: list[int] | None = None,
    ) -> None:
        require_lerobot()
        super().__init__()
        self.root, self.policy_config, self.tokenizer = Path(root), policy_config, tokenizer
        self.repo_id, self.batch_size, self.seed, self.episodes = repo_id, batch_size, seed, episodes
        self.dataset: Any = None
        self.preprocessor: Any = None
        self.postprocessor: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        from lerobot.datasets.factory import resolve_delta_timestamps
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

        meta = LeRobotDatasetMetadata(self.repo_id, root=self.root)
        check_action_dimension(self.policy_config, meta.features, self.root)
        delta = resolve_delta_timestamps(self.policy_config, meta)
        self.dataset = LeRobotDataset(self.repo_id, root=self.root, episodes=self.episodes, delta_timestamps=delta)
        self.preprocessor, self.postprocessor = lerobot_processors(self.policy_config, meta.stats, self.tokenizer)

    def processors(self) -> tuple[Any, Any]:
        """LeRobot's (pre-processor, post-processor) with this dataset's statistics (after ``setup``)."""
        self.setup()
        return self.preprocessor, self.postprocessor

    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A raw LeRobot batch (``task`` strings, un-normalised tensors) to the adapters' batch: the policy's
        pre-processor, then the instruction mask. Training and evaluation both go through here."""
        self.setup()
        tasks = list(batch["task"])
        processed = self.preprocessor(batch)
        prompts = processed.get("task", tasks)
        length = processed["observation.language.tokens"].shape[1]
        processed[INSTRUCTION_MASK] = instruction_token_mask(self.tokenizer, prompts, tasks, length)
        return {k: v for k, v in processed.items() if isinstance(v, torch.Tensor)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Default-collate LeRobot samples and :meth:`preprocess` them."""
        return self.preprocess(default_collate(samples))

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed, collate_fn=self.collate
        )
