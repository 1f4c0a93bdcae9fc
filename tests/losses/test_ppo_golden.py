"""alignlib's PPO pieces against golden values from TRL 0.11.4's classic PPOTrainer.

The golden file is written by scripts/ppo_golden/generate_trl011.py, which runs
TRL's own compute_rewards, compute_advantages, loss, masked_whiten and KL
controllers on fixed inputs (see its header to re-run). Classic TRL leaves
arbitrary values on padding and masks later; alignlib zeroes padding itself, so
values are compared on the response mask and checked to be 0 off it.
"""

import json
from pathlib import Path

import pytest
import torch

from alignlib.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    kl_shaped_rewards,
    ppo_loss,
    whiten,
)

GOLDEN = json.loads((Path(__file__).parent / "golden" / "ppo_trl_0_11_4.json").read_text())
INPUT_SETS = {
    name: {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}
    for name, tensors in GOLDEN["inputs"].items()
}
ESTIMATOR = {"kl": "k1", "abs": "abs", "mse": "mse"}  # TRL classic's names -> alignlib's


def entropy_from_logits(logits):
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def assert_on_mask(ours, golden, mask, rtol=1e-9, atol=1e-12):
    golden = torch.tensor(golden, dtype=torch.float64)
    torch.testing.assert_close(ours[mask], golden[mask], rtol=rtol, atol=atol)
    assert bool((ours[~mask] == 0).all()), "padding must be 0"


def alignlib_step(cfg):
    inputs = INPUT_SETS[cfg["inputs"]]
    mask = inputs["mask"].bool()
    shaped = kl_shaped_rewards(
        inputs["scores"], inputs["logprobs"], inputs["ref_logprobs"], mask,
        kl_coef=cfg["kl_coef"], estimator=ESTIMATOR[cfg.get("kl_penalty", "kl")],
    )
    rewards = shaped.rewards
    if cfg.get("whiten_rewards"):
        rewards = whiten(rewards, mask, shift_mean=False)
    gae = gae_advantages(rewards, inputs["values"], mask, gamma=cfg.get("gamma", 1.0), lam=cfg.get("lam", 0.95))
    advantages = whiten(gae.advantages, mask)
    old_values = torch.where(mask, inputs["values"], 0.0)
    new_logprobs = inputs["new_logprobs"].clone().requires_grad_(True)
    vpreds = (old_values + inputs["vpreds_offset"]).requires_grad_(True)
    out = ppo_loss(
        new_logprobs, inputs["logprobs"], advantages, vpreds, old_values, gae.returns, mask,
        cliprange=cfg.get("cliprange", 0.2), cliprange_value=cfg.get("cliprange_value", 0.2),
        vf_coef=cfg.get("vf_coef", 0.1), entropy=entropy_from_logits(inputs["logits"]),
    )
    grads = torch.autograd.grad(out.loss, [new_logprobs, vpreds])
    return shaped, gae, advantages, out, grads


@pytest.mark.parametrize("step", GOLDEN["steps"], ids=lambda s: "{kl_penalty}-kl_coef{kl_coef}".format(**s["config"]))
def test_one_full_ppo_step_matches_trl_classic(step):
    cfg = step["config"]
    mask = INPUT_SETS[cfg["inputs"]]["mask"].bool()
    shaped, gae, advantages, out, (grad_logprobs, grad_vpreds) = alignlib_step(cfg)

    assert_on_mask(shaped.kl, step["kls"], mask)
    assert_on_mask(shaped.non_score_rewards, step["non_score_rewards"], mask)
    assert_on_mask(shaped.rewards, step["rewards"], mask)
    assert_on_mask(advantages, step["advantages"], mask)
    assert_on_mask(gae.returns, step["returns"], mask)

    stats = step["stats"]
    vf_coef = cfg.get("vf_coef", 0.1)
    checks = {
        "loss/policy": out.policy_loss,
        "loss/value": out.value_loss,
        "loss/total": out.policy_loss + vf_coef * out.value_loss,
        "policy/approxkl": out.approx_kl,
        "policy/policykl": out.policy_kl,
        "policy/clipfrac": out.policy_clipfrac,
        "val/clipfrac": out.value_clipfrac,
        "policy/entropy": out.entropy,
    }
    for name, ours in checks.items():
        torch.testing.assert_close(ours, torch.tensor(stats[name], dtype=torch.float64), rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(vf_coef * out.value_loss, torch.tensor(step["vf_loss_scaled"], dtype=torch.float64))
    # TRL backpropagates pg_loss + vf_coef * vf_loss (no entropy bonus: entropy_coef is 0 here)
    assert_on_mask(grad_logprobs, step["grad_new_logprobs"], mask)
    assert_on_mask(grad_vpreds, step["grad_vpreds"], mask)


def test_whiten_matches_trl_masked_whiten():
    inputs = INPUT_SETS["padded"]
    mask = inputs["mask"].bool()
    assert_on_mask(whiten(inputs["values"], mask, shift_mean=True), GOLDEN["masked_whiten"]["shift_mean_true"], mask)
    assert_on_mask(whiten(inputs["values"], mask, shift_mean=False), GOLDEN["masked_whiten"]["shift_mean_false"], mask)


def test_kl_controllers_match_trl():
    spec = GOLDEN["kl_controllers"]["adaptive"]
    controller = AdaptiveKLController(spec["init_kl_coef"], spec["target"], spec["horizon"])
    for kl, expected in zip(spec["kl_sequence"], spec["values"], strict=True):
        controller.update(kl, spec["n_steps"])
        assert controller.value == pytest.approx(expected, rel=1e-12)
    fixed = FixedKLController(GOLDEN["kl_controllers"]["fixed"]["kl_coef"])
    fixed.update(100.0, 256)
    assert fixed.value == GOLDEN["kl_controllers"]["fixed"]["value_after_update"]
