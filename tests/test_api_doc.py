"""docs/api.md is generated from the docstrings and cannot go stale."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PAGE = Path(__file__).parents[1] / "docs" / "make_api.py"


def test_the_api_reference_matches_the_docstrings():
    spec = importlib.util.spec_from_file_location("make_api", PAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.PAGE.read_text() == module.render(), "docs/api.md is stale: run `python docs/make_api.py`"
    assert "## `APT`" in module.render() and "save_pretrained" in module.render()
