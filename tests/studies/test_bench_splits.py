"""The splits are disjoint in the ways they claim, and user files are read as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from apt_studies import (
    HELD_OUT_PAIRS,
    TRAIN_LAYOUTS,
    InstructionResolutionError,
    canonical_pairs,
    held_out_violations,
    load_instruction_file,
    make_episodes,
    matches_training_wording,
    resolve_instruction,
    training_content_words,
    training_pairs,
    user_episodes,
    wording_violations,
)
from apt_studies.scene import COLOURS, SHAPES


def test_held_out_compositions_never_appear_in_training() -> None:
    assert not training_pairs() & HELD_OUT_PAIRS
    assert {c for c, _ in HELD_OUT_PAIRS} == set(COLOURS) and {s for _, s in HELD_OUT_PAIRS} == set(SHAPES)
    assert {c for c, _ in training_pairs()} == set(COLOURS) and {s for _, s in training_pairs()} == set(SHAPES)
    train = make_episodes("train", 2000, seed=0)
    assert held_out_violations(train) == []
    unseen = make_episodes("unseen_composition", 300, seed=0)
    assert all(e.scene.target_object.pair in HELD_OUT_PAIRS for e in unseen)
    assert not {e.scene.target_object.pair for e in unseen} & {e.scene.target_object.pair for e in train}


def test_unseen_composition_needs_both_words() -> None:
    for episode in make_episodes("unseen_composition", 100, seed=1):
        target, others = (
            episode.scene.target_object,
            [o for i, o in enumerate(episode.scene.objects) if i != episode.scene.target],
        )
        assert any(o.colour == target.colour for o in others) and any(o.shape == target.shape for o in others)


def test_paraphrases_share_no_training_wording() -> None:
    paraphrase = make_episodes("paraphrase", 500, seed=0)
    assert wording_violations(paraphrase) == []
    train_texts = {e.instruction for e in make_episodes("train", 1000, seed=0)}
    assert not train_texts & {e.instruction for e in paraphrase}
    assert all(matches_training_wording(t) for t in train_texts)
    assert "pick" in training_content_words() and "red" in training_content_words()
    assert len(wording_violations(make_episodes("seen", 20, seed=0))) == 20, "the check must be able to fail"


def test_layout_targets_and_imbalance() -> None:
    train = make_episodes("train", 2000, seed=0)
    canonical = np.mean([e.scene.target == e.canonical_target for e in train])
    assert 0.87 < canonical < 0.93
    assert {e.layout for e in train} == set(range(len(TRAIN_LAYOUTS)))
    assert all(e.scene.target == e.canonical_target for e in make_episodes("seen", 200, seed=0))
    assert all(e.scene.target == e.canonical_target for e in make_episodes("paraphrase", 200, seed=0))
    counterfactual = make_episodes("counterfactual", 200, seed=0)
    assert all(e.layout >= 0 and e.scene.target != e.canonical_target for e in counterfactual)
    assert {e.scene.target_object.pair for e in make_episodes("seen", 500, seed=0)} == canonical_pairs()
    novel = make_episodes("novel_layout", 200, seed=0)
    assert all(e.layout == -1 and e.scene.target_object.pair in training_pairs() for e in novel)


def test_splits_differ_for_the_same_seed() -> None:
    assert make_episodes("seen", 5, seed=0)[0].scene != make_episodes("counterfactual", 5, seed=0)[0].scene


def test_user_file_formats(tmp_path: Path) -> None:
    text = tmp_path / "instructions.txt"
    text.write_text("# comment\ncould you grab the crimson ball\n\nthe big one, go to it\n", encoding="utf-8")
    jsonl = tmp_path / "instructions.jsonl"
    jsonl.write_text(
        '{"instruction": "fetch the violet cube", "id": 3}\n"reach for the yellow triangle"\n', encoding="utf-8"
    )
    loaded = load_instruction_file(text)
    assert [(u.text, u.line) for u in loaded] == [("could you grab the crimson ball", 2), ("the big one, go to it", 4)]
    assert [u.text for u in load_instruction_file(jsonl)] == ["fetch the violet cube", "reach for the yellow triangle"]
    episodes = user_episodes(loaded + load_instruction_file(jsonl), per_instruction=5, seed=0, layouts="novel")
    assert len(episodes) == 20 and all(e.split == "user" for e in episodes)
    assert all(resolve_instruction(e.instruction, e.scene) == e.scene.target for e in episodes)
    assert episodes == user_episodes(loaded + load_instruction_file(jsonl), per_instruction=5, seed=0, layouts="novel")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("grab the red cube\ngo over there\n", r"instructions.txt:2: cannot resolve 'go over there'"),
        ("take the red blue cube\n", r":1: .*several colours"),
    ],
)
def test_user_file_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "instructions.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InstructionResolutionError, match=message):
        load_instruction_file(path)


def test_user_jsonl_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": 3}\n', encoding="utf-8")
    with pytest.raises(InstructionResolutionError, match=r"bad\.jsonl:1"):
        load_instruction_file(path)
