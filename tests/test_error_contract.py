"""The error contract of ``apt_lightning.errors``: every error the library raises on purpose is an ``AptError``."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import apt_lightning

CORE = Path(apt_lightning.__file__).parent
ALLOWED = {
    # Python's protocols require these exact types.
    ("__init__.py", "AttributeError"),  # module __getattr__ (PEP 562)
    ("feature_cache.py", "AssertionError"),  # an unreachable branch, not an error a user can meet
    ("base.py", "NotImplementedError"),  # abstract hooks of FlowMatchingPolicy that a subclass must define
}


def builtin_raises() -> list[str]:
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = call.id if isinstance(call, ast.Name) else None
            is_builtin_exception = isinstance(getattr(builtins, name or "", None), type) and issubclass(
                getattr(builtins, name), BaseException
            )
            if is_builtin_exception and (path.name, name) not in ALLOWED:
                found.append(f"{path.relative_to(CORE)}:{node.lineno}: raise {name}")
    return found


def test_the_core_raises_no_bare_builtin_exception():
    assert builtin_raises() == []


def test_the_walk_finds_a_bare_raise(tmp_path, monkeypatch):
    (tmp_path / "bad.py").write_text("def f():\n    raise ValueError('x')\n")
    monkeypatch.setattr(__import__(__name__), "CORE", tmp_path)
    assert builtin_raises() == ["bad.py:2: raise ValueError"]
