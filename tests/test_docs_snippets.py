"""The README's code runs as written, and no page's code names an API that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apt_lightning import APT

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
APT_ATTRIBUTE = re.compile(r"\bapt\.([A-Za-z_]\w*)")


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_the_readme_snippets_run_in_order(tmp_path, monkeypatch):
    """Quickstart (model, Trainer, fit, reload, adapter files) and the plain loop with its resume, as a user pastes
    them: one namespace, in a fresh directory."""
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3, "the quickstart and the plain loop are python blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md block {number}", "exec"), namespace)
    assert (tmp_path / "my_vla_apt" / "apt_config.json").is_file() and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
)
def test_every_controller_attribute_a_page_names_exists(page):
    """A renamed or removed controller method (say ``apt.set_step``) cannot stay in the docs."""
    text = re.sub(r"## Migrating to 1\.0.*?(?=\n## |\Z)", "", (ROOT / page).read_text(), flags=re.DOTALL)  # old names
    code = "\n".join(BLOCK.findall(text)) + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", text))
    named = set(APT_ATTRIBUTE.findall(code))
    instance = APT.__init__.__code__.co_names  # attributes set in __init__ (model, vlm, fusion, config)
    missing = sorted(n for n in named if not hasattr(APT, n) and n not in instance)
    assert missing == [], f"{page} names APT attributes that do not exist: {missing}"
