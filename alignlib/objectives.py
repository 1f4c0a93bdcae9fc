r"""What each offline objective computes on one micro-batch: log-probs, per-pair losses, metrics.

A micro-batch holds B pairs stacked into one forward pass: rows 0..B-1 are the chosen
sequences and rows B..2B-1 the rejected ones (alignlib.data.PreferenceCollator). For every
objective but the reward model, the policy's forward gives each row's summed log-prob of its
labelled (response) tokens and their count; then

    dpo     dpo_loss(log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l))   summed log-probs
    orpo    orpo_loss(mean log pi(y_w), mean log pi(y_l))                         per-token means
    simpo   simpo_loss(mean log pi(y_w), mean log pi(y_l))                        per-token means
    cpo     cpo_loss(log pi(y_w), log pi(y_l))       summed (sigmoid, hinge), per-token means (ipo, simpo)
    reward  reward_ranking_loss(r(x, y_w), r(x, y_l))                             a score per row

`pairwise_terms` returns sums over the micro-batch's pairs (`BatchTerms`), never means, so
that the trainer can divide by the size of the whole optimizer step: micro-batches then add
up to the step exactly, whatever their sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignlib.logprobs import IGNORE_INDEX, sequence_logprobs, sequence_logprobs_from_hidden
from alignlib.losses import cpo_loss, dpo_loss, orpo_loss, reward_ranking_loss, simpo_loss
from alignlib.training import finite_or_poisoned

if TYPE_CHECKING:
    from alignlib.configs import TrainConfig

__all__ = [
    "BatchTerms",
    "PolicyOutputs",
    "nll_weight",
    "pairwise_terms",
    "reference_logps",
    "response_logps",
    "uses_average_logps",
]


@dataclass
class BatchTerms:
    """What one micro-batch contributes; sums, so micro-batches add up to the step exactly."""

    pair_loss_sum: torch.Tensor  # sum over pairs of the objective's per-pair loss
    nll_sum: torch.Tensor  # sum of -log p over chosen response tokens (0 if unused)
    chosen_tokens: int
    metric_sums: dict[str, float]  # TRL-named metrics, summed over pairs
    pairs: int
    ties: int  # pairs whose chosen and rejected rewards are exactly equal


def uses_average_logps(objective: str, cfg: TrainConfig) -> bool:
    """ORPO, SimPO and CPO's simpo/ipo types score a response by its mean token log-prob."""
    return objective in ("orpo", "simpo") or (objective == "cpo" and cfg.loss_type in ("ipo", "simpo"))


def nll_weight(objective: str, cfg: TrainConfig) -> float:
    """Weight of the chosen-response NLL in the step's loss: ORPO 1, CPO cpo_alpha, DPO rpo_alpha."""
    if objective == "orpo":
        return 1.0
    if objective == "cpo":
        return cfg.cpo_alpha
    if objective == "dpo":
        return cfg.rpo_alpha or 0.0
    return 0.0


# ----------------------------------------------------------------------------------------------
# The policy's forward
# ----------------------------------------------------------------------------------------------


def response_logps(model: torch.nn.Module, batch: dict, *, use_kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens (2B,) and their counts (2B,).

    With use_kernels the lm_head and log-softmax run fused and chunked from the last hidden
    states (alignlib.logprobs.linear_token_logprobs), so the (2B, T, V) logits never exist.
    """
    labels = batch["labels"]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    if use_kernels and _fusable(model):
        hidden = _decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weight = model.get_output_embeddings().weight
        return sequence_logprobs_from_hidden(hidden.to(weight.dtype), weight, labels), counts
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, labels), counts


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def _fusable(model: torch.nn.Module) -> bool:
    """The fused path computes plain hidden @ W^T: no final softcapping, scale or bias on the lm_head."""
    config = model.config
    head = model.get_output_embeddings()
    return (getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
            and head is not None and getattr(head, "bias", None) is None)


class PolicyOutputs(torch.nn.Module):
    """The policy's forward as the objectives consume it, as one module, so that DDP can wrap it
    whole (the fused path reaches past the model's own forward to its decoder and lm_head).

    forward(input_ids, attention_mask, labels) returns, for the reward objective, the scores
    (2B,); otherwise the summed log-probs of each row's labelled tokens (2B,) and their counts.
    """

    def __init__(self, model: torch.nn.Module, objective: str, use_kernels: bool) -> None:
        super().__init__()
        self.model, self.objective, self.use_kernels = model, objective, use_kernels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        if self.objective == "reward":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return response_logps(self.model, batch, use_kernels=self.use_kernels)


def reference_logps(reference: Any, batch: dict, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's summed log-probs of chosen (B,) and rejected (B,): precomputed ones
    carried in the batch, or a forward of `reference` (alignlib.models.ReferenceForward)."""
    if "ref_logps" in batch:  # precomputed
        ref = batch["ref_logps"]
    else:
        ref = sequence_logprobs(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return ref[:pairs], ref[pairs:]


# ----------------------------------------------------------------------------------------------
# One micro-batch
# ----------------------------------------------------------------------------------------------


def pairwise_terms(objective: str, cfg: TrainConfig, model: torch.nn.Module, batch: dict, reference: Any,
                   *, policy: torch.nn.Module | None = None) -> BatchTerms:
    """The objective's per-pair losses for one micro-batch of B pairs (rows: B chosen, then B rejected),
    summed, with the NLL of the chosen tokens and TRL's metrics.

    `policy`: the PolicyOutputs of `model` to run (e.g. wrapped in DDP); by default a plain one.
    `reference`: DPO's reference (a ReferenceForward), unless the batch carries `ref_logps`.
    """
    pairs = batch["input_ids"].shape[0] // 2
    policy = policy if policy is not None else PolicyOutputs(model, objective, cfg.use_kernels)
    if objective == "reward":
        return _reward_terms(cfg, policy, batch, pairs)

    logps_sum, counts = policy(batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps_sum, poison = finite_or_poisoned(logps_sum)
    logps = logps_sum / counts.clamp(min=1) if uses_average_logps(objective, cfg) else logps_sum
    chosen, rejected = logps[:pairs], logps[pairs:]
    if objective == "dpo":
        ref_chosen, ref_rejected = reference_logps(reference, batch, pairs)
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=cfg.loss_type,
                       label_smoothing=cfg.label_smoothing, chosen_lengths=counts[:pairs],
                       rejected_lengths=counts[pairs:], f_divergence_type=cfg.f_divergence_type)
    elif objective == "orpo":
        out = orpo_loss(chosen, rejected, beta=cfg.beta)
    elif objective == "simpo":
        out = simpo_loss(chosen, rejected, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing)
    else:
        out = cpo_loss(chosen, rejected, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                       simpo_gamma=cfg.simpo_gamma)

    metrics = {
        "rewards/chosen": out.chosen_rewards.sum().item(),
        "rewards/rejected": out.rejected_rewards.sum().item(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum().item(),
        "logps/chosen": chosen.detach().sum().item(),
        "logps/rejected": rejected.detach().sum().item(),
    }
    if objective == "orpo":
        metrics["log_odds_ratio"] = out.log_odds_ratio.sum().item()
        metrics["log_odds_chosen"] = out.log_odds_chosen.sum().item()
    nll_sum = -logps_sum[:pairs].sum()
    chosen_tokens = int(counts[:pairs].sum())
    return BatchTerms(out.losses.sum() + poison, nll_sum, chosen_tokens, metrics, pairs, _ties(out))


def _reward_terms(cfg: TrainConfig, policy: torch.nn.Module, batch: dict, pairs: int) -> BatchTerms:
    """The reward model's ranking loss: one score per row, chosen against rejected."""
    scores = policy(batch["input_ids"], batch["attention_mask"])
    scores = scores if scores.dtype == torch.float64 else scores.float()  # bf16/fp16 scores upcast
    scores, poison = finite_or_poisoned(scores)
    out = reward_ranking_loss(scores[:pairs], scores[pairs:], margin=batch.get("margin"),
                              center_rewards_coefficient=cfg.center_rewards_coefficient)
    metrics = {
        "accuracy": (out.chosen_rewards > out.rejected_rewards).float().sum().item(),
        "margin": (out.chosen_rewards - out.rejected_rewards).sum().item(),
        "mean_reward": ((out.chosen_rewards + out.rejected_rewards) / 2).sum().item(),
    }
    return BatchTerms(out.losses.sum() + poison, scores.new_zeros(()), 0, metrics, pairs, _ties(out))


def _ties(out) -> int:
    return int((out.chosen_rewards == out.rejected_rewards).sum())
