"""DDP with 2 CPU processes across the switch: every parameter is identical on both ranks at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.parametrize("arch", ["pi0", "groot"])
def test_ddp_two_processes_across_switch(arch, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(HERE / "ddp_script.py"), arch, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    metas = [torch.load(tmp_path / f"meta{r}.pt") for r in (0, 1)]
    assert all((m["stage"], m["step"]) == (2, 8) for m in metas), metas
    assert ranks[0].keys() == ranks[1].keys()
    differing = [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])]
    assert not differing, differing[:5]
    trained = [k for k in ranks[0] if "apt_gate" in k]
    assert trained and any(float(ranks[0][k].abs().max()) > 0 for k in trained), "Stage 2 must have trained the gates"
