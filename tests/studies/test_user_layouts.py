"""User instructions on the training layouts (``apt-evaluate --layouts train``, the default) or on fresh scenes."""

from __future__ import annotations

import pytest

from apt_studies.language import resolve_instruction
from apt_studies.layouts import TRAIN_LAYOUTS
from apt_studies.user_file import (
    InstructionFileError,
    InstructionLayoutWarning,
    fitting_layouts,
    load_instruction_file,
    user_episodes,
)


def test_train_layouts_put_each_instruction_on_a_familiar_scene_naming_one_object():
    episodes = user_episodes(["grab the red square", "pick up the small blue circle"], per_instruction=4, seed=3)
    assert len(episodes) == 8
    for episode in episodes:
        layout = TRAIN_LAYOUTS[episode.layout]
        assert tuple((o.colour, o.shape, o.size) for o in episode.scene.objects) == layout.objects
        assert resolve_instruction(episode.instruction, episode.scene) == episode.scene.target
        assert episode.canonical_target == layout.canonical
    assert {e.layout for e in episodes[:4]} <= {0, 7}  # the two layouts with exactly one red square


def test_instructions_that_fit_no_training_layout_are_named_and_skipped(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("grab the red square\ngrab the green diamond\n")  # green diamond: a held-out composition
    with pytest.warns(InstructionLayoutWarning, match=r"line 2: 'grab the green diamond'.*--layouts novel"):
        episodes = user_episodes(load_instruction_file(path), per_instruction=2)
    assert [e.instruction for e in episodes] == ["grab the red square"] * 2
    with pytest.raises(InstructionFileError, match="--layouts novel"), pytest.warns(InstructionLayoutWarning):
        user_episodes(["grab the green diamond"])
    assert fitting_layouts(load_instruction_file(path)[1].query) == []


def test_novel_layouts_build_fresh_scenes_for_any_instruction():
    episodes = user_episodes(["grab the green diamond"], per_instruction=3, layouts="novel")
    assert len(episodes) == 3 and all(e.layout == -1 for e in episodes)
    assert all(resolve_instruction(e.instruction, e.scene) == e.scene.target for e in episodes)
    with pytest.raises(ValueError, match="`layouts` must be one of"):
        user_episodes(["grab the red square"], layouts="familiar")
