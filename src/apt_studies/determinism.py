"""Make a benchmark run a function of its command: fixed torch thread count and deterministic kernels.

A CPU matrix product splits its sums across threads, and the order of floating-point additions changes with the
thread count: the same seed gives different weights with 1, 2 or 16 threads, and after a few hundred optimiser
steps different success rates. The study and the VLM pretraining therefore run inside :func:`fixed_threads`,
which pins the count (:data:`STUDY_THREADS` by default, whatever ``OMP_NUM_THREADS`` or the machine says) and
asks torch for deterministic algorithms, and restores both on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["STUDY_THREADS", "fixed_threads"]

STUDY_THREADS = 1
"""Intra-op threads of every study and VLM-pretraining run. One thread: the only count every machine has, and
the fastest per core for these tiny models (run several studies side by side to use more cores)."""


@contextlib.contextmanager
def fixed_threads(threads: int = STUDY_THREADS) -> Iterator[int]:
    """Run the body with ``threads`` intra-op threads and deterministic torch algorithms, then restore both.

    Args:
        threads: Intra-op thread count (>= 1).

    Yields:
        The thread count in force.

    Raises:
        ValueError: If ``threads`` is not a positive integer.

    Example::

        >>> with fixed_threads(1) as n:
        ...     torch.get_num_threads() == n == 1
        True
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive integer, got {threads!r}.")
    before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
