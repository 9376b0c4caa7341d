"""The Stage-1 feature cache is never silently off or silently wrong (issue 20, items 1, 2, 7 and 8): a guard that
matches no batch key, sample identities that collide, a spill directory that cannot hold the features and a model
that never asks the cache are each named before or at step 0, with the fix."""

from __future__ import annotations

import errno
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from apt_lightning import APTStageScheduler, FeatureCacheError, Stage1FeatureCache
from apt_lightning.data import ResumableDataLoader
from apt_lightning.errors import AptError, ConfigError
from apt_lightning.feature_cache import parse_bytes
from apt_lightning.schedule import StagePlan
from helpers import LanguageDecidesDataset, collate, make_batch, make_policy, trainer


class ImagesDataset(LanguageDecidesDataset):
    """The same samples with the image under ``images``, as some models name it."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["images"] = item.pop("pixel_values")
        return item


class Snapshot(Callback):
    """The weights as they were before step 0."""

    def on_train_start(self, trainer, pl_module):
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _unchanged(snapshot: Snapshot, policy) -> bool:
    after = policy.state_dict()
    return all(torch.equal(after[k], v) for k, v in snapshot.before.items())


def _cache_on(policy, cache: Stage1FeatureCache):
    """``cache`` serving ``policy`` in Stage-1 training without a Trainer."""
    policy.apt.prepare(StagePlan(first_stage=1))
    policy.apt._attach_feature_cache(cache)
    policy.train()
    return policy


def _loss(policy, batch):
    b = batch["state"].shape[0]
    return policy.flow_loss(batch, torch.zeros(b, policy.chunk_size, 2), torch.full((b,), 0.5))


def test_check_keys_that_match_no_batch_key_stop_the_fit_at_step_0_without_changing_a_weight():
    policy, snapshot = make_policy("groot"), Snapshot()
    data = ResumableDataLoader(ImagesDataset(8), batch_size=4, collate_fn=collate)
    fit = trainer(2, [APTStageScheduler(switch_at_step=100), Stage1FeatureCache(), snapshot])
    with pytest.raises(FeatureCacheError, match=r"check_keys=\['pixel_values'\]\): the batch has no tensor") as info:
        fit.fit(policy, data)
    assert "'images'" in str(info.value) and "check_keys=('images',)" in str(info.value)
    assert fit.global_step == 0 and _unchanged(snapshot, policy)


def test_a_typo_in_check_keys_is_refused_and_a_string_is_refused_at_construction():
    policy = _cache_on(make_policy("groot"), Stage1FeatureCache(check_keys=("image",)))
    batch = {**make_batch("left"), "sample_id": torch.tensor([0, 1])}
    with pytest.raises(FeatureCacheError, match=r"no tensor \['image'\] \(its tensors: \[.*'pixel_values'"):
        _loss(policy, batch)
    with pytest.raises(ConfigError, match=r"`check_keys`='pixel_values' is a string.*\('pixel_values',\)"):
        Stage1FeatureCache(check_keys="pixel_values")


def test_turning_the_guard_off_is_allowed_but_warned():
    with pytest.warns(UserWarning, match=r"check_keys=\(\)\) turns the augmentation guard off"):
        Stage1FeatureCache(check_keys=())


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([0.2, 0.7]), r"`sample_id` is a torch.float32 tensor: float or bool identities collide"),
        (torch.tensor([True, False]), r"`sample_id` is a torch.bool tensor"),
        (torch.tensor([[0], [1]]), r"`sample_id` has shape \(2, 1\).*`ids.view\(-1\)`"),
        (["a", "b"], r"`sample_id` holds \['str'\], not integer identities"),
        ([1.0, 2.0], r"`sample_id` holds \['float'\], not integer identities"),
        (torch.tensor([3, 3]), r"`sample_id` repeats \[3\]: two samples of one batch share an identity"),
    ],
    ids=["float", "bool", "B-by-1", "str", "float-list", "duplicate"],
)
def test_sample_ids_that_would_collide_or_crash_are_named(ids, match):
    policy = _cache_on(make_policy("groot"), Stage1FeatureCache())
    batch = {**make_batch(["left", "right"]), "sample_id": ids}
    with pytest.raises(FeatureCacheError, match=match) as info:
        _loss(policy, batch)
    assert isinstance(info.value, AptError) and len(policy.apt._feature_cache) == 0


def test_int_lists_and_numpy_ints_are_accepted_as_ids():
    np = pytest.importorskip("numpy")
    policy = _cache_on(make_policy("groot"), Stage1FeatureCache())
    _loss(policy, {**make_batch(["left", "right"]), "sample_id": [np.int64(4), 5]})
    assert len(policy.apt._feature_cache) == 2


def test_two_samples_sharing_an_id_across_batches_are_named_not_served_each_others_features():
    policy = _cache_on(make_policy("groot"), Stage1FeatureCache())
    _loss(policy, {**make_batch("left", seed=0), "sample_id": torch.tensor([0, 1])})
    other = {**make_batch("left", seed=1), "sample_id": torch.tensor([0, 1])}  # other images, same ids
    with pytest.raises(FeatureCacheError, match=r"or two different samples sharing the `sample_id` 0"):
        _loss(policy, other)


@pytest.mark.parametrize("size", ["-5MiB", "nanGiB", "infGiB", -1, True, 3.5, "lots"])
def test_bad_max_memory_is_a_config_error(size):
    with pytest.raises(ConfigError, match=r"`max_memory`"):
        Stage1FeatureCache(max_memory=size)
    assert parse_bytes("0.5KiB") == 512


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_a_spill_dir_that_cannot_be_written_is_refused_at_fit_start(tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a directory")
    spill = blocker if where == "file" else blocker / "cache"
    policy, snapshot = make_policy("groot"), Snapshot()
    fit = trainer(2, [APTStageScheduler(switch_at_step=100), Stage1FeatureCache(spill_dir=spill), snapshot])
    with pytest.raises(FeatureCacheError, match=r"cannot write to .*taken.*Give `spill_dir` a writable directory"):
        fit.fit(policy, ResumableDataLoader(LanguageDecidesDataset(8), batch_size=4, collate_fn=collate))
    assert not hasattr(snapshot, "before")  # refused before training started


def test_a_spill_disk_without_room_is_refused_at_the_first_fill_before_any_update(tmp_path, monkeypatch):
    monkeypatch.setattr("apt_lightning.feature_cache._free_bytes", lambda path: 1000)
    policy, snapshot = make_policy("groot"), Snapshot()
    cache = Stage1FeatureCache(max_memory=0, spill_dir=tmp_path / "spill")
    fit = trainer(2, [APTStageScheduler(switch_at_step=100), cache, snapshot])
    with pytest.raises(FeatureCacheError, match=r"needs .* of spill space for 8 samples .* has 1000 B free"):
        fit.fit(policy, ResumableDataLoader(LanguageDecidesDataset(8), batch_size=4, collate_fn=collate))
    assert fit.global_step == 0 and _unchanged(snapshot, policy)


def test_a_disk_that_fills_up_mid_stage_1_is_named_and_leaves_no_spill_file(tmp_path, monkeypatch):
    cache = Stage1FeatureCache(max_memory=0, spill_dir=tmp_path)
    cache._spill_dir = tmp_path / "rank0"
    policy = _cache_on(make_policy("groot"), cache)
    _loss(policy, {**make_batch("left"), "sample_id": torch.tensor([0, 1])})
    assert sorted(p.name for p in cache._spill_dir.iterdir()) == ["0.safetensors", "1.safetensors"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("apt_lightning.feature_cache.save_file", full)
    with pytest.raises(FeatureCacheError, match=r"could not write sample 2 .* \(OSError: .*No space left.*removed"):
        _loss(policy, {**make_batch("left"), "sample_id": torch.tensor([2, 3])})
    assert not cache._spill_dir.exists() and len(cache) == 0


def test_a_spill_file_removed_under_the_cache_is_named(tmp_path):
    cache = Stage1FeatureCache(max_memory=0, spill_dir=tmp_path)
    policy = _cache_on(make_policy("groot"), cache)
    cache._spill_dir = tmp_path / "rank0"
    batch = {**make_batch("left"), "sample_id": torch.tensor([0, 1])}
    _loss(policy, batch)
    (cache._spill_dir / "1.safetensors").unlink()
    with pytest.raises(FeatureCacheError, match=r"could not read sample 1's spill file"):
        _loss(policy, batch)


def test_the_no_op_cache_is_warned_about_after_the_first_stage_1_batch_not_at_an_epoch_end():
    """With the switch inside the first epoch no Stage-1 epoch ever ends: the warning comes after batch 0."""
    policy, cache = make_policy("groot"), Stage1FeatureCache()
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=2))
    cache.on_train_batch_start(None, policy, {}, 0)
    with pytest.warns(UserWarning, match=r"served no sample in the first Stage-1 training batch.*apt\.cached_vlm"):
        cache.on_train_batch_end(None, policy, None, {}, 0)
    cache.on_train_batch_start(None, policy, {}, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.on_train_batch_end(None, policy, None, {}, 1)  # once, not every batch
