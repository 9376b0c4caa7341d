"""Evaluate a saved policy checkpoint on your own instructions (and on the benchmark splits).

The same as the ``apt-evaluate`` command; this shows the Python API behind it::

    python examples/evaluate_checkpoint.py runs/study/checkpoints/pi0-apt-seed0.ckpt examples/data/my_instructions.txt

Each instruction (one per line; ``#`` starts a comment; ``.jsonl`` files with an ``instruction`` field work too)
is paired with fresh scenes in which it names exactly one object; a line that names no colour, shape or size
is reported with its file and line number before anything runs. Accented and full-width letters are folded
("réd" reads as "red"); a word the benchmark does not know is warned about with its ``file:line``.
"""

from __future__ import annotations

import sys

from apt_lightning.models import load_policy
from apt_studies import evaluate_policy, load_instruction_file, user_episodes

checkpoint, instruction_file = sys.argv[1], sys.argv[2]
instructions = load_instruction_file(instruction_file)
policy = load_policy(checkpoint)  # the class, config and stage come from the checkpoint itself
results = evaluate_policy(
    policy,
    splits=("seen", "counterfactual"),
    episodes=50,
    extra_splits={"user": user_episodes(instructions, per_instruction=10)},
    progress=True,
)
for split, rate in results["success"].items():
    print(f"{split:<16} success {rate:.2f}")
print(f"instruction sensitivity {results['instruction_sensitivity']:.3f} (0 means the instruction is ignored)")
