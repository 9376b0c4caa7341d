"""Demonstration collection: determinism, sample format, padding and speed."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from apt_studies import STATE_DIM, WordTokenizer, collate, collect_demonstrations, make_episodes


def test_demonstrations_are_deterministic() -> None:
    a, b, c = (collect_demonstrations("train", 20, seed=s, chunk_size=4) for s in (0, 0, 1))
    assert len(a) == len(b)
    for key in ("images", "states", "actions", "action_pad"):
        assert np.array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)))
    assert torch.equal(a.prompts.input_ids, b.prompts.input_ids)
    assert len(a) != len(c) or not torch.equal(a.actions, c.actions)


def test_sample_format_and_padding() -> None:
    chunk = 6
    data = collect_demonstrations("counterfactual", 10, seed=0, chunk_size=chunk, num_image_tokens=2)
    sample = data[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    assert sample["state"].shape == (STATE_DIM,) and sample["actions"].shape == (chunk, 2)
    assert sample["input_ids"][:2].eq(WordTokenizer().image_id).all()
    words = sample["input_ids"][sample["language_mask"]]
    assert WordTokenizer().decode(words) == sample["instruction"]
    assert sample["split"] == "counterfactual" and sample["target"] != sample["canonical_target"]
    for e in range(len(data.episodes)):
        rows = torch.nonzero(data.episode_index == e).flatten()
        length = len(rows)
        last = data[int(rows[-1])]
        assert last["action_pad_mask"].tolist() == [False] + [True] * (chunk - 1)
        assert torch.all(last["actions"][1:] == 0)
        first = data[int(rows[0])]
        assert first["action_pad_mask"].sum() == max(chunk - length, 0)
        # the label chunk is the trajectory's own future: sample t+1's first action is sample t's second one
        if length > 1:
            assert torch.equal(data[int(rows[0])]["actions"][1], data[int(rows[1])]["actions"][0])


def test_collate_and_dataloader() -> None:
    a = collect_demonstrations("seen", 3, seed=0, chunk_size=4)
    b = collect_demonstrations("paraphrase", 3, seed=0, chunk_size=4)
    batch = collate([a[0], b[0]])
    assert batch["input_ids"].shape[0] == 2 and batch["language_mask"].dtype == torch.bool
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["language_mask"].shape
    assert batch["instruction"] == [a[0]["instruction"], b[0]["instruction"]]
    loaded = next(iter(DataLoader(a, batch_size=5, collate_fn=collate)))
    assert loaded["image"].shape == (5, 3, 32, 32) and loaded["actions"].shape == (5, 4, 2)


def test_explicit_episodes_and_uint8_images() -> None:
    episodes = make_episodes("unseen_composition", 4, seed=0)
    data = collect_demonstrations(episodes, chunk_size=2, image_dtype=torch.uint8, image_size=16)
    assert data[0]["image"].dtype == torch.uint8 and data[0]["image"].shape == (3, 16, 16)
    assert data.episodes == episodes


def test_collection_is_fast() -> None:
    start = time.perf_counter()
    data = collect_demonstrations("train", 250, seed=0, chunk_size=8)
    elapsed = time.perf_counter() - start
    assert len(data) >= 1500
    assert elapsed / len(data) * 2000 < 10.0
