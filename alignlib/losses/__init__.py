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

kto_loss takes unpaired examples: per-sequence log-probs (B,), a desirable label per example,
and the log-probs of mismatched pairs (or their step-wide mean, z0, from kto_kl_sum); it returns
per-example `losses` first, like the pairwise losses. group_advantages and rloo_advantages turn
(B,) rewards in groups of responses into advantages; grpo_loss and rloo_loss take (B, T) tensors
with a mask and return `loss`, the batch's sum divided by a `normalizer` (grpo_normalizer gives
a batch's share; pass a whole step's for a loss that does not depend on the split).

Nothing here touches a model or a trainer. A bad argument raises a ValueError that names it;
the checks of scalar options (beta, label_smoothing, the coefficients) are shared, in _checks.
"""

from .cpo import CPO_LOSS_TYPES, CPOLossOutput, cpo_loss, simpo_loss
from .dpo import DPO_LOSS_TYPES, F_DIVERGENCES, DPOLossOutput, dpo_loss
from .grpo import (
    ADVANTAGE_SCALES,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    GRPOLossOutput,
    RLOOLossOutput,
    group_advantages,
    grpo_loss,
    grpo_normalizer,
    rloo_advantages,
    rloo_loss,
)
from .kto import KTO_LOSS_TYPES, KLSum, KTOLossOutput, kto_kl_sum, kto_loss
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
    "ADVANTAGE_SCALES",
    "AdaptiveKLController",
    "CPOLossOutput",
    "CPO_LOSS_TYPES",
    "DPOLossOutput",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "FixedKLController",
    "GAEOutput",
    "GRPOLossOutput",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KLSum",
    "KL_ESTIMATORS",
    "KTOLossOutput",
    "KTO_LOSS_TYPES",
    "ORPOLossOutput",
    "PPOLossOutput",
    "PolicyLossOutput",
    "RLOOLossOutput",
    "RewardLossOutput",
    "ShapedRewards",
    "ValueLossOutput",
    "cpo_loss",
    "dpo_loss",
    "gae_advantages",
    "group_advantages",
    "grpo_loss",
    "grpo_normalizer",
    "kl_penalty",
    "kl_shaped_rewards",
    "kto_kl_sum",
    "kto_loss",
    "masked_mean",
    "orpo_loss",
    "penalize_missing_eos",
    "ppo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_ranking_loss",
    "rloo_advantages",
    "rloo_loss",
    "simpo_loss",
    "whiten",
]
