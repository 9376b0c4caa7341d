"""Every code block of README.md and docs/*.md is checked: python blocks are executed (self-contained, or after a setup
their marker names) or marked not runnable here with the reason; shell blocks name scripts, flags, modules and extras
that exist. How blocks are marked and checked: tests/docs_blocks.py."""

from __future__ import annotations

import re

import pytest

from apt_lightning import APT
from docs_blocks import (
    PYTHON,
    ROOT,
    SHELL,
    Block,
    all_blocks,
    blocks,
    check_command,
    parse_marker,
    run_block,
    shell_commands,
    with_value_checks,
)

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
APT_ATTRIBUTE = re.compile(r"\bapt\.([A-Za-z_]\w*)")
README_TEST = "test_the_readme_snippets_run_in_order"

# Pages others edit carry no markers; their python blocks are classified here: (page, start of the block's first
# line) -> why it cannot run here.
NOT_RUNNABLE_HERE = {
    ("docs/integrations.md", "from lerobot.configs import PreTrainedConfig"): "needs LeRobot 0.6.1 (its Python 3.12 "
    "venv) and a trained checkpoint under outputs/",
    ("docs/integrations.md", "import lightning.pytorch as L"): "needs LeRobot 0.6.1 (its Python 3.12 venv), a pi0 "
    "checkpoint and a LeRobot dataset",
    ("docs/integrations.md", "adapter = PI0APT(policy, APTConfig(lr=2.5e-5))"): "needs LeRobot 0.6.1 (its Python 3.12 "
    "venv): the adapter wraps LeRobot's PI0Policy",
    ("docs/integrations.md", 'adapter.save_pretrained("out/")'): "needs LeRobot 0.6.1 (its Python 3.12 venv): the "
    "adapter wraps LeRobot's PI0Policy",
}


def _listed(block: Block, page: str, start: str) -> bool:
    return block.page == page and block.first_line.startswith(start)


def classify(block: Block) -> tuple[str, str]:
    """``(kind, detail)``: ``("readme", test)``, ``("run", "")``, ``("setup", NAME)`` or ``("skip", REASON)``."""
    if block.page == "README.md":
        return "readme", README_TEST
    listed = [reason for (page, start), reason in NOT_RUNNABLE_HERE.items() if _listed(block, page, start)]
    if listed:
        return "skip", listed[0]
    if block.marker is None:
        raise ValueError(
            f"{block.name}: a python block with no `<!-- snippet: run -->`, `<!-- snippet: setup=NAME -->` or "
            "`<!-- snippet: skip: REASON -->` on the line before it: make it run, or say why it cannot here"
        )
    return parse_marker(block.marker)


PYTHON_BLOCKS = all_blocks(PYTHON)
SHELL_BLOCKS = all_blocks(SHELL)


def _blocks_of(*kinds: str) -> list[pytest.param]:
    chosen = []
    for block in PYTHON_BLOCKS:
        try:
            kind, detail = classify(block)
        except ValueError:
            continue  # reported by test_every_python_block_is_run_or_marked_not_runnable
        if kind in kinds:
            chosen.append(pytest.param(block, detail if kind == "setup" else None, id=block.name))
    return chosen


def test_every_python_block_is_run_or_marked_not_runnable():
    problems = []
    for block in PYTHON_BLOCKS:
        try:
            classify(block)
        except ValueError as error:
            problems.append(str(error))
    assert problems == []
    stale = sorted(key for key in NOT_RUNNABLE_HERE if sum(_listed(b, *key) for b in PYTHON_BLOCKS) != 1)
    assert stale == [], f"NOT_RUNNABLE_HERE entries that name no block (edited or removed) or several: {stale}"


def test_a_block_without_a_marker_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- snippet: setup=nope -->\n```python\nx = 2\n```\n")
    unmarked, unknown = blocks(page, root=tmp_path)
    with pytest.raises(ValueError, match="no `<!-- snippet: run -->`"):
        classify(unmarked)
    with pytest.raises(ValueError, match="unknown setup 'nope'"):
        classify(unknown)
    with pytest.raises(ValueError, match="is not `run`"):
        parse_marker("skip:")  # a skip needs its reason


def test_the_readme_snippets_run_in_order(tmp_path, monkeypatch):
    """Quickstart (model, Trainer, fit, reload, adapter files) and the plain loop with its resume, as a user pastes
    them: one namespace, in a fresh directory."""
    readme = [b for b in PYTHON_BLOCKS if b.page == "README.md"]
    assert len(readme) >= 3, "the quickstart and the plain loop are python blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for block in readme:
        exec(compile(with_value_checks(block.code), block.name, "exec"), namespace)
    assert (tmp_path / "my_vla_apt" / "apt_config.json").is_file() and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.parametrize(("block", "setup"), _blocks_of("run", "setup"))
def test_docs_python_block_runs(block, setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block(block, setup)


@pytest.mark.parametrize(("block", "setup"), _blocks_of("skip"))
def test_a_block_not_runnable_here_still_compiles(block, setup):
    compile(block.code, block.name, "exec")


def test_a_value_comment_is_asserted():
    namespace: dict = {}
    exec(compile(with_value_checks("x = 1\nx  # 1\nx  # the value\n"), "ok", "exec"), namespace)
    with pytest.raises(AssertionError, match=r"\(1, 2\)"):
        exec(compile(with_value_checks("x = 1\nx            # 2\n"), "wrong", "exec"), namespace)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.name for b in SHELL_BLOCKS])
def test_shell_block_names_what_exists(block):
    commands = shell_commands(block.code)
    assert commands, f"{block.name}: no command found"
    problems = [problem for command in commands for problem in check_command(command)]
    assert problems == [], f"{block.name}: " + "; ".join(problems)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("python examples/pretrain_finetune.py --arch pi0", "has no option `--arch`"),
        ("python examples/pretrain_finetune.py --archs", "takes one or more value"),
        ("python examples/metaworld_study.py --publish yes", "takes 0 positional"),
        ("python examples/no_such_script.py", "no such script"),
        ("python -m no_such_module_here", "no such module"),
        ('pip install -e ".[test,no_such_extra]"', "no extra 'no_such_extra'"),
        ("pip install -e plugins/nowhere", "has no pyproject.toml"),
        ("pip install -c examples/nothing.txt torch", "no file"),
        ("apt-lightnin fit", "not a python script"),
    ],
)
def test_the_shell_checks_catch_what_does_not_exist(line, problem):
    problems = [p for command in shell_commands(line) for p in check_command(command)]
    assert any(problem in p for p in problems), problems


def test_the_shell_checks_pass_what_exists():
    line = 'python examples/pretrain_finetune.py --archs pi0 --seeds 0 1 --out=runs/x && pip install -e ".[bench]"'
    assert [p for command in shell_commands(line) for p in check_command(command)] == []


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


def test_the_methods_setup_fails_a_method_that_drops_apts_param_groups(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrong = "def configure_optimizers(self):\n    return torch.optim.SGD(self.parameters(), lr=0.1)\n"
    block = Block("docs/new.md", 1, "python", wrong, "setup=readme_methods")
    with pytest.raises(AssertionError, match="does not build on APT's param groups"):
        run_block(block, "readme_methods")
