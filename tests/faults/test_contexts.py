"""A wrong fusion context is reported at the first forward of step 0, not at the switch (issue 20, items 6, 7 and
8): count, width, a stacked tensor, a ``context_dim`` entry, a non-float context, a float or non-0/1 mask and a
context on another device, each naming the site and the fix; ``guidance_scale`` is a finite real number."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from apt_lightning import APTConfig, APTStageScheduler, FusionContextError, StagePlan
from apt_lightning.contexts import check_contexts, per_site_contexts
from apt_lightning.errors import AptError, GuidanceScaleError
from apt_lightning.guidance import check_guidance_scale
from helpers import loader, make_batch, make_policy, trainer
from third_shape import ThirdShapePolicy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _third(**fusion) -> ThirdShapePolicy:
    torch.manual_seed(0)
    policy = ThirdShapePolicy(context_layers=(2, 4), apt_config=APTConfig(lr=3e-3))
    if fusion:
        policy.apt.fusion = dataclasses.replace(policy.apt.fusion, **fusion)
    return policy


def _contexts(policy, batch):
    contexts, _, language = policy.encode(batch)
    return contexts, language


WRONG = {
    "count": (lambda c: [*c, c[0]], r"3 feature tensors for 2 fusion sites"),
    "stacked": (lambda c: torch.stack(c), r"one stacked \(N, B, S, D\) tensor .*`x.unbind\(0\)`"),
    "width": (
        lambda c: [c[0], c[1][..., :16]],
        r"`expert\.layers\.1` reads context \(B, S, 32\) but got \(2, \d+, 16\)",
    ),
    "int64": (lambda c: [c[0], c[1].long()], r"`expert\.layers\.1` got torch.int64 features.*cast to float silently"),
    "bool": (lambda c: [c[0].bool(), c[1]], r"`expert\.layers\.0` got torch.bool features"),
    "batch": (lambda c: [c[0], c[1][:1]], r"`expert\.layers\.1` got a context of batch size 1"),
    "meta-device": (lambda c: [c[0], c[1].to("meta")], r"`expert\.layers\.1` lives on cpu but its context is on meta"),
}


class WrongContexts(ThirdShapePolicy):
    """Passes its fusion context through ``wrong`` in every forward, in both stages, as a buggy model would."""

    wrong = staticmethod(lambda contexts: contexts)

    def encode(self, batch):
        contexts, visible, language = super().encode(batch)
        return self.wrong(contexts), visible, language

    def flow_loss(self, batch, noise, time):  # the expert itself reads the unmodified contexts
        contexts, visible, language = ThirdShapePolicy.encode(self, batch)
        t = time[:, None, None]
        x_t = (1 - t) * noise + t * batch["actions"]
        with self.apt.fusion_context(self.wrong(contexts), language):
            velocity = self.expert(x_t, time, batch["state"], contexts, visible)
        return torch.nn.functional.mse_loss(velocity, batch["actions"] - noise)


class Snapshot(Callback):
    def on_train_start(self, trainer, pl_module):
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("case", ["count", "stacked"])
def test_a_wrong_context_in_a_one_fit_plan_fails_at_step_0_without_changing_a_weight(case):
    torch.manual_seed(0)
    policy = WrongContexts(context_layers=(2, 4), apt_config=APTConfig(lr=3e-3))
    policy.wrong, match = WRONG[case]
    snapshot = Snapshot()
    fit = trainer(5, [APTStageScheduler(switch_at_step=3), snapshot])
    with pytest.raises(FusionContextError, match=match):
        fit.fit(policy, loader(8, batch_size=2))
    assert fit.global_step == 0
    after = policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.before.items())


@pytest.mark.parametrize("case", [c for c in WRONG if c not in ("count", "stacked")])
def test_each_wrong_context_is_named_at_the_first_stage_1_forward(case):
    policy = _third()
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=3))
    contexts, language = _contexts(policy, make_batch("left"))
    wrong, match = WRONG[case]
    with pytest.raises(FusionContextError, match=match) as info, policy.apt.fusion_context(wrong(contexts), language):
        pass
    assert isinstance(info.value, AptError)


def test_a_context_dim_entry_the_model_does_not_match_is_named_at_step_0():
    policy = _third(context_dim=[32, 48])  # the model passes two 32-wide layers
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=3))
    contexts, language = _contexts(policy, make_batch("left"))
    with (
        pytest.raises(FusionContextError, match=r"`expert\.layers\.1` reads context \(B, S, 48\).*context_dim"),
        policy.apt.fusion_context(contexts, language),
    ):
        pass


def test_models_that_skip_their_features_in_stage_1_are_checked_at_the_switch_instead():
    policy = _third()
    policy.apt.prepare(StagePlan(first_stage=1, switch_step=3))
    with policy.apt.fusion_context(None, None):
        pass  # legal: the reference policies compute no language features in Stage 1
    check_contexts(None, torch.ones(2, 3, dtype=torch.bool), policy.apt.sites)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (lambda m: m.float(), r"the mask is torch.float32; pass a bool mask.*additive"),
        (lambda m: m.long() * 2, r"the integer mask holds values other than 0 and 1"),
        (lambda m: m.to("meta"), r"the mask is on meta but its features on cpu"),
        (lambda m: m[:, :-1], r"mask \(2, \d+\) bool on cpu does not match its features"),
    ],
    ids=["float", "int-not-01", "device", "shape"],
)
def test_masks_are_bool_or_0_1_on_the_features_device(mask, match):
    policy = _third()
    policy.apt.prepare(StagePlan(first_stage=2))
    contexts, language = _contexts(policy, make_batch("left"))
    with pytest.raises(FusionContextError, match=match):
        per_site_contexts(contexts, mask(language), policy.apt.sites)


def test_an_integer_0_1_mask_is_read_as_the_bool_mask():
    policy = _third()
    policy.apt.prepare(StagePlan(first_stage=2))
    contexts, language = _contexts(policy, make_batch(["left", "right"]))
    as_int = per_site_contexts(contexts, language.long(), policy.apt.sites)
    as_bool = per_site_contexts(contexts, language, policy.apt.sites)
    assert all(torch.equal(a[1], b[1]) and a[1].dtype == torch.bool for a, b in zip(as_int, as_bool, strict=True))


@pytest.mark.parametrize(
    ("scale", "match"),
    [
        (1e30, r"`guidance_scale`=1e\+30 is beyond \+-1000"),
        (float("nan"), r"must be finite, got nan"),
        (float("inf"), r"must be finite, got inf"),
        ("2", r"must be a real number .* got '2' \(str\).*float\(args.guidance_scale\)"),
        (True, r"got True \(bool\)"),
        (None, r"got None \(NoneType\)"),
    ],
    ids=["huge", "nan", "inf", "str", "bool", "none"],
)
def test_sample_actions_refuses_a_guidance_scale_that_cannot_give_actions(scale, match):
    policy = make_policy("groot")
    policy.apt.prepare(StagePlan(first_stage=2))
    with pytest.raises(GuidanceScaleError, match=match):
        policy.sample_actions(make_batch("left"), torch.zeros(2, policy.chunk_size, 2), guidance_scale=scale)


def test_a_large_guidance_scale_warns_and_ordinary_ones_pass_silently():
    with pytest.warns(UserWarning, match=r"`guidance_scale`=50 is large"):
        assert check_guidance_scale(50) == 50.0
    assert check_guidance_scale(torch.tensor(1.5)) == 1.5 and check_guidance_scale(2) == 2.0
