"""The instruction table: complete for MT50, training wordings and paraphrases apart (no metaworld needed)."""

import numpy as np
import pytest

from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.tasks import (
    INSTRUCTIONS,
    MT50_TASKS,
    paraphrase_instruction,
    training_instruction,
    wording_overlaps,
    wording_words,
)
from apt_studies.tokenizer import normalise


def test_every_task_has_two_training_wordings_and_four_paraphrases():
    assert len(MT50_TASKS) == 50
    for task, wording in INSTRUCTIONS.items():
        assert len(wording.training) == 2 and len(set(wording.training)) == 2, task
        assert len(wording.paraphrases) == 4 and len(set(wording.paraphrases)) == 4, task


def test_no_paraphrase_is_a_training_wording():
    assert wording_overlaps() == []


def test_group_tasks_are_told_apart_by_their_training_words():
    for a, b in (("reach-v3", "push-v3"), ("push-v3", "pick-place-v3"), ("faucet-open-v3", "faucet-close-v3")):
        words_a = {w for s in INSTRUCTIONS[a].training for w in normalise(s)}
        words_b = {w for s in INSTRUCTIONS[b].training for w in normalise(s)}
        assert words_a - words_b and words_b - words_a, (a, b)


def test_draws_come_from_the_right_register():
    rng = np.random.default_rng(0)
    assert training_instruction("push-v3", rng) in INSTRUCTIONS["push-v3"].training
    assert paraphrase_instruction("push-v3", rng) in INSTRUCTIONS["push-v3"].paraphrases
    assert wording_words("training") | wording_words("paraphrase") == wording_words()


def test_unknown_task_and_register_raise():
    with pytest.raises(MetaWorldConfigError, match="no instructions for task 'push-v2'"):
        training_instruction("push-v2", np.random.default_rng(0))
    with pytest.raises(MetaWorldConfigError, match="`register`='held_out'"):
        wording_words("held_out")
