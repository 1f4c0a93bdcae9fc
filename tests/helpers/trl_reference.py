"""Run TRL's own loss code on inputs we choose.

TRL keeps its losses inside trainer methods. Building a real trainer needs a
model, a tokenizer and a dataset, yet the methods only read a handful of
attributes from `self` and a few outputs from the model. So each function here
calls the unbound TRL method with a stub `self` (a SimpleNamespace holding just
those attributes) and, where the method runs a model, a stub model that returns
the log-probs or rewards we want it to see. Nothing of TRL's arithmetic is
restated here: what comes back is what TRL computed.

Every function returns TRL's reduced loss, its logged metrics (or, for ORPO and CPO,
its per-pair outputs), and the gradient of that loss with respect to each input.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import DPOTrainer, RewardTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer


class _Accelerator:
    """Single process: gathering is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def unwrap_model(model):
        return model


def _trainer_stub(**attributes) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        **attributes,
    )


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


def trl_dpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """DPOTrainer._compute_loss (TRL 1.16) on a stub model that returns these sequence log-probs.

    The stub model's per-token log-probs put each sequence's total in its first
    completion position, so TRL's sum over tokens gives back exactly the value we
    chose. The reference log-probs go in as precomputed (TRL's
    `precompute_ref_logps` path), which lets their gradients flow too. The
    completion mask carries the response lengths that ipo and sigmoid_norm read.
    """
    pi_w, pi_l, ref_w, ref_l = _leaves(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    batch = pi_w.shape[0]
    if chosen_lengths is None:
        chosen_lengths = torch.ones(batch, dtype=torch.long)
    if rejected_lengths is None:
        rejected_lengths = torch.ones(batch, dtype=torch.long)
    lengths = torch.cat([chosen_lengths, rejected_lengths]).long()
    seq_len = int(lengths.max()) + 2
    positions = torch.arange(seq_len).expand(2 * batch, seq_len)
    completion_mask = (positions >= 1) & (positions < 1 + lengths.unsqueeze(1))  # one prompt token first

    def stub_model(input_ids, attention_mask, labels, fused_lm_head, use_cache=False, **_):
        assert fused_lm_head and labels.shape == input_ids.shape
        totals = torch.cat([pi_w, pi_l])
        per_token = torch.cat([totals.unsqueeze(1), totals.new_zeros(2 * batch, seq_len - 2)], dim=1)
        zeros = torch.zeros(2 * batch, seq_len - 1, dtype=totals.dtype)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    stub = _trainer_stub(
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.ones(2 * batch, seq_len, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, seq_len, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": ref_w,
        "ref_rejected_logps": ref_l,
    }
    loss = DPOTrainer._compute_loss(stub, stub_model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics, _grads(loss, [pi_w, pi_l, ref_w, ref_l])


def trl_orpo(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """ORPOTrainer.odds_ratio_loss (trl.experimental, 1.16).

    TRL returns beta * log sigmoid(log odds), which its trainer *subtracts*
    from the NLL; the returned loss here is -mean(that), the quantity minimised.
    Note TRL upcasts with `.float()`, so its arithmetic is float32 even for
    float64 inputs.
    """
    pi_w, pi_l = _leaves(policy_chosen_logps, policy_rejected_logps)
    stub = _trainer_stub(beta=beta)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        stub, pi_w, pi_l
    )
    loss = -losses.mean()
    outputs = {
        "losses": -losses.detach(),
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "log_odds_ratio": log_odds_ratio.detach(),
        "log_odds_chosen": log_odds_chosen.detach(),
    }
    return loss, outputs, _grads(loss, [pi_w, pi_l])


def trl_cpo(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """CPOTrainer.cpo_loss (trl.experimental, 1.16): the preference term, without the NLL."""
    pi_w, pi_l = _leaves(policy_chosen_logps, policy_rejected_logps)
    stub = _trainer_stub(
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, alpha=alpha
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, pi_w, pi_l)
    loss = losses.mean()
    outputs = {"losses": losses.detach(), "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    return loss, outputs, _grads(loss, [pi_w, pi_l])


def trl_reward(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """RewardTrainer.compute_loss (TRL 1.16) with a stub model whose scalar outputs are these rewards."""
    r_w, r_l = _leaves(chosen_rewards, rejected_rewards)
    batch = r_w.shape[0]

    def stub_model(**_):
        return SimpleNamespace(logits=torch.cat([r_w, r_l]).unsqueeze(-1))

    stub = _trainer_stub(args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    inputs = {
        "input_ids": torch.ones(2 * batch, 3, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, 3, dtype=torch.long),
    }
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(stub, stub_model, inputs)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics, _grads(loss, [r_w, r_l])
