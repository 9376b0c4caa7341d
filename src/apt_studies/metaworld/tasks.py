"""Instructions for every Meta-World MT50 task, written for this benchmark: training wordings and held-out paraphrases.

Each task has two *training* wordings (what demonstrations carry, as narrow as real robot data) and four
*paraphrases* (used only by the ``paraphrase`` evaluation split). The two registers never share a sentence, and
:func:`wording_overlaps` lists any paraphrase equal to a training wording of any task, so a test keeps them apart.
Within a language-critical group (:mod:`apt_studies.metaworld.groups`) the wordings of different tasks differ in
their verb, since the scene is the same and only the words tell the tasks apart.

This module needs neither ``metaworld`` nor MuJoCo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apt_studies.metaworld.errors import MetaWorldConfigError
from apt_studies.tokenizer import normalise

__all__ = [
    "INSTRUCTIONS",
    "MT50_TASKS",
    "TaskWording",
    "paraphrase_instruction",
    "training_instruction",
    "wording_overlaps",
    "wording_words",
]


@dataclass(frozen=True)
class TaskWording:
    """A task's sentences: ``training`` (in demonstrations) and ``paraphrases`` (held out for evaluation)."""

    training: tuple[str, ...]
    paraphrases: tuple[str, ...]


def _w(training: tuple[str, ...], paraphrases: tuple[str, ...]) -> TaskWording:
    return TaskWording(training, paraphrases)


INSTRUCTIONS: dict[str, TaskWording] = {
    # --- language-critical groups -----------------------------------------------------------------------------
    "reach-v3": _w(
        ("reach the yellow ball with the gripper", "move the gripper to the yellow ball"),
        (
            "put your hand on the marker and leave the puck alone",
            "go touch the ball on the post",
            "bring the claw up to the floating target",
            "your fingers should end at the yellow sphere",
        ),
    ),
    "push-v3": _w(
        ("push the puck to the foot of the post", "slide the puck under the yellow ball"),
        (
            "shove the disc along the table until it sits below the marker",
            "nudge the puck over to the pole",
            "move the puck across the surface to the base of the stand",
            "drag the red disc to where the post stands",
        ),
    ),
    "pick-place-v3": _w(
        ("pick up the puck and place it at the yellow ball", "lift the puck to the yellow ball"),
        (
            "grab the disc and hold it up at the marker",
            "raise the puck into the air at the sphere",
            "take the red disc off the table and bring it to the floating target",
            "carry the puck up to the top of the post",
        ),
    ),
    "faucet-open-v3": _w(
        ("open the faucet", "turn the faucet on"),
        (
            "rotate the tap handle so the water would run",
            "swing the tap lever to the open side",
            "let the water flow by twisting the spigot",
            "move the tap's arm to its open position",
        ),
    ),
    "faucet-close-v3": _w(
        ("close the faucet", "turn the faucet off"),
        (
            "rotate the tap handle so the water would stop",
            "swing the tap lever to the shut side",
            "stop the water by twisting the spigot",
            "move the tap's arm to its closed position",
        ),
    ),
    "stick-push-v3": _w(
        ("use the stick to push the thermos", "push the thermos with the stick"),
        (
            "grab the rod and shove the flask away with it",
            "take the blue bar and nudge the bottle along",
            "with the rod in hand move the flask forward",
            "drive the bottle away using the bar",
        ),
    ),
    "stick-pull-v3": _w(
        ("use the stick to pull the thermos", "pull the thermos with the stick"),
        (
            "hook the flask's handle with the rod and draw it over",
            "take the blue bar and tug the bottle along",
            "with the rod in hand bring the flask back",
            "drag the bottle towards you using the bar",
        ),
    ),
    # --- pretraining corpus (the rest of MT50) ------------------------------------------------------------------
    "assembly-v3": _w(
        ("put the ring onto the peg", "place the nut over the peg"),
        (
            "slip the loop down onto the pin",
            "fit the round nut around the post",
            "lower the ring so the peg goes through it",
            "thread the ring onto the upright pin",
        ),
    ),
    "basketball-v3": _w(
        ("put the ball in the hoop", "dunk the ball into the basket"),
        (
            "score by dropping the sphere through the ring",
            "take the ball and sink it in the net",
            "lift the sphere and let it fall into the rim",
            "place the ball inside the basketball hoop",
        ),
    ),
    "bin-picking-v3": _w(
        ("move the cube from one bin to the other", "put the block in the other bin"),
        (
            "carry the small box over into the second tray",
            "transfer the block between the two containers",
            "lift the cube out of its tray and drop it in the next one",
            "relocate the block to the empty bin",
        ),
    ),
    "box-close-v3": _w(
        ("put the lid on the box", "close the box with its lid"),
        (
            "cover the container with its top",
            "grab the cap and set it onto the case",
            "shut the case by placing the cover on it",
            "lower the lid over the open box",
        ),
    ),
    "button-press-topdown-v3": _w(
        ("press the button from above", "push the button down"),
        (
            "hit the switch with a downward poke",
            "jab the top of the button",
            "depress the key vertically",
            "tap the button by coming down on it",
        ),
    ),
    "button-press-topdown-wall-v3": _w(
        ("press the button from above behind the wall", "push the button down past the wall"),
        (
            "reach over the barrier and poke the switch downward",
            "go around the partition and depress the key",
            "hit the switch from the top despite the wall",
            "tap the button vertically beyond the barrier",
        ),
    ),
    "button-press-v3": _w(
        ("press the button", "push the button in"),
        (
            "poke the switch forward",
            "jab the button horizontally",
            "depress the key on the front of the box",
            "hit the switch straight ahead",
        ),
    ),
    "button-press-wall-v3": _w(
        ("press the button behind the wall", "push the button in past the wall"),
        (
            "reach around the barrier and poke the switch",
            "go past the partition and depress the key",
            "hit the switch although a wall is in the way",
            "jab the button beyond the barrier",
        ),
    ),
    "coffee-button-v3": _w(
        ("press the coffee machine button", "push the button on the coffee machine"),
        (
            "start the espresso maker by poking its switch",
            "hit the key on the brewer",
            "tap the switch of the espresso machine",
            "make coffee by pressing the machine's key",
        ),
    ),
    "coffee-pull-v3": _w(
        ("pull the mug away from the coffee machine", "take the cup out from the coffee machine"),
        (
            "draw the mug back from under the brewer",
            "slide the cup out of the espresso maker",
            "retrieve the mug from the machine",
            "bring the cup towards you away from the brewer",
        ),
    ),
    "coffee-push-v3": _w(
        ("push the mug under the coffee machine", "slide the cup to the coffee machine"),
        (
            "shove the mug beneath the brewer's spout",
            "nudge the cup into the espresso maker",
            "move the mug into place below the machine",
            "set the cup under the spout by sliding it",
        ),
    ),
    "dial-turn-v3": _w(
        ("turn the dial", "rotate the dial"),
        (
            "twist the knob around",
            "spin the round knob",
            "give the control wheel a turn",
            "crank the knob a quarter of the way",
        ),
    ),
    "disassemble-v3": _w(
        ("take the ring off the peg", "remove the nut from the peg"),
        (
            "lift the loop up and off the pin",
            "pull the round nut free of the post",
            "unthread the ring from the upright pin",
            "raise the ring until the peg comes out of it",
        ),
    ),
    "door-close-v3": _w(
        ("close the door", "shut the door"),
        (
            "swing the hinged panel closed",
            "push the door until it latches",
            "bring the door back to its frame",
            "make the open door close",
        ),
    ),
    "door-lock-v3": _w(
        ("lock the door", "turn the door lock"),
        (
            "twist the latch into the locked position",
            "secure the door with its knob",
            "rotate the lock so the door cannot open",
            "set the door's latch to locked",
        ),
    ),
    "door-open-v3": _w(
        ("open the door", "pull the door open"),
        (
            "swing the hinged panel wide",
            "draw the door away from its frame",
            "grab the handle and open the panel",
            "make the closed door open",
        ),
    ),
    "door-unlock-v3": _w(
        ("unlock the door", "turn the door lock back"),
        (
            "twist the latch into the unlocked position",
            "release the door's knob",
            "rotate the lock so the door can open",
            "set the door's latch to open",
        ),
    ),
    "hand-insert-v3": _w(
        ("put the block in the hole", "move the block into the hole"),
        (
            "slide the cube into the opening in the table",
            "drop the small box into the gap",
            "guide the block down into the slot",
            "get the cube inside the cavity",
        ),
    ),
    "drawer-close-v3": _w(
        ("close the drawer", "push the drawer shut"),
        (
            "slide the tray back into the cabinet",
            "shove the drawer in",
            "return the pulled out drawer to the chest",
            "make the open drawer close",
        ),
    ),
    "drawer-open-v3": _w(
        ("open the drawer", "pull the drawer out"),
        (
            "slide the tray out of the cabinet",
            "draw the drawer towards you",
            "tug the drawer's handle to open it",
            "make the closed drawer open",
        ),
    ),
    "hammer-v3": _w(
        ("hammer the nail in", "drive the nail with the hammer"),
        (
            "pick up the mallet and strike the peg",
            "knock the nail into the wall with the tool",
            "use the mallet to pound the pin",
            "grab the hammer and bang the nail home",
        ),
    ),
    "handle-press-side-v3": _w(
        ("press the handle down from the side", "push the side handle down"),
        (
            "lower the lever coming from the side",
            "bear down on the lateral lever",
            "force the side lever to the bottom",
            "move the lever on the side downward",
        ),
    ),
    "handle-press-v3": _w(
        ("press the handle down", "push the handle down"),
        ("lower the lever", "bear down on the lever", "force the lever to the bottom", "move the lever downward"),
    ),
    "handle-pull-side-v3": _w(
        ("pull the handle up from the side", "lift the side handle"),
        (
            "raise the lever coming from the side",
            "draw the lateral lever upward",
            "bring the side lever to the top",
            "move the lever on the side upward",
        ),
    ),
    "handle-pull-v3": _w(
        ("pull the handle up", "lift the handle"),
        ("heave the lever up", "draw the lever upward", "bring the lever to the top", "move the lever upward"),
    ),
    "lever-pull-v3": _w(
        ("pull the lever up", "raise the lever"),
        (
            "swing the arm of the switch upward",
            "flip the long handle up",
            "rotate the bar until it points up",
            "tilt the lever towards the ceiling",
        ),
    ),
    "peg-insert-side-v3": _w(
        ("insert the peg into the hole from the side", "push the peg sideways into the hole"),
        (
            "slide the pin into the opening in the box",
            "fit the rod into the slot horizontally",
            "guide the pin into the side of the block",
            "plug the stick into the socket",
        ),
    ),
    "pick-place-wall-v3": _w(
        ("pick up the puck and place it behind the wall", "lift the puck over the wall to the goal"),
        (
            "carry the disc over the barrier and set it down",
            "raise the puck past the partition",
            "take the disc across the wall",
            "bring the puck to the far side of the barrier",
        ),
    ),
    "pick-out-of-hole-v3": _w(
        ("pick the puck out of the hole", "lift the puck out of the hole"),
        (
            "take the disc up from the pit",
            "retrieve the puck from the cavity",
            "raise the disc out of the opening",
            "get the puck up and out of the gap",
        ),
    ),
    "push-back-v3": _w(
        ("push the puck backwards", "slide the puck back to the goal"),
        (
            "draw the disc towards the robot",
            "move the puck closer to the arm's base",
            "bring the disc back along the table",
            "pull the puck in the other direction",
        ),
    ),
    "plate-slide-v3": _w(
        ("slide the plate into the goal", "push the plate into the net"),
        (
            "shove the dish forward into the frame",
            "nudge the disc into the target area",
            "move the dish ahead into the goal box",
            "glide the plate into the cage",
        ),
    ),
    "plate-slide-side-v3": _w(
        ("slide the plate sideways into the goal", "push the plate into the net from the side"),
        (
            "shove the dish laterally into the frame",
            "nudge the disc to the side goal",
            "move the dish across into the cage",
            "glide the plate sideways to the target area",
        ),
    ),
    "plate-slide-back-v3": _w(
        ("slide the plate back out of the goal", "pull the plate back from the net"),
        (
            "draw the dish out of the frame towards you",
            "retrieve the disc from the target area",
            "move the dish back out of the cage",
            "glide the plate away from the goal box",
        ),
    ),
    "plate-slide-back-side-v3": _w(
        ("slide the plate sideways out of the goal", "pull the plate out of the net to the side"),
        (
            "draw the dish laterally out of the frame",
            "retrieve the disc sideways from the cage",
            "move the dish across and out of the goal box",
            "glide the plate to the side away from the target",
        ),
    ),
    "peg-unplug-side-v3": _w(
        ("pull the peg out of the hole", "unplug the peg sideways"),
        (
            "draw the pin out of the socket",
            "extract the rod from the slot",
            "free the pin from the side of the block",
            "take the stick out of its opening",
        ),
    ),
    "soccer-v3": _w(
        ("kick the ball into the goal", "push the ball into the net"),
        (
            "score by rolling the sphere into the frame",
            "shove the football into the cage",
            "nudge the ball between the posts",
            "get the sphere into the goal box",
        ),
    ),
    "push-wall-v3": _w(
        ("push the puck around the wall to the goal", "slide the puck past the wall"),
        (
            "shove the disc around the barrier",
            "move the puck beside the partition to the target",
            "nudge the disc along and around the wall",
            "drive the puck past the obstacle",
        ),
    ),
    "reach-wall-v3": _w(
        ("reach the goal behind the wall", "move the gripper over the wall to the goal"),
        (
            "put your hand at the target beyond the barrier",
            "go past the partition to the marker",
            "bring the claw across the wall",
            "touch the spot on the far side of the obstacle",
        ),
    ),
    "shelf-place-v3": _w(
        ("put the block on the shelf", "place the block on the shelf"),
        (
            "set the cube onto the rack",
            "lift the small box up to the ledge",
            "store the block on the upper board",
            "move the cube up onto the shelving",
        ),
    ),
    "sweep-into-v3": _w(
        ("sweep the block into the hole", "push the block into the hole"),
        (
            "brush the cube into the opening",
            "shove the small box into the gap",
            "nudge the block across into the cavity",
            "slide the cube until it drops into the slot",
        ),
    ),
    "sweep-v3": _w(
        ("sweep the block off the table", "push the block off the edge"),
        (
            "brush the cube over the side",
            "shove the small box past the rim",
            "nudge the block until it falls off",
            "slide the cube away off the surface",
        ),
    ),
    "window-open-v3": _w(
        ("open the window", "slide the window open"),
        (
            "push the pane aside to let air in",
            "move the glass panel to open it",
            "shift the sash until the window is open",
            "make the closed window open",
        ),
    ),
    "window-close-v3": _w(
        ("close the window", "slide the window shut"),
        (
            "push the pane back across the frame",
            "move the glass panel to close it",
            "shift the sash until the window is closed",
            "make the open window close",
        ),
    ),
}
"""Task name -> wordings. Keys are exactly Meta-World's 50 MT50 v3 task names."""

MT50_TASKS: tuple[str, ...] = tuple(sorted(INSTRUCTIONS))
"""The 50 task names, sorted."""


def _wording(task: str) -> TaskWording:
    try:
        return INSTRUCTIONS[task]
    except KeyError:
        raise MetaWorldConfigError(f"no instructions for task {task!r}; expected one of {MT50_TASKS}.") from None


def training_instruction(task: str, rng: np.random.Generator) -> str:
    """One of ``task``'s training wordings, drawn from ``rng``."""
    options = _wording(task).training
    return options[int(rng.integers(len(options)))]


def paraphrase_instruction(task: str, rng: np.random.Generator) -> str:
    """One of ``task``'s held-out paraphrases, drawn from ``rng`` (evaluation only)."""
    options = _wording(task).paraphrases
    return options[int(rng.integers(len(options)))]


def wording_overlaps() -> list[tuple[str, str]]:
    """``(task, paraphrase)`` pairs whose paraphrase equals (after :func:`normalise`) any task's training wording."""
    training = {tuple(normalise(s)) for w in INSTRUCTIONS.values() for s in w.training}
    return [(t, p) for t, w in INSTRUCTIONS.items() for p in w.paraphrases if tuple(normalise(p)) in training]


def wording_words(register: str = "all") -> frozenset[str]:
    """Every word of the ``"training"`` or ``"paraphrase"`` register, or of both (``"all"``): for vocabularies."""
    if register not in ("training", "paraphrase", "all"):
        raise MetaWorldConfigError(f"`register`={register!r}: use 'training', 'paraphrase' or 'all'.")
    parts = []
    for w in INSTRUCTIONS.values():
        if register in ("training", "all"):
            parts.extend(w.training)
        if register in ("paraphrase", "all"):
            parts.extend(w.paraphrases)
    return frozenset(word for sentence in parts for word in normalise(sentence))
