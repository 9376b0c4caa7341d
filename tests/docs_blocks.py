"""The code blocks of README.md and docs/*.md, how each one is checked, and the cheap checks of shell blocks.

A ```python block in docs/ is preceded by a marker comment (the line before its fence, blank lines allowed):

* ``<!-- snippet: run -->``: self-contained, executed in a fresh directory;
* ``<!-- snippet: setup=NAME -->``: executed after the setup :data:`SETUPS` names (README's quickstart, ...),
  then that setup's check, if it has one;
* ``<!-- snippet: skip: REASON -->``: not runnable here (a GPU, a real checkpoint, LeRobot's venv); only compiled.

In an executed block, a bare expression followed by a comment holding a Python literal (``model.apt.stage  # 2``)
is asserted to equal it. README's blocks carry no markers: its own test runs all of them in order.

Shell blocks are not run. Each command is checked: a ``python`` script exists and every ``--flag`` passed is one its
argparse parser defines, with a value where it takes one (read from the script's source, not by importing it);
``python -m`` modules exist; every extra of a ``pip install -e PATH[extras]`` is declared in PATH's pyproject.toml;
console scripts are this project's or listed in :data:`EXTERNAL_COMMANDS` with a reason.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import shlex
import tokenize
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import InvalidRequirement, Requirement

ROOT = Path(__file__).parents[1]
PYTHON = {"python", "py", "python3", "pycon"}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*snippet:\s*(?P<spec>.*?)\s*-->\s*\Z", re.DOTALL)

EXTERNAL_COMMANDS = {
    "lerobot-train": "LeRobot's console script, in its Python 3.12 venv (not this one); its flags are LeRobot's config",
    "lerobot-eval": "LeRobot's console script, in its Python 3.12 venv (not this one); its flags are LeRobot's config",
    "export": "a shell builtin",
    "cd": "a shell builtin",
}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # the spec of the `<!-- snippet: ... -->` comment before the fence, if any

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = MARKER.search(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        found.append(
            Block(
                page=path.relative_to(root).as_posix(),
                line=text.count("\n", 0, match.start()) + 1,
                lang=match["lang"].lower(),
                code=match["code"],
                marker=marker["spec"] if marker else None,
            )
        )
    return found


def all_blocks(langs: set[str]) -> list[Block]:
    return [block for path in pages() for block in blocks(path) if block.lang in langs]


# ---------------------------------------------------------------------------------------------- executing blocks
def with_value_checks(code: str) -> str:
    """``code`` with every top-level ``expression  # literal`` turned into ``assert (expression) == literal``."""
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(code).readline)
        if token.type == tokenize.COMMENT
    }
    lines = code.splitlines()
    for node in ast.parse(code).body:
        if not isinstance(node, ast.Expr) or node.end_lineno is None or node.end_lineno not in comments:
            continue
        try:
            expected = ast.literal_eval(comments[node.end_lineno])
        except (ValueError, SyntaxError):
            continue  # a prose comment, not a value
        expression = ast.get_source_segment(code, node)
        if node.lineno != node.end_lineno or expression is None:
            continue
        lines[node.lineno - 1] = f"assert ({expression}) == {expected!r}, ({expression}, {expected!r})"
    return "\n".join(lines) + "\n"


def readme_namespace() -> dict[str, Any]:
    """README's quickstart block (``MyVLA``, ``example``, ``loader`` and its imports), executed."""
    quickstart = next(b for b in blocks(ROOT / "README.md") if b.lang == "python")
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    exec(compile(quickstart.code, f"{quickstart.name}", "exec"), namespace)
    return namespace


def setup_readme() -> tuple[dict[str, Any], Callable[[dict[str, Any]], None] | None]:
    """README's quickstart, plus what the guide's fragments refer to: a fresh ``model``, step counts ``N`` and ``M``
    (2 each), ``corpus`` and ``task_data`` (the quickstart's loader) and the library names they use."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from apt_lightning import APTConfig, APTStageScheduler, StagePlan
    from apt_lightning.feature_cache import Stage1FeatureCache
    from apt_lightning.models import load_policy

    namespace = readme_namespace()
    L.seed_everything(0)
    namespace.update(
        L=L, torch=torch, ModelCheckpoint=ModelCheckpoint, APTConfig=APTConfig, APTStageScheduler=APTStageScheduler,
        StagePlan=StagePlan, Stage1FeatureCache=Stage1FeatureCache, load_policy=load_policy,
        model=namespace["MyVLA"](), N=2, M=2, corpus=namespace["loader"], task_data=namespace["loader"],
    )  # fmt: skip
    return namespace, None


def setup_readme_methods() -> tuple[dict[str, Any], Callable[[dict[str, Any]], None] | None]:
    """README's quickstart; the block defines methods of ``MyVLA``. The check puts them on a subclass, fits it for
    2 steps across the switch and asserts that APT raised no warning (APT warns, for example, about an optimiser
    without its param groups)."""
    namespace, _ = setup_readme()
    defined_before = set(namespace)

    def check(after: dict[str, Any]) -> None:
        import lightning as L

        from apt_lightning import APTStageScheduler

        methods = {k: v for k, v in after.items() if k not in defined_before and callable(v)}
        assert methods, "the block defines no method"
        cls = type("MyVLAWithDocsMethods", (after["MyVLA"],), methods)
        L.seed_everything(0)
        model = cls()
        trainer = L.Trainer(
            max_steps=2, callbacks=[APTStageScheduler(switch_at_step=1)], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, after["loader"])
        from_apt = [str(w.message) for w in caught if "apt_lightning" in (w.filename or "")]
        assert model.apt.step == 2 and model.apt.stage == 2
        assert from_apt == [], from_apt

    return namespace, check


SETUPS: dict[str, Callable[[], tuple[dict[str, Any], Callable[[dict[str, Any]], None] | None]]] = {
    "readme": setup_readme,
    "readme_methods": setup_readme_methods,
}


def parse_marker(spec: str) -> tuple[str, str]:
    """``("run", "")``, ``("setup", NAME)`` or ``("skip", REASON)``; ValueError for anything else."""
    if spec == "run":
        return "run", ""
    if spec.startswith("setup="):
        name = spec.removeprefix("setup=").strip()
        if name not in SETUPS:
            raise ValueError(f"unknown setup {name!r}; known: {sorted(SETUPS)}")
        return "setup", name
    if spec.startswith("skip:") and spec.removeprefix("skip:").strip():
        return "skip", spec.removeprefix("skip:").strip()
    raise ValueError(f"{spec!r} is not `run`, `setup=NAME` or `skip: REASON`")


def run_block(block: Block, setup: str | None) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    check = None
    if setup is not None:
        namespace, check = SETUPS[setup]()
    exec(compile(with_value_checks(block.code), block.name, "exec"), namespace)
    if check is not None:
        check(namespace)
    return namespace


# ---------------------------------------------------------------------------------------------- shell blocks
@dataclass(frozen=True)
class ScriptOptions:
    flags: dict[str, str]  # option string -> nargs: "0", "1", "?", "*", "+"
    positionals: int


def script_options(path: Path) -> ScriptOptions | None:
    """The options an argparse script defines, read from its source; None when it has no parser."""
    tree = ast.parse(path.read_text())
    flags: dict[str, str] = {}
    positionals = 0
    parsers = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        parsers += called == "ArgumentParser"
        if called != "add_argument":
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        keywords = {k.arg: k.value for k in node.keywords}
        action = keywords.get("action")
        nargs = keywords.get("nargs")
        if isinstance(action, ast.Constant) and action.value in {"store_true", "store_false", "count", "store_const"}:
            kind = "0"
        elif isinstance(nargs, ast.Constant):
            kind = str(nargs.value)
        else:
            kind = "1"
        if names and names[0].startswith("-"):
            flags.update(dict.fromkeys(names, kind))
        else:
            positionals += 1
    return ScriptOptions(flags, positionals) if parsers or flags else None


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, split at ``&&``, ``;``, ``|``."""
    joined = code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in {"&&", ";", "||", "|", "&"}:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _pyproject(directory: Path) -> dict[str, Any]:
    path = directory / "pyproject.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def console_scripts() -> set[str]:
    return set(_pyproject(ROOT).get("project", {}).get("scripts", {}))


def check_python(argv: list[str]) -> list[str]:
    """Problems with ``python ARGS``: a missing module or script, a flag its parser does not define."""
    args = argv[1:]
    while args and args[0].startswith("-") and args[0] != "-m":
        args = args[1:]  # interpreter options (-u, -X ...)
    if not args:
        return []
    if args[0] == "-m":
        module = args[1] if len(args) > 1 else ""
        return [] if module and importlib.util.find_spec(module) else [f"`python -m {module}`: no such module"]
    script = ROOT / args[0]
    if not script.is_file():
        return [f"`{args[0]}`: no such script"]
    return check_flags(args[0], script_options(script), args[1:])


def check_flags(script: str, options: ScriptOptions | None, args: list[str]) -> list[str]:
    if options is None:
        return [f"`{script}` takes no options, given {args}"] if args else []
    problems = []
    positionals = 0
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            positionals += 1
            continue
        flag, has_value, _ = arg.partition("=")
        if flag not in options.flags:
            problems.append(f"`{script}` has no option `{flag}` (it has {sorted(options.flags)})")
            continue
        kind = options.flags[flag]
        values = 0
        if not has_value:
            while i < len(args) and not args[i].startswith("-") and (kind in {"+", "*"} or values < _most(kind)):
                values += 1
                i += 1
        else:
            values = 1
        if (kind == "0" and values) or (kind == "1" and values != 1) or (kind == "+" and not values):
            problems.append(f"`{script} {flag}` takes {_describe(kind)} value(s), given {values}")
    if positionals > options.positionals:
        problems.append(f"`{script}` takes {options.positionals} positional argument(s), given {positionals}")
    return problems


def _most(kind: str) -> int:
    return {"0": 0, "1": 1, "?": 1}.get(kind, int(kind) if kind.isdigit() else 1)


def _describe(kind: str) -> str:
    return {"0": "no", "1": "one", "?": "an optional", "*": "any number of", "+": "one or more"}.get(kind, kind)


def check_pip(argv: list[str]) -> list[str]:
    """Problems with ``pip install ...``: an editable path or constraints file that does not exist, an extra its
    pyproject.toml does not declare, a requirement that does not parse."""
    if len(argv) < 2 or argv[1] != "install":
        return [f"`{' '.join(argv)}`: only `pip install` is checked"]
    problems = []
    args = argv[2:]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in {"-e", "--editable"}:
            problems += _check_editable(args[i] if i < len(args) else "")
            i += 1
        elif arg in {"-c", "-r", "--constraint", "--requirement"}:
            if i >= len(args) or not (ROOT / args[i]).is_file():
                problems.append(f"`pip install {arg}`: no file {args[i] if i < len(args) else ''!r}")
            i += 1
        elif not arg.startswith("-"):
            try:
                Requirement(arg)
            except InvalidRequirement as error:
                problems.append(f"`pip install {arg}`: {error}")
    return problems


def _check_editable(target: str) -> list[str]:
    path, _, extras = target.partition("[")
    directory = ROOT / path
    if not (directory / "pyproject.toml").is_file():
        return [f"`pip install -e {target}`: {path!r} has no pyproject.toml"]
    declared = set(_pyproject(directory).get("project", {}).get("optional-dependencies", {}))
    asked = [e.strip() for e in extras.rstrip("]").split(",") if e.strip()]
    return [f"`pip install -e {target}`: no extra {e!r} in {path}/pyproject.toml ({sorted(declared)})" for e in asked
            if e not in declared]  # fmt: skip


def check_command(argv: list[str]) -> list[str]:
    program = Path(argv[0]).name
    if re.fullmatch(r"python[\d.]*", program):
        return check_python(argv)
    if re.fullmatch(r"pip[\d.]*", program):
        return check_pip(argv)
    if program in console_scripts() or program in EXTERNAL_COMMANDS:
        return []
    return [f"`{argv[0]}`: not a python script, pip, a console script of pyproject.toml or a known external command"]
