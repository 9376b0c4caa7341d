"""Write docs/api.md, the API reference, from the docstrings of every name in ``apt_lightning.__all__``.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 if docs/api.md is stale (tests/test_api_doc.py runs this check)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import apt_lightning

PAGE = Path(__file__).with_name("api.md")
HEADER = (
    "# API reference\n\n"
    "Generated from the docstrings by `python docs/make_api.py`; `tests/test_api_doc.py` fails when it is stale.\n"
    "Every name below is importable from `apt_lightning`.\n"
)


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "(no docstring)")


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _members(cls: type) -> list[str]:
    lines = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            lines.append(f"- **`{name}`** (property): {_doc(member).splitlines()[0]}")
        elif inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
            function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            lines.append(f"- **`{name}{_signature(function)}`**: {_doc(function).splitlines()[0]}")
    return lines


def render() -> str:
    sections = [HEADER]
    for name in sorted(apt_lightning.__all__, key=str.lower):
        obj = getattr(apt_lightning, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        signature = _signature(obj) if inspect.isfunction(obj) or not issubclass(obj, BaseException) else ""
        body = [f"## `{name}`\n", f"*{kind}* `{name}{signature}`\n", "```text", _doc(obj), "```", ""]
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            members = _members(obj)
            if members:
                body += ["Members:", "", *members, ""]
        sections.append("\n".join(body))
    return "\n".join(sections).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if PAGE.read_text() == text else 1)
    PAGE.write_text(text)
