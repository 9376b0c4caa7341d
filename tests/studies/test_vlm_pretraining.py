"""One-off VLM pretraining on diverse tabletop language, and its on-disk cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModel, PaliGemmaConfig, PaliGemmaModel

from apt_lightning.models.groot import tiny_paligemma_config
from apt_studies import default_tokenizer
from apt_studies import vlm_pretraining as vp
from apt_studies.scene import COLOURS, SHAPES, SIZES, Scene, SceneObject
from apt_studies.vlm_pretraining.corpus import patch_labels
from apt_studies.vocabulary import COLOUR_SYNONYMS, SHAPE_SYNONYMS, SIZE_SYNONYMS

TINY = dict(steps=3, n_scenes=32, batch_size=8, warmup_steps=1)


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def vlm_config(tokenizer) -> PaliGemmaConfig:
    return tiny_paligemma_config(**tokenizer.vlm_vocabulary, hidden_size=32)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(steps=0), "`steps`"),
        (dict(batch_size=-1), "`batch_size`"),
        (dict(n_scenes=2.5), "`n_scenes`"),
        (dict(lr=0.0), "`lr`"),
        (dict(warmup_steps=-1), "`warmup_steps`"),
        (dict(blind_mask_prob=1.5), r"`blind_mask_prob`.*1\.5"),
        (dict(distill_weight=-0.1), "`distill_weight`"),
        (dict(seed_embeddings="yes"), "`seed_embeddings`"),
        (dict(seed=-3), "`seed`.*-3"),
        (dict(patch_weight=float("nan")), "`patch_weight`"),
    ],
)
def test_config_validation(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vp.VLMPretrainingConfig(**overrides)


def test_vocabulary_mismatch_is_rejected(tokenizer) -> None:
    clash = tiny_paligemma_config(vocab_size=tokenizer.vocab_size + 1, hidden_size=32)  # image id past <image>
    with pytest.raises(ValueError, match="<image> id 4"):
        vp.pretrain_vlm(clash, tokenizer, vp.VLMPretrainingConfig(**TINY), progress=False)


def test_patch_labels_mark_object_centres() -> None:
    objects = (
        SceneObject("red", "circle", "small", 0.1, 0.1),  # patch (row 0, col 0)
        SceneObject("blue", "square", "large", 0.9, 0.6),  # patch (row 2, col 3)
    )
    labels = patch_labels([Scene(objects, target=0)], grid=4)[0]
    nothing = [len(COLOURS), len(SHAPES), len(SIZES)]
    assert labels[0].tolist() == [list(COLOURS).index("red"), SHAPES.index("circle"), SIZES.index("small")]
    assert labels[11].tolist() == [list(COLOURS).index("blue"), SHAPES.index("square"), SIZES.index("large")]
    assert all(labels[p].tolist() == nothing for p in range(16) if p not in (0, 11))


def test_seeded_embeddings_bring_synonyms_together(tokenizer) -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(tokenizer.vocab_size + 1, 32)
    before = embedding.weight.detach().clone()
    vp.seed_word_embeddings(embedding, tokenizer)
    after = embedding.weight.detach()

    special = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.image_id]
    assert torch.equal(after[special], before[special]) and torch.equal(after[-1], before[-1])
    words = after[5:-1]
    assert words.std().item() == pytest.approx(before[5:-1].std().item(), rel=1e-4)

    def cos(a: str, b: str) -> float:
        ia, ib = tokenizer.token_to_id(a), tokenizer.token_to_id(b)
        assert tokenizer.unk_id not in (ia, ib)
        return float(torch.cosine_similarity(after[ia], after[ib], dim=0))

    synonyms = [(c, syn) for c, syns in COLOUR_SYNONYMS.items() for syn in syns]
    synonyms += [(s, syn) for s, syns in SHAPE_SYNONYMS.items() for syn in syns]
    synonyms += [(s, syn) for s, syns in SIZE_SYNONYMS.items() for syn in syns]
    # pair every synonym with a word of another attribute value
    unrelated = [(a, b2) for (a, _), (_, b2) in zip(synonyms, synonyms[5:] + synonyms[:5], strict=True)]
    unrelated = [(a, b) for a, b in unrelated if (a, b) not in synonyms]
    syn_mean = sum(cos(a, b) for a, b in synonyms) / len(synonyms)
    unrelated_mean = sum(cos(a, b) for a, b in unrelated) / len(unrelated)
    assert syn_mean > unrelated_mean + 0.2, (syn_mean, unrelated_mean)  # random rows: a gap of about 0.1


def test_pretrain_is_deterministic_and_leaves_global_rng(tokenizer, vlm_config) -> None:
    config = vp.VLMPretrainingConfig(**TINY)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, metrics = vp.pretrain_vlm(vlm_config, tokenizer, config, progress=False)
    assert torch.equal(torch.rand(3), expected_draw), "pretraining must not consume the caller's RNG"
    second, again = vp.pretrain_vlm(vlm_config, tokenizer, config, progress=False)
    _assert_same_weights(_state(first), _state(second))
    assert isinstance(first, PaliGemmaModel) and not first.training
    for register in vp.EVAL_REGISTERS:
        for name in ("colour_acc", "shape_acc", "size_acc", "position_error"):
            assert metrics[f"eval/{register}/{name}"] == again[f"eval/{register}/{name}"]
    assert {"train/loss", "train/distill", "train/patch", "train/colour", "wall_s"} <= metrics.keys()


def test_cache_reuses_and_keys_on_config(tmp_path: Path, tokenizer, vlm_config, monkeypatch) -> None:
    config = vp.VLMPretrainingConfig(**TINY)
    trained: list[nn.Module] = []
    real = vp.pretrain_vlm

    def spy(*args: Any, **kwargs: Any):
        model, metrics = real(*args, **kwargs)
        trained.append(model)
        return model, metrics

    monkeypatch.setattr(vp, "pretrain_vlm", spy)
    directory, metrics = vp.pretrained_vlm(vlm_config, tokenizer, config, cache_dir=tmp_path, progress=False)
    assert len(trained) == 1 and directory.parent == tmp_path and directory.name.startswith("vlm-")
    assert [p.name for p in tmp_path.iterdir()] == [directory.name], "no staging directory may be left behind"

    def refuse(*args: Any, **kwargs: Any):
        raise AssertionError("a cached VLM must not be retrained")

    monkeypatch.setattr(vp, "pretrain_vlm", refuse)
    again, cached_metrics = vp.pretrained_vlm(vlm_config, tokenizer, config, cache_dir=tmp_path, progress=False)
    assert again == directory and cached_metrics == pytest.approx(metrics)

    for loader in (PaliGemmaModel.from_pretrained, AutoModel.from_pretrained):
        loaded = loader(directory)
        assert isinstance(loaded, PaliGemmaModel)
        _assert_same_weights(_state(loaded), _state(trained[0]))

    monkeypatch.setattr(vp, "pretrain_vlm", spy)
    other, _ = vp.pretrained_vlm(
        vlm_config, tokenizer, vp.VLMPretrainingConfig(**TINY, seed=1), cache_dir=tmp_path, progress=False
    )
    assert other != directory and len(trained) == 2


def test_incomplete_cache_is_replaced(tmp_path: Path, tokenizer, vlm_config, monkeypatch) -> None:
    config = vp.VLMPretrainingConfig(**TINY, distill_weight=0.0, seed_embeddings=False, patch_weight=0.0)
    directory, _ = vp.pretrained_vlm(vlm_config, tokenizer, config, cache_dir=tmp_path, progress=False)
    (directory / "model.safetensors").unlink()  # e.g. a copy that was interrupted
    calls: list[int] = []
    real = vp.pretrain_vlm

    def counting(*args: Any, **kwargs: Any):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(vp, "pretrain_vlm", counting)
    again, _ = vp.pretrained_vlm(vlm_config, tokenizer, config, cache_dir=tmp_path, progress=False)
    assert calls == [1] and again == directory
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "pretraining.json"]
    PaliGemmaModel.from_pretrained(directory)


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APT_LIGHTNING_CACHE", str(tmp_path))
    assert vp.default_cache_dir() == tmp_path
    monkeypatch.delenv("APT_LIGHTNING_CACHE")
    assert vp.default_cache_dir() == Path.home() / ".cache" / "apt_lightning"


def test_cache_is_built_with_fixed_threads_and_keyed_on_versions(
    tmp_path: Path, tokenizer, vlm_config, monkeypatch
) -> None:
    config = vp.VLMPretrainingConfig(**TINY, distill_weight=0.0, seed_embeddings=False, patch_weight=0.0)
    seen: list[tuple[int, bool]] = []
    real = vp.pretrain_vlm

    def spy(*args: Any, **kwargs: Any):
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(vp, "pretrain_vlm", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's setting must not reach the weights
    try:
        directory, _ = vp.pretrained_vlm(vlm_config, tokenizer, config, cache_dir=tmp_path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [(vp.STUDY_THREADS, True)] and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(vp, "_versions", lambda: {"torch": "0.0", "transformers": "0.0"})
    other, _ = vp.pretrained_vlm(vlm_config, tokenizer, config, cache_dir=tmp_path, progress=False)
    assert other != directory and len(seen) == 2
