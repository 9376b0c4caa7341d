"""APT across the switch under FSDP1 (Lightning's ``FSDPStrategy``) on GPUs, and what the per-step non-finite
check costs there.

FSDP1 flattens each wrapped unit's parameters: it needs ``use_orig_params=True`` to hold the frozen VLM beside
the trainable expert and fusion blocks and to keep APT's per-role param groups (Lightning's default; APT refuses
``use_orig_params=False`` at setup). Each decoder/encoder layer, DiT block and fusion block is its own unit.
Runs the same fit twice, with and without ``check_finite`` (one host synchronisation per step), and prints the
mean step time of each (synchronising only at the edges of each window).

    python examples/fsdp_gpu.py [--arch groot] [--devices 1] [--steps 40] [--switch 20] [--width 512]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import Dataset

from apt_lightning import APTConfig, APTStageScheduler, GatedCrossAttentionBlock
from apt_lightning.data import ResumableDataLoader
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_lightning.models.dit import DiTBlock


class Synthetic(Dataset):
    """Random observations, a 12-token prompt whose middle 10 tokens are the instruction."""

    def __init__(self, size: int, chunk: int, image: int, vocab: int) -> None:
        self.size, self.chunk, self.image, self.vocab = size, chunk, image, vocab

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(3, self.vocab - 2, (12,), generator=g)
        language = torch.zeros(12, dtype=torch.bool)
        language[1:-1] = True
        return {
            "pixel_values": torch.randn(3, self.image, self.image, generator=g),
            "state": torch.randn(2, generator=g),
            "input_ids": ids,
            "attention_mask": torch.ones(12, dtype=torch.long),
            "language_mask": language,
            "actions": torch.randn(self.chunk, 2, generator=g),
            "sample_id": torch.tensor(i),
        }


class WindowTimer(Callback):
    """Mean step time over windows of steps, synchronising only at the windows' edges (a per-step sync would
    hide the very cost being measured)."""

    def __init__(self, edges: list[int]) -> None:
        self.edges, self.marks = edges, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.edges:
            torch.cuda.synchronize()
            self.marks[trainer.global_step] = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.marks[trainer.global_step] = time.perf_counter()

    def mean(self, start: int, stop: int) -> float:
        return (self.marks[stop] - self.marks[start]) / (stop - start)


def build(arch: str, width: int, layers: int) -> pl.LightningModule:
    torch.manual_seed(0)
    apt = APTConfig(lr=1e-4)
    if arch == "pi0":
        config = tiny_pi0_config(hidden_size=width, num_layers=layers, image_size=224, chunk_size=16, vocab_size=1024)
        return PI0Policy(config, apt_config=apt, fusion_heads=8)
    vlm = tiny_paligemma_config(vocab_size=1024, image_size=224, hidden_size=width, num_layers=layers)
    return GR00TStylePolicy(vlm, chunk_size=16, head_width=width, head_depth=layers, head_heads=8, apt_config=apt)


def fit(args: argparse.Namespace, check_finite: bool) -> tuple[float, float, int]:
    policy = build(args.arch, args.width, args.layers)
    from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    units = {GemmaDecoderLayer, SiglipEncoderLayer, DiTBlock, GatedCrossAttentionBlock}
    strategy = FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy(units), use_orig_params=True)
    timer = WindowTimer([3, args.switch, args.switch + 3])
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=args.devices,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=args.steps,
        callbacks=[APTStageScheduler(switch_at_step=args.switch, check_finite=check_finite), timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # ResumableDataLoader shards itself across ranks
    )
    data = Synthetic(args.batch * args.steps, policy.chunk_size, 224, 1024)
    trainer.fit(policy, ResumableDataLoader(data, batch_size=args.batch, shuffle=True))
    return timer.mean(3, args.switch), timer.mean(args.switch + 3, args.steps), policy.apt.stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="groot", choices=["pi0", "groot"])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--switch", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs; the last pair is reported")
    args = parser.parse_args()
    # alternate on/off; the first pair warms the GPU up (allocator, kernels) and is not reported
    runs = [(flag, fit(args, flag)) for _ in range(args.rounds) for flag in (False, True)]
    results = dict(runs[-2:])
    card = torch.cuda.get_device_name()
    for flag, (stage1, stage2, stage) in results.items():
        print(
            f"{card} x{args.devices}, FSDP1 bf16-mixed, {args.arch}, check_finite={flag}: Stage 1 "
            f"{stage1 * 1e3:.1f} ms/step, Stage 2 {stage2 * 1e3:.1f} ms/step, ended in stage {stage}"
        )
    (on1, on2, _), (off1, off2, _) = results[True], results[False]
    print(f"check_finite cost: Stage 1 x{on1 / off1:.3f}, Stage 2 x{on2 / off2:.3f}")


if __name__ == "__main__":
    main()
