"""What a study's numbers depend on besides its command: library versions, the CPU and its instruction sets, threads.

Results are a function of the command *and* of this record. On one machine with the same versions a study is
bit-exact across processes and caches; across CPUs the kernels differ (PyTorch dispatches AVX-512 or AVX2 code,
oneDNN and the BLAS pick other blockings), so float sums round differently, training trajectories diverge, and the
numbers agree only within the seed spread. :func:`environment_record` is written into every results file, and
:func:`same_kernels` says whether two records can be expected to agree bit for bit.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "transformers", "lightning", "numpy", "peft", "safetensors", "mujoco", "metaworld")
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
"""The /proc/cpuinfo flags that change which kernels PyTorch and its libraries run."""
KERNEL_KEYS = ("packages", "cpu_capability", "isa_flags", "threads")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> tuple[str, list[str]]:
    """CPU model name and the :data:`ISA_FLAGS` it has (from /proc/cpuinfo; the platform's name elsewhere)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or platform.machine(), []
    model, flags = platform.machine(), set()
    for line in info.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return model, [flag for flag in ISA_FLAGS if flag in flags]


def environment_record() -> dict[str, Any]:
    """Versions, CPU, instruction sets, PyTorch's CPU capability and thread count of this process.

    Example::

        >>> record = environment_record()
        >>> record["packages"]["torch"] == torch.__version__, record["cpu_capability"] in ("AVX512", "AVX2", "DEFAULT")
        (True, True)
    """
    model, flags = _cpu()
    return {
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cpu": model,
        "isa_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def same_kernels(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[str]:
    """What differs between two records in what decides the kernels (versions, CPU capability, ISA flags,
    threads); an empty list means a rerun can be expected to be bit-exact. A missing record differs in everything.
    """
    if not a or not b:
        return ["no environment recorded"]
    return [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in KERNEL_KEYS if a.get(key) != b.get(key)]
