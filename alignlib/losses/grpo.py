r"""GRPO and RLOO: policy gradients with a baseline from a group of responses to one prompt.

No value model. For each prompt the policy samples a group of G responses; each response's
scalar reward r_i is compared with the rest of its group, and that advantage drives a
PPO-style clipped update of every token of the response.

**Advantages.** GRPO (DeepSeekMath, Shao et al., 2024, https://arxiv.org/abs/2402.03300,
sec. 4.1.2, outcome supervision) standardises within the group:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)

Dr. GRPO (Liu et al., 2025, https://arxiv.org/abs/2503.20783) drops the division (it favours
prompts whose rewards barely vary), and Lite PPO (Liu et al., 2025,
https://arxiv.org/abs/2508.08221) divides by the batch's std instead. RLOO (Ahmadian et al.,
2024, https://arxiv.org/abs/2402.14740; Kool et al., 2019) uses the mean of the *other*
responses of the group as the baseline:

    A_i = r_i - 1/(G-1) sum_{j != i} r_j

**The update**, per response token t of response i, with the importance ratio
rho_it = pi(o_it | q, o_i,<t) / pi_old(o_it | ...) and eps_low, eps_high (DAPO's clip-higher,
Yu et al., 2025, https://arxiv.org/abs/2503.14476):

    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL_it
    KL_it = pi_ref/pi - log(pi_ref/pi) - 1           (DeepSeekMath eq. 4, Schulman's k3)

GSPO (Zheng et al., 2025, https://arxiv.org/abs/2507.18071) replaces rho_it by one ratio per
sequence, rho_i = exp(mean_t log rho_it) (`importance_sampling_level="sequence"`).

**The reduction** is where the loss types differ (|o_i| the length of response i):

    grpo     1/B sum_i 1/|o_i| sum_t l_it            DeepSeekMath eq. 3: mean per response, then over responses
    bnpo     sum_it l_it / sum_i |o_i|               every token of the batch weighs the same
    dapo     sum_it l_it / (tokens in the whole step) DAPO sec. 3.3, the token-level loss
    dr_grpo  sum_it l_it / (B * max_completion_length) Dr. GRPO: a constant, no length bias

**Gradient accumulation.** A step of several micro-batches (and ranks) should give the
loss and gradient of the whole step, however it is split. Every loss here is a sum over
the batch divided by a `normalizer`; pass the step's normaliser (`grpo_normalizer` of each
micro-batch, summed over micro-batches and ranks) and the micro-batch losses add up to the
step's loss. Left out, the normaliser is the batch's own (TRL's per-micro-batch behaviour).

Tensors are (B, T) with a response mask, as in ppo.py, whose helpers these functions share:
padding is zeroed before any arithmetic, and exp() of a log-ratio is taken at most at
e^LOG_RATIO_MAX = e^20 (TRL does not clamp, and overflows to inf or NaN beyond).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (
    MAX_COEFFICIENT,
    MAX_MAGNITUDE,
    UNIT_INTERVAL,
    check_choice,
    check_finite,
    check_positive,
    check_range,
    check_rollout,
    compute_dtype,
    on_mask,
)
from .ppo import LOG_RATIO_MAX, kl_penalty, masked_mean

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
ADVANTAGE_SCALES = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Added to a reward std before dividing by it (TRL's constant), so a group whose rewards all
# agree gets advantages 0 rather than 0 / 0.
STD_EPS = 1e-4
# Loss types whose per-response terms are summed and divided by a count of responses; the
# others divide by a count of tokens (dr_grpo: responses times max_completion_length).
_PER_SEQUENCE = ("grpo", "sapo")
_PER_TOKEN = ("bnpo", "dapo", "cispo")


# ---------------------------------------------------------------------------
# Advantages from groups of rewards
# ---------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    r"""GRPO's advantages: each reward minus its group's mean, divided by a std (+1e-4).

    A_i = (r_i - mean_group(r)) / (std + 1e-4), std the unbiased standard deviation of the
    group's rewards (scale="group", DeepSeekMath), of the whole batch's (scale="batch",
    Lite PPO), or no division (scale="none", Dr. GRPO).

    Args:
        rewards: (B,) one reward per response, in consecutive groups of group_size (the
            responses to one prompt side by side). NaN marks a response no reward function
            could score: it is left out of the means and stds and gets advantage 0, as in
            TRL 1.16. Pass the rewards of whole groups (gather them across ranks first).
        group_size: G, at least 2 for scale="group"; must divide B.
        scale: one of ADVANTAGE_SCALES.

    Returns:
        (B,) advantages, float32 (float64 for float64 rewards), 0 for unscorable responses
        and for a group whose rewards all agree.
    """
    check_choice("scale", scale, ADVANTAGE_SCALES)
    rewards, scorable = _check_grouped_rewards(rewards, group_size, least=2 if scale == "group" else 1,
                                               why=" for scale='group' (a group's std needs two rewards)")
    r, s = rewards.view(-1, group_size), scorable.view(-1, group_size)

    mean = _mean(r, s, dim=1)
    advantages = r - mean
    if scale == "group":
        advantages = advantages / (_std(r, s, mean, dim=1) + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (_std(rewards, scorable, _mean(rewards, scorable)) + STD_EPS)
    return torch.where(s, advantages, 0.0).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False) -> torch.Tensor:
    r"""RLOO's advantages: each reward minus the mean of the other rewards of its group.

    A_i = r_i - 1/(n-1) sum_{j != i} r_j over the n scorable responses of the group
    (Ahmadian et al., 2024). With normalize=True (TRL's `normalize_advantages`) the advantages
    are then standardised over the batch: (A - mean(A)) / (std(A) + 1e-4).

    Args:
        rewards: (B,) one reward per response in consecutive groups of group_size; NaN marks
            an unscorable response (advantage 0, left out of its siblings' baselines). A
            response with no scorable sibling has no baseline and gets 0 too. Any KL penalty
            (TRL's RLOO subtracts beta * sum_t KL_t) belongs in the rewards already.
        group_size: G >= 2; must divide B.
        normalize: standardise over the responses that have an advantage.

    Returns:
        (B,) advantages, float32 (float64 for float64 rewards).
    """
    rewards, scorable = _check_grouped_rewards(rewards, group_size, least=2,
                                               why=" (the leave-one-out baseline needs a sibling)")
    r, s = rewards.view(-1, group_size), scorable.view(-1, group_size)

    n = s.sum(dim=1, keepdim=True)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1)  # mean of the other scorable rewards
    has_baseline = (s & (n >= 2)).view(-1)
    advantages = (r - baseline).view(-1)
    if normalize:
        mean = _mean(advantages, has_baseline)
        advantages = (advantages - mean) / (_std(advantages, has_baseline, mean) + STD_EPS)
    return torch.where(has_baseline, advantages, 0.0)


def _check_grouped_rewards(rewards: torch.Tensor, group_size: int, least: int, why: str):
    """rewards upcast with NaN set to 0, and the (B,) bool mask of scorable (non-NaN) entries."""
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point() or rewards.dim() != 1:
        raise ValueError(f"rewards must be a (B,) floating-point tensor, got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < least:
        raise ValueError(f"group_size must be an int >= {least}{why if least > 1 else ''}, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide the number of rewards, {rewards.numel()}")
    scorable = ~rewards.isnan()
    if not bool(torch.where(scorable, rewards.abs() <= MAX_MAGNITUDE, True).all()):
        raise ValueError(
            f"rewards must be finite (NaN marks an unscorable response) and within +-2^40, got "
            f"{rewards[scorable & ~(rewards.abs() <= MAX_MAGNITUDE)][:3].tolist()}"
        )
    dtype = compute_dtype(rewards)
    return torch.where(scorable, rewards.to(dtype), 0.0), scorable


def _mean(x: torch.Tensor, keep: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the kept entries (along dim, kept as size 1), 0 where none is kept."""
    if dim is None:
        return torch.where(keep, x, 0.0).sum() / keep.sum().clamp(min=1)
    return torch.where(keep, x, 0.0).sum(dim, keepdim=True) / keep.sum(dim, keepdim=True).clamp(min=1)


def _std(x: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std of x over the kept entries; 0 where fewer than two are kept (their deviations are 0)."""
    squares = torch.where(keep, (x - mean) ** 2, 0.0)
    n = keep.sum() if dim is None else keep.sum(dim, keepdim=True)
    total = squares.sum() if dim is None else squares.sum(dim, keepdim=True)
    return torch.sqrt(total / (n - 1).clamp(min=1))


# ---------------------------------------------------------------------------
# The GRPO update
# ---------------------------------------------------------------------------


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor
    """() the batch's summed loss divided by `normalizer`: what to backpropagate."""
    per_token_losses: torch.Tensor
    """(B, T) l_it (the KL term included), 0 on padding, before the reduction."""
    clip_low: torch.Tensor
    """() fraction of response tokens (sequences, at sequence level) with rho < 1 - eps_low and A < 0 (TRL's
    clip_ratio/low_mean); 0 for cispo and sapo."""
    clip_high: torch.Tensor
    """() the same for rho > 1 + eps_high and A > 0 (TRL's clip_ratio/high_mean); for cispo, rho > eps_high
    and A > 0 (TRL's cispo_clip_ratio); 0 for sapo. clip_low + clip_high is TRL's clip_ratio/region_mean."""
    kl: torch.Tensor | None
    """() mean over response tokens of the KL term (k3, times rho with use_bias_correction_kl), TRL's `kl`;
    None without ref_logprobs."""
    normalizer: torch.Tensor
    """() what the summed loss was divided by (the argument, or this batch's grpo_normalizer)."""


def grpo_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> torch.Tensor:
    """This batch's share of the normaliser of `loss_type`; summed over a step's micro-batches and ranks, the step's.

    grpo, sapo: the number of responses B. dr_grpo: B * max_completion_length. bnpo, dapo,
    cispo: the number of response tokens. Returned as a 0-d float64 tensor on mask's device.
    """
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    rows = mask.shape[0]
    if loss_type in _PER_SEQUENCE:
        return torch.tensor(float(rows), dtype=torch.float64, device=mask.device)
    if loss_type == "dr_grpo":
        _check_max_completion_length(max_completion_length)
        return torch.tensor(float(rows * max_completion_length), dtype=torch.float64, device=mask.device)
    return (mask != 0).sum().to(torch.float64)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    normalizer: torch.Tensor | float | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
) -> GRPOLossOutput:
    r"""The GRPO objective and its variants (see the module docstring for the reductions).

    Per token, with rho the importance ratio (per token, or one per sequence at
    importance_sampling_level="sequence": exp(mean_t log rho_it), GSPO):

    ========= ======================================================= =======================================
    loss_type per-token loss l_it (before + beta KL_it)               paper
    ========= ======================================================= =======================================
    grpo      -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)         DeepSeekMath eq. 3
    bnpo      same                                                    TRL's batch-normalised GRPO
    dapo      same                                                    DAPO (clip-higher, token-level)
    dr_grpo   same                                                    Dr. GRPO
    cispo     -sg(min(rho, eps_high)) A log pi(o_it)                  MiniMax-M1 (arXiv 2506.13585)
    sapo      -(4 / tau) sig(tau (rho - 1)) A, tau = tau_pos if A > 0 SAPO (arXiv 2511.20347)
    ========= ======================================================= =======================================

    cispo keeps a gradient on every token (the ratio is clipped and detached, not the
    surrogate) and sapo replaces the hard clip by a smooth gate; both are in TRL 1.16, and
    ScaleRL (arXiv 2510.13786) found cispo the best of these at scale.

    Args:
        logprobs: (B, T) log pi(o_it) under the policy being trained (with grad).
        old_logprobs: (B, T) the same under the policy that sampled (no grad). On-policy,
            logprobs.detach().
        advantages: (B,) one per response (group_advantages, rloo_advantages), or (B, T).
        mask: (B, T) True on response tokens; every row needs one.
        ref_logprobs: (B, T) log pi_ref, for the KL term; required when beta > 0.
        beta: the KL weight, in [0, 1e6] (TRL's default 0, no reference model).
        epsilon_low, epsilon_high: the clip range [1 - eps_low, 1 + eps_high]; eps_low in
            [0, 1], eps_high in [0, 1e6]. For cispo eps_high is the cap on rho itself (> 0;
            ScaleRL uses 5).
        loss_type: one of GRPO_LOSS_TYPES.
        importance_sampling_level: "token" or "sequence" (GSPO).
        max_completion_length: dr_grpo's constant (an int >= 1); read by dr_grpo only.
        normalizer: what the summed loss is divided by; None means this batch's
            grpo_normalizer. Pass the step's total for a loss that does not depend on how the
            step is split into micro-batches and ranks.
        use_bias_correction_kl: multiply KL_it by rho (TRL 1.16's default, after DeepSeek-V3.2):
            the same value on-policy, but the unbiased gradient of KL(pi || pi_ref).
        sapo_temperature_pos, sapo_temperature_neg: sapo's tau for A > 0 and A <= 0 (> 0).

    Returns:
        GRPOLossOutput, float32 (float64 if an input is float64).
    """
    check_choice("loss_type", loss_type, GRPO_LOSS_TYPES)
    check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    check_positive("beta", beta, allow_zero=True, upper=MAX_COEFFICIENT)
    check_range("epsilon_low", epsilon_low, UNIT_INTERVAL)
    check_positive("epsilon_high", epsilon_high, allow_zero=loss_type != "cispo", upper=MAX_COEFFICIENT)
    if loss_type == "sapo":
        check_positive("sapo_temperature_pos", sapo_temperature_pos, upper=MAX_COEFFICIENT)
        check_positive("sapo_temperature_neg", sapo_temperature_neg, upper=MAX_COEFFICIENT)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta!r} weighs a KL to the reference: pass ref_logprobs (B, T)")
    named = {"logprobs": logprobs, "old_logprobs": old_logprobs}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    if isinstance(advantages, torch.Tensor) and advantages.dim() == 2:
        named["advantages"] = advantages
    mask = check_rollout(mask, **named)
    advantages = _check_advantages(advantages, mask)
    dtype = compute_dtype(*named.values(), advantages)
    logprobs, old_logprobs = on_mask(mask, logprobs.to(dtype), old_logprobs.to(dtype))
    # (B,) advantages as (B, 1), broadcasting over the tokens; (B, T) ones zeroed on padding.
    A = advantages.to(dtype).unsqueeze(1) if advantages.dim() == 1 else on_mask(mask, advantages.to(dtype))[0]
    lengths = mask.sum(dim=1, keepdim=True)  # |o_i|

    # log rho: per token, or one per response (GSPO: the mean over its tokens).
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True) / lengths
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))

    if loss_type == "cispo":
        # The clipped ratio is a detached weight on the REINFORCE term: every token keeps a gradient.
        per_token = -ratio.clamp(max=epsilon_high).detach() * A * logprobs
        clip_low, clip_high = torch.zeros_like(ratio, dtype=torch.bool), (ratio > epsilon_high) & (A > 0)
    elif loss_type == "sapo":
        tau = torch.where(A > 0, A.new_tensor(sapo_temperature_pos), A.new_tensor(sapo_temperature_neg))
        per_token = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * A  # a soft gate instead of the clip
        clip_low = clip_high = torch.zeros_like(ratio, dtype=torch.bool)
    else:  # grpo, bnpo, dapo, dr_grpo: the clipped surrogate
        clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        per_token = -torch.min(ratio * A, clipped_ratio * A)
        clip_low, clip_high = (ratio < 1 - epsilon_low) & (A < 0), (ratio > 1 + epsilon_high) & (A > 0)

    kl = None
    if ref_logprobs is not None:
        (ref_logprobs,) = on_mask(mask, ref_logprobs.to(dtype))
        kl_term = kl_penalty(logprobs, ref_logprobs, "k3")  # pi_ref/pi - log(pi_ref/pi) - 1
        if use_bias_correction_kl:
            kl_term = kl_term * ratio
        kl = masked_mean(kl_term, mask).detach()
        per_token = per_token + beta * kl_term
    per_token = torch.where(mask, per_token, 0.0)

    if normalizer is None:
        normalizer = grpo_normalizer(mask, loss_type, max_completion_length)
    normalizer = _check_normalizer(normalizer).to(dtype)
    if loss_type in _PER_SEQUENCE:
        total = (per_token.sum(dim=1) / lengths.squeeze(1)).sum()  # each response's mean l_it, summed
    else:
        total = per_token.sum()
    return GRPOLossOutput(
        loss=total / normalizer,
        per_token_losses=per_token,
        clip_low=_fraction(clip_low, mask, dtype),
        clip_high=_fraction(clip_high, mask, dtype),
        kl=kl,
        normalizer=normalizer,
    )


# ---------------------------------------------------------------------------
# The RLOO update
# ---------------------------------------------------------------------------


class RLOOLossOutput(NamedTuple):
    loss: torch.Tensor
    """() the summed per-response losses divided by `normalizer`."""
    per_sequence_losses: torch.Tensor
    """(B,) -min(rho_i A_i, clip(rho_i) A_i)."""
    clip_low: torch.Tensor
    """() fraction of responses with rho < 1 - eps_low and A < 0 (TRL's clip_ratio/low_mean)."""
    clip_high: torch.Tensor
    """() fraction with rho > 1 + eps_high and A > 0 (TRL's clip_ratio/high_mean)."""
    normalizer: torch.Tensor
    """() what the sum was divided by (the argument, or B)."""


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    normalizer: torch.Tensor | float | None = None,
) -> RLOOLossOutput:
    r"""RLOO's update, as TRL 1.16's RLOOTrainer has it: REINFORCE on whole responses, PPO-clipped.

    With rho_i = pi(o_i|q) / pi_old(o_i|q), the ratio of the responses' (summed) likelihoods:

        l_i = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i),   L = sum_i l_i / B

    On-policy rho_i = 1 and the gradient is REINFORCE's -A_i grad log pi(o_i|q) (Ahmadian et
    al., 2024); the clip matters when a batch is reused for several updates.

    Args:
        logprobs, old_logprobs: (B, T) per-token log-probs under the policy being trained
            and the one that sampled.
        advantages: (B,) rloo_advantages.
        mask: (B, T) True on response tokens; every row needs one.
        epsilon_low, epsilon_high: the clip range, eps_low in [0, 1], eps_high in [0, 1e6].
        normalizer: what the sum is divided by; None means B. Pass the step's number of
            responses for a loss that does not depend on how the step is split.
    """
    check_range("epsilon_low", epsilon_low, UNIT_INTERVAL)
    check_positive("epsilon_high", epsilon_high, allow_zero=True, upper=MAX_COEFFICIENT)
    mask = check_rollout(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1:
        raise ValueError(f"advantages must be (B,), one per response; got {getattr(advantages, 'shape', advantages)}")
    advantages = _check_advantages(advantages, mask)
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    logprobs, old_logprobs = on_mask(mask, logprobs.to(dtype), old_logprobs.to(dtype))
    A = advantages.to(dtype)

    log_ratio = logprobs.sum(dim=1) - old_logprobs.sum(dim=1)  # log pi(o_i) - log pi_old(o_i)
    ratio = torch.exp(log_ratio.clamp(max=LOG_RATIO_MAX))
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence = -torch.min(ratio * A, clipped_ratio * A)

    normalizer = _check_normalizer(float(mask.shape[0]) if normalizer is None else normalizer).to(dtype)
    return RLOOLossOutput(
        loss=per_sequence.sum() / normalizer,
        per_sequence_losses=per_sequence,
        clip_low=((ratio < 1 - epsilon_low) & (A < 0)).to(dtype).mean(),
        clip_high=((ratio > 1 + epsilon_high) & (A > 0)).to(dtype).mean(),
        normalizer=normalizer,
    )


# ---------------------------------------------------------------------------
# Checks and small helpers
# ---------------------------------------------------------------------------


def _check_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """advantages (B,) finite, or (B, T) (checked on the mask by check_rollout); returned unchanged."""
    if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point():
        raise ValueError(f"advantages must be a floating-point torch.Tensor, got {getattr(advantages, 'dtype', advantages)}")
    if advantages.dim() == 2:
        return advantages
    if advantages.shape != mask.shape[:1]:
        raise ValueError(
            f"advantages must have shape ({mask.shape[0]},), one per response, or {tuple(mask.shape)}; "
            f"got {tuple(advantages.shape)}"
        )
    check_finite("advantages", advantages)
    return advantages


def _check_normalizer(normalizer: torch.Tensor | float) -> torch.Tensor:
    value = normalizer if isinstance(normalizer, torch.Tensor) else torch.tensor(normalizer, dtype=torch.float64)
    if value.dim() != 0 or not bool(torch.isfinite(value.double())) or not bool(value > 0):
        raise ValueError(f"normalizer must be a finite number > 0 (or a 0-d tensor), got {normalizer!r}")
    return value


def _check_max_completion_length(max_completion_length: int | None) -> None:
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length < 1:
        raise ValueError(
            "loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length, an int >= 1; "
            f"got {max_completion_length!r}"
        )


def _fraction(flags: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fraction of response tokens flagged; of responses when flags are one per response ((B, 1))."""
    flags = flags.to(dtype)
    if flags.shape[1] == 1:
        return flags.mean()
    return masked_mean(flags, mask)
