"""The core library never imports the benchmark: ``apt_lightning.bench`` depends on the core, not the reverse."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import apt_lightning

_PROBE = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m == "apt_lightning.bench" or m.startswith("apt_lightning.bench."))
print(json.dumps(loaded))
"""


def _core_modules() -> list[str]:
    modules = [m.name for m in pkgutil.walk_packages(apt_lightning.__path__, prefix="apt_lightning.")]
    return sorted(m for m in modules if m != "apt_lightning.bench" and not m.startswith("apt_lightning.bench."))


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
    assert not [m for m in core if ".bench" in m]
    assert "apt_lightning.cli" not in core  # the command line moved to apt_lightning.bench.cli


def test_no_core_module_imports_the_benchmark():
    loaded = _bench_modules_after_importing("apt_lightning", "apt_lightning.models", *_core_modules())
    assert loaded["apt_lightning"] == [] and loaded["apt_lightning.models"] == []
    offenders = {module: bench for module, bench in loaded.items() if bench}
    assert not offenders, f"core modules pull in the benchmark: {offenders}"
