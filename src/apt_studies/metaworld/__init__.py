"""Meta-World as a language-critical benchmark (issue 25): shared-scene task groups, renderer, splits, experts.

Needs ``pip install "metaworld==3.1.1" packaging``; the task and instruction tables import without it. Importing
this package defaults ``MUJOCO_GL``/``PYOPENGL_PLATFORM`` to ``egl`` when no display is set (import it before
``metaworld`` or ``mujoco``, or set them yourself). See ``docs/metaworld.md``.
"""

from apt_studies.metaworld.sim import _headless_defaults

_headless_defaults()
