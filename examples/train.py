"""Train a reference VLA with APT on the tabletop benchmark, then evaluate it.

``--arch pi0``: transformers' PI0 (the expert shares attention with the VLM layer by layer); ``--arch groot``:
PaliGemma features from a middle layer feeding a DiT flow-matching head. The APT-specific lines are the callback
and ``APTConfig``; ``--baseline`` trains the same model the ordinary way (language from step 0; the VLM fully
fine-tuned for pi0 as openpi does, frozen for GR00T as its ``tune_llm=False`` default does).

    python examples/train.py --arch pi0 [--steps 400] [--switch 200] [--baseline] [--random-vlm] [--out runs/pi0]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from apt_lightning import APTConfig, APTStageScheduler, GateMonitor
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config
from apt_studies import TabletopDataModule, VLMPretrainingConfig, evaluate_policy, pretrained_vlm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--arch", choices=("pi0", "groot"), default="pi0")
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--switch", type=int, default=200)
parser.add_argument("--baseline", action="store_true", help="ordinary joint training, no APT")
parser.add_argument("--random-vlm", action="store_true", help="skip the pretrained VLM")
parser.add_argument("--out", default=None, help="output directory (default runs/<arch>)")
args = parser.parse_args()
out = args.out or f"runs/{args.arch}"

pl.seed_everything(0)
data = TabletopDataModule(episodes=300, chunk_size=8, batch_size=32)
vocabulary = data.tokenizer.vlm_vocabulary
vlm_dir = None
if not args.random_vlm:  # a PaliGemma pretrained on diverse language from the environment (cached after the first run)
    vlm_dir, _ = pretrained_vlm(
        tiny_paligemma_config(**vocabulary, hidden_size=64), data.tokenizer, VLMPretrainingConfig()
    )
vlm_pretrained = str(vlm_dir) if vlm_dir else None

if args.baseline and args.arch == "pi0":  # openpi fine-tunes the whole model with one learning rate
    apt_config = APTConfig(vlm_mode="full", lr=1e-3, vlm_lr=1e-3, warmup_steps=20)
else:  # APT's default, and GR00T's frozen LLM; gates learn at 10 x lr
    apt_config = APTConfig(vlm_mode="frozen", lr=1e-3, warmup_steps=20)
scheduler = APTStageScheduler(stage="joint") if args.baseline else APTStageScheduler(switch_at_step=args.switch)

if args.arch == "pi0":
    config = tiny_pi0_config(chunk_size=8, hidden_size=64, **vocabulary)
    policy = PI0Policy(config, apt_config=apt_config, vlm_pretrained=vlm_pretrained)
else:
    config = tiny_paligemma_config(**vocabulary, hidden_size=64)
    policy = GR00TStylePolicy(
        config, vlm_pretrained=vlm_pretrained, chunk_size=8, head_width=64, head_depth=4, apt_config=apt_config
    )
trainer = pl.Trainer(
    max_steps=args.steps,
    accelerator="cpu",
    default_root_dir=out,
    log_every_n_steps=10,
    callbacks=[scheduler, GateMonitor(every_n_steps=10)],
)
trainer.fit(policy, datamodule=data)
trainer.save_checkpoint(f"{out}/final.ckpt")

results = evaluate_policy(policy, episodes=100, progress=True)
print({split: round(rate, 2) for split, rate in results["success"].items()})
print(f"instruction sensitivity {results['instruction_sensitivity']:.3f}; checkpoint {out}/final.ckpt")
