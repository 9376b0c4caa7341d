"""The cheaper fusion options the benchmarks compare, as ``fusion_options`` of the reference policies.

Each entry holds :class:`~apt_lightning.FusionConfig` fields that differ from the defaults (``ff_mult=4``, a
block after every expert layer). Placement uses ``exclude_modules`` with peft semantics: the regex below matches
the full name of every even-numbered layer, so ``every2`` fuses layers 1, 3, 5, ... (open_flamingo's
``(i + 1) % 2 == 0``).
"""

from __future__ import annotations

from typing import Any

EVEN_LAYERS = r".*\.\d*[02468]"
"""Full-name regex of the even-numbered expert layers (``...layers.0``, ``...blocks.14``)."""

FUSION_OPTIONS: dict[str, dict[str, Any]] = {
    "ff4": {"ff_mult": 4},
    "ff1": {"ff_mult": 1},
    "no_ff": {"ff_mult": 0},
    "no_ff_every2": {"ff_mult": 0, "exclude_modules": EVEN_LAYERS},
}
"""Option name -> ``fusion_options``; ``ff4`` is the default before issue 19 (named ``default`` in the accuracy
runs' records)."""
