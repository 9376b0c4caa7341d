"""The pretraining corpus is disjoint from the task and its evaluation, balanced (or habit-biased as asked),
worded like training, and a pure function of its arguments."""

from __future__ import annotations

import pytest

from apt_studies import HELD_OUT_PAIRS, TRAIN_LAYOUTS, make_episodes, matches_training_wording
from apt_studies.evaluation import EVAL_SEED, VALIDATION_SEED
from apt_studies.pretrain_corpus import (
    FRESH_SPLITS,
    corpus_layouts,
    evaluation_object_sets,
    make_corpus,
    object_set,
)
from apt_studies.splits import EVAL_SPLITS


@pytest.fixture(scope="module")
def balanced():
    return make_corpus(n_layouts=64, episodes_per_layout=12, seed=0)


def test_corpus_layouts_are_disjoint_from_task_and_evaluation(balanced) -> None:
    layouts = balanced.layouts
    assert len(layouts) == 64
    sets = [object_set(layout.objects) for layout in layouts]
    assert len(set(sets)) == 64, "corpus layouts repeat"
    assert not set(sets) & {object_set(layout.objects) for layout in TRAIN_LAYOUTS}
    assert not any(o[:2] in HELD_OUT_PAIRS for layout in layouts for o in layout.objects)
    # every evaluation split's scenes (reported seed 0 and validation seed 0, drawn here, not from the guard)
    assert set(FRESH_SPLITS) | {"seen", "paraphrase", "counterfactual"} == set(EVAL_SPLITS)
    for offset in (EVAL_SEED, VALIDATION_SEED):
        for split in EVAL_SPLITS:
            scenes = {object_set([o.attributes for o in e.scene.objects]) for e in make_episodes(split, 200, offset)}
            assert not scenes & set(sets), split
    # the guard covers a scene drawn for a later study seed too
    assert object_set([o.attributes for o in make_episodes("novel_layout", 1, EVAL_SEED + 9)[0].scene.objects]) in (
        evaluation_object_sets()
    )
    # episodes hold exactly their layout's objects, and no task layout index
    for layout_index, episode in zip(balanced.layout_of, balanced.episodes, strict=True):
        assert [o.attributes for o in episode.scene.objects] == list(layouts[layout_index].objects)
        assert episode.layout == -1 and episode.canonical_target == -1 and episode.split == "pretrain"


def test_balanced_targets(balanced) -> None:
    for layout, counts in zip(balanced.layouts, balanced.target_counts(), strict=True):
        assert counts == {i: 12 // len(layout.objects) for i in range(len(layout.objects))}
    uneven = make_corpus(n_layouts=8, episodes_per_layout=10, seed=1)
    for counts in uneven.target_counts():
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 10


@pytest.mark.parametrize("habit", [0.9, 0.5])
def test_habit_fraction(habit: float) -> None:
    corpus = make_corpus(n_layouts=16, episodes_per_layout=10, seed=0, habit=habit)
    for layout, counts in zip(corpus.layouts, corpus.target_counts(), strict=True):
        assert counts[layout.canonical] == round(habit * 10)
    pairs = zip(corpus.layout_of, corpus.episodes, strict=True)
    assert all(e.canonical_target == corpus.layouts[i].canonical for i, e in pairs)
    # same layouts as the balanced corpus: only the targets differ
    assert corpus.layouts == make_corpus(n_layouts=16, episodes_per_layout=10, seed=0).layouts


def test_instructions_use_training_templates_only(balanced) -> None:
    assert all(matches_training_wording(e.instruction) for e in balanced.episodes)
    for e in balanced.episodes:
        obj = e.scene.target_object
        assert f"{obj.colour} {obj.shape}" in e.instruction, e.instruction


def test_corpus_is_deterministic() -> None:
    a, b = make_corpus(n_layouts=64, seed=3), make_corpus(n_layouts=64, seed=3)
    assert a == b
    c = make_corpus(n_layouts=64, seed=4)
    assert c.layouts == a.layouts and c.episodes != a.episodes
    assert corpus_layouts(64, layout_seed=1) != a.layouts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"habit": 1.0}, "habit"),
        ({"habit": 0.0}, "habit"),
        ({"episodes_per_layout": 3}, "episodes_per_layout"),
        ({"n_layouts": 0}, "n_layouts"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_corpus(**kwargs)


def test_more_layouts_than_exist_is_refused_before_any_draw(monkeypatch):
    """``make_corpus(n_layouts=100000)`` used to draw forever: only 53,676 distinct corpus layouts exist."""
    from apt_lightning.errors import ConfigError
    from apt_studies import pretrain_corpus

    available = pretrain_corpus.distinct_corpus_layouts()
    assert 50_000 < available < 56_000

    def no_draw(*args, **kwargs):
        raise AssertionError("a layout was drawn")

    monkeypatch.setattr(pretrain_corpus, "random_scene", no_draw)
    with pytest.raises(ConfigError, match=rf"`n_layouts`=100,000 exceeds the {available:,} distinct corpus layouts"):
        make_corpus(n_layouts=100_000, episodes_per_layout=4)
    with pytest.raises(ConfigError, match=rf"`n_layouts`={available + 1:,} exceeds"):
        pretrain_corpus.corpus_layouts(available + 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(n_layouts=64, episodes_per_layout=10**9),
            r"64 x 1,000,000,000 = 64,000,000,000 episodes exceeds the 1,000,000",
        ),
        (
            dict(n_layouts=8, episodes_per_layout=8, habit=0.3),
            r"`habit`=0.3 x `episodes_per_layout`=8 = 2.4 episodes .* rounded to 2.*nearest: 0.25",
        ),
        (dict(n_layouts=8, episodes_per_layout=10, habit=True), r"`habit` must be None .* got True"),
        (dict(n_layouts=2.5, episodes_per_layout=8), r"`n_layouts` must be an integer >= 1, got 2.5"),
        (dict(n_layouts=0, episodes_per_layout=8), r"`n_layouts` must be an integer >= 1, got 0"),
    ],
    ids=["huge-episodes", "rounded-habit", "bool-habit", "float-layouts", "zero-layouts"],
)
def test_corpus_sizes_that_are_unbounded_or_would_round_are_refused_before_any_work(monkeypatch, kwargs, match):
    from apt_lightning.errors import AptError
    from apt_studies import pretrain_corpus

    monkeypatch.setattr(pretrain_corpus, "corpus_layouts", lambda *a, **k: pytest.fail("layouts were drawn"))
    with pytest.raises(AptError, match=match) as info:
        make_corpus(**kwargs)
    assert isinstance(info.value, ValueError)


def test_a_habit_that_gives_whole_episodes_is_kept_exactly():
    corpus = make_corpus(n_layouts=4, episodes_per_layout=8, seed=0, habit=0.375)
    counts = zip(corpus.target_counts(), corpus.layouts, strict=True)
    assert all(count[layout.canonical] == 3 for count, layout in counts)
