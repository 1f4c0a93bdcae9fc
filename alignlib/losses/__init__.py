"""Preference-alignment losses as pure functions of tensors.

The pairwise losses (dpo_loss, cpo_loss, simpo_loss, orpo_loss, reward_ranking_loss) take
per-sequence log-probs (or rewards) of shape (B,) and return a NamedTuple whose first three
fields are the unreduced per-pair `losses` and the detached `chosen_rewards` /
`rejected_rewards`: reduce `losses` yourself, usually with `.mean()`.

The PPO pieces take per-token (B, T) tensors and a response mask. ppo_policy_loss,
ppo_value_loss and ppo_loss return `loss`, already reduced: the mean over the response
tokens of the whole batch (ppo_policy_loss and ppo_value_loss also return the unreduced
`per_token_losses`). kl_penalty, kl_shaped_rewards, gae_advantages, whiten and
penalize_missing_eos compute what feeds them, per token or per sequence, unreduced;
masked_mean is the reduction; the KL controllers hold the KL coefficient.

Nothing here touches a model or a trainer. A bad argument raises a ValueError that names it;
the checks of scalar options (beta, label_smoothing, the coefficients) are shared, in _checks.
"""

from .cpo import CPO_LOSS_TYPES, CPOLossOutput, cpo_loss, simpo_loss
from .dpo import DPO_LOSS_TYPES, F_DIVERGENCES, DPOLossOutput, dpo_loss
from .orpo import ORPOLossOutput, orpo_loss
from .ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    GAEOutput,
    PolicyLossOutput,
    PPOLossOutput,
    ShapedRewards,
    ValueLossOutput,
    gae_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    penalize_missing_eos,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from .reward import RewardLossOutput, reward_ranking_loss

__all__ = [
    "AdaptiveKLController",
    "CPOLossOutput",
    "CPO_LOSS_TYPES",
    "DPOLossOutput",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "FixedKLController",
    "GAEOutput",
    "KL_ESTIMATORS",
    "ORPOLossOutput",
    "PPOLossOutput",
    "PolicyLossOutput",
    "RewardLossOutput",
    "ShapedRewards",
    "ValueLossOutput",
    "cpo_loss",
    "dpo_loss",
    "gae_advantages",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_mean",
    "orpo_loss",
    "penalize_missing_eos",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_ranking_loss",
    "simpo_loss",
    "whiten",
]
