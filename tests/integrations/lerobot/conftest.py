"""LeRobot integration tests: they need LeRobot 0.6.1, which needs Python >= 3.12 and torch < 2.12, so they run
in their own venv (`.ci/run`, second step). Elsewhere (the main Python 3.11 / torch 2.13 suite) every module
here is skipped at import by `pytest.importorskip`, which says why."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
