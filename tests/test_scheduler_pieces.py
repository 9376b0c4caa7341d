"""The Lightning adapter in small pieces: the scheduler drives the plan; the non-finite guard is a callback of its
own that the scheduler adds once; the Trainer's clock is read with a fallback for loops without a batch index."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from apt_lightning import APTStageScheduler, NonFiniteGuard
from helpers import loader, make_policy, trainer


@pytest.mark.parametrize(
    "check_finite, own_guard, expected", [(True, False, 1), (True, True, 1), (False, False, 0)], ids=str
)
def test_the_scheduler_adds_one_guard_unless_the_trainer_has_one(check_finite, own_guard, expected):
    callbacks = [APTStageScheduler(switch_at_step=1, check_finite=check_finite)]
    callbacks += [NonFiniteGuard()] if own_guard else []
    fit = trainer(2, callbacks)
    fit.fit(make_policy("groot"), loader())
    guards = [c for c in fit.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == expected
    fit.validate(fit.lightning_module, loader())  # setup again: still one
    assert len([c for c in fit.callbacks if isinstance(c, NonFiniteGuard)]) == expected


def test_the_trainer_clock_falls_back_to_batch_zero_without_a_fit_loop():
    policy = make_policy("groot")
    policy.__dict__["_trainer"] = SimpleNamespace(global_step=7, global_rank=1)  # no fit_loop attribute
    assert policy._trainer_clock() == (7, 1, 0)
    policy.__dict__["_trainer"] = None
    assert policy._trainer_clock() is None
