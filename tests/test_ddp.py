"""DDP with 2 CPU processes across the switch: every parameter is identical on both ranks at the end."""

from __future__ import annotations

import pytest
import torch

from helpers import run_script


@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_ddp_two_processes_across_switch(arch, tmp_path):
    run_script("ddp_script.py", arch, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    metas = [torch.load(tmp_path / f"meta{r}.pt") for r in (0, 1)]
    assert all((m["stage"], m["step"]) == (2, 8) for m in metas), metas
    assert ranks[0].keys() == ranks[1].keys()
    differing = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert not differing, differing[:5]
    trained = [k for k in ranks[0] if "apt_gate" in k]
    assert trained and any(float(ranks[0][k].abs().max()) > 0 for k in trained), "Stage 2 must have trained the gates"
