r"""Reference-free preference losses: CPO and SimPO (with AlphaPO's reward).

CPO (Xu et al., 2024, https://arxiv.org/abs/2401.08417) drops DPO's reference
model: the implicit reward of a response is beta * log pi(y|x) itself, and the
loss is the sigmoid (or hinge, or IPO) loss on the reward margin, plus an NLL
term on the chosen response that the caller adds (TRL's `cpo_alpha` weight).

SimPO (Meng, Xia and Chen, 2024, https://arxiv.org/abs/2405.14734) uses the
*length-averaged* log-prob as the reward and asks for a target margin gamma
(paper eq. 6):

    L_SimPO = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

AlphaPO (Gupta et al., 2025, https://arxiv.org/abs/2501.03884) reshapes the
reward with alpha != 0: r(y) = (1 - P(y)^-alpha) / alpha, which tends to log P(y)
as alpha -> 0.

The inputs follow TRL's CPOTrainer: summed log-probs for the sigmoid and hinge
CPO losses, length-averaged log-probs for ipo and simpo.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import (
    EXP_MAX,
    MAX_COEFFICIENT,
    Interval,
    check_batch,
    check_choice,
    check_coefficient,
    check_label_smoothing,
    check_positive,
    clamp_to_finite,
)

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
# Loss types that read label_smoothing (conservative DPO's eps), and the interval each accepts.
_LABEL_SMOOTHING_RANGES = {
    "sigmoid": Interval(0.0, 0.5, high_open=True),
    "simpo": Interval(0.0, 0.5, high_open=True),
}
# AlphaPO's alpha below this in magnitude is taken as its limit alpha -> 0, r = log P. The
# two differ by a relative |alpha log P| / 2: under float32 round-off for any |log P| <= 2^40
# (float64's for |log P| <= 1e4). A smaller alpha breaks the formula: backward divides the
# gradient by alpha (overflowing float32 for alpha ~ 1e-30), and below 1e-45 alpha is 0 in
# float32 (0 / 0 = NaN).
ALPHA_ZERO = 1e-20


class CPOLossOutput(NamedTuple):
    losses: torch.Tensor
    """(B,) per-pair loss, unreduced."""
    chosen_rewards: torch.Tensor
    """(B,) beta * r(y_w), detached; r is log pi, or AlphaPO's reward when alpha != 0."""
    rejected_rewards: torch.Tensor
    """(B,) beta * r(y_l), detached."""


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
) -> CPOLossOutput:
    r"""SimPO, per pair: -(1-eps) log sig(beta m - gamma) - eps log sig(-(beta m - gamma)), m = r(y_w) - r(y_l).

    Args:
        policy_chosen_logps: (B,) log pi(y_w|x) averaged over the response tokens.
        policy_rejected_logps: (B,) the same for y_l.
        beta: in (0, 1e6], not below 1.18e-38; the reward scale (the paper uses 2.0 to 2.5).
        gamma: the target reward margin, in [-1e6, 1e6] (TRL's `simpo_gamma`; the paper uses 0.5 to 1.6).
        label_smoothing: eps in [0, 0.5), as in conservative DPO.
        alpha: AlphaPO's reward shape, in [-1e6, 1e6]; 0 (or |alpha| < 1e-20) is plain SimPO.

    Returns:
        CPOLossOutput(losses, chosen_rewards, rejected_rewards), each (B,).
    """
    r_w, r_l = _rewards(policy_chosen_logps, policy_rejected_logps, beta, alpha)
    check_label_smoothing(label_smoothing, "simpo", _LABEL_SMOOTHING_RANGES)
    check_coefficient("gamma", gamma)
    eps = label_smoothing

    z = clamp_to_finite(beta * (r_w - r_l) - gamma)  # see _rewards: huge AlphaPO rewards
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return CPOLossOutput(losses, (beta * r_w).detach(), (beta * r_l).detach())


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> CPOLossOutput:
    r"""CPO's preference term, per pair, for each of TRL's CPOTrainer loss types.

    With m = r(y_w) - r(y_l), r = log pi (or AlphaPO's reward):

    ========= ====================================================== =========================
    loss_type per-pair loss                                           paper
    ========= ====================================================== =========================
    sigmoid   -(1-eps) log sig(beta m) - eps log sig(-beta m)          CPO eq. 3
    hinge     max(0, 1 - beta m)                                       SLiC
    ipo       (m - 1/(2 beta))^2                                       IPO eq. 17
    simpo     `simpo_loss` with gamma = simpo_gamma                    SimPO eq. 6
    ========= ====================================================== =========================

    The full CPO objective adds cpo_alpha * NLL(y_w) (TRL's default cpo_alpha = 1);
    SimPO uses cpo_alpha = 0.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) log pi(y|x), summed over
            response tokens for sigmoid/hinge, averaged for ipo/simpo (as TRL does).
        beta: in (0, 1e6], not below 1.18e-38; the reward scale (the IPO regulariser tau for ipo).
        loss_type: one of CPO_LOSS_TYPES.
        label_smoothing: eps in [0, 0.5) for sigmoid and simpo; must be 0 otherwise.
        simpo_gamma: SimPO's target margin, read only by loss_type='simpo'.
        alpha: AlphaPO's reward shape, in [-1e6, 1e6]; 0 (or |alpha| < 1e-20) is log pi.

    Returns:
        CPOLossOutput(losses, chosen_rewards, rejected_rewards), each (B,).
    """
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    if loss_type == "simpo":
        return simpo_loss(
            policy_chosen_logps,
            policy_rejected_logps,
            beta=beta,
            gamma=simpo_gamma,
            label_smoothing=label_smoothing,
            alpha=alpha,
        )
    r_w, r_l = _rewards(policy_chosen_logps, policy_rejected_logps, beta, alpha)
    check_label_smoothing(label_smoothing, loss_type, _LABEL_SMOOTHING_RANGES)
    eps = label_smoothing

    m = r_w - r_l
    beta_m = clamp_to_finite(beta * m)  # see _rewards: huge AlphaPO rewards
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta_m) - eps * F.logsigmoid(-beta_m)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta_m)
    else:  # ipo
        losses = (m - 1 / (2 * beta)) ** 2
    return CPOLossOutput(losses, (beta * r_w).detach(), (beta * r_l).detach())


def _rewards(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs, beta and alpha; return r(y_w), r(y_l) in the compute dtype."""
    dtype = check_batch(policy_chosen_logps=chosen_logps, policy_rejected_logps=rejected_logps)
    check_positive("beta", beta, upper=MAX_COEFFICIENT)
    check_coefficient("alpha", alpha)
    logp_w, logp_l = chosen_logps.to(dtype), rejected_logps.to(dtype)
    if abs(alpha) < ALPHA_ZERO:
        return logp_w, logp_l
    # AlphaPO: r = (1 - P^-alpha) / alpha = -expm1(-alpha log P) / alpha, which keeps
    # its digits as log P -> 0 (where 1 - P^-alpha cancels). For alpha > 0 it falls like
    # -P^-alpha / alpha, beyond any dtype for small P: the exponent is clamped (as TRL's
    # alpha-divergence is) and the reward kept finite (inf - inf would be NaN); so is beta * m
    # in the losses (0 * inf would be). The loss is then at worst +inf, never NaN.
    # The exponent is clamped on both sides: below -EXP_MAX, expm1 is -1 to the last digit.
    cap = EXP_MAX[dtype]
    r_w = clamp_to_finite(-torch.expm1((-alpha * logp_w).clamp(-cap, cap)) / alpha)
    r_l = clamp_to_finite(-torch.expm1((-alpha * logp_l).clamp(-cap, cap)) / alpha)
    return r_w, r_l
