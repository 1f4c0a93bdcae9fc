"""alignlib's PPO pieces against golden values from TRL 0.11.4's classic PPOTrainer.

The golden file is written by scripts/ppo_golden/generate_trl011.py, which runs
TRL's own compute_rewards, compute_advantages, loss, masked_whiten and KL
controllers on fixed inputs (see its header to re-run). Classic TRL leaves
arbitrary values on padding and masks later; alignlib zeroes padding itself, so
values are compared on the response mask and checked to be 0 off it.

The values go through helpers.parity.Comparison (rtol 1e-9 / atol 1e-12; TRL 0.25.1's at
float32's 2e-5 / 1e-6), so scripts/parity_report.py can write what these tests compared
into docs/parity.md.
"""

import pytest
import torch
from helpers.parity import ADAPTIVE_KL, WHITEN, Comparison, classic_step_variant, trl025_run_variant
from helpers.ppo_golden import CLASSIC, CLASSIC_INPUTS, classic_step

from alignlib.losses import AdaptiveKLController, FixedKLController, whiten


def compare_on_mask(compare, what, ours, golden, mask):
    compare(what, ours[mask], torch.tensor(golden, dtype=torch.float64)[mask])
    assert bool((ours[~mask] == 0).all()), f"{what}: padding must be 0"


@pytest.mark.parametrize("step", CLASSIC["steps"], ids=lambda s: "{kl_penalty}-kl_coef{kl_coef}".format(**s["config"]))
def test_one_full_ppo_step_matches_trl_classic(step):
    ours = classic_step(step["config"])
    mask = ours.mask
    compare = Comparison(classic_step_variant(step))
    compare_on_mask(compare, "kl", ours.kl, step["kls"], mask)
    compare_on_mask(compare, "non_score_rewards", ours.non_score_rewards, step["non_score_rewards"], mask)
    compare_on_mask(compare, "rewards", ours.rewards, step["rewards"], mask)
    compare_on_mask(compare, "advantages", ours.advantages, step["advantages"], mask)
    compare_on_mask(compare, "returns", ours.returns, step["returns"], mask)
    for name, value in ours.stats.items():
        compare(name, value, step["stats"][name])
    # TRL backpropagates pg_loss + vf_coef * vf_loss (no entropy bonus: entropy_coef is 0 here)
    compare_on_mask(compare, "grad_new_logprobs", ours.grad_new_logprobs, step["grad_new_logprobs"], mask)
    compare_on_mask(compare, "grad_vpreds", ours.grad_vpreds, step["grad_vpreds"], mask)
    compare.check()


@pytest.mark.parametrize("shift_mean", [True, False], ids=lambda shift: f"shift_mean={shift}")
def test_whiten_matches_trl_masked_whiten(shift_mean):
    inputs = CLASSIC_INPUTS["padded"]
    mask = inputs["mask"].bool()
    key = f"shift_mean_{str(shift_mean).lower()}"
    compare = Comparison(WHITEN)
    ours = whiten(inputs["values"], mask, shift_mean=shift_mean)
    compare_on_mask(compare, key, ours, CLASSIC["masked_whiten"][key], mask)
    compare.check()


def test_kl_controllers_match_trl():
    spec = CLASSIC["kl_controllers"]["adaptive"]
    controller = AdaptiveKLController(spec["init_kl_coef"], spec["target"], spec["horizon"])
    compare = Comparison(ADAPTIVE_KL)
    for kl, expected in zip(spec["kl_sequence"], spec["values"], strict=True):
        controller.update(kl, spec["n_steps"])
        assert controller.value == pytest.approx(expected, rel=1e-12)
        compare("kl_coef", controller.value, expected)
    compare.check()
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
    compare = Comparison(trl025_run_variant(run))  # rtol 2e-5, atol 1e-6: TRL computed these in float32
    m = r.response_mask
    compare("kl", r.ours["kl"][m], r.theirs["kl"][m])
    compare("non_score_reward", r.ours["non_score_reward"][m], r.theirs["non_score_reward"][m])
    compare("scores", r.ours["scores"], r.theirs["scores"])
    e = r.episode_mask
    compare("advantages_unwhitened", r.ours["advantages_unwhitened"][e], r.theirs["advantages_unwhitened"][e])
    compare("returns", r.ours["returns"][e], r.theirs["returns"][e])
    compare("advantages", r.ours["advantages"][m], r.theirs["advantages"][m])
    compare.check()
