"""alignlib's PPO pieces run on the inputs stored in the TRL golden files.

The golden files (tests/losses/golden/) hold inputs and TRL's outputs; they are
written by scripts/ppo_golden/. Here the same inputs go through alignlib, so the
tests and docs/parity.md can compare the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from alignlib.losses import gae_advantages, kl_shaped_rewards, ppo_loss, whiten

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "losses" / "golden"
CLASSIC = json.loads((GOLDEN_DIR / "ppo_trl_0_11_4.json").read_text())
CLASSIC_INPUTS = {
    name: {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}
    for name, tensors in CLASSIC["inputs"].items()
}
ESTIMATOR = {"kl": "k1", "abs": "abs", "mse": "mse"}  # classic TRL's names -> alignlib's


class ClassicStep(NamedTuple):
    mask: torch.Tensor
    kl: torch.Tensor
    non_score_rewards: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor  # whitened, as TRL's compute_advantages returns them
    returns: torch.Tensor
    stats: dict[str, torch.Tensor]  # under TRL's stat names
    grad_new_logprobs: torch.Tensor
    grad_vpreds: torch.Tensor


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


def classic_step(cfg: dict) -> ClassicStep:
    """One PPO step through alignlib on a golden step's inputs and config."""
    inputs = CLASSIC_INPUTS[cfg["inputs"]]
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
    vf_coef = cfg.get("vf_coef", 0.1)
    out = ppo_loss(
        new_logprobs, inputs["logprobs"], advantages, vpreds, old_values, gae.returns, mask,
        cliprange=cfg.get("cliprange", 0.2), cliprange_value=cfg.get("cliprange_value", 0.2),
        vf_coef=vf_coef, entropy=entropy_from_logits(inputs["logits"]),
    )
    grad_logprobs, grad_vpreds = torch.autograd.grad(out.loss, [new_logprobs, vpreds])
    stats = {
        "loss/policy": out.policy_loss,
        "loss/value": out.value_loss,
        "loss/total": out.policy_loss + vf_coef * out.value_loss,
        "policy/approxkl": out.approx_kl,
        "policy/policykl": out.policy_kl,
        "policy/clipfrac": out.policy_clipfrac,
        "val/clipfrac": out.value_clipfrac,
        "policy/entropy": out.entropy,
    }
    return ClassicStep(
        mask, shaped.kl, shaped.non_score_rewards, shaped.rewards, advantages, gae.returns,
        {k: v.detach() for k, v in stats.items()}, grad_logprobs, grad_vpreds,
    )


# ---------------------------------------------------------------------------
# TRL 0.25.1's PPOTrainer (values captured from its train() loop; float32 arithmetic)
# ---------------------------------------------------------------------------

LATER = json.loads((GOLDEN_DIR / "ppo_trl_0_25_1.json").read_text())
LATER_ESTIMATORS = {"k1": "k1", "k3": "k3"}


class LaterRun(NamedTuple):
    response_mask: torch.Tensor  # ~padding_mask: response tokens, EOS included
    episode_mask: torch.Tensor  # ~padding_mask_p1: one position more, where 0.25.1 puts the score
    ours: dict[str, torch.Tensor]
    theirs: dict[str, torch.Tensor]


def later_run(run: dict) -> LaterRun:
    """alignlib on the tensors TRL 0.25.1's train() saw, next to what it computed from them."""
    from alignlib.losses import kl_penalty, penalize_missing_eos

    t = {k: torch.tensor(v) for k, v in run.items() if isinstance(v, list)}
    response_mask = ~t["padding_mask"]
    episode_mask = ~t["padding_mask_p1"]
    kl = torch.where(response_mask, kl_penalty(t["logprobs"], t["ref_logprobs"], LATER_ESTIMATORS[run["kl_estimator"]]), 0.0)
    scores = penalize_missing_eos(t["scores_before_penalty"], t["contain_eos_token"], run["missing_eos_penalty"])
    # GAE and whitening on TRL's own rewards and values, over the episode as 0.25.1 defines it
    gae = gae_advantages(t["rewards"], t["values"], episode_mask, gamma=run["gamma"], lam=run["lam"])
    ours = {
        "kl": kl,
        "non_score_reward": -run["kl_coef"] * kl,
        "scores": scores,
        "advantages_unwhitened": gae.advantages,
        "returns": gae.returns,
        "advantages": whiten(gae.advantages, response_mask),
    }
    return LaterRun(response_mask, episode_mask, ours, t)
