"""User instruction files: Unicode is folded rather than deleted, unknown words and misread formats are
reported with ``file:line``, unreadable files raise one clear error, and ``apt-evaluate`` prints it as one line."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest

from apt_studies import (
    InstructionFileError,
    InstructionFormatWarning,
    UnknownWordWarning,
    WordTokenizer,
    load_instruction_file,
    user_episodes,
)
from apt_studies.cli import evaluate_entry, evaluate_main
from apt_studies.user_file import MAX_LINE_CHARS


def _write(tmp_path: Path, content: str | bytes, name: str = "mine.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _load_without_warnings(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_instruction_file(path)


@pytest.mark.parametrize(
    ("text", "colour", "shape"),
    [
        ("grab the réd cube", "red", "square"),  # was read as 'r d cube': any cube
        ("ｇｒａｂ ｔｈｅ ＲＥＤ ｃｕｂｅ", "red", "square"),  # full-width letters
        ("fetch the CRIMSÓN bäll", "red", "circle"),
        ("go to the gre\u0301en diamond", "green", "diamond"),  # decomposed accent (e + U+0301)
        ("ﬁnd the big yellow triangle", "yellow", "triangle"),  # ligature "ﬁ" (NFKC: "fi")
    ],
)
def test_accented_and_full_width_words_are_folded_not_deleted(tmp_path, text, colour, shape):
    (instruction,) = _load_without_warnings(_write(tmp_path, text + "\n"))  # no word is unknown
    assert (instruction.query.colour, instruction.query.shape) == (colour, shape)
    tokenizer = WordTokenizer()
    assert tokenizer.unk_id not in tokenizer.tokenize(text)  # the policy's prompt holds the same words
    episodes = user_episodes([instruction], per_instruction=3, layouts="novel")
    assert all((e.scene.target_object.colour, e.scene.target_object.shape) == (colour, shape) for e in episodes)


def test_every_unknown_word_is_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path, "# mine\ngrab the rød cube\npick up the blue ball\nfetch the 🟥 zorbly ball quickly\n")
    with pytest.warns(UnknownWordWarning) as record:
        loaded = load_instruction_file(path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}:2: 'rød' (did you mean 'red'?) maps to no token")
    assert "evaluated as colour=any, shape=square, size=any" in messages[0]
    assert "Use words the benchmark knows" in messages[0] and "fix the spelling" in messages[0]
    assert messages[1].startswith(f"{path}:4: ") and all(w in messages[1] for w in ("'zorbly'", "'quickly'", "'🟥'"))
    assert [u.unknown_words for u in loaded] == [("rød",), (), ("zorbly", "quickly", "🟥")]


@pytest.mark.filterwarnings("ignore::apt_studies.UnknownWordWarning")  # the key 'instruction' is one
def test_json_lines_in_a_txt_file_warn_and_name_the_fix(tmp_path):
    path = _write(tmp_path, '{"instruction": "grab the red cube"}\npick up the blue ball\n"fetch the tiny box"\n')
    message = r"mine.txt:1: 2 line\(s\) \(1, 3\) look like JSON.*Rename it to .jsonl"
    with pytest.warns(InstructionFormatWarning, match=message):
        load_instruction_file(path)
    jsonl = _write(tmp_path, '{"instruction": "grab the red cube"}\n', name="mine.jsonl")
    assert [u.text for u in _load_without_warnings(jsonl)] == ["grab the red cube"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            r"mine.txt:3: contains NUL bytes, so it is a binary file.*Pass a text file or save this one as UTF-8",
        ),
        (
            "grab the red cube\n".encode("utf-16"),
            r"mine.txt is UTF-16 text \(it starts with a UTF-16 byte-order mark\)"
            r".*Save it as UTF-8, e.g. `iconv -f UTF-16",
        ),
        ("grab the red cube\n".encode("utf-32"), r"mine.txt is UTF-32 text.*Save it as UTF-8"),
        (
            "grab the red cube\n".encode("utf-16-le"),
            r"mine.txt:1: contains NUL bytes.*UTF-16/UTF-32 text without a byte-order mark",
        ),
        (
            b"pick up the blue ball\ngrab the r\xe9d cube\n",
            r"mine.txt:2: byte 0xe9 is not valid UTF-8.*Re-save the file as UTF-8",
        ),
        (b"# only a comment\n\n", r"mine.txt holds no instruction.*write one instruction per line"),
        (b"", r"mine.txt holds no instruction"),
    ],
    ids=["binary", "utf16", "utf32", "utf16_no_bom", "latin1", "comments_only", "empty"],
)
def test_unreadable_files_raise_one_error_naming_the_file_and_the_fix(tmp_path, content, message):
    with pytest.raises(InstructionFileError, match=message) as error:
        load_instruction_file(_write(tmp_path, content))
    assert isinstance(error.value, ValueError) and not isinstance(error.value, UnicodeDecodeError)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    (instruction,) = _load_without_warnings(_write(tmp_path, "\ufeffgrab the red cube\n".encode("utf-8")))
    assert instruction.query.colour == "red" and instruction.line == 1


def test_a_directory_is_not_reported_as_missing(tmp_path):
    folder = tmp_path / "instructions"
    folder.mkdir()
    _write(folder, "grab the red cube\n", name="mine.txt")
    message = r"instructions is a directory, not a file; pass one file inside it, e.g. .*mine.txt"
    with pytest.raises(InstructionFileError, match=message):
        load_instruction_file(folder)
    with pytest.raises(InstructionFileError, match=r"nowhere.txt does not exist; check the path"):
        load_instruction_file(tmp_path / "nowhere.txt")


def test_a_huge_line_is_refused_at_once(tmp_path):
    path = _write(tmp_path, "pick up the blue ball\n" + "grab the red cube " * 5_600 + "\n")
    start = time.perf_counter()
    message = (
        rf"mine.txt:2: instruction is 100,799 characters long; instructions are capped at {MAX_LINE_CHARS:,}.*Shorten"
    )
    with pytest.raises(InstructionFileError, match=message):
        load_instruction_file(path)
    assert time.perf_counter() - start < 2  # was 2 minutes and 5.7 GB in evaluation
    longest = "grab the red" + " " * (MAX_LINE_CHARS - 17) + " cube"  # exactly at the cap
    (ok,) = _load_without_warnings(
        _write(tmp_path, "# " + "x" * 100_000 + "\n" + longest + "\n")
    )  # comments: any length
    assert len(ok.text) == MAX_LINE_CHARS and ok.query.colour == "red"
    metadata = _write(tmp_path, '{"instruction": "grab the red cube", "notes": "%s"}\n' % ("x" * 5_000), name="m.jsonl")
    assert [u.text for u in _load_without_warnings(metadata)] == ["grab the red cube"]  # the cap is on the instruction


def test_evaluate_from_python_raises_the_typed_error(tmp_path):
    checkpoint = _write(tmp_path, b"", name="x.ckpt")
    with pytest.raises(InstructionFileError, match="is a directory"):
        evaluate_main([str(checkpoint), "--instructions", str(tmp_path)])


@pytest.mark.parametrize(
    ("instructions", "checkpoint", "message"),
    [
        (b"\x00\x01binary", b"", "mine.txt:1: contains NUL bytes"),
        ("a" * 100_000, b"", "mine.txt:1: instruction is 100,000 characters long"),
        ("grab the red cube\nplease do something\n", b"", "mine.txt:2: cannot resolve 'please do something'"),
        (None, None, "checkpoint x.ckpt is a directory"),
        ("grab the red cube\n", b"garbage", "x.ckpt cannot be read as a PyTorch checkpoint"),
    ],
    ids=["binary", "long_line", "unresolvable", "checkpoint_dir", "checkpoint_garbage"],
)
def test_apt_evaluate_prints_input_errors_as_one_line(tmp_path, capsys, monkeypatch, instructions, checkpoint, message):
    monkeypatch.chdir(tmp_path)
    if checkpoint is None:
        Path("x.ckpt").mkdir()
    else:
        _write(tmp_path, checkpoint, name="x.ckpt")
    args = ["x.ckpt"] + ([] if instructions is None else ["--instructions", str(_write(tmp_path, instructions).name)])
    with pytest.raises(SystemExit) as exit_:
        evaluate_entry(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"apt-evaluate: error: {message}") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_apt_evaluate_prints_warnings_as_lines_before_the_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, b"", name="x.ckpt")
    _write(tmp_path, 'grab the rød cube\n{"instruction": "take the red ball"}\nplease do something\n')
    with pytest.raises(SystemExit):
        evaluate_entry(["x.ckpt", "--instructions", "mine.txt"])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("apt-evaluate: warning: mine.txt:1: 'rød' (did you mean 'red'?)")
    assert lines[-1].startswith("apt-evaluate: error: mine.txt:3: cannot resolve")
