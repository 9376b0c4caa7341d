"""Numpy rasteriser for tabletop scenes (no PIL / OpenCV dependency).

Each object is rasterised only inside its bounding box on a supersampled canvas, then the canvas is
box-filtered down to the requested size. Supersampling keeps the shapes distinguishable at the default
32x32 resolution, where an object is only 5-7 pixels wide.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from apt_studies.scene import COLOURS, Scene

BACKGROUND_RGB: tuple[int, int, int] = (72, 64, 56)
GRIPPER_RGB: tuple[int, int, int] = (245, 245, 245)
GRIPPER_ARM = 0.045
"""Half-length of the gripper cross arms (unit-square coordinates)."""
GRIPPER_THICKNESS = 0.02
"""Half-thickness of the gripper cross arms."""

_EXTENT = 1.15
"""Rasterisation window around an object, in radii (covers every shape's extent)."""

ShapeTest = Callable[[np.ndarray, np.ndarray], np.ndarray]

_SHAPE_TESTS: dict[str, ShapeTest] = {
    # u, v are offsets from the centre divided by the object's radius; v grows downwards.
    # Extents are tuned so that small shapes stay distinguishable at 32x32: the diamond's tips reach a bit
    # beyond the contact radius and the circle stays a bit inside it.
    "circle": lambda u, v: u * u + v * v <= 0.85,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.82,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.12,
    "triangle": lambda u, v: (v <= 0.75) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.75),
}


def _pixel_range(lo: float, hi: float, n: int) -> slice:
    """Canvas indices whose pixel centres may fall in ``[lo, hi]`` (unit coordinates)."""
    return slice(max(int(np.floor(lo * n)), 0), min(int(np.ceil(hi * n)) + 1, n))


def render(scene: Scene, ee_pos: np.ndarray | tuple[float, float], size: int = 32, supersample: int = 2) -> np.ndarray:
    """Rasterise a scene and the gripper.

    Args:
        scene: Objects to draw (the target is *not* marked: only language says which object to reach).
        ee_pos: Gripper position ``(x, y)`` in ``[0, 1]^2``; drawn as a light cross on top of everything.
        size: Output height and width in pixels.
        supersample: Samples per pixel along each axis (anti-aliasing); 1 disables it.

    Returns:
        ``(size, size, 3)`` uint8 RGB image.
    """
    if size < 4 or supersample < 1:
        raise ValueError(f"size must be >= 4 and supersample >= 1, got {size}, {supersample}")
    n = size * supersample
    centres_1d = (np.arange(n, dtype=np.float32) + 0.5) / n
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = BACKGROUND_RGB
    for obj in scene.objects:
        r = obj.radius
        half = r * _EXTENT
        rows, cols = _pixel_range(obj.y - half, obj.y + half, n), _pixel_range(obj.x - half, obj.x + half, n)
        u = (centres_1d[cols][None, :] - obj.x) / r
        v = (centres_1d[rows][:, None] - obj.y) / r
        mask = _SHAPE_TESTS[obj.shape](u, v)
        canvas[rows, cols][mask] = COLOURS[obj.colour]
    ex, ey = float(ee_pos[0]), float(ee_pos[1])
    rows = _pixel_range(ey - GRIPPER_ARM, ey + GRIPPER_ARM, n)
    cols = _pixel_range(ex - GRIPPER_ARM, ex + GRIPPER_ARM, n)
    du = np.abs(centres_1d[cols][None, :] - ex)
    dv = np.abs(centres_1d[rows][:, None] - ey)
    cross = ((du <= GRIPPER_ARM) & (dv <= GRIPPER_THICKNESS)) | ((du <= GRIPPER_THICKNESS) & (dv <= GRIPPER_ARM))
    canvas[rows, cols][cross] = GRIPPER_RGB
    if supersample > 1:
        canvas = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.rint(canvas).astype(np.uint8)
