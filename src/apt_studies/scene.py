"""Scene description and procedural placement for the 2-D tabletop benchmark.

A *scene* is a handful of coloured shapes lying in the unit square plus the index of the object the episode
is about (the *target*). Keeping the target inside the scene lets the renderer, the expert and the physics
share one immutable value, and lets a counterfactual episode be expressed as "the same objects, another
target" (:meth:`Scene.with_target`).

Coordinates: ``x`` grows to the right and ``y`` grows *downwards* (image row order), both in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 20),
}
"""Canonical colour names and their fixed RGB values (none of them is grey, so the gripper stays distinct)."""

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS: dict[str, float] = {"small": 0.075, "large": 0.105}
"""Contact radius of each size class; also the half-extent used by the rasteriser."""

MIN_GAP = 0.09
"""Free space kept between any two object discs, wide enough for the gripper to pass between them."""
BORDER = 0.05
"""Free space kept between object discs and the table edge, so paths can go around objects near the edge."""
EE_CLEARANCE = 0.07
"""Minimum distance between the initial gripper position and any object disc."""

Attributes = tuple[str, str, str]
"""``(colour, shape, size)`` of an object."""
AttributeSpec = tuple[str | None, str | None, str | None]
"""``(colour, shape, size)`` with ``None`` where any value will do (drawn at random)."""


@dataclass(frozen=True)
class SceneObject:
    """One object on the table.

    Attributes:
        colour: Canonical colour name (a key of :data:`COLOURS`).
        shape: One of :data:`SHAPES`.
        size: One of :data:`SIZES`.
        x: Horizontal centre in ``[0, 1]``.
        y: Vertical centre in ``[0, 1]`` (grows downwards).
    """

    colour: str
    shape: str
    size: str
    x: float
    y: float

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.shape not in SHAPES or self.size not in SIZES:
            raise ValueError(f"unknown object attributes {(self.colour, self.shape, self.size)!r}")

    @property
    def radius(self) -> float:
        """Contact radius: touching the disc of this radius counts as reaching the object."""
        return SIZE_RADIUS[self.size]

    @property
    def attributes(self) -> Attributes:
        """``(colour, shape, size)``, the object's identity independent of where it lies."""
        return (self.colour, self.shape, self.size)

    @property
    def pair(self) -> tuple[str, str]:
        """``(colour, shape)``: the composition that splits hold out."""
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Objects on the table and the index of the object the episode asks for.

    Attributes:
        objects: The objects, drawn in this order.
        target: Index into ``objects`` of the instructed object.
    """

    objects: tuple[SceneObject, ...]
    target: int

    def __post_init__(self) -> None:
        if not 0 <= self.target < len(self.objects):
            raise ValueError(f"target {self.target} out of range for {len(self.objects)} objects")

    @property
    def target_object(self) -> SceneObject:
        """The instructed object."""
        return self.objects[self.target]

    def with_target(self, target: int) -> Scene:
        """The same objects with another target (used for counterfactual instructions)."""
        return replace(self, target=target)

    def centres(self) -> np.ndarray:
        """Object centres as a ``(n, 2)`` float64 array."""
        return np.array([(o.x, o.y) for o in self.objects], dtype=np.float64)

    def radii(self) -> np.ndarray:
        """Contact radii as a ``(n,)`` float64 array."""
        return np.array([o.radius for o in self.objects], dtype=np.float64)


@dataclass(frozen=True)
class Episode:
    """A task: a scene, an instruction that names its target, and where the gripper starts.

    Attributes:
        scene: Objects and target.
        instruction: Natural-language instruction naming ``scene.target``.
        ee_start: Initial gripper position ``(x, y)``.
        split: Name of the generator that produced the episode (``"train"``, ``"seen"``, ...).
        layout: Index of the training layout the scene was built from, or ``-1`` for a fresh layout.
        canonical_target: The object the layout habitually asks for, or ``-1`` when there is no habit.
            Used by shortcut baselines and to tell counterfactual episodes apart.
    """

    scene: Scene
    instruction: str
    ee_start: tuple[float, float]
    split: str = "custom"
    layout: int = -1
    canonical_target: int = -1


def _valid_positions(positions: np.ndarray, radii: np.ndarray) -> bool:
    """Whether discs lie inside the table (with :data:`BORDER`) and keep :data:`MIN_GAP` between them."""
    low = radii + BORDER
    if np.any(positions < low[:, None]) or np.any(positions > 1.0 - low[:, None]):
        return False
    dist = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    need = radii[:, None] + radii[None, :] + MIN_GAP
    np.fill_diagonal(dist, np.inf)
    return bool(np.all(dist >= need))


def place_objects(
    rng: np.random.Generator,
    attributes: Sequence[Attributes],
    target: int,
    anchors: Sequence[tuple[float, float]] | None = None,
    jitter: float = 0.0,
    max_tries: int = 2000,
) -> Scene:
    """Place objects at non-overlapping positions by rejection sampling.

    Args:
        rng: Source of randomness; the result is a pure function of its state.
        attributes: ``(colour, shape, size)`` per object.
        target: Index of the instructed object.
        anchors: Optional nominal positions (training layouts); positions are then ``anchor + U(-jitter,
            jitter)`` so a layout stays recognisable. Without anchors, positions are uniform on the table.
        jitter: Half-width of the uniform jitter around anchors.
        max_tries: Rejection-sampling budget before giving up.

    Returns:
        The placed scene.

    Raises:
        RuntimeError: If no valid placement was found (the attributes cannot fit on the table).
    """
    radii = np.array([SIZE_RADIUS[a[2]] for a in attributes], dtype=np.float64)
    n = len(attributes)
    for _ in range(max_tries):
        if anchors is not None:
            positions = np.asarray(anchors, dtype=np.float64) + rng.uniform(-jitter, jitter, size=(n, 2))
        else:
            low = radii[:, None] + BORDER
            positions = low + rng.random((n, 2)) * (1.0 - 2.0 * low)
        if _valid_positions(positions, radii):
            objects = tuple(
                SceneObject(c, s, z, float(p[0]), float(p[1]))
                for (c, s, z), p in zip(attributes, positions, strict=True)
            )
            return Scene(objects=objects, target=target)
    raise RuntimeError(f"could not place {list(attributes)} on the table in {max_tries} tries")


def sample_ee_start(rng: np.random.Generator, scene: Scene, max_tries: int = 2000) -> tuple[float, float]:
    """Draw a gripper start position at least :data:`EE_CLEARANCE` away from every object disc.

    Starting clear of all objects means no episode is decided before the policy acts.
    """
    centres, radii = scene.centres(), scene.radii()
    for _ in range(max_tries):
        p = 0.04 + rng.random(2) * 0.92
        if np.all(np.linalg.norm(centres - p, axis=1) >= radii + EE_CLEARANCE):
            return (float(p[0]), float(p[1]))
    raise RuntimeError("no free start position for the gripper")


def draw_attributes(rng: np.random.Generator, spec: AttributeSpec = (None, None, None)) -> Attributes:
    """Fill the ``None`` entries of ``spec`` uniformly at random, in colour, shape, size order."""
    options = (tuple(COLOURS), SHAPES, SIZES)
    return tuple(  # type: ignore[return-value]
        value if value is not None else choices[int(rng.integers(len(choices)))]
        for value, choices in zip(spec, options, strict=True)
    )


def random_scene(
    rng: np.random.Generator,
    n_objects: int,
    include: Sequence[AttributeSpec] = (),
    accept: Callable[[Attributes], bool] | None = None,
    max_tries: int = 10_000,
) -> Scene:
    """A fresh random scene, the one generator behind every non-layout scene of the benchmark.

    Objects have pairwise distinct ``(colour, shape)``, so a colour-and-shape reference is always unique. The
    ``include`` objects come first (their ``None`` attributes drawn by :func:`draw_attributes`); the rest are
    uniform random distractors that ``accept`` admits (e.g. "not named by the instruction"). The order is then
    shuffled and positions drawn uniformly (:func:`place_objects`).

    Args:
        rng: Source of randomness; the scene is a pure function of its state.
        n_objects: Objects in the scene.
        include: Objects the scene must hold; the first one is the target.
        accept: Filter for distractors (all accepted when None).
        max_tries: Draws allowed for distractors before giving up.

    Returns:
        The scene; its target is the first included object, or a random object when ``include`` is empty.

    Raises:
        ValueError: If ``include`` repeats a (colour, shape) pair or holds more than ``n_objects`` objects.
        RuntimeError: If ``accept`` admits too few distractors.
    """
    objects = [draw_attributes(rng, spec) for spec in include]
    if len({o[:2] for o in objects}) != len(objects) or len(objects) > n_objects:
        raise ValueError(f"`include` must hold at most {n_objects} objects with distinct (colour, shape): {objects}")
    for _ in range(max_tries):
        if len(objects) == n_objects:
            break
        candidate = draw_attributes(rng)
        if all(candidate[:2] != o[:2] for o in objects) and (accept is None or accept(candidate)):
            objects.append(candidate)
    if len(objects) < n_objects:
        raise RuntimeError(f"only {len(objects)} of {n_objects} objects admitted in {max_tries} draws")
    order = rng.permutation(len(objects))
    return place_objects(rng, [objects[i] for i in order], target=int(np.argmin(order)))
