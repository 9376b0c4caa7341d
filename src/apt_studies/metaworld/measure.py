"""The figures of ``docs/metaworld.md``: ``python -m apt_studies.metaworld.measure --episodes 5`` prints them as JSON.

Render time per frame, first-frame pixel differences per group before and after neutralisation, and the
scripted experts' success and demonstration time per episode (rendering included) on training and novel starts.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from apt_studies.metaworld.camera import FrameRenderer
from apt_studies.metaworld.demos import collect_demonstrations
from apt_studies.metaworld.groups import GROUPS
from apt_studies.metaworld.sim import make_env
from apt_studies.metaworld.splits import MetaWorldEpisode


def render_ms(size: int, frames: int = 100) -> float:
    """Milliseconds per frame of the push scene at ``size`` px."""
    group, env = GROUPS["puck"], make_env("push-v3")
    vec = group.sample(np.random.default_rng(0))
    group.reset(env, vec)
    renderer = FrameRenderer(env.model, size)
    renderer.render(env.data, group.markers(vec))
    start = time.perf_counter()
    for _ in range(frames):
        renderer.render(env.data, group.markers(vec))
    renderer.close()
    return 1000 * (time.perf_counter() - start) / frames


def _frame(task: str, size: int, mode: str, vec: np.ndarray, group: Any) -> np.ndarray:
    env = make_env(task)
    renderer = FrameRenderer(env.model, size)
    if mode == "metaworld":  # each task's own start distribution (seed 0), its coloured goal sites visible
        env._freeze_rand_vec, env.seeded_rand_vec = False, True
        env.seed(0)
        env.reset()
        renderer._option.sitegroup[:] = 1
        frame = renderer.render(env.data)
    else:
        group.reset(env, vec)
        frame = renderer.render(env.data, group.markers(vec))
    renderer.close()
    return frame


def pixel_differences(size: int = 96) -> dict[str, dict[str, list[int]]]:
    """Per group: pixels of each task's first frame that differ from the habitual task's, before and after."""
    out: dict[str, dict[str, list[int]]] = {}
    for name, group in GROUPS.items():
        vec = group.sample(np.random.default_rng(0))
        out[name] = {}
        for mode in ("metaworld", "neutral"):
            frames = [_frame(t, size, mode, vec, group) for t in group.tasks]
            out[name][mode] = [int(np.any(frames[0] != f, axis=-1).sum()) for f in frames[1:]]
    return out


def expert_success(episodes: int, size: int = 96) -> dict[str, dict[str, float]]:
    """Per task and start box: expert success rate, mean steps and seconds per demonstration episode."""
    rng = np.random.default_rng(1)
    out: dict[str, dict[str, float]] = {}
    for name, group in GROUPS.items():
        for novel in (False, True):
            for task in group.tasks:
                split = "novel_position" if novel else "seen"
                batch = [
                    MetaWorldEpisode(task, name, tuple(group.sample(rng, novel)), "", split) for _ in range(episodes)
                ]
                demos = collect_demonstrations(batch, image_size=size, progress=False)
                out[f"{task}/{split}"] = {
                    "success": len(demos.episodes) / episodes,
                    "mean_steps": len(demos) / max(len(demos.episodes), 1),
                    "seconds_per_episode": demos.seconds / episodes,
                }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=5, help="expert episodes per task and start box")
    args = parser.parse_args()
    report = {
        "render_ms_per_frame": {str(s): round(render_ms(s), 2) for s in (64, 96)},
        "first_frame_pixels_differing": pixel_differences(),
        "expert": expert_success(args.episodes),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
