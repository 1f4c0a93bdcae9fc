r"""What each offline objective computes on one micro-batch: log-probs, per-example losses, metrics.

Pairwise objectives: a micro-batch holds B pairs stacked into one forward pass, rows 0..B-1 the
chosen sequences and rows B..2B-1 the rejected ones (alignlib.data.PreferenceCollator). For
every objective but the reward model, the policy's forward gives each row's summed log-prob of
its labelled (response) tokens and their count; then

    dpo     dpo_loss(log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l))   summed log-probs
    orpo    orpo_loss(mean log pi(y_w), mean log pi(y_l))                         per-token means
    simpo   simpo_loss(mean log pi(y_w), mean log pi(y_l))                        per-token means
    cpo     cpo_loss(log pi(y_w), log pi(y_l))       summed (sigmoid, hinge), per-token means (ipo, simpo)
    reward  reward_ranking_loss(r(x, y_w), r(x, y_l))                             a score per row

KTO: a micro-batch holds B unpaired rows, each desirable or not (alignlib.data.UnpairedCollator),
and the step's reference point z0 comes first (`kto_kl`, over mismatched prompt/completion
pairs of the whole step, summed over micro-batches and ranks):

    kto     kto_loss(log pi(y), log pi_ref(y), desirable, kl=z0)                    summed log-probs

SFT: a micro-batch holds B sequences (or B packed rows of them; alignlib.data.SequenceCollator);
its loss is the NLL of the trained tokens, a mean over the whole step's trained tokens:

    sft     -sum log pi(y_t) / N_tokens                                             token-weighted

`micro_batch_terms` returns sums over the micro-batch's examples (`BatchTerms`), never means,
so that the trainer can divide by the size of the whole optimizer step: micro-batches then add
up to the step exactly, whatever their sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from alignlib.logprobs import IGNORE_INDEX, sequence_logprobs, sequence_logprobs_from_hidden
from alignlib.losses import (
    KLSum,
    cpo_loss,
    dpo_loss,
    kto_kl_sum,
    kto_loss,
    orpo_loss,
    reward_ranking_loss,
    simpo_loss,
)
from alignlib.models import decoder_of, lm_head_fusable, vocabulary_size
from alignlib.training import finite_or_poisoned

if TYPE_CHECKING:
    from alignlib.configs import TrainConfig

__all__ = [
    "DATA_KINDS",
    "DEFAULT_LOSS_TYPES",
    "BatchTerms",
    "PolicyOutputs",
    "check_packing_isolated",
    "kto_kl",
    "loss_type_for",
    "metric_means",
    "micro_batch_terms",
    "nll_tokens",
    "nll_weight",
    "pairwise_terms",
    "reference_logps",
    "response_logps",
    "sft_terms",
    "uses_average_logps",
]

DATA_KINDS = {"dpo": "pairs", "orpo": "pairs", "simpo": "pairs", "cpo": "pairs", "reward": "pairs", "kto": "unpaired",
              "sft": "sequences"}
"""What one example of each objective is: a preference pair, one unpaired row (desirable or not),
or one sequence (SFT; a packed row of several when packing)."""
DEFAULT_LOSS_TYPES = {"dpo": "sigmoid", "cpo": "sigmoid", "kto": "kto"}
"""loss_type when none is given, for the objectives that have one (TRL's defaults)."""


@dataclass
class BatchTerms:
    """What one micro-batch contributes; sums, so micro-batches add up to the step exactly."""

    loss_sum: torch.Tensor  # sum over examples of the objective's per-example loss
    nll_sum: torch.Tensor  # sum of -log p over the NLL's tokens (chosen responses; 0 if unused)
    nll_tokens: int  # how many tokens nll_sum covers
    metric_sums: dict[str, float]  # TRL-named metrics, summed over examples
    examples: int  # pairs, or unpaired rows
    ties: int  # pairs whose chosen and rejected rewards are exactly equal (0 for unpaired rows)


def loss_type_for(objective: str, cfg: TrainConfig) -> str | None:
    """cfg.loss_type, or the objective's default (DEFAULT_LOSS_TYPES) when none was given."""
    return cfg.loss_type or DEFAULT_LOSS_TYPES.get(objective)


def uses_average_logps(objective: str, cfg: TrainConfig) -> bool:
    """ORPO, SimPO and CPO's simpo/ipo types score a response by its mean token log-prob."""
    return objective in ("orpo", "simpo") or (objective == "cpo" and loss_type_for(objective, cfg) in ("ipo", "simpo"))


def nll_weight(objective: str, cfg: TrainConfig) -> float:
    """Weight of the NLL (of the chosen responses; SFT: of every trained token) in the step's loss:
    SFT and ORPO 1, CPO cpo_alpha, DPO rpo_alpha."""
    if objective in ("orpo", "sft"):
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
    A packed batch (with position_ids) runs without an attention mask, so that transformers
    builds one that keeps its sequences apart (alignlib.data.packing).
    """
    labels = batch["labels"]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    inputs = _model_inputs(batch)
    if use_kernels and lm_head_fusable(model):
        hidden = decoder_of(model)(**inputs).last_hidden_state
        weight = model.get_output_embeddings().weight
        return sequence_logprobs_from_hidden(hidden.to(weight.dtype), weight, labels), counts
    logits = model(**inputs).logits
    return sequence_logprobs(logits, labels), counts


def _model_inputs(batch: dict) -> dict:
    """The forward's arguments: ids and the attention mask, or for packed rows ids and position ids."""
    if batch.get("position_ids") is not None:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class PolicyOutputs(torch.nn.Module):
    """The policy's forward as the objectives consume it, as one module, so that DDP can wrap it
    whole (the fused path reaches past the model's own forward to its decoder and lm_head).

    forward(input_ids, attention_mask, labels) returns, for the reward objective, the scores
    (2B,); otherwise the summed log-probs of each row's labelled tokens (2B,) and their counts.
    """

    def __init__(self, model: torch.nn.Module, objective: str, use_kernels: bool) -> None:
        super().__init__()
        self.model, self.objective, self.use_kernels = model, objective, use_kernels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        if self.objective == "reward":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "position_ids": position_ids}
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


def micro_batch_terms(objective: str, cfg: TrainConfig, model: torch.nn.Module, batch: dict, reference: Any, *,
                      policy: torch.nn.Module | None = None, z0: float | None = None) -> BatchTerms:
    """The objective's summed per-example losses, NLL and metrics for one micro-batch.

    `policy`: the PolicyOutputs of `model` to run (e.g. wrapped in DDP); by default a plain one.
    `reference`: the reference policy (a ReferenceForward) of dpo and kto, unless the batch
    carries precomputed `ref_logps`. `z0`: KTO's reference point for the step (`kto_kl`).
    """
    policy = policy if policy is not None else PolicyOutputs(model, objective, cfg.use_kernels)
    if objective == "kto":
        return kto_terms(cfg, policy, batch, reference, z0)
    if objective == "sft":
        return sft_terms(policy, batch)
    return pairwise_terms(objective, cfg, model, batch, reference, policy=policy)


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
        out = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, loss_type=loss_type_for(objective, cfg),
                       label_smoothing=cfg.label_smoothing, chosen_lengths=counts[:pairs],
                       rejected_lengths=counts[pairs:], f_divergence_type=cfg.f_divergence_type)
    elif objective == "orpo":
        out = orpo_loss(chosen, rejected, beta=cfg.beta)
    elif objective == "simpo":
        out = simpo_loss(chosen, rejected, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing)
    else:
        out = cpo_loss(chosen, rejected, beta=cfg.beta, loss_type=loss_type_for(objective, cfg),
                       label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)

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


# ----------------------------------------------------------------------------------------------
# KTO: unpaired rows, and the step's reference point
# ----------------------------------------------------------------------------------------------


def kto_kl(policy: torch.nn.Module, reference: Any, kl_batch: dict) -> KLSum:
    """The sum and count of log pi - log pi_ref over one micro-batch of mismatched pairs (no grad):
    the trainer adds them up over the step's micro-batches and ranks, and z0 = max(0, total / count)."""
    with torch.no_grad():
        policy_logps, _ = policy(kl_batch["input_ids"], kl_batch["attention_mask"], kl_batch["labels"])
        ref_logps = sequence_logprobs(reference(kl_batch["input_ids"], kl_batch["attention_mask"]), kl_batch["labels"])
    return kto_kl_sum(policy_logps, ref_logps)


def kto_terms(cfg: TrainConfig, policy: torch.nn.Module, batch: dict, reference: Any, z0: float | None) -> BatchTerms:
    """KTO's per-example losses over B unpaired rows, for the step's z0, with TRL's metrics as sums
    (rewards and log-probs of the desirable rows and of the others, and their counts)."""
    logps, _ = policy(batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps, poison = finite_or_poisoned(logps)
    if "ref_logps" in batch:  # precomputed
        ref = batch["ref_logps"]
    else:
        ref = sequence_logprobs(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    desirable = batch["desirable"].to(logps.device)
    kl = None if loss_type_for("kto", cfg) == "apo_zero_unpaired" else (z0 or 0.0)
    out = kto_loss(logps, ref, desirable, kl=kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                   undesirable_weight=cfg.undesirable_weight, loss_type=loss_type_for("kto", cfg))
    rows = desirable.shape[0]
    metrics = {
        "rewards/chosen": out.chosen_rewards.sum().item(),
        "rewards/rejected": out.rejected_rewards.sum().item(),
        "logps/chosen": logps.detach()[desirable].sum().item(),
        "logps/rejected": logps.detach()[~desirable].sum().item(),
        "count/chosen": float(desirable.sum()),
        "count/rejected": float((~desirable).sum()),
        "kl": float(out.kl) * rows,  # the step's z0, as a sum over rows (its mean is z0)
    }
    return BatchTerms(out.losses.sum() + poison, logps.new_zeros(()), 0, metrics, rows, 0)


# ----------------------------------------------------------------------------------------------
# SFT: the NLL of the trained tokens
# ----------------------------------------------------------------------------------------------


def sft_terms(policy: torch.nn.Module, batch: dict) -> BatchTerms:
    """B sequences (or packed rows): the summed NLL of their trained tokens and its token count; the
    trainer divides by the whole step's count. No per-example loss (loss_sum is 0)."""
    logps, counts = policy(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("position_ids"))
    rows = batch["input_ids"].shape[0]  # a NaN log-prob makes the NLL NaN: the step's guard sees it
    return BatchTerms(logps.new_zeros(()), -logps.sum(), int(counts.sum()), {}, rows, 0)


def check_packing_isolated(model: torch.nn.Module, device: torch.device | None = None) -> None:
    """Raise ValueError unless the model keeps packed sequences apart: the logits of a sequence packed
    after another (position ids restarting, no attention mask) must equal those of it alone.

    transformers' attention implementations that build their mask from the position ids (eager,
    sdpa, flex, flash_attention_2) pass; one that ignores them lets each sequence read the one
    before it, and packing would then train on text that crosses a sequence boundary.
    """
    vocab = vocabulary_size(model)
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator).to(device) for n in (5, 4))
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
            alone = model(input_ids=second, attention_mask=torch.ones_like(second), use_cache=False).logits
    finally:
        model.train(was_training)
    packed, alone = packed[0, 5:].float(), alone[0].float()
    scale = alone.abs().max().clamp(min=1e-6)
    if not torch.allclose(packed, alone, atol=1e-2 * float(scale), rtol=0):
        implementation = getattr(model.config, "_attn_implementation", None)
        raise ValueError(
            f"packing: this model's attention ({implementation!r}) lets a packed sequence attend to the one before "
            f"it (logits differ by {float((packed - alone).abs().max()):.3g} from the sequence alone); use "
            "attn_implementation sdpa, eager or flash_attention_2, or train without packing")


def nll_tokens(objective: str, batch: dict) -> int:
    """The tokens the objective's NLL term covers in a micro-batch: the chosen responses' of a pair
    batch (its first half); every trained token of SFT sequences; none for unpaired rows."""
    labels = batch["labels"]
    if DATA_KINDS[objective] == "sequences":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    if DATA_KINDS[objective] != "pairs":
        return 0
    return int((labels[: labels.shape[0] // 2, 1:] != IGNORE_INDEX).sum())


def metric_means(objective: str, sums: dict[str, float], examples: float) -> dict[str, float]:
    """The logged means of summed metrics: per example, except KTO's chosen/rejected metrics,
    which average over the desirable (or undesirable) rows, as TRL's KTOTrainer logs them."""
    if objective != "kto":
        return {key: value / examples for key, value in sums.items()}
    sums = dict(sums)
    counts = {"chosen": sums.pop("count/chosen", 0.0), "rejected": sums.pop("count/rejected", 0.0)}
    means = {}
    for key, value in sums.items():
        side = key.rsplit("/", 1)[-1]
        if side in counts:
            if counts[side]:
                means[key] = value / counts[side]
        else:
            means[key] = value / examples
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means
