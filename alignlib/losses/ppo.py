r"""PPO with a KL penalty to a reference model: the classic RLHF recipe.

Ziegler et al., 2019 (https://arxiv.org/abs/1909.08593) and InstructGPT
(Ouyang et al., 2022) fine-tune a policy pi with PPO (Schulman et al., 2017,
https://arxiv.org/abs/1707.06347) on the score of a reward model, while a
per-token KL penalty keeps pi close to the reference (SFT) model pi_ref:

    r_t = -kl_coef * KL_t                      for every response token t
    r_T = -kl_coef * KL_T + score              at the last response token T

The advantages come from GAE (Schulman et al., 2016, https://arxiv.org/abs/1506.02438):

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t

and the update minimises the clipped surrogate and the clipped value loss, with
rho_t = pi(a_t|s_t) / pi_old(a_t|s_t):

    L_pg = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))
    L_vf = 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old-eps_v, V_old+eps_v) - R_t)^2)
    L    = L_pg + vf_coef L_vf

All tensors of per-token values are (B, T), one row per response, with a mask
(B, T) that is True on response tokens. Padding contributes nothing: it is
zeroed with torch.where (so even inf or NaN filler stays out), and every mean
is over the masked tokens of the whole batch, as in TRL's classic PPOTrainer.

Numerics: bf16/fp16 inputs are computed (and returned) in float32, float64 stays
float64. Values on response tokens must be finite and within +-2^40 = 1.1e12 (else a
ValueError, as for the other losses). exp() of a log-ratio (the policy ratio, the k3
estimate) is taken at most at LOG_RATIO_MAX: a ratio beyond e^20 = 5e8 means the
trust region is long gone, and the clamp keeps every result finite (zero gradient
past it; TRL does not clamp, and overflows to inf or NaN there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ._checks import (
    MAX_COEFFICIENT,
    UNIT_INTERVAL,
    check_finite,
    check_positive,
    check_range,
    check_rollout,
    check_same_shape,
    on_mask,
    upcast,
)

KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "mse")
# exp(log-ratio) is taken at most at e^20 (see the module docstring).
LOG_RATIO_MAX = 20.0


# ---------------------------------------------------------------------------
# KL penalty and reward shaping
# ---------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    r"""Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    With log_r = log pi(a_t) - log pi_ref(a_t) (Schulman, "Approximating KL
    divergence", 2020, http://joschu.net/blog/kl-approx.html):

    * k1:  log_r                         unbiased, can be negative per token
    * k2:  1/2 log_r^2                   biased, low variance (TRL classic calls it "mse")
    * k3:  (e^{-log_r} - 1) + log_r      unbiased, >= 0, low variance (log_r clamped at -LOG_RATIO_MAX)
    * abs: |log_r|
    * mse: 1/2 log_r^2, the same as k2

    Args:
        logprobs: (..., ) log pi of the sampled tokens.
        ref_logprobs: (...,) log pi_ref of the same tokens, same shape.
        estimator: one of KL_ESTIMATORS.

    Returns:
        A tensor of logprobs' shape, float32 (float64 for float64 inputs). Not masked:
        see kl_shaped_rewards.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    logprobs, ref_logprobs = upcast(logprobs, ref_logprobs)
    log_r = logprobs - ref_logprobs
    if estimator == "k1":
        return log_r
    if estimator in ("k2", "mse"):
        return 0.5 * log_r**2
    if estimator == "k3":
        log_r = log_r.clamp(min=-LOG_RATIO_MAX)  # k3 saturates at its value for log_r = -20
        return torch.expm1(-log_r) + log_r
    return log_r.abs()


class ShapedRewards(NamedTuple):
    rewards: torch.Tensor
    """(B, T) -kl_coef * KL_t, plus the score at each row's last response token; 0 on padding."""
    kl: torch.Tensor
    """(B, T) the per-token KL estimate, 0 on padding."""
    non_score_rewards: torch.Tensor
    """(B, T) -kl_coef * KL_t, 0 on padding."""


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> ShapedRewards:
    r"""Per-token rewards r_t = -kl_coef KL_t, with the sequence score added at the last response token.

    Args:
        scores: (B,) one scalar score per response (reward model or function).
        logprobs: (B, T) log pi of each response token (the rollout policy).
        ref_logprobs: (B, T) log pi_ref of the same tokens.
        mask: (B, T) True (or 1) on response tokens; every row needs at least one.
        kl_coef: in [0, 1e6], 0 or not below 1.18e-38; the KL weight (an AdaptiveKLController's `.value`).
        estimator: which KL estimate (see kl_penalty).

    Returns:
        ShapedRewards(rewards, kl, non_score_rewards), each (B, T).
    """
    mask = check_rollout(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_scores(scores, logprobs)
    check_positive("kl_coef", kl_coef, allow_zero=True, upper=MAX_COEFFICIENT)

    kl = torch.where(mask, kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
    non_score_rewards = -kl_coef * kl
    rewards = non_score_rewards.clone()
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_true_index(mask)] += scores.to(rewards.dtype)
    return ShapedRewards(rewards, kl, non_score_rewards)


def penalize_missing_eos(scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores - penalty for each response that never emitted EOS (cut off at max_new_tokens).

    Args:
        scores: (B,) sequence scores.
        contains_eos: (B,) bool, whether each response contains the EOS token.
        penalty: >= 0 subtracted from the scores of truncated responses; None leaves them as they are.
    """
    _check_scores(scores, scores.unsqueeze(1))
    if contains_eos.shape != scores.shape:
        raise ValueError(f"contains_eos has shape {tuple(contains_eos.shape)}, scores {tuple(scores.shape)}")
    if penalty is None:
        return scores
    check_positive("penalty (missing_eos_penalty)", penalty, allow_zero=True)
    return torch.where(contains_eos.bool(), scores, scores - penalty)


# ---------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------


class GAEOutput(NamedTuple):
    advantages: torch.Tensor
    """(B, T) A_t, not whitened; 0 on padding."""
    returns: torch.Tensor
    """(B, T) R_t = A_t + V_t, the value targets; 0 on padding."""


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> GAEOutput:
    r"""Generalised advantage estimation over each response.

    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; R_t = A_t + V_t,
    with V and r taken as 0 outside the mask (so the value after the last response
    token is 0: the episode ends there).

    TRL's classic `compute_advantages` returns whiten(A, mask) as the advantages:
    call `whiten(out.advantages, mask)` for the same. The returns are not whitened.

    Args:
        rewards: (B, T) per-token rewards (kl_shaped_rewards).
        values: (B, T) V(s_t) from the value head at rollout time.
        mask: (B, T) True on response tokens.
        gamma: discount in [0, 1].
        lam: GAE's lambda in [0, 1].
    """
    mask = check_rollout(mask, rewards=rewards, values=values)
    check_range("gamma", gamma, UNIT_INTERVAL)
    check_range("lam", lam, UNIT_INTERVAL)

    rewards, values = on_mask(mask, rewards, values)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    returns = advantages + values
    return GAEOutput(torch.where(mask, advantages, 0.0), torch.where(mask, returns, 0.0))


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    r"""Normalise x over the masked entries: (x - mean) / sqrt(var + eps).

    The variance is the unbiased one (Bessel's n-1), as in TRL's `masked_whiten`.
    With shift_mean=True the result has mean 0 (TRL's behaviour, used for the
    advantages); with shift_mean=False the mean is added back, so only the scale
    changes (TRL's `whiten_rewards`). torchtune's `whiten(shift_mean=True)` is
    the opposite convention: it adds the mean back. Entries outside the mask are 0.

    Args:
        x: (B, T) values.
        mask: (B, T) True where x counts; None means everywhere. At least 2 entries.
        eps: > 0, keeps a constant x finite (its variance is 0).
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mask = check_rollout(mask, require_every_row=False, x=x)
    check_positive("eps", eps)
    (x,) = on_mask(mask, x)
    n = mask.sum()
    if int(n) < 2:
        raise ValueError(f"whiten needs at least 2 unmasked values for a variance, got {int(n)}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (entries outside never enter, even if inf or NaN); 0 if none."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------
# The PPO update
# ---------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    """() the clipped surrogate, averaged over response tokens."""
    per_token_losses: torch.Tensor
    """(B, T) max(-A rho, -A clip(rho)), 0 on padding: reduce it another way if you like."""
    clipfrac: torch.Tensor
    """() fraction of tokens where the clipped term was the larger (the clip was active)."""
    approx_kl: torch.Tensor
    """() 1/2 mean (log rho)^2, the k2 estimate of KL(pi_old || pi); TRL's ppo/policy/approxkl."""
    policy_kl: torch.Tensor
    """() mean(-log rho), the k1 estimate; TRL's ppo/policy/policykl (used for early stopping)."""


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> PolicyLossOutput:
    r"""PPO's clipped surrogate: mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)).

    Args:
        logprobs: (B, T) log pi(a_t|s_t) under the policy being trained (with grad).
        old_logprobs: (B, T) the same under the rollout policy (no grad).
        advantages: (B, T) A_t, usually whitened.
        mask: (B, T) True on response tokens.
        cliprange: eps > 0.
    """
    mask = check_rollout(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check_positive("cliprange", cliprange)
    logprobs, old_logprobs, advantages = on_mask(mask, logprobs, old_logprobs, advantages)

    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    per_token = torch.where(mask, torch.max(unclipped, clipped), 0.0)

    return PolicyLossOutput(
        loss=masked_mean(per_token, mask),
        per_token_losses=per_token,
        clipfrac=masked_mean((clipped > unclipped).to(per_token.dtype), mask).detach(),
        approx_kl=(0.5 * masked_mean(log_ratio**2, mask)).detach(),
        policy_kl=masked_mean(-log_ratio, mask).detach(),
    )


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    """() 1/2 mean_t max((V - R)^2, (V_clipped - R)^2)."""
    per_token_losses: torch.Tensor
    """(B, T) the same before the mean, 0 on padding."""
    clipfrac: torch.Tensor
    """() fraction of tokens where the clipped error was the larger."""


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> ValueLossOutput:
    r"""Clipped value loss: 1/2 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2).

    Args:
        values: (B, T) V(s_t) from the value head being trained (with grad).
        old_values: (B, T) V(s_t) at rollout time.
        returns: (B, T) the targets R_t from gae_advantages.
        mask: (B, T) True on response tokens.
        cliprange_value: eps > 0, how far V may move from V_old before the clip bites.
    """
    mask = check_rollout(mask, values=values, old_values=old_values, returns=returns)
    check_positive("cliprange_value", cliprange_value)
    values, old_values, returns = on_mask(mask, values, old_values, returns)

    values_clipped = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    error_unclipped = (values - returns) ** 2
    error_clipped = (values_clipped - returns) ** 2
    per_token = torch.where(mask, 0.5 * torch.max(error_unclipped, error_clipped), 0.0)

    return ValueLossOutput(
        loss=masked_mean(per_token, mask),
        per_token_losses=per_token,
        clipfrac=masked_mean((error_clipped > error_unclipped).to(per_token.dtype), mask).detach(),
    )


class PPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """() policy_loss + vf_coef * value_loss - entropy_coef * entropy: what to backpropagate."""
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    """() the unweighted value loss (TRL's ppo/loss/value)."""
    policy_clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    policy_kl: torch.Tensor
    entropy: torch.Tensor | None
    """() mean per-token entropy when one was given, else None."""


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> PPOLossOutput:
    r"""The PPO objective: L_pg + vf_coef L_vf - entropy_coef H.

    Arguments as in ppo_policy_loss and ppo_value_loss (defaults are TRL's classic
    PPOConfig: cliprange 0.2, cliprange_value 0.2, vf_coef 0.1). `entropy` is an
    optional (B, T) per-token entropy of the policy (with grad) for a bonus.
    """
    check_positive("vf_coef", vf_coef, allow_zero=True, upper=MAX_COEFFICIENT)
    check_positive("entropy_coef", entropy_coef, allow_zero=True, upper=MAX_COEFFICIENT)
    policy = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)
    value = ppo_value_loss(values, old_values, returns, mask, cliprange_value)
    loss = policy.loss + vf_coef * value.loss
    mean_entropy = None
    if entropy is not None:
        mask_b = check_rollout(mask, entropy=entropy, logprobs=logprobs)
        mean_entropy = masked_mean(*on_mask(mask_b, entropy), mask_b)
        loss = loss - entropy_coef * mean_entropy
    elif entropy_coef != 0:
        raise ValueError("entropy_coef is non-zero but no entropy was given")
    return PPOLossOutput(
        loss=loss,
        policy_loss=policy.loss,
        value_loss=value.loss,
        policy_clipfrac=policy.clipfrac,
        value_clipfrac=value.clipfrac,
        approx_kl=policy.approx_kl,
        policy_kl=policy.policy_kl,
        entropy=mean_entropy,
    )


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


class AdaptiveKLController:
    r"""Proportional control of kl_coef towards a target KL (Ziegler et al., 2019, sec. 2.2).

    After each batch: e = clip(KL / target - 1, -0.2, 0.2); kl_coef *= 1 + e * n_steps / horizon.
    KL above target raises the penalty, below lowers it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        check_positive("init_kl_coef", init_kl_coef, allow_zero=True, upper=MAX_COEFFICIENT)
        check_positive("target", target)
        check_positive("horizon", horizon)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the batch's mean KL (per sequence, summed over tokens); n_steps: samples since the last update.

        n_steps must stay below 5 * horizon, else a KL under target would make the multiplier
        1 - 0.2 n_steps / horizon zero or negative (a KL reward instead of a penalty).
        """
        if not math.isfinite(float(current_kl)):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        if isinstance(n_steps, bool) or not math.isfinite(float(n_steps)) or n_steps < 0:
            raise ValueError(f"n_steps must be a finite number >= 0, got {n_steps!r}")
        if n_steps >= 5 * self.horizon:
            raise ValueError(
                f"n_steps={n_steps} must be below 5 * horizon = {5 * self.horizon:g}: the multiplier "
                "1 - 0.2 * n_steps / horizon would reach 0 or below and flip the sign of the KL penalty"
            )
        proportional_error = float(np.clip(float(current_kl) / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant kl_coef, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        check_positive("kl_coef", kl_coef, allow_zero=True, upper=MAX_COEFFICIENT)
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""


# ---------------------------------------------------------------------------
# Masks, and the check of a sequence score (the (B, T) checks are in _checks)
# ---------------------------------------------------------------------------


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True entry in each row of a (B, T) mask."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).max(dim=1).values


def _check_scores(scores: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point torch.Tensor, got {getattr(scores, 'dtype', type(scores))}")
    if scores.shape != like.shape[:1]:
        raise ValueError(f"scores must have shape ({like.shape[0]},), one per response; got {tuple(scores.shape)}")
    check_finite("scores", scores)
