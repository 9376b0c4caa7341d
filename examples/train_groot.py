"""Train a GR00T-style VLA (PaliGemma features + DiT flow-matching head) with APT on the tabletop benchmark, then
evaluate it.

The APT-specific lines are the callback and ``APTConfig``; ``--baseline`` runs the same model the ordinary way
(language from step 0, the VLM frozen as GR00T does by default with tune_llm=False).

    python examples/train_groot.py [--steps 400] [--switch 200] [--baseline] [--random-vlm] [--out runs/groot]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from apt_lightning import APTConfig, APTStageScheduler, GateMonitor
from apt_lightning.bench import TabletopDataModule, VLMPretrainingConfig, evaluate_policy, pretrained_vlm
from apt_lightning.models import GR00TStylePolicy, tiny_paligemma_config

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--switch", type=int, default=200)
parser.add_argument("--baseline", action="store_true")
parser.add_argument("--random-vlm", action="store_true", help="skip the pretrained VLM")
parser.add_argument("--out", default="runs/groot")
args = parser.parse_args()

pl.seed_everything(0)
data = TabletopDataModule(episodes=300, chunk_size=8, batch_size=32)
vlm_dir = None
if not args.random_vlm:  # a PaliGemma pretrained on diverse language from the environment (cached after the first run)
    vlm_dir, _ = pretrained_vlm(
        tiny_paligemma_config(**data.tokenizer.vlm_vocabulary, hidden_size=64), data.tokenizer, VLMPretrainingConfig()
    )

if args.baseline:
    apt_config = APTConfig(vlm_mode="frozen", lr=1e-3, warmup_steps=20)
    scheduler = APTStageScheduler(stage="joint")
else:
    apt_config = APTConfig(vlm_mode="frozen", lr=1e-3, warmup_steps=20)  # gates learn at 10 x lr
    scheduler = APTStageScheduler(switch_at_step=args.switch)

policy = GR00TStylePolicy(
    tiny_paligemma_config(**data.tokenizer.vlm_vocabulary, hidden_size=64),
    vlm_pretrained=str(vlm_dir) if vlm_dir else None,  # GR00T loads its VLM backbone from a pretrained checkpoint
    chunk_size=8,
    head_dim=64,
    head_depth=4,
    apt_config=apt_config,
)
trainer = pl.Trainer(
    max_steps=args.steps,
    accelerator="cpu",
    default_root_dir=args.out,
    log_every_n_steps=10,
    callbacks=[scheduler, GateMonitor(every_n_steps=10)],
)
trainer.fit(policy, datamodule=data)
trainer.save_checkpoint(f"{args.out}/final.ckpt")

results = evaluate_policy(policy, episodes=100, progress=True)
print({split: round(rate, 2) for split, rate in results["success"].items()})
print(f"instruction sensitivity {results['instruction_sensitivity']:.3f}; checkpoint {args.out}/final.ckpt")
