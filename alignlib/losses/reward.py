r"""The pairwise reward-model loss (Bradley-Terry ranking).

A reward model r_phi(x, y) -> scalar is trained so that the chosen response
outscores the rejected one, with P(y_w > y_l) = sigmoid(r_w - r_l) (Bradley and
Terry, 1952; InstructGPT, Ouyang et al., 2022, eq. 1):

    L = -log sigmoid(r_w - r_l - m)  +  c * (r_w + r_l)^2

* m, the margin: Llama 2 (Touvron et al., 2023, eq. 2) asks for a larger gap on
  pairs the annotators rated as clearly separated; a margin column per pair.
* c, the centering coefficient: Eisenstein et al., 2023 (https://arxiv.org/abs/2312.09244)
  pull the rewards towards zero mean, since the ranking loss alone leaves the
  offset free. TRL's `center_rewards_coefficient` (they suggest 0.01).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import MAX_COEFFICIENT, check_batch, check_finite, check_positive


class RewardLossOutput(NamedTuple):
    losses: torch.Tensor
    """(B,) per-pair loss, unreduced; its mean equals TRL's RewardTrainer loss."""
    chosen_rewards: torch.Tensor
    """(B,) r_w, detached."""
    rejected_rewards: torch.Tensor
    """(B,) r_l, detached."""


def reward_ranking_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> RewardLossOutput:
    r"""Bradley-Terry ranking loss per pair: -log sig(r_w - r_l - m) + c (r_w + r_l)^2.

    Args:
        chosen_rewards: (B,) the reward model's scalar output for (x, y_w).
        rejected_rewards: (B,) the same for (x, y_l).
        margin: (B,) tensor or a number, the required gap m; None means 0.
        center_rewards_coefficient: c in [0, 1e6], 0 or not below 1.18e-38; None means no
            centering term.

    Returns:
        RewardLossOutput(losses, chosen_rewards, rejected_rewards), each (B,),
        in float32 (float64 for float64 input). Finite, with finite gradients, for
        rewards and margins within +-2^40 = 1.1e12 (beyond: ValueError) and c <= 1e6.
    """
    dtype = check_batch(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    r_w, r_l = chosen_rewards.to(dtype), rejected_rewards.to(dtype)

    m = 0.0
    if margin is not None:
        m = torch.as_tensor(margin, dtype=dtype, device=r_w.device)
        if m.dim() != 0 and m.shape != r_w.shape:
            raise ValueError(
                f"margin must be a number or have shape {tuple(r_w.shape)} like the rewards, got {tuple(m.shape)}"
            )
        check_finite("margin", m)
    c = center_rewards_coefficient
    if c is not None:
        check_positive("center_rewards_coefficient", c, allow_zero=True, upper=MAX_COEFFICIENT)

    losses = -F.logsigmoid(r_w - r_l - m)
    if c is not None:
        losses = losses + c * (r_w + r_l) ** 2

    return RewardLossOutput(losses, r_w.detach(), r_l.detach())
