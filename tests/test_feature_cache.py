"""Stage-1 feature cache: exact, instruction-free, refused where it cannot be right, bounded, per process."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from apt_lightning import APTStageScheduler, FeatureCacheError, Stage1FeatureCache, StagePlan
from apt_lightning.data import ResumableDataLoader
from apt_lightning.feature_cache import parse_bytes
from helpers import LanguageDecidesDataset, LossRecorder, collate, make_batch, make_policy, run_script, trainer

SWITCH, TOTAL = 8, 12  # 4 batches per epoch: Stage 1 fills in epoch 0 and hits in epoch 1, then Stage 2


class ChangingInstructions(Dataset):
    """Each visit gives a sample another instruction (of another length); ``jitter`` adds a random image draw."""

    def __init__(self, size: int = 16, jitter: float = 0.0) -> None:
        self.base = LanguageDecidesDataset(size)
        self.visits = 0
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.visits += 1
        word = ("left", "right")[(i + self.visits) % 2]
        item = {k: v[0] for k, v in make_batch(word, batch_size=1, seed=i).items()}
        if self.jitter:
            item["pixel_values"] = item["pixel_values"] + self.jitter * torch.randn_like(item["pixel_values"])
        return {**item, "sample_id": torch.tensor(i)}


def run(arch: str, cache: Stage1FeatureCache | None, dataset: Dataset, steps: int = TOTAL, **plan) -> dict[int, float]:
    recorder = LossRecorder()
    callbacks = [APTStageScheduler(**(plan or {"switch_at_step": SWITCH})), recorder]
    if cache is not None:
        callbacks.append(cache)
    loader = ResumableDataLoader(dataset, batch_size=4, shuffle=True, collate_fn=collate)
    trainer(steps, callbacks).fit(make_policy(arch), loader)
    return recorder.losses


class HitCounter(Stage1FeatureCache):
    """Records how many samples were served from the cache before the switch emptied it."""

    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        self.size_before_switch = max(getattr(self, "size_before_switch", 0), len(self))
        super().on_train_batch_start(trainer, pl_module, batch, idx)


def test_cached_stage1_loss_trajectory_equals_uncached_across_the_switch(arch):
    reference = run(arch, None, ChangingInstructions())
    cache = HitCounter()
    cached = run(arch, cache, ChangingInstructions())
    assert sorted(cached) == sorted(reference) == list(range(TOTAL))
    diffs = [abs(cached[s] - reference[s]) for s in range(TOTAL)]
    assert max(diffs) <= 1e-6, diffs
    assert cache.misses == 16 and cache.hits == 16  # epoch 0 filled every sample, epoch 1 was served from memory
    assert cache.size_before_switch == 16 and len(cache) == 0  # emptied at the switch, never used in Stage 2


def test_cache_is_bypassed_outside_stage1_training(arch):
    policy = make_policy(arch)
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=4))
    cache = Stage1FeatureCache()
    policy.apt._attach_feature_cache(cache)
    batch = {**make_batch("left", batch_size=2), "sample_id": torch.tensor([0, 1])}
    policy.eval()
    policy.flow_loss(batch, torch.randn(2, policy.chunk_size, policy.noise_dim), torch.rand(2))
    assert len(cache) == 0  # validation / sampling never fill or read it
    policy.train()
    policy.flow_loss(batch, torch.randn(2, policy.chunk_size, policy.noise_dim), torch.rand(2))
    assert len(cache) == 2
    policy.apt._set_step(4)  # Stage 2: computed, not served
    policy.flow_loss(batch, torch.randn(2, policy.chunk_size, policy.noise_dim), torch.rand(2))
    assert cache.hits == 0
    with pytest.raises(FeatureCacheError, match="stage 2"):
        cache.get_or_compute(batch, lambda: None, stage=2, device=torch.device("cpu"))


@pytest.mark.parametrize("plan", [{"stage": 2}, {"stage": "joint"}], ids=["stage2_only", "joint"])
def test_plan_without_stage1_is_refused_at_fit_start(plan):
    with pytest.raises(FeatureCacheError, match="no Stage 1"):
        run("groot", Stage1FeatureCache(), LanguageDecidesDataset(), steps=2, **plan)


def test_random_augmentation_is_refused_instead_of_cached():
    with pytest.raises(FeatureCacheError, match="random augmentation"):
        run("groot", Stage1FeatureCache(), ChangingInstructions(jitter=0.1), steps=SWITCH)


def test_batch_without_sample_identity_is_refused_with_the_fix():
    class NoIds(LanguageDecidesDataset):
        def __getitem__(self, i):
            return self.items[i]

    with pytest.raises(FeatureCacheError, match=r"sample_id.*__getitem__"):
        run("groot", Stage1FeatureCache(), NoIds(), steps=2)


def test_budget_overflow_without_spill_names_the_bytes_per_sample():
    with pytest.raises(FeatureCacheError, match=r"bytes per sample.*spill_dir"):
        run("groot", Stage1FeatureCache(max_memory=1024), LanguageDecidesDataset(), steps=2)


def test_spilled_samples_train_exactly_and_are_deleted_at_the_switch(tmp_path):
    reference = run("pi0", None, ChangingInstructions())

    class Spy(Stage1FeatureCache):
        def on_train_batch_start(self, trainer, pl_module, batch, idx):
            self.files = max(getattr(self, "files", 0), len(list((tmp_path / "rank0").glob("*.safetensors"))))
            super().on_train_batch_start(trainer, pl_module, batch, idx)

    probe = Stage1FeatureCache()
    policy = make_policy("pi0")
    policy.apt.prepare(StagePlan(first_stage=1))
    policy.apt._attach_feature_cache(probe)
    policy.train()
    batch = {**make_batch("left", batch_size=1), "sample_id": torch.tensor([0])}
    policy.flow_loss(batch, torch.randn(1, policy.chunk_size, policy.noise_dim), torch.rand(1))
    per_sample = probe.bytes_per_sample
    cache = Spy(max_memory=5 * per_sample, spill_dir=tmp_path)
    cached = run("pi0", cache, ChangingInstructions())
    assert max(abs(cached[s] - reference[s]) for s in range(TOTAL)) <= 1e-6
    assert 0 < cache.files < 16 and cache.hits == 16  # some in memory, the rest on disk, all served in epoch 1
    assert not list(tmp_path.rglob("*.safetensors"))


def test_changed_vlm_weights_empty_the_cache():
    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=1))
    cache = Stage1FeatureCache()
    cache._vlm_fingerprint = cache_fingerprint = __import__(
        "apt_lightning.feature_cache", fromlist=["weights_fingerprint"]
    ).weights_fingerprint(policy.apt.vlm_module)
    policy.apt._attach_feature_cache(cache)
    policy.train()
    batch = {**make_batch("left", batch_size=2), "sample_id": torch.tensor([0, 1])}
    policy.flow_loss(batch, torch.randn(2, policy.chunk_size, 2), torch.rand(2))
    cache.on_train_epoch_start(None, policy)
    assert len(cache) == 2 and cache._vlm_fingerprint == cache_fingerprint
    with torch.no_grad():
        next(policy.apt.vlm_module.parameters()).add_(1e-3)
    cache.on_train_epoch_start(None, policy)
    assert len(cache) == 0


def test_sizes_parse_and_bad_sizes_are_refused():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(7) == 7
    for bad in ("lots", -1, True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_ddp_two_processes_cached_equals_uncached(tmp_path):
    for variant in ("plain", "cache"):
        (tmp_path / variant).mkdir()
        run_script("ddp_script.py", "groot", str(tmp_path / variant), variant)
    for rank in (0, 1):
        plain, cached = (torch.load(tmp_path / variant / f"meta{rank}.pt") for variant in ("plain", "cache"))
        assert sorted(cached["losses"]) == sorted(plain["losses"]) == list(range(16))
        diffs = [abs(cached["losses"][s] - plain["losses"][s]) for s in range(16)]
        assert max(diffs) <= 1e-6, diffs
        assert cached["cache_hits"] > 0  # each rank served its own samples from its own cache
    ranks = [torch.load(tmp_path / "cache" / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # and the ranks stayed in sync


def test_a_model_that_never_asks_the_cache_is_warned_about():
    policy = make_policy("groot")
    policy.apt.cached_vlm = lambda batch, compute: compute()  # a model whose VLM pass bypasses the cache
    loader = ResumableDataLoader(LanguageDecidesDataset(), batch_size=4, shuffle=True, collate_fn=collate)
    with pytest.warns(UserWarning, match=r"served no sample.*apt\.cached_vlm"):
        trainer(4, [APTStageScheduler(stage=1), Stage1FeatureCache()]).fit(policy, loader)
