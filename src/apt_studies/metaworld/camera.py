"""Small, fast, upright frames of a Meta-World scene: an own ``mujoco.Renderer`` and a free camera.

``env.render()`` draws at the size the env was built with, with a 4096^2 shadow map and 4x multisampling (13-17
frames/s here), and Meta-World's ``corner*`` cameras show the table small and upside down at 64-96 px. The
:class:`FrameRenderer` instead renders through its own ``mujoco.Renderer`` with multisampling, shadows and
reflections off, from a free camera facing the robot across the table (the robot's base at the top of the image),
where the table's working area fills the frame.

Every *site* (Meta-World's coloured goal markers, end-effector dots) is hidden, because the goal markers differ in
colour from task to task and would tell the task apart in the pixels. A group that needs a visible goal draws its
own task-neutral marker (:class:`Marker`), identical for every task of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.metaworld.sim import require_mujoco

__all__ = ["DEFAULT_CAMERA", "DEFAULT_IMAGE_SIZE", "Camera", "FrameRenderer", "Marker"]

DEFAULT_IMAGE_SIZE = 96
"""Frame side in pixels: the puck is ~4 px wide at 96 px (~3 px at 64 px)."""


@dataclass(frozen=True)
class Camera:
    """A free MuJoCo camera (``mjvCamera``), so no model file needs a new camera.

    Attributes:
        lookat: World point ``(x, y, z)`` at the image centre.
        distance: Metres from ``lookat``.
        azimuth: Degrees; -90 looks along -y, i.e. from the far side of the table towards the robot.
        elevation: Degrees; negative looks down.
    """

    lookat: tuple[float, float, float] = (0.1, 0.68, 0.05)
    distance: float = 0.85
    azimuth: float = -90.0
    elevation: float = -50.0

    def __post_init__(self) -> None:
        if self.distance <= 0:
            raise MetaWorldConfigError(f"`distance` must be positive, got {self.distance}.")
        if not -90.0 <= self.elevation < 0.0:
            raise MetaWorldConfigError(
                f"`elevation`={self.elevation} does not look down at the table: use a value in [-90, 0)."
            )


DEFAULT_CAMERA = Camera()
"""Facing the robot from across the table; covers x in about [-0.25, 0.45] at the objects' row (mirror image:
the world's +x is on the image's left)."""


@dataclass(frozen=True)
class Marker:
    """A goal marker drawn by the renderer (not part of the physics): a ball on a thin post standing on the table.

    The ball shows a point in the air, the post's foot the point of the table below it, so one marker serves
    tasks that aim at either.

    Attributes:
        position: Ball centre ``(x, y, z)`` in world coordinates.
        table_z: Height of the post's foot.
        rgba: Colour of ball and post.
        radius: Ball radius (metres).
    """

    position: tuple[float, float, float]
    table_z: float = 0.0
    rgba: tuple[float, float, float, float] = (0.95, 0.85, 0.1, 1.0)
    radius: float = 0.02


class FrameRenderer:
    """Renders ``(size, size, 3)`` uint8 RGB frames of one MuJoCo model.

    Args:
        model: The env's ``mujoco.MjModel`` (``env.unwrapped.model``); its off-screen multisampling is set to 0.
        size: Frame side in pixels.
        camera: Where to look from.

    Raises:
        MetaWorldConfigError: ``size`` below 16 or above the model's off-screen buffer.
    """

    def __init__(self, model: Any, size: int = DEFAULT_IMAGE_SIZE, camera: Camera = DEFAULT_CAMERA) -> None:
        mujoco = require_mujoco()
        if size < 16:
            raise MetaWorldConfigError(f"`size`={size} is too small to show the objects: use 16 or more.")
        if size > min(model.vis.global_.offwidth, model.vis.global_.offheight):
            raise MetaWorldConfigError(
                f"`size`={size} exceeds the model's off-screen buffer "
                f"({model.vis.global_.offwidth}x{model.vis.global_.offheight}); use a smaller size."
            )
        model.vis.quality.offsamples = 0
        self.model = model
        self.size = size
        self.camera = camera
        self._renderer = mujoco.Renderer(model, size, size)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._option = mujoco.MjvOption()
        self._option.sitegroup[:] = 0  # goal markers are sites: hide them all
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self._camera.lookat[:] = camera.lookat
        self._camera.distance = camera.distance
        self._camera.azimuth = camera.azimuth
        self._camera.elevation = camera.elevation

    def render(self, data: Any, markers: Sequence[Marker] = ()) -> np.ndarray:
        """One frame of ``data`` (the env's ``mujoco.MjData``) with ``markers`` drawn on top of the scene."""
        mujoco = require_mujoco()
        self._renderer.update_scene(data, self._camera, self._option)
        scene = self._renderer.scene
        for marker in markers:
            self._add_marker(mujoco, scene, marker)
        return self._renderer.render().copy()

    @staticmethod
    def _add_marker(mujoco: Any, scene: Any, marker: Marker) -> None:
        if scene.ngeom + 2 > scene.maxgeom:
            raise MetaWorldConfigError("the scene has no room for another marker geom; draw fewer markers.")
        top = np.asarray(marker.position, dtype=np.float64)
        foot = np.array([top[0], top[1], marker.table_z])
        rgba = np.asarray(marker.rgba, dtype=np.float32)
        ball = scene.geoms[scene.ngeom]
        mujoco.mjv_initGeom(ball, mujoco.mjtGeom.mjGEOM_SPHERE, np.full(3, marker.radius), top, np.eye(3).ravel(), rgba)
        scene.ngeom += 1
        if top[2] - foot[2] > marker.radius:
            post = scene.geoms[scene.ngeom]
            mujoco.mjv_initGeom(post, mujoco.mjtGeom.mjGEOM_CAPSULE, np.zeros(3), np.zeros(3), np.eye(3).ravel(), rgba)
            mujoco.mjv_connector(post, mujoco.mjtGeom.mjGEOM_CAPSULE, marker.radius / 4, foot, top)
            scene.ngeom += 1

    def close(self) -> None:
        """Free the GL context now rather than at garbage collection."""
        self._renderer.close()
