r"""What each objective of the online loop computes: advantages from a scored rollout, and the loss of
one micro-batch. The loop (alignlib.rl) is the same for all three; this module holds where they differ.

| | PPO | GRPO | RLOO |
|---|---|---|---|
| completions per prompt | 1 | num_generations | num_generations |
| value head | yes | no | no |
| KL to the reference | per token, in the reward (kl_coef, adaptive) | per token, in the loss (beta) | per sequence, in the reward (beta) |
| advantages | GAE over the value head, whitened | `group_advantages` | `rloo_advantages` |
| optimizer steps per rollout | ppo_epochs x (shuffled minibatches of mini_batch_size) | num_iterations | num_iterations |
| loss | `ppo_loss` (clipped policy and value losses) | `grpo_loss` (loss_type) | `rloo_loss` |

Every loss is a sum over the optimizer step's rows divided by the step's normaliser (PPO: its
response tokens; GRPO: `grpo_normalizer` of its rows; RLOO: its rows), counted over every
micro-batch and rank, so the micro-batch losses of all ranks add up to the step's loss and
their gradients, summed over ranks, to its gradient, however the step is split. Statistics
are kept the same way (`Averages`: sums and counts, reduced over ranks).

The math is alignlib.losses' (PPO validated against classic TRL, GRPO and RLOO against TRL
1.16); this module only applies it to a rollout batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from alignlib.configs import GRPOConfig, OnlineConfig, PPOConfig, RLOOConfig
from alignlib.distributed import Processes, sum_across
from alignlib.losses import (
    AdaptiveKLController,
    FixedKLController,
    PPOLossOutput,
    gae_advantages,
    group_advantages,
    grpo_loss,
    grpo_normalizer,
    kl_shaped_rewards,
    masked_mean,
    penalize_missing_eos,
    ppo_loss,
    rloo_advantages,
    rloo_loss,
    whiten,
)

__all__ = ["Averages", "GRPOObjective", "OnlineObjective", "PPOObjective", "PPOTargets", "RLOOObjective",
           "compute_targets", "make_objective", "masked_var", "ppo_minibatch_loss"]


class Averages:
    """Means kept as sums and counts, so that micro-batches and ranks combine exactly."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, mean: torch.Tensor | float, count: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(mean) * count
        self.counts[name] = self.counts.get(name, 0.0) + count

    def means(self, processes: Processes) -> dict[str, float]:
        """The means over every rank's sums (every rank must call this)."""
        summed = sum_across({**{f"t/{k}": v for k, v in self.totals.items()},
                             **{f"c/{k}": v for k, v in self.counts.items()}}, processes)
        names = sorted({key[2:] for key in summed})
        return {name: summed[f"t/{name}"] / summed[f"c/{name}"] for name in names if summed.get(f"c/{name}", 0) > 0}


class Forward(NamedTuple):
    """The policy's outputs on a micro-batch's rows (alignlib.rollout.policy_forward), padding zeroed."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


class OnlineObjective:
    """What the loop asks of an objective (see the module docstring); PPOObjective, GRPOObjective,
    RLOOObjective fill it in."""

    name = "online"
    value_head = False  # the policy carries a value head (PPO)

    def __init__(self, config: OnlineConfig) -> None:
        self.config = config

    @property
    def uses_reference(self) -> bool:
        """Reference log-probs are computed (the KL term)."""
        return self.config.beta > 0

    @property
    def uses_old_logprobs(self) -> bool:
        """The sampling policy's log-probs are computed before the update (else: the first pass's, detached)."""
        return self.config.num_iterations > 1

    @property
    def passes(self) -> int:
        return self.config.num_iterations

    @property
    def micro_batch_size(self) -> int:
        return self.config.per_device_train_batch_size

    def drops_unscorable(self) -> bool:
        """Whether unscorable completions leave the batch (PPO) or stay with advantage 0 (GRPO, RLOO)."""
        return False

    def optimizer_steps(self, n_rows: int, step: int, epoch: int, world_size: int) -> list[list[int]]:
        """The rows (over every rank) of each optimizer step of pass `epoch`: the whole batch."""
        return [list(range(n_rows))]

    def trained_rows(self, rollout: Any) -> torch.Tensor:
        """(B,) bool: the rows the loss trains on (mask_truncated_completions leaves out the cut-off ones)."""
        if self.config.mask_truncated_completions:
            return rollout.contains_eos.clone()
        return torch.ones_like(rollout.contains_eos)

    def batch_stats(self, rewards: torch.Tensor, per_function: torch.Tensor, names: list[str],
                    rollout: Any) -> dict[str, float]:
        """TRL's metrics of a scored rollout batch (rewards, completion lengths)."""
        return {**group_reward_stats(rewards, per_function, names, self.config.group_size),
                **completion_stats(rollout)}

    def step_stats(self, targets: Any, rows: list[int], mask: torch.Tensor) -> dict[str, float]:
        """Stats of an optimizer step's rows that are not means over micro-batches (PPO's variances)."""
        return {}

    def stop_early(self, stats: dict[str, float]) -> bool:
        """Whether to skip the step's remaining updates after one with these stats (PPO's target_kl)."""
        return False

    def update_metrics(self, loss: float, grad_norm: float) -> dict[str, float]:
        """The metrics of one applied optimizer step besides its Averages (TRL's loss and grad_norm)."""
        return {"loss": loss, "grad_norm": grad_norm}

    def update_summary(self, collected: list[dict[str, float]], passes: int, early_stopped: bool,
                       updates: int) -> dict[str, float]:
        """The step's update metrics: each averaged over the optimizer steps that were applied."""
        return _average(collected)

    def after_step(self, stats: dict[str, float], n_rows: int) -> None:
        """Anything the objective updates once per step (PPO: the KL controller)."""


def _average(collected: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for stats in collected for name in stats})
    return {name: sum(s[name] for s in collected if name in s) / sum(name in s for s in collected) for name in names}


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------


class PPOTargets(NamedTuple):
    """What one rollout batch trains towards; every field (B, T) over response tokens, 0 on padding."""

    rewards: torch.Tensor
    """-kl_coef KL_t, plus the score at the last response token (whitened if whiten_rewards)."""
    kl: torch.Tensor
    """The per-token KL estimate (config.kl_estimator)."""
    non_score_rewards: torch.Tensor
    """-kl_coef KL_t."""
    advantages: torch.Tensor
    """GAE advantages, whitened over the batch."""
    returns: torch.Tensor
    """R_t = A_t + V_t (A before whitening): the value targets."""
    values: torch.Tensor
    """V(s_t) at rollout time, 0 on padding."""


def compute_targets(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    config: PPOConfig,
) -> PPOTargets:
    """KL-shaped rewards, GAE and whitening for one rollout batch (classic TRL's compute_rewards
    followed by compute_advantages).

    Args:
        scores: (B,) final scores (after penalty, baseline, clip).
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under the rollout policy
            and the reference.
        values: (B, T) V(s_t) at rollout time.
        mask: (B, T) True on response tokens.
        kl_coef: the controller's current value.
        config: kl_estimator, whiten_rewards, gamma, lam.
    """
    mask = mask.bool()
    shaped = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=config.kl_estimator)
    rewards = whiten(shaped.rewards, mask, shift_mean=False) if config.whiten_rewards else shaped.rewards
    gae = gae_advantages(rewards, values, mask, gamma=config.gamma, lam=config.lam)
    return PPOTargets(
        rewards=rewards,
        kl=shaped.kl,
        non_score_rewards=shaped.non_score_rewards,
        advantages=whiten(gae.advantages, mask),
        returns=gae.returns,
        values=torch.where(mask, values, 0.0),
    )


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the True entries of mask (as TRL's masked_var)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def ppo_minibatch_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    old_logprobs: torch.Tensor,
    targets: PPOTargets,
    mask: torch.Tensor,
    *,
    config: PPOConfig,
    entropy: torch.Tensor | None = None,
) -> tuple[PPOLossOutput, dict[str, torch.Tensor]]:
    """The loss to backpropagate for one minibatch, and classic TRL's per-minibatch stats.

    Args:
        logprobs: (b, T) log-probs of the rollout tokens under the policy being trained (grad).
        values: (b, T) V(s_t) from the value head being trained (grad).
        old_logprobs: (b, T) the rollout policy's log-probs.
        targets: the minibatch's rows of compute_targets' result.
        mask: (b, T) True on response tokens.
        config: cliprange, cliprange_value, vf_coef, entropy_coef.
        entropy: (b, T) the policy's per-token entropy (with grad when entropy_coef > 0), or None.

    Returns (out, stats): stats under classic TRL's names without the "ppo/" prefix
    (loss/policy, policy/approxkl, val/clipfrac, returns/mean, ...), detached.
    """
    mask = mask.bool()
    out = ppo_loss(
        logprobs, old_logprobs, targets.advantages, values, targets.values, targets.returns, mask,
        cliprange=config.cliprange, cliprange_value=config.cliprange_value, vf_coef=config.vf_coef,
        entropy=entropy, entropy_coef=config.entropy_coef,
    )
    stats = {
        "loss/policy": out.policy_loss,
        "loss/value": out.value_loss,
        "loss/total": out.loss,
        "policy/approxkl": out.approx_kl,
        "policy/policykl": out.policy_kl,
        "policy/clipfrac": out.policy_clipfrac,
        "policy/advantages_mean": masked_mean(targets.advantages, mask),
        "returns/mean": masked_mean(targets.returns, mask),
        "returns/var": masked_var(targets.returns, mask),
        "val/vpred": masked_mean(values, mask),
        "val/error": masked_mean((values - targets.returns) ** 2, mask),
        "val/clipfrac": out.value_clipfrac,
        "val/mean": masked_mean(targets.values, mask),
        "val/var": masked_var(targets.values, mask),
    }
    if out.entropy is not None:
        stats["policy/entropy"] = out.entropy
    return out, {name: value.detach() for name, value in stats.items()}


_WHOLE_MINIBATCH_STATS = ("returns/var", "val/var")  # not means over tokens: computed on the whole minibatch


class PPOObjective(OnlineObjective):
    """PPO with a KL penalty in the reward and a value head (classic TRL's PPOTrainer)."""

    name = "ppo"
    value_head = True

    def __init__(self, config: PPOConfig) -> None:
        super().__init__(config)
        self.kl_controller = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
                              if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))

    uses_reference = True
    uses_old_logprobs = True

    @property
    def passes(self) -> int:
        return self.config.ppo_epochs

    @property
    def micro_batch_size(self) -> int:
        return self.config.mini_batch_size

    def drops_unscorable(self) -> bool:
        return True

    def trained_rows(self, rollout: Any) -> torch.Tensor:
        return torch.ones_like(rollout.contains_eos)

    def batch_stats(self, rewards: torch.Tensor, per_function: torch.Tensor, names: list[str],
                    rollout: Any) -> dict[str, float]:
        return {}  # classic TRL's env/* and tokens/* come with the targets

    def scores(self, rewards: torch.Tensor, rollout: Any) -> torch.Tensor:
        """The missing-EOS penalty, the baseline and the clip, in that order."""
        cfg = self.config
        scores = penalize_missing_eos(rewards, rollout.contains_eos, cfg.missing_eos_penalty) - cfg.reward_baseline
        return scores.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip is not None else scores

    def targets(self, rewards: torch.Tensor, rollout: Any, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                values: torch.Tensor) -> tuple[PPOTargets, dict[str, float]]:
        scores = self.scores(rewards, rollout)
        targets = compute_targets(scores, old_logprobs, ref_logprobs, values, rollout.response_mask,
                                  kl_coef=self.kl_controller.value, config=self.config)
        mask = rollout.response_mask
        stats = {
            "objective/kl": targets.kl.sum(dim=1).mean().item(),
            "objective/kl_coef": self.kl_controller.value,
            "objective/entropy": torch.where(mask, -old_logprobs, 0.0).sum(dim=1).mean().item(),
            "env/reward_mean": rewards.mean().item(),
            "env/reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "ppo/mean_scores": scores.mean().item(),
            "ppo/mean_non_score_reward": targets.non_score_rewards.sum(dim=1).mean().item(),
            "tokens/queries_len_mean": rollout.query_mask.sum(dim=1).float().mean().item(),
            "tokens/responses_len_mean": mask.sum(dim=1).float().mean().item(),
            "tokens/responses_with_eos": rollout.contains_eos.float().mean().item(),
        }
        return targets, stats

    def optimizer_steps(self, n_rows: int, step: int, epoch: int, world_size: int) -> list[list[int]]:
        """Shuffled minibatches of mini_batch_size rows per rank (the order seeded by seed, step and epoch)."""
        generator = torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) * 101 + epoch)
        order = torch.randperm(n_rows, generator=generator).tolist()
        size = self.config.mini_batch_size * world_size
        return [order[start: start + size] for start in range(0, n_rows, size)]

    def normalizer(self, mask: torch.Tensor) -> float:
        """An optimizer step's response tokens (mask: its rows over every rank)."""
        return float(mask.sum())

    def loss(self, forward: Forward, rows: torch.Tensor, old_logprobs: torch.Tensor, targets: PPOTargets,
             mask: torch.Tensor, normalizer: float, averages: Averages) -> torch.Tensor:
        """This micro-batch's share of the minibatch's PPO loss: its token mean times its share of the tokens."""
        out, stats = ppo_minibatch_loss(forward.logprobs, forward.values, old_logprobs[rows],
                                        PPOTargets(*(t[rows] for t in targets)), mask, config=self.config,
                                        entropy=forward.entropy)
        tokens = float(mask.sum())
        for name, value in stats.items():
            if name not in _WHOLE_MINIBATCH_STATS:
                averages.add(f"ppo/{name}", value, tokens)
        return out.loss * (tokens / normalizer)

    def step_stats(self, targets: PPOTargets, rows: list[int], mask: torch.Tensor) -> dict[str, float]:
        """The stats of a whole minibatch that are not token means (computed once, on every rank alike)."""
        rows_mask = mask[rows]
        return {"ppo/returns/var": masked_var(targets.returns[rows], rows_mask).item(),
                "ppo/val/var": masked_var(targets.values[rows], rows_mask).item()}

    def stop_early(self, update_stats: dict[str, float]) -> bool:
        """target_kl: stop the step's updates once the approx-KL to the rollout policy exceeds 1.5 x target_kl."""
        target = self.config.target_kl
        return target is not None and update_stats.get("ppo/policy/approxkl", 0.0) > 1.5 * target

    def update_metrics(self, loss: float, grad_norm: float) -> dict[str, float]:
        return {"ppo/grad_norm": grad_norm} if self.config.max_grad_norm is not None else {}

    def update_summary(self, collected: list[dict[str, float]], passes: int, early_stopped: bool,
                       updates: int) -> dict[str, float]:
        return {**_average(collected), "ppo/epochs": passes, "ppo/early_stopped": float(early_stopped),
                "ppo/minibatch_updates": updates}

    def after_step(self, stats: dict[str, float], n_rows: int) -> None:
        self.kl_controller.update(stats["objective/kl"], n_rows)


# ----------------------------------------------------------------------------------------------
# GRPO and RLOO
# ----------------------------------------------------------------------------------------------


def group_reward_stats(rewards: torch.Tensor, per_function: torch.Tensor, names: list[str],
                       group_size: int) -> dict[str, float]:
    """TRL's reward metrics of a batch: reward, reward_std, rewards/NAME/mean and /std (NaN, i.e.
    unscorable or not applicable, left out), frac_reward_zero_std (groups whose rewards all agree)."""
    stats: dict[str, float] = {}
    for i, name in enumerate(names):
        column = per_function[:, i]
        stats[f"rewards/{name}/mean"] = _nanmean(column)
        stats[f"rewards/{name}/std"] = _nanstd(column)
    stats["reward"], stats["reward_std"] = _nanmean(rewards), _nanstd(rewards)
    groups = rewards.view(-1, group_size)
    zero_std = [float(_nanstd(group) < 1e-8) if (~group.isnan()).sum() > 1 else 1.0 for group in groups]
    stats["frac_reward_zero_std"] = sum(zero_std) / len(zero_std)
    stats["completions/unscorable_ratio"] = rewards.isnan().float().mean().item()
    return stats


def completion_stats(rollout: Any) -> dict[str, float]:
    """TRL's completions/* metrics: lengths (all, and of those that ended with EOS), the share cut off."""
    lengths = rollout.response_mask.sum(dim=1).float()
    ended = lengths[rollout.contains_eos]
    stats = {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
             "completions/max_length": lengths.max().item(),
             "completions/clipped_ratio": (~rollout.contains_eos).float().mean().item()}
    if ended.numel():
        stats.update({"completions/mean_terminated_length": ended.mean().item(),
                      "completions/min_terminated_length": ended.min().item(),
                      "completions/max_terminated_length": ended.max().item()})
    return stats


def _nanmean(x: torch.Tensor) -> float:
    kept = x[~x.isnan()]
    return kept.mean().item() if kept.numel() else float("nan")


def _nanstd(x: torch.Tensor) -> float:
    kept = x[~x.isnan()]
    return kept.std().item() if kept.numel() > 1 else 0.0


class GroupTargets(NamedTuple):
    advantages: torch.Tensor
    """(B,) one advantage per completion."""
    ref_logprobs: torch.Tensor | None
    """(B, T) the reference's log-probs (GRPO with beta > 0), else None."""


class GRPOObjective(OnlineObjective):
    """GRPO: group-standardised advantages, a clipped update with the KL to the reference in the loss."""

    name = "grpo"

    def targets(self, rewards: torch.Tensor, rollout: Any, old_logprobs: torch.Tensor | None,
                ref_logprobs: torch.Tensor | None, values: Any) -> tuple[GroupTargets, dict[str, float]]:
        advantages = group_advantages(rewards, self.config.num_generations, self.config.scale_rewards)
        return GroupTargets(advantages, ref_logprobs), {}

    def normalizer(self, mask: torch.Tensor) -> float:
        """grpo_normalizer of the optimizer step's rows (over every rank; rows left out of the loss count
        as rows with no tokens)."""
        return float(grpo_normalizer(mask, self.config.loss_type, self.config.max_completion_length))

    def loss(self, forward: Forward, rows: torch.Tensor, old_logprobs: torch.Tensor | None, targets: GroupTargets,
             mask: torch.Tensor, normalizer: float, averages: Averages) -> torch.Tensor:
        cfg = self.config
        old = forward.logprobs.detach() if old_logprobs is None else old_logprobs[rows]
        ref = targets.ref_logprobs[rows] if targets.ref_logprobs is not None else None
        out = grpo_loss(forward.logprobs, old, targets.advantages[rows], mask, ref_logprobs=ref, beta=cfg.beta,
                        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                        importance_sampling_level=cfg.importance_sampling_level,
                        max_completion_length=cfg.max_completion_length, normalizer=normalizer,
                        use_bias_correction_kl=cfg.use_bias_correction_kl,
                        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg)
        tokens = float(mask.sum())
        count = float(mask.shape[0]) if cfg.importance_sampling_level == "sequence" else tokens
        _add_common(averages, out.clip_low, out.clip_high, count, forward, mask)
        if cfg.loss_type == "cispo":
            averages.add("cispo_clip_ratio", out.clip_high.detach(), count)
        if out.kl is not None:
            averages.add("kl", out.kl, tokens)
        return out.loss


class RLOOObjective(OnlineObjective):
    """RLOO: leave-one-out baselines, the sequence KL to the reference in the reward, a clipped
    sequence-level update (TRL 1.16's RLOOTrainer)."""

    name = "rloo"

    @property
    def uses_old_logprobs(self) -> bool:
        return self.config.num_iterations > 1 or self.config.beta > 0  # the KL in the reward reads them

    def targets(self, rewards: torch.Tensor, rollout: Any, old_logprobs: torch.Tensor | None,
                ref_logprobs: torch.Tensor | None, values: Any) -> tuple[GroupTargets, dict[str, float]]:
        cfg, stats = self.config, {}
        if cfg.beta > 0:  # r_i - beta * sum_t (log pi_old - log pi_ref), k1 as in TRL's RLOO
            mask = rollout.response_mask
            per_token_kl = torch.where(mask, old_logprobs - ref_logprobs, 0.0)
            rewards = rewards - cfg.beta * per_token_kl.sum(dim=1)
            stats["kl"] = (per_token_kl.sum() / mask.sum().clamp(min=1)).item()
        advantages = rloo_advantages(rewards, cfg.num_generations, normalize=cfg.normalize_advantages)
        return GroupTargets(advantages, None), stats

    def normalizer(self, mask: torch.Tensor) -> float:
        return float(mask.shape[0])

    def loss(self, forward: Forward, rows: torch.Tensor, old_logprobs: torch.Tensor | None, targets: GroupTargets,
             mask: torch.Tensor, normalizer: float, averages: Averages) -> torch.Tensor:
        cfg = self.config
        old = forward.logprobs.detach() if old_logprobs is None else old_logprobs[rows]
        out = rloo_loss(forward.logprobs, old, targets.advantages[rows], mask, epsilon_low=cfg.epsilon,
                        epsilon_high=cfg.epsilon_high, normalizer=normalizer)
        _add_common(averages, out.clip_low, out.clip_high, float(mask.shape[0]), forward, mask)
        return out.loss


def _add_common(averages: Averages, clip_low: torch.Tensor, clip_high: torch.Tensor,
                count: float, forward: Forward, mask: torch.Tensor) -> None:
    """TRL's per-update metrics shared by GRPO and RLOO."""
    averages.add("clip_ratio/low_mean", clip_low.detach(), count)
    averages.add("clip_ratio/high_mean", clip_high.detach(), count)
    averages.add("clip_ratio/region_mean", (clip_low + clip_high).detach(), count)
    if forward.entropy is not None:
        averages.add("entropy", masked_mean(forward.entropy, mask), float(mask.sum()))


OBJECTIVE_CLASSES = {"ppo": PPOObjective, "grpo": GRPOObjective, "rloo": RLOOObjective}
CONFIG_TYPES = {"ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}


def make_objective(config: OnlineConfig) -> OnlineObjective:
    """The objective of a config (PPOConfig, GRPOConfig, RLOOConfig)."""
    for name, config_type in CONFIG_TYPES.items():
        if type(config) is config_type:
            return OBJECTIVE_CLASSES[name](config)
    raise ValueError(f"no online objective takes a {type(config).__name__}; give a PPOConfig, GRPOConfig or "
                     "RLOOConfig")
