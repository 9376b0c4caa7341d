"""Main job (default): train both reference VLAs with APT on the tabletop benchmark and evaluate every split.

One ``Trainer.fit`` per architecture with ``APTStageScheduler(switch_at_step=...)``: Stage 1 learns the
vision-action prior from demonstrations with the instruction hidden, Stage 2 opens the gates. The policies
are then rolled out closed-loop on each held-out split; success rates and instruction sensitivity are
printed and written to ``<out>/results.json``, gate values over training to ``<out>/gates.json``.

    python examples/apt_demo.py [--steps 400] [--switch 200] [--episodes 300] [--eval-episodes 100] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from apt_lightning import APTConfig, APTStageScheduler, GateMonitor
from apt_lightning.bench import EVAL_SPLITS, collect_demonstrations, default_tokenizer, make_episodes, rollout
from apt_lightning.bench import collate as bench_collate
from apt_lightning.bench import measure_instruction_sensitivity, sensitivity_probe
from apt_lightning.data import ResumableDataLoader
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config

CHUNK = 8


def collate(samples):
    batch = bench_collate(samples)
    batch["pixel_values"] = batch.pop("image")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def build(arch: str, vocab: int, lr: float) -> pl.LightningModule:
    config = APTConfig(lr=lr, gate_lr=10 * lr, warmup_steps=20)
    if arch == "pi0":
        return PI0Policy(tiny_pi0_config(chunk_size=CHUNK, vocab_size=vocab, hidden_size=64), apt_config=config)
    return GR00TStylePolicy(
        tiny_paligemma_config(vocab_size=vocab, hidden_size=64), chunk_size=CHUNK, head_dim=64, head_depth=4, apt_config=config
    )


def policy_fn(policy):
    def act(obs):
        batch = dict(obs)
        batch["pixel_values"] = batch.pop("image") if "image" in batch else batch["pixel_values"]
        noise = batch.pop("noise", None)
        return policy.sample_actions(batch, noise=noise)
    return act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--switch", type=int, default=200)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--eval-episodes", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arch", nargs="+", default=["pi0", "groot"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = default_tokenizer()
    started = time.perf_counter()
    data = collect_demonstrations("train", n_episodes=args.episodes, seed=args.seed, chunk_size=CHUNK, tokenizer=tokenizer)
    results, gates = {}, {}
    for arch in args.arch:
        pl.seed_everything(args.seed, verbose=False)
        policy = build(arch, tokenizer.vocab_size + 1, args.lr)
        monitor = GateMonitor(every_n_steps=10)
        trainer = pl.Trainer(
            max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_model_summary=False, callbacks=[APTStageScheduler(switch_at_step=args.switch), monitor],
        )
        trainer.fit(policy, ResumableDataLoader(data, batch_size=32, shuffle=True, seed=args.seed, collate_fn=collate))
        policy.eval()
        act = policy_fn(policy)
        row = {}
        for split in EVAL_SPLITS:
            episodes = make_episodes(split, args.eval_episodes, seed=1000 + args.seed)
            row[split] = rollout(act, episodes, chunk_size=CHUNK, tokenizer=tokenizer).summary()["success_rate"]
        probe = sensitivity_probe(make_episodes("counterfactual", 64, seed=7), CHUNK, seed=7, tokenizer=tokenizer)
        row["instruction_sensitivity"] = float(measure_instruction_sensitivity(act, probe))
        results[arch] = row
        gates[arch] = monitor.history
    elapsed = time.perf_counter() - started
    print(f"\nAPT ({args.switch} Stage-1 + {args.steps - args.switch} Stage-2 steps), success rate per split:")
    header = ["model", *EVAL_SPLITS, "instr. sensitivity"]
    print(" | ".join(f"{h:>18}" for h in header))
    for arch, row in results.items():
        print(" | ".join([f"{arch:>18}", *(f"{row[s]:18.2f}" for s in EVAL_SPLITS), f"{row['instruction_sensitivity']:18.3f}"]))
    print(f"wall time {elapsed:.0f} s; results in {out}/results.json")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results, "wall_s": elapsed}, indent=2))
    (out / "gates.json").write_text(json.dumps(gates))


if __name__ == "__main__":
    main()
