"""Step-time ratios measured side by side in one run: APT Stage 1 / Stage 2 vs ordinary joint training.

Joint baseline = the same model trained the usual way: VLM trainable, language visible, no APT masks
(for pi0: transformers' own ``PI0ForConditionalGeneration.forward``). Also measures the cost of pi0's
language-blind 4-D block mask against the stock 2-D padding mask for the prefix pass.

    python benchmarks/stage_cost.py [--steps 20] [--hidden 64] [--layers 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apt_lightning import JOINT, APTConfig, StagePlan
from apt_lightning.models import GR00TStylePolicy, PI0Policy, tiny_paligemma_config, tiny_pi0_config


def batch(b: int, words: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab - 2, (b, words + 2))
    ids[:, 0], ids[:, -1] = 1, 2
    language = torch.zeros_like(ids, dtype=torch.bool)
    language[:, 1:-1] = True
    return {
        "pixel_values": torch.randn(b, 3, 64, 64),
        "state": torch.randn(b, 2),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "language_mask": language,
        "actions": torch.randn(b, 8, 2),
    }


def timed(step, n: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(policy, data, optimizer):
    def run():
        noise, t = (
            torch.randn(data["actions"].shape[0], policy.chunk_size, policy.noise_dim),
            policy.sample_time(data["actions"].shape[0]),
        )
        loss = policy.flow_loss(data, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def build(arch: str, vlm_mode: str, args: argparse.Namespace, vocab: int) -> PI0Policy | GR00TStylePolicy:
    """A reference policy of the benchmark's size."""
    apt_config = APTConfig(vlm_mode=vlm_mode)  # type: ignore[arg-type]
    if arch == "pi0":
        config = tiny_pi0_config(
            hidden_size=args.hidden, num_layers=args.layers, chunk_size=8, vocab_size=vocab, image_size=64
        )
        return PI0Policy(config, apt_config=apt_config)
    vlm = tiny_paligemma_config(vocab_size=vocab, image_size=64, hidden_size=args.hidden, num_layers=args.layers)
    return GR00TStylePolicy(vlm, chunk_size=8, head_dim=args.hidden, head_depth=args.layers, apt_config=apt_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = 256
    data = batch(args.batch, 12, vocab)
    rows = []
    for arch in ("pi0", "groot"):
        stage1 = build(arch, "frozen", args, vocab)
        stage1.apt_prepare(StagePlan(first_stage=1))
        stage2 = build(arch, "frozen", args, vocab)
        stage2.apt_prepare(StagePlan(first_stage=2))
        joint = build(arch, "full", args, vocab)  # ordinary training: everything trainable, language visible
        joint.apt_prepare(StagePlan(first_stage=JOINT))
        t = {}
        for name, policy in (("stage1", stage1), ("stage2", stage2), ("joint", joint)):
            params = [p for p in policy.parameters() if p.requires_grad]
            policy.train()  # the mixin keeps a frozen VLM in eval mode
            t[name] = timed(train_step(policy, data, torch.optim.AdamW(params, lr=1e-4)), args.steps)
        rows.append((arch, t))
    print(
        f"median step time, batch {args.batch}, hidden {args.hidden}, {args.layers} layers, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'model':8} {'stage1 ms':>10} {'stage2 ms':>10} {'joint ms':>10} {'s1/joint':>9} {'s2/joint':>9}")
    for arch, t in rows:
        print(
            f"{arch:8} {t['stage1'] * 1e3:10.1f} {t['stage2'] * 1e3:10.1f} {t['joint'] * 1e3:10.1f} "
            f"{t['stage1'] / t['joint']:9.2f} {t['stage2'] / t['joint']:9.2f}"
        )
    prefix_mask_cost(args, vocab, data)


def prefix_mask_cost(args, vocab, data) -> None:
    """pi0 prefix pass: APT's 4-D language-blind mask vs transformers' stock 2-D mask."""
    policy = PI0Policy(
        tiny_pi0_config(hidden_size=args.hidden, num_layers=args.layers, chunk_size=8, vocab_size=vocab, image_size=64)
    )
    policy.apt_prepare(StagePlan(first_stage=2))
    policy.eval()
    prompt = policy.prompt(data)
    masks = policy.apt_masks(prompt["attention_mask"], prompt["language_mask"])
    pixels = data["pixel_values"][:, None]
    cams = torch.ones(pixels.shape[:2], dtype=torch.bool)
    model = policy.pi0.model

    def blind():
        with torch.no_grad():
            model.vlm(
                inputs_embeds=model.embed_prefix(prompt["input_ids"], pixels, cams),
                attention_mask=masks.vlm_attention,
                position_ids=masks.position_ids,
                use_cache=True,
            )

    def stock():
        with torch.no_grad():
            model.vlm(
                inputs_embeds=model.embed_prefix(prompt["input_ids"], pixels, cams),
                attention_mask=prompt["attention_mask"],
                position_ids=prompt["attention_mask"].cumsum(-1) - 1,
                token_type_ids=torch.zeros_like(prompt["input_ids"]),
                use_cache=True,
            )

    tb, ts = timed(blind, args.steps), timed(stock, args.steps)
    print(
        f"pi0 prefix pass: language-blind 4-D mask {tb * 1e3:.1f} ms, stock 2-D mask {ts * 1e3:.1f} ms, "
        f"ratio {tb / ts:.2f}"
    )


if __name__ == "__main__":
    main()
