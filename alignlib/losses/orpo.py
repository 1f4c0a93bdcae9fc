r"""ORPO: Monolithic Preference Optimization without Reference Model.

Hong, Lee and Thorne, 2024, https://arxiv.org/abs/2403.07691.

ORPO adds an odds-ratio penalty to the ordinary supervised loss on the chosen
response, with no reference model. The odds of a response are
odds(y|x) = P(y|x) / (1 - P(y|x)), where P is the *length-averaged* likelihood
exp(mean_t log p(y_t | x, y_<t)). The loss (paper eqs. 6-7) is

    L_ORPO = L_SFT + lambda * L_OR
    L_OR   = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )

and, with l = log P, log odds = l - log(1 - e^l). This module computes
beta * L_OR per pair (TRL calls lambda `beta`); the SFT term is the caller's,
because it needs logits, not log-probs. Two conventions exist for it:

* prompt tokens masked, the NLL over the chosen response only (the paper's
  L_SFT, and alignlib's trainer default);
* prompt tokens included, the NLL over the whole chosen prompt + response, as
  TRL's ORPOTrainer computes it (labels are the input ids wherever the
  attention mask is 1).

Either way it is a token-level mean cross-entropy over the chosen sequences::

    nll = F.cross_entropy(chosen_logits[:, :-1].flatten(0, 1), chosen_labels[:, 1:].flatten(),
                          ignore_index=-100)
    loss = nll + orpo_loss(avg_chosen_logps, avg_rejected_logps, beta=0.1).losses.mean()

where chosen_labels is -100 on the prompt (paper) or only on padding (TRL).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import MAX_COEFFICIENT, check_batch, check_positive

# log P at or above this is treated as this value: at P = 1 the odds are infinite.
# A length-averaged log-prob that close to 0 means P = 1 to float32's precision.
MAX_LOGP = -1e-12


class ORPOLossOutput(NamedTuple):
    losses: torch.Tensor
    """(B,) beta * L_OR = -beta * log sigmoid(log odds ratio), to be minimised."""
    chosen_rewards: torch.Tensor
    """(B,) beta * avg log P(y_w|x), detached (TRL's logged reward)."""
    rejected_rewards: torch.Tensor
    """(B,) beta * avg log P(y_l|x), detached."""
    log_odds_ratio: torch.Tensor
    """(B,) log sigmoid(log odds(y_w) - log odds(y_l)), detached; TRL logs its mean as `log_odds_ratio`."""
    log_odds_chosen: torch.Tensor
    """(B,) log odds(y_w) - log odds(y_l), detached; TRL logs its mean as `log_odds_chosen`."""


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler, 2012).

    Near 0, 1 - e^x cancels, so use log(-expm1(x)); far below 0, e^x is tiny and
    log1p(-e^x) keeps its digits. The switch point is x = -log 2. Unlike a plain
    torch.where over both formulas, the gradient stays finite up to x = -1e-12.
    """
    far = x < -math.log(2)
    # Each branch only sees inputs where it is finite: torch.where would otherwise
    # send 0 * inf = NaN back through the unused branch's gradient.
    x_far = torch.where(far, x, -1.0)
    x_near = torch.where(far, -0.5, x)
    return torch.where(far, torch.log1p(-torch.exp(x_far)), torch.log(-torch.expm1(x_near)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> ORPOLossOutput:
    r"""ORPO's odds-ratio term, per pair: -beta * log sigmoid(log odds(y_w|x) - log odds(y_l|x)).

    Args:
        policy_chosen_logps: (B,) mean per-token log-prob of the chosen response,
            log P(y_w|x) averaged over its tokens (ORPO uses averages, not sums).
        policy_rejected_logps: (B,) the same for the rejected response.
        beta: in (0, 1e6], not below 1.18e-38; the weight lambda of the odds-ratio term against the NLL.

    Inputs must lie in [-2^40, 0] (2^40 = 1.1e12; else ValueError); values in (-1e-12, 0]
    are read as -1e-12 (P = 1 has infinite odds). Over that whole range, and for beta in
    [1e-6, 1e6], the result and its gradients are finite, in float32 and float64.

    Returns:
        ORPOLossOutput(losses, chosen_rewards, rejected_rewards, log_odds_ratio,
        log_odds_chosen), each (B,), computed in float32 (float64 for float64 input).
        Add the SFT term yourself (see the module docstring).
    """
    dtype = check_batch(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_positive("beta", beta, upper=MAX_COEFFICIENT)
    for name, logps in (("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)):
        if bool((logps > 0).any()):
            raise ValueError(f"{name} must be log-probabilities (<= 0); got values up to {logps.max().item()}")

    logp_w = policy_chosen_logps.to(dtype).clamp(max=MAX_LOGP)
    logp_l = policy_rejected_logps.to(dtype).clamp(max=MAX_LOGP)

    # log odds(y) = log P - log(1 - P)
    log_odds_w = logp_w - log1mexp(logp_w)
    log_odds_l = logp_l - log1mexp(logp_l)
    log_odds = log_odds_w - log_odds_l
    ratio = F.logsigmoid(log_odds)
    losses = -beta * ratio

    return ORPOLossOutput(
        losses,
        (beta * policy_chosen_logps.to(dtype)).detach(),
        (beta * policy_rejected_logps.to(dtype)).detach(),
        ratio.detach(),
        log_odds.detach(),
    )
