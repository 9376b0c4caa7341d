"""Tokenizer, language generators and the referring-expression parser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_studies import (
    InstructionResolutionError,
    WordTokenizer,
    build_prompt,
    caption,
    describe_object,
    diverse_instruction,
    make_episodes,
    paraphrase_instruction,
    question_answer,
    resolve_instruction,
    training_instruction,
)


def test_tokenizer_round_trip_unknown_and_padding() -> None:
    tok = WordTokenizer()
    ids, mask = tok.encode("Could you GRAB the crimson ball?", max_len=12)
    assert ids.dtype == torch.long and ids.shape == (12,) and mask.tolist() == [1] * 8 + [0] * 4
    assert ids[0] == tok.bos_id and ids[7] == tok.eos_id and ids[8:].eq(tok.pad_id).all()
    assert tok.decode(ids) == "could you grab the crimson ball"
    assert tok.pad_id == 0 and len({tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.image_id}) == 5

    ids, _ = tok.encode("pick up the zorblax", add_special_tokens=False)
    assert ids.tolist()[-1] == tok.unk_id and tok.decode(ids) == "pick up the"

    batch, batch_mask = tok.batch_encode(["pick up the red square", "grab it"])
    assert batch.shape == (2, 7) and batch_mask.sum(1).tolist() == [7, 4]
    truncated, _ = tok.encode("pick up the red square", max_len=4)
    assert truncated.tolist() == [tok.bos_id, tok.token_to_id("pick"), tok.token_to_id("up"), tok.eos_id]
    assert WordTokenizer().vocabulary == tok.vocabulary, "vocabulary must be deterministic"


def test_prompt_layout_masks() -> None:
    tok = WordTokenizer()
    prompt = build_prompt(tok, ["pick up the red square", "go to the ball"], num_image_tokens=3, max_len=12)
    assert prompt.input_ids.shape == (2, 12)
    assert prompt.input_ids[:, :3].eq(tok.image_id).all() and prompt.input_ids[:, 3].eq(tok.bos_id).all()
    assert prompt.language_mask.dtype == torch.bool
    assert prompt.language_mask[0].tolist() == [False] * 4 + [True] * 5 + [False] * 3
    assert prompt.language_mask[1].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert prompt.attention_mask[1].tolist() == [1] * 9 + [0] * 3
    with pytest.raises(ValueError):
        build_prompt(tok, ["x"], num_image_tokens=3, max_len=4)


def test_every_generator_stays_inside_the_vocabulary() -> None:
    tok = WordTokenizer()
    rng = np.random.default_rng(0)
    texts = []
    for episode in make_episodes("novel_layout", 150, seed=0) + make_episodes("train", 50, seed=0):
        scene = episode.scene
        for i, obj in enumerate(scene.objects):
            texts += [
                training_instruction(rng, obj),
                paraphrase_instruction(rng, obj),
                diverse_instruction(rng, i, scene),
            ]
            texts.append(describe_object(obj, rng))
        texts.append(caption(scene, rng))
        texts += list(question_answer(scene, rng, ee_pos=episode.ee_start))
    unknown = {
        w
        for t in texts
        for w, i in zip(t.lower().replace(",", " ").replace(":", " ").split(), tok.tokenize(t), strict=False)
        if i == tok.unk_id
    }
    assert not unknown


def test_instructions_resolve_to_their_target() -> None:
    rng = np.random.default_rng(1)
    for episode in make_episodes("novel_layout", 200, seed=2):
        scene = episode.scene
        assert resolve_instruction(episode.instruction, scene) == scene.target
        assert resolve_instruction(paraphrase_instruction(rng, scene.target_object), scene) == scene.target
        assert resolve_instruction(diverse_instruction(rng, scene.target, scene), scene) == scene.target


def test_resolution_errors() -> None:
    scene = make_episodes("seen", 1, seed=0)[0].scene
    with pytest.raises(InstructionResolutionError, match="names no"):
        resolve_instruction("go over there", scene)
    with pytest.raises(InstructionResolutionError, match="several colours"):
        resolve_instruction("grab the red blue cube", scene)


def test_question_answers_are_consistent() -> None:
    rng = np.random.default_rng(3)
    for episode in make_episodes("novel_layout", 100, seed=3):
        question, answer = question_answer(episode.scene, rng)
        if question.startswith("how many objects"):
            assert answer == ["zero", "one", "two", "three", "four"][len(episode.scene.objects)]
        if question.startswith("is there"):
            assert answer in ("yes", "no")
        assert question and answer
