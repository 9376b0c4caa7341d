"""Pretrained-policy cache keys are pinned: a refactoring that changes one silently retrains every cached model.

The names below were computed on the code before the tabletop and Meta-World studies shared their pretraining
pieces; the ``vlm-*`` directories and the Meta-World ones are the caches the published results were trained from.
Nothing is built: the lookup is stopped at the first completeness check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import apt_studies.disk_cache as disk_cache
from apt_studies.metaworld.study import MetaWorldStudyConfig
from apt_studies.pretrain_study import pretrained_policy
from apt_studies.study import PRETRAIN_METHODS, StudyConfig

_PROBE = ({}, torch.zeros(1))


class _Looked(Exception):
    pass


@pytest.fixture
def looked_up(monkeypatch):
    """Calls a pretraining function and returns the name of the directory it looked up (builds nothing)."""

    def stop(directory, files):
        raise _Looked(Path(directory).name)

    monkeypatch.setattr(disk_cache, "is_complete", stop)

    def call(function, *args):
        with pytest.raises(_Looked) as looked:
            function(*args)
        return looked.value.args[0]

    return call


TABLETOP = [
    ("pi0", "apt", "vlm-cf3da9ef7866", "pretrained-pi0-1b18a49307f9"),
    ("pi0", "apt_ft_vlm", "vlm-cf3da9ef7866", "pretrained-pi0-1b18a49307f9"),
    ("pi0", "baseline", "vlm-cf3da9ef7866", "pretrained-pi0-89126e6eb143"),
    ("groot", "apt", "vlm-cf3da9ef7866", "pretrained-groot-478c375d1ce9"),
    ("groot", "baseline", "vlm-cf3da9ef7866", "pretrained-groot-44d637ad2822"),
    ("pi0", "apt_s1_quarter", None, "pretrained-pi0-ad71f57609b8"),
    ("groot", "apt_habit", None, "pretrained-groot-2043863ef4ac"),
    ("pi0", "baseline_habit", None, "pretrained-pi0-e69394f16fd1"),
    ("groot", "apt_s1_0", None, "pretrained-groot-98c4016d94dc"),
]


@pytest.mark.parametrize(("arch", "method", "vlm", "expected"), TABLETOP)
def test_tabletop_pretraining_keys_are_unchanged(looked_up, arch, method, vlm, expected):
    config = StudyConfig(regime="pretrain", methods=PRETRAIN_METHODS)
    assert looked_up(pretrained_policy, config, arch, method, 0, {}, vlm, _PROBE, "/nonexistent") == expected


METAWORLD = [  # the 12 caches of the published Meta-World study (seeds 0-2; apt and apt_ft_vlm share one)
    ("pi0", "baseline", ("121d39ddc672", "8ffcefeea5f0", "cd2641c2dfe4")),
    ("pi0", "apt", ("9516b859aa08", "60b47cd1153a", "500e6806b61b")),
    ("pi0", "apt_ft_vlm", ("9516b859aa08", "60b47cd1153a", "500e6806b61b")),
    ("groot", "baseline", ("629f49ab9f4d", "6796538308ab", "370aef21d8c7")),
    ("groot", "apt", ("793e56e1ea5f", "348ca7edc67c", "dfdf03c680a9")),
    ("groot", "apt_ft_vlm", ("793e56e1ea5f", "348ca7edc67c", "dfdf03c680a9")),
]


@pytest.mark.parametrize(("arch", "method", "keys"), METAWORLD)
def test_metaworld_pretraining_keys_are_unchanged(looked_up, arch, method, keys):
    config = MetaWorldStudyConfig(archs=("pi0", "groot"))
    vlm = Path("vlm-metaworld-5714a3d72122")
    found = [
        looked_up(pretrained_policy, config, arch, method, seed, {}, vlm, _PROBE, "/nonexistent") for seed in (0, 1, 2)
    ]
    assert found == [f"pretrained-metaworld-{arch}-{key}" for key in keys]


@pytest.mark.parametrize(("seed", "key"), [(0, "e75dfb8e462d"), (1, "0980edaa03ef"), (2, "aa7e05d22299")])
def test_metaworld_demonstration_keys_are_unchanged(looked_up, seed, key):
    """The study's fine-tuning demonstrations (100 ``train`` episodes, chunk 8, 96 px), as cached by the published
    study; the key holds the simulator's versions, so it is pinned for the ones it was built with."""
    from importlib import metadata

    from apt_studies.metaworld.demos import cached_demonstrations

    try:
        versions = (metadata.version("metaworld"), metadata.version("mujoco"))
    except metadata.PackageNotFoundError:
        pytest.skip("metaworld or mujoco is not installed")
    if versions != ("3.1.1", "3.3.0"):
        pytest.skip(f"the pinned keys are of metaworld 3.1.1 and mujoco 3.3.0, not {versions}")
    assert looked_up(cached_demonstrations, "train", 100, seed, 8) == key
