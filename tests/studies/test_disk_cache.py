"""The directory cache behind the pretrained VLM: built once, atomic, never accepts a partial artefact."""

from __future__ import annotations

from pathlib import Path

import pytest

from apt_studies.disk_cache import cache_key, cached_directory, is_complete

FILES = ("a.txt", "b.txt")


def _writer(calls: list[Path]):
    def build(staging: Path) -> None:
        calls.append(staging)
        for name in FILES:
            (staging / name).write_text(name)

    return build


def test_built_once_then_reused(tmp_path: Path) -> None:
    calls: list[Path] = []
    target = tmp_path / "cache" / "thing-1"
    assert cached_directory(target, FILES, _writer(calls)) is True
    assert cached_directory(target, FILES, _writer(calls)) is False
    assert len(calls) == 1 and is_complete(target, FILES)
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing-1"], "no staging directory left behind"


def test_failed_or_partial_builds_cache_nothing(tmp_path: Path) -> None:
    target = tmp_path / "thing"

    def crash(staging: Path) -> None:
        (staging / "a.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_directory(target, FILES, crash)
    with pytest.raises(RuntimeError, match=r"wrote no \['b.txt'\]"):
        cached_directory(target, FILES, lambda staging: (staging / "a.txt").write_text("a"))
    assert list(tmp_path.iterdir()) == []

    target.mkdir()
    (target / "a.txt").write_text("stale")  # an incomplete directory is replaced, not trusted
    calls: list[Path] = []
    assert cached_directory(target, FILES, _writer(calls)) is True
    assert (target / "a.txt").read_text() == "a.txt"


def test_cache_key_depends_on_every_field_not_on_order() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1, "b": [1, 2]}) != cache_key({"a": 1, "b": [2, 1]})
    assert len(cache_key({})) == 12
