"""The core type-checks: mypy, configured in pyproject.toml (`[tool.mypy]`), passes on the files it lists, and the
`# type: ignore` comments in them stay few, each naming its error code and giving its reason."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
MAX_IGNORES = 6  # the core and the reference models (load_from_checkpoint: two bases, two argument orders)
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[a-z-]+(?:,\s*[a-z-]+)*\])?(?P<reason>\s*#\s*\S.*)?")


def checked_files() -> list[Path]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    return [ROOT / name for name in config["files"]]


def test_checked_files_exist():
    files = checked_files()
    assert files and all(path.is_file() for path in files), [str(p) for p in files if not p.is_file()]


def test_mypy_passes_on_the_core():
    pytest.importorskip("mypy")
    # No file arguments: mypy checks pyproject's `files` with its settings; the cache (.mypy_cache/) keeps reruns fast.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, "mypy found type errors in the core:\n" + result.stdout + result.stderr


def test_type_ignores_are_few_and_explained():
    ignores = []
    for path in checked_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = IGNORE.search(line)
            if match:
                ignores.append((f"{path.relative_to(ROOT)}:{number}", match))
    unexplained = [where for where, match in ignores if not (match["codes"] and match["reason"])]
    assert not unexplained, f"give each `# type: ignore[code]  # reason` its error code and reason: {unexplained}"
    assert len(ignores) <= MAX_IGNORES, (
        f"{len(ignores)} `type: ignore` comments in the checked core (at most {MAX_IGNORES}): fix the types instead. "
        + ", ".join(where for where, _ in ignores)
    )
