"""Meta-World demonstrations exported as a LeRobotDataset from a tiny demonstration cache written here, in the cache's
own format (generated arrays: this venv has no metaworld), and read back through LeRobot's reader."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "lerobot",
    reason="LeRobot 0.6.1 is not installed here (it needs Python >= 3.12 and torch < 2.12): these tests run in the "
    "second step of .ci/run, in their own venv",
)

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from apt_studies.disk_cache import cache_key
from apt_studies.metaworld.demos import (
    Demonstrations,
    chunk_actions,
    demonstration_settings,
    stack_parts,
    write_demonstrations,
)
from apt_studies.metaworld.errors import MetaWorldCacheError, MetaWorldConfigError
from apt_studies.metaworld.lerobot_export import FPS, episode_frames, export_demonstrations
from apt_studies.metaworld.splits import make_episodes

REPO_ID = "apt_lightning/metaworld"
SIZE, CHUNK, LENGTHS = 16, 4, (5, 7, 3)
SETTINGS = dict(split="train", n_episodes=3, seed=0, chunk_size=CHUNK, image_size=SIZE)


def _demos(lengths=LENGTHS) -> Demonstrations:
    """Random demonstrations of ``make_episodes("train", 3, 0)``, stacked as collect_demonstrations stacks them."""
    rng = np.random.default_rng(0)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "states", "actions", "action_pad", "owner", "step")}
    for index, length in enumerate(lengths):
        chunks, pad = chunk_actions(rng.uniform(-1, 1, (length, 4)).astype(np.float32), CHUNK)
        parts["images"].append(rng.integers(0, 256, (length, SIZE, SIZE, 3), dtype=np.uint8))
        parts["states"].append(rng.random((length, 4), dtype=np.float32))
        parts["actions"].append(chunks)
        parts["action_pad"].append(pad)
        parts["owner"].append(np.full(length, index, np.int64))
        parts["step"].append(np.arange(length, dtype=np.int64))
    episodes = make_episodes("train", len(lengths), seed=0)
    return Demonstrations(**stack_parts(parts, SIZE, CHUNK), episodes=episodes, attempted=len(lengths), seconds=0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A demonstration cache holding one entry, as ``cached_demonstrations`` would have left it."""
    root = tmp_path_factory.mktemp("cache")
    payload = {**demonstration_settings(**SETTINGS), "metaworld": "3.1.1", "mujoco": "3.3.0"}
    directory = root / "metaworld_demos" / cache_key(payload)
    directory.mkdir(parents=True)
    demos = _demos()
    write_demonstrations(directory, demos, payload)
    return root, demos


@pytest.fixture(scope="module")
def exported(cache, tmp_path_factory):
    root, demos = cache
    out = tmp_path_factory.mktemp("lerobot") / "metaworld"
    export_demonstrations(out, cache_dir=root, repo_id=REPO_ID, **SETTINGS)
    return out, demos


def test_exported_dataset_holds_the_cached_frames_and_instructions(exported):
    out, demos = exported
    dataset = LeRobotDataset(REPO_ID, root=out)
    assert (dataset.num_episodes, dataset.num_frames, dataset.fps) == (3, sum(LENGTHS), FPS)
    features = dataset.meta.features
    assert features["observation.images.top"]["shape"] == (SIZE, SIZE, 3)
    assert features["observation.state"]["shape"] == (4,) and features["action"]["shape"] == (4,)
    seen = 0
    for frame in dataset:
        seen += 1
        episode = int(frame["episode_index"])
        step = int(frame["frame_index"])
        row = int(np.flatnonzero((demos.episode_index == episode) & (demos.step == step))[0])
        assert frame["task"] == demos.episodes[episode].instruction
        image = (frame["observation.images.top"].permute(1, 2, 0) * 255).round().numpy().astype(np.uint8)
        assert np.array_equal(image, demos.images[row])  # PNG is lossless: the cached pixels, read as x / 255
        assert np.array_equal(frame["observation.state"].numpy(), demos.states[row])
        assert np.array_equal(frame["action"].numpy(), demos.actions[row, 0])
    assert seen == sum(LENGTHS)
    assert len({demos.episodes[e].instruction for e in range(3)}) >= 2  # the tasks really differ per episode


def test_lerobot_rebuilds_the_studys_action_chunks(exported):
    out, demos = exported
    deltas = {"action": [k / FPS for k in range(CHUNK)]}
    dataset = LeRobotDataset(REPO_ID, root=out, delta_timestamps=deltas)
    for i in range(len(dataset)):
        item = dataset[i]
        row = int(
            np.flatnonzero((demos.episode_index == item["episode_index"]) & (demos.step == item["frame_index"]))[0]
        )
        pad = item["action_is_pad"].numpy()
        assert np.array_equal(pad, demos.action_pad[row])
        assert np.array_equal(item["action"].numpy()[~pad], demos.actions[row][~pad])
    assert demos.action_pad.any()  # the padded tail was exercised


def test_missing_or_strided_demonstrations_are_refused(cache, tmp_path):
    root, _ = cache
    with pytest.raises(MetaWorldCacheError, match=r"no cached demonstrations .* cached there: \[\{'split': 'train'"):
        export_demonstrations(tmp_path / "out", cache_dir=root, **{**SETTINGS, "seed": 1})
    assert not (tmp_path / "out").exists()
    strided = _demos()
    strided.step = strided.step * 2  # a corpus kept every 2nd step has no action per frame
    with pytest.raises(MetaWorldConfigError, match="only demonstrations kept at every step"):
        next(episode_frames(strided))
