"""alignlib's PPO pieces against golden values from TRL 0.11.4's classic PPOTrainer.

The golden file is written by scripts/ppo_golden/generate_trl011.py, which runs
TRL's own compute_rewards, compute_advantages, loss, masked_whiten and KL
controllers on fixed inputs (see its header to re-run). Classic TRL leaves
arbitrary values on padding and masks later; alignlib zeroes padding itself, so
values are compared on the response mask and checked to be 0 off it.
"""

import pytest
import torch
from helpers.ppo_golden import CLASSIC, CLASSIC_INPUTS, classic_step

from alignlib.losses import AdaptiveKLController, FixedKLController, whiten


def assert_on_mask(ours, golden, mask, rtol=1e-9, atol=1e-12):
    golden = torch.tensor(golden, dtype=torch.float64)
    torch.testing.assert_close(ours[mask], golden[mask], rtol=rtol, atol=atol)
    assert bool((ours[~mask] == 0).all()), "padding must be 0"


@pytest.mark.parametrize("step", CLASSIC["steps"], ids=lambda s: "{kl_penalty}-kl_coef{kl_coef}".format(**s["config"]))
def test_one_full_ppo_step_matches_trl_classic(step):
    ours = classic_step(step["config"])
    mask = ours.mask
    assert_on_mask(ours.kl, step["kls"], mask)
    assert_on_mask(ours.non_score_rewards, step["non_score_rewards"], mask)
    assert_on_mask(ours.rewards, step["rewards"], mask)
    assert_on_mask(ours.advantages, step["advantages"], mask)
    assert_on_mask(ours.returns, step["returns"], mask)
    for name, value in ours.stats.items():
        expected = torch.tensor(step["stats"][name], dtype=torch.float64)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12, msg=name)
    # TRL backpropagates pg_loss + vf_coef * vf_loss (no entropy bonus: entropy_coef is 0 here)
    assert_on_mask(ours.grad_new_logprobs, step["grad_new_logprobs"], mask)
    assert_on_mask(ours.grad_vpreds, step["grad_vpreds"], mask)


def test_whiten_matches_trl_masked_whiten():
    inputs = CLASSIC_INPUTS["padded"]
    mask = inputs["mask"].bool()
    assert_on_mask(whiten(inputs["values"], mask, shift_mean=True), CLASSIC["masked_whiten"]["shift_mean_true"], mask)
    assert_on_mask(whiten(inputs["values"], mask, shift_mean=False), CLASSIC["masked_whiten"]["shift_mean_false"], mask)


def test_kl_controllers_match_trl():
    spec = CLASSIC["kl_controllers"]["adaptive"]
    controller = AdaptiveKLController(spec["init_kl_coef"], spec["target"], spec["horizon"])
    for kl, expected in zip(spec["kl_sequence"], spec["values"], strict=True):
        controller.update(kl, spec["n_steps"])
        assert controller.value == pytest.approx(expected, rel=1e-12)
    fixed = FixedKLController(CLASSIC["kl_controllers"]["fixed"]["kl_coef"])
    fixed.update(100.0, 256)
    assert fixed.value == CLASSIC["kl_controllers"]["fixed"]["value_after_update"]


# --- TRL 0.25.1: k1/k3 estimators and missing_eos_penalty, inline in its train() loop -----------

from helpers.ppo_golden import LATER, later_run  # noqa: E402


@pytest.mark.parametrize("run", LATER["runs"], ids=lambda r: r["kl_estimator"])
def test_kl_estimators_and_missing_eos_penalty_match_trl_0_25(run):
    r = later_run(run)
    contains_eos = r.theirs["contain_eos_token"]
    assert bool(contains_eos.any()) and not bool(contains_eos.all()), "the golden batch must mix both cases"
    close = {"rtol": 2e-5, "atol": 1e-6}  # TRL computed these in float32
    m = r.response_mask
    torch.testing.assert_close(r.ours["kl"][m], r.theirs["kl"][m], **close)
    torch.testing.assert_close(r.ours["non_score_reward"][m], r.theirs["non_score_reward"][m], **close)
    torch.testing.assert_close(r.ours["scores"], r.theirs["scores"], **close)
    e = r.episode_mask
    torch.testing.assert_close(r.ours["advantages_unwhitened"][e], r.theirs["advantages_unwhitened"][e], **close)
    torch.testing.assert_close(r.ours["returns"][e], r.theirs["returns"][e], **close)
    torch.testing.assert_close(r.ours["advantages"][m], r.theirs["advantages"][m], **close)
