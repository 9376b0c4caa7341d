"""The LeRobot export's cache side, without LeRobot: finding cached demonstrations by their settings, splitting them
into frames, and the errors (the dataset itself is written and read back in tests/integrations/lerobot)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from apt_lightning.integrations.lerobot import LeRobotUnavailableError
from apt_studies.disk_cache import cache_key
from apt_studies.metaworld.demos import (
    Demonstrations,
    chunk_actions,
    demonstration_settings,
    find_demonstrations,
    read_demonstrations,
    stack_parts,
    write_demonstrations,
)
from apt_studies.metaworld.errors import MetaWorldCacheError
from apt_studies.metaworld.lerobot_export import episode_frames, export_demonstrations
from apt_studies.metaworld.splits import make_episodes

SETTINGS = dict(split="train", n_episodes=2, seed=0, chunk_size=3, image_size=8)


def _demos() -> Demonstrations:
    rng = np.random.default_rng(1)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "states", "actions", "action_pad", "owner", "step")}
    for index, length in enumerate((4, 2)):
        chunks, pad = chunk_actions(rng.uniform(-1, 1, (length, 4)).astype(np.float32), 3)
        parts["images"].append(rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8))
        parts["states"].append(rng.random((length, 4), dtype=np.float32))
        parts["actions"].append(chunks)
        parts["action_pad"].append(pad)
        parts["owner"].append(np.full(length, index, np.int64))
        parts["step"].append(np.arange(length, dtype=np.int64))
    return Demonstrations(**stack_parts(parts, 8, 3), episodes=make_episodes("train", 2, 0), attempted=2, seconds=0.0)


def _cache(root, versions=("3.1.1", "3.3.0")):
    payload = {**demonstration_settings(**SETTINGS), "metaworld": versions[0], "mujoco": versions[1]}
    directory = root / "metaworld_demos" / cache_key(payload)
    directory.mkdir(parents=True)
    write_demonstrations(directory, _demos(), payload)
    return directory


def test_chunks_are_the_next_actions_padded_past_the_end():
    actions = np.arange(8, dtype=np.float32).reshape(4, 2)
    chunks, pad = chunk_actions(actions, 3)
    assert np.array_equal(chunks[1], actions[1:4]) and not pad[1].any()
    assert np.array_equal(chunks[3, 0], actions[3]) and pad[3].tolist() == [False, True, True]
    assert not chunks[3, 1:].any()


def test_cached_demonstrations_are_found_by_their_settings_and_split_into_frames(tmp_path):
    directory = _cache(tmp_path)
    assert find_demonstrations(demonstration_settings(**SETTINGS), tmp_path) == directory
    demos = read_demonstrations(directory)
    episodes = list(episode_frames(demos))
    assert [len(frames) for _, frames in episodes] == [4, 2]
    episode, frames = episodes[1]
    assert all(f["task"] == episode.instruction for f in frames)
    assert np.array_equal(frames[1]["action"], demos.actions[5, 0]) and frames[1]["observation.state"].shape == (4,)
    with pytest.raises(MetaWorldCacheError, match=r"no cached demonstrations .* cached there: \[\{'split': 'train'"):
        find_demonstrations(demonstration_settings(**{**SETTINGS, "seed": 3}), tmp_path)
    _cache(tmp_path, versions=("3.1.2", "3.3.0"))
    with pytest.raises(MetaWorldCacheError, match=r"several cached demonstrations match .*'3\.1\.2'"):
        find_demonstrations(demonstration_settings(**SETTINGS), tmp_path)
    with pytest.raises(MetaWorldCacheError, match="not a complete demonstration cache"):
        read_demonstrations(tmp_path / "nothing")


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is not None, reason="LeRobot is installed here")
def test_export_without_lerobot_says_where_to_run_it(tmp_path):
    with pytest.raises(LeRobotUnavailableError, match="LeRobot"):
        export_demonstrations(tmp_path / "out", cache_dir=tmp_path, **SETTINGS)
    assert not (tmp_path / "out").exists()
