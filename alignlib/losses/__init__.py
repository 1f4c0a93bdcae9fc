"""Preference-alignment losses as pure functions of tensors.

Each function takes per-sequence (or, for PPO, per-token) log-probs and returns a
NamedTuple whose first fields are the unreduced `losses` and the detached
`chosen_rewards` / `rejected_rewards`. Nothing here touches a model or a trainer.
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
