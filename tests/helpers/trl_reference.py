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
from types import MethodType, SimpleNamespace

import torch
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer, RLOOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer


class _Accelerator:
    """Single process: gathering is the identity."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
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


def trl_kto(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """KTOTrainer._compute_loss (TRL 1.16) on a stub model that returns these sequence log-probs.

    As for DPO, each sequence's total sits in its first completion position, so TRL's sum over
    tokens gives back the chosen value. The mismatched (KL) pairs are one token longer, which is
    how the stub model tells TRL's KL forward from the main one; TRL runs the KL forward under
    no_grad, so only the completions' and the reference's log-probs get gradients. The
    reference log-probs go in as precomputed (`precompute_ref_log_probs`), as for DPO.
    Returns TRL's loss, its logged metrics (`kl`, `rewards/chosen`, ...) and the gradients with
    respect to policy_logps and ref_logps.
    """
    pi, ref = _leaves(policy_logps, ref_logps)
    calculate_kl = loss_type != "apo_zero_unpaired"
    batch, seq_len = pi.shape[0], 3  # one prompt token, the completion, one padding position
    kl_batch = policy_kl_logps.shape[0] if calculate_kl else batch

    def per_token(totals: torch.Tensor, length: int) -> torch.Tensor:
        return torch.cat([totals.unsqueeze(1), totals.new_zeros(totals.shape[0], length - 2)], dim=1)

    def stub_model(input_ids, attention_mask, labels, fused_lm_head, use_cache=False, **_):
        assert fused_lm_head and labels.shape == input_ids.shape
        length = input_ids.shape[1]
        totals = policy_kl_logps if length == seq_len + 1 else pi  # the KL forward is one token longer
        zeros = torch.zeros(totals.shape[0], length - 1, dtype=totals.dtype)
        return SimpleNamespace(log_probs=per_token(totals, length), entropy=zeros, mean_logits=zeros)

    stub = _trainer_stub(
        beta=beta,
        loss_type=loss_type,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        calculate_KL=calculate_kl,
        precompute_ref_logps=True,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)  # TRL's own, on the stub
    ones = torch.ones(batch, seq_len, dtype=torch.long)
    inputs = {
        "input_ids": ones,
        "attention_mask": ones,
        "completion_mask": torch.tensor([[0, 1, 1]] * batch),
        "label": desirable.bool(),
        "ref_logps": ref,
    }
    if calculate_kl:
        kl_ones = torch.ones(kl_batch, seq_len + 1, dtype=torch.long)
        inputs.update(
            KL_input_ids=kl_ones,
            KL_attention_mask=kl_ones,
            KL_completion_mask=torch.tensor([[0, 1, 1, 1]] * kl_batch),
            ref_KL_logps=ref_kl_logps,
        )
    loss = KTOTrainer._compute_loss(stub, stub_model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics, _grads(loss, [pi, ref])


def trl_grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    gradient_accumulation_steps: int = 1,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor | None]]:
    """GRPOTrainer._compute_loss (TRL 1.16) with its per-token log-prob method stubbed to return `logprobs`.

    The old and reference log-probs and the advantages go in through `inputs`, as TRL's
    _generate_and_score_completions hands them over, so their gradients flow too. One process;
    `gradient_accumulation_steps` is TRL's current_gradient_accumulation_steps (and its
    steps_per_generation), by which grpo, bnpo and dr_grpo divide each micro-batch's loss.
    `num_items_in_batch` is the token count dapo and cispo divide by (default: the mask's).
    Returns TRL's loss, its logged metrics and the gradients with respect to logprobs,
    old_logprobs, advantages and ref_logprobs (None where no gradient reaches one).
    """
    lp, old, adv = _leaves(logprobs, old_logprobs, advantages)
    ref = _leaves(ref_logprobs)[0] if ref_logprobs is not None else None
    batch, length = lp.shape

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **_):
        assert logits_to_keep == length and input_ids.shape == (batch, 1 + length)
        return lp, torch.zeros_like(lp), None

    stub = _trainer_stub(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        max_completion_length=max_completion_length,
        current_gradient_accumulation_steps=gradient_accumulation_steps,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(
            use_bias_correction_kl=use_bias_correction_kl,
            delta=None,
            steps_per_generation=gradient_accumulation_steps,
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
        ),
    )
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    inputs = {
        "prompt_ids": torch.ones(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": torch.as_tensor(num_items_in_batch, dtype=lp.dtype),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics, _grads(loss, [lp, old, adv] + ([ref] if ref is not None else []))


def _scored_completions_stub(rewards: torch.Tensor, group_size: int, mask: torch.Tensor | None, **attributes):
    """A stub trainer for _generate_and_score_completions: one prompt token per completion, the
    completions as long as the mask's rows, and one reward function that returns `rewards`."""
    batch = rewards.shape[0]
    lengths = [1] * batch if mask is None else mask.sum(dim=1).tolist()
    completion_ids = [[1] * int(n) for n in lengths]
    stub = _trainer_stub(
        _calculate_rewards=lambda inputs, prompts, completions, completion_ids_list: rewards.unsqueeze(1).clone(),
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        num_generations=group_size,
        num_generations_eval=group_size,
        reward_weights=torch.ones(1, dtype=rewards.dtype),
        reward_func_names=["reward"],
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
        args=SimpleNamespace(per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                             steps_per_generation=1, gradient_accumulation_steps=1,
                             gradient_checkpointing_kwargs=None),
        **attributes,
    )
    stub.model.is_gradient_checkpointing = False
    return stub, [{"prompt": f"prompt {i // group_size}"} for i in range(batch)], completion_ids


def trl_grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale: str) -> torch.Tensor:
    """GRPOTrainer._generate_and_score_completions (TRL 1.16) on a stub whose one reward function returns
    `rewards` (NaN for an unscorable completion); the advantages it hands to the loss.

    Generation is stubbed (`_generate` returns one-token prompts and completions); beta = 0, one
    iteration per batch and no vLLM, so no model is run. TRL's advantage code runs as written.
    """
    stub, inputs, completion_ids = _scored_completions_stub(
        rewards, group_size, None,
        environment_factories=None,
        tools=[],
        environments=None,
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        beta=0.0,
        multi_objective_aggregation="sum_then_normalize",
        scale_rewards=scale,
    )
    batch = rewards.shape[0]
    stub._generate = lambda prompts: ([[1]] * batch, completion_ids, None, ["completion"] * batch, None, {}, None,
                                      [None] * batch)
    return GRPOTrainer._generate_and_score_completions(stub, inputs)["advantages"]


def trl_rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    normalize: bool = False,
    beta: float = 0.0,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """RLOOTrainer._generate_and_score_completions (TRL 1.16) on a stub, as trl_grpo_advantages.

    With beta > 0 TRL subtracts beta * sum_t (log pi_old - log pi_ref) over each completion from
    its reward: the stubbed per-token log-prob method returns `old_logprobs` for the policy and
    `ref_logprobs` for the reference model, on completions as long as the rows of `mask`.
    """
    batch = rewards.shape[0]
    stub, inputs, completion_ids = _scored_completions_stub(
        rewards, group_size, mask,
        ref_model=SimpleNamespace(name="reference"),
        beta=beta,
        reward_clip_range=None,
        normalize_advantages=normalize,
    )
    width = 1 if mask is None else mask.shape[1]
    if old_logprobs is None:
        old_logprobs = torch.zeros(batch, width, dtype=rewards.dtype)

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **_):
        assert logits_to_keep == width
        return (ref_logprobs if model is stub.ref_model else old_logprobs), None, None

    stub._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    stub._generate = lambda prompts: ([[1]] * batch, completion_ids, ["completion"] * batch)
    return RLOOTrainer._generate_and_score_completions(stub, inputs)["advantages"]


def trl_rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor | None]]:
    """RLOOTrainer._compute_loss (TRL 1.16), its per-token log-prob method stubbed to return `logprobs`.

    TRL takes the rollout's log-probs as per-sequence sums (`old_logps`, computed at generation
    as (old_per_token_logps * completion_mask).sum(1)); the sum is formed here the same way, so
    the gradient with respect to old_logprobs comes back as (B, T), TRL's per-sequence gradient on
    every response token. Returns TRL's loss, its metrics, and the gradients with respect to
    logprobs, old_logprobs and advantages.
    """
    lp, old, adv = _leaves(logprobs, old_logprobs, advantages)
    batch, length = lp.shape

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **_):
        assert logits_to_keep == length
        return lp, torch.zeros_like(lp), None

    stub = _trainer_stub(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
    )
    inputs = {
        "prompt_ids": torch.ones(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "old_logps": (old * mask.long()).sum(1),
        "advantages": adv,
    }
    loss = RLOOTrainer._compute_loss(stub, None, inputs)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return loss, metrics, _grads(loss, [lp, old, adv])
