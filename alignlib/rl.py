r"""RLHF with PPO and a KL penalty: rollout, score, KL-shaped rewards, GAE, the clipped update.

One PPO step (`train_ppo` runs `max_steps` of them):

1. Rollout: `per_device_train_batch_size` prompts, left-padded, sampled from the policy with
   `generate` (temperature, top_k, top_p, up to `response_length` new tokens, stopping at EOS).
   Tokens after the first EOS are padding; the EOS itself belongs to the response.
2. Score: a reward model (a sequence classifier, read at its last token) or a Python callable
   `reward(prompts, responses) -> scores`; then the missing-EOS penalty, the baseline, the clip.
3. Without grad: the rollout policy's log-probs, the reference's (the same model with its LoRA
   adapter disabled, or a frozen copy in full fine-tuning), and V(s_t) from a value head (one
   nn.Linear on the policy's last hidden state, trained with it).
4. `compute_targets`: r_t = -kl_coef KL_t (+ the score at the last response token), GAE
   advantages (whitened) and returns.
5. `ppo_epochs` passes over shuffled minibatches of `mini_batch_size` rows: `ppo_minibatch_loss`
   (clipped policy loss, clipped value loss, optional entropy bonus), gradient clipping, one
   optimizer step each; stop early once the approx-KL to the rollout policy exceeds
   1.5 x target_kl.
6. The KL controller (adaptive or fixed) updates kl_coef from the batch's mean sequence KL.

All the math is alignlib.losses' (validated against classic TRL's PPOTrainer); this module
only orchestrates. Optimizer, scheduler, checkpoints, metrics and progress come from
alignlib.training. Dropout stays off throughout (the model is kept in eval mode), so the
rollout log-probs and the first minibatch's log-probs come from the same function.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from alignlib.logprobs import IGNORE_INDEX, token_logprobs
from alignlib.losses import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    PPOLossOutput,
    gae_advantages,
    kl_shaped_rewards,
    masked_mean,
    penalize_missing_eos,
    ppo_loss,
    whiten,
)
from alignlib.models import ModelConfig, load_causal_lm, load_tokenizer, make_reference, save_model
from alignlib.training import (
    MetricsLogger,
    Progress,
    SeededSampler,
    find_latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    set_seed,
)

__all__ = [
    "DEMO_OVERRIDES",
    "DEMO_LORA_LEARNING_RATE",
    "PPOConfig",
    "PPOTargets",
    "PolicyWithValueHead",
    "RewardFunction",
    "RewardModelScorer",
    "Rollout",
    "call_reward_function",
    "compute_targets",
    "demo_config",
    "demo_reward",
    "embedded_default",
    "entropy_from_logits",
    "generate_rollout",
    "load_reward_function",
    "policy_forward",
    "ppo_minibatch_loss",
    "ppo_update",
    "reference_logprobs",
    "train_ppo",
]

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]
"""`reward(prompts, responses) -> one number per response` (a list, numpy array or tensor)."""

CLASSIC_ESTIMATOR_NAMES = {"kl": "k1"}  # classic TRL's kl_penalty="kl" is the k1 estimate


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    """Settings of a PPO run. Names follow TRL's PPOConfig (classic 0.11 and the later one).
    The objective's and the KL controller's defaults are classic TRL's (learning_rate, cliprange,
    cliprange_value, vf_coef, gamma, lam, init_kl_coef, target, horizon, ppo_epochs); the batch
    sizes are smaller (classic: 256 rollouts, minibatches of 128), and gradients are clipped at 1."""

    # --- where from, where to
    output_dir: str = field(default="ppo-output", metadata={"help": "Checkpoints, metrics.jsonl and the final "
                                                                   "model (output_dir/final) go here."})
    dataset: str | None = field(default=None, metadata={"help": "Prompts: a file, datasets directory or Hub name "
                                                                "read by alignlib.data.load_prompt_dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out prompts for the before/after "
                                                                     "evaluation (default: the first training "
                                                                     "prompts)."})
    eval_split: str = field(default="train", metadata={"help": "Split of `eval_dataset`."})
    num_eval_prompts: int = field(default=128, metadata={"help": "Prompts evaluated before and after training."})
    reward_model: str | None = field(default=None, metadata={"help": "A sequence-classification reward model "
                                                                     "(full model or SEQ_CLS LoRA adapter dir), "
                                                                     "e.g. from `alignlib train reward`."})
    reward: str | None = field(default=None, metadata={"help": "A reward function 'module:function' or "
                                                               "'path/file.py:function', called as "
                                                               "fn(prompts, responses) -> scores."})
    seed: int = field(default=0, metadata={"help": "Seed of the whole run (sampling, shuffling, init)."})

    # --- optimisation
    max_steps: int = field(default=100, metadata={"help": "PPO steps (one rollout batch and its update each)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Prompts per rollout batch (classic "
                                                                           "TRL's batch_size)."})
    mini_batch_size: int = field(default=16, metadata={"help": "Rollout rows per optimizer step."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "AdamW learning rate."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (alignlib.training.OPTIMIZER_NAMES)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name, "
                                                                          "stepped once per PPO step."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up PPO steps of the scheduler."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (None: no clip)."})

    # --- PPO objective
    cliprange: float = field(default=0.2, metadata={"help": "eps of the clipped policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "How far V may move from its rollout value."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus (0: none)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Rescale the per-token rewards to unit "
                                                                  "variance before GAE."})
    target_kl: float | None = field(default=None, metadata={"help": "Stop a step's PPO epochs once the "
                                                                    "approx-KL to the rollout policy exceeds "
                                                                    "1.5 x target_kl (None: never)."})

    # --- KL penalty to the reference
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial (or fixed) KL coefficient."})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adapt kl_coef towards `target`."})
    target: float = field(default=6.0, metadata={"help": "Target sequence KL of the adaptive controller."})
    horizon: float = field(default=10000, metadata={"help": "Horizon (in samples) of the adaptive controller."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimate in the reward.",
                                                      "choices": [*KL_ESTIMATORS, "kl"]})

    # --- rollout
    response_length: int = field(default=32, metadata={"help": "max_new_tokens of each rollout."})
    min_response_length: int | None = field(default=None, metadata={"help": "Response-length sampler: each "
                                                                            "rollout batch draws its max_new_tokens "
                                                                            "uniformly in [min_response_length, "
                                                                            "response_length]."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0: off)."})

    # --- scores
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                                                              "response cut off without EOS."})
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every score."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-reward_clip, "
                                                                      "reward_clip] (classic TRL's score_clip)."})

    # --- bookkeeping
    logging_steps: int = field(default=1, metadata={"help": "Write metrics.jsonl every N steps."})
    save_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (None: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'true' (the latest checkpoint in "
                                                                               "output_dir) or a checkpoint path."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    demo_defaults: bool = field(default=True, metadata={"help": "In the embedded default (no model given), "
                                                                "fields still at their class default take the "
                                                                "demo's tuned values (alignlib.rl.DEMO_OVERRIDES)."})

    def __post_init__(self) -> None:
        self.kl_estimator = CLASSIC_ESTIMATOR_NAMES.get(self.kl_estimator, self.kl_estimator)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)} (or 'kl'), "
                             f"got {self.kl_estimator!r}")
        for name in ("max_steps", "per_device_train_batch_size", "mini_batch_size", "ppo_epochs",
                     "response_length", "logging_steps", "num_eval_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.mini_batch_size > self.per_device_train_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) cannot exceed per_device_train_batch_size "
                             f"({self.per_device_train_batch_size})")
        positive = ("learning_rate", "cliprange", "cliprange_value", "target", "horizon", "temperature")
        for name in positive:
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        non_negative = ("vf_coef", "entropy_coef", "init_kl_coef", "weight_decay")
        for name in non_negative:
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("max_grad_norm", "target_kl", "reward_clip"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
        if self.missing_eos_penalty is not None and (not _is_number(self.missing_eos_penalty)
                                                     or self.missing_eos_penalty < 0):
            raise ValueError(f"missing_eos_penalty must be None or a finite number >= 0, "
                             f"got {self.missing_eos_penalty!r}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma!r}, lam={self.lam!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k!r}")
        if self.min_response_length is not None and not 1 <= self.min_response_length <= self.response_length:
            raise ValueError(f"min_response_length must lie in [1, response_length={self.response_length}], "
                             f"got {self.min_response_length!r}")
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"save_steps must be None or >= 1, got {self.save_steps!r}")
        if self.reward_model is not None and self.reward is not None:
            raise ValueError("give reward_model or reward, not both")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# The update math: rollout tensors -> rewards, advantages, returns -> losses and stats
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


# ----------------------------------------------------------------------------------------------
# Models: policy with a value head, reward
# ----------------------------------------------------------------------------------------------


class PolicyWithValueHead(torch.nn.Module):
    """A causal LM (or its peft wrapper) and a value head V(s) = w^T h + b on its last hidden state.

    One module, so that checkpoints (alignlib.training) hold the adapter (or all weights) and the
    value head together. The head is float32 and starts at zero (V = 0 everywhere).
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits (B, L, V) and values (B, L), float32."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits, values


def load_reward_function(spec: str) -> RewardFunction:
    """The callable named by 'package.module:function' or 'path/to/file.py:function'."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward must look like 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {function_name!r}")
    return function


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def call_reward_function(fn: RewardFunction, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """fn(prompts, responses) as a (B,) float32 tensor; a wrong length, a non-number or a NaN is
    a ValueError naming fn."""
    name = _function_name(fn)
    raw = fn(prompts, responses)
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().tolist()
    elif isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"reward function {name} must return one number per response (a list of "
                         f"{len(responses)}), got {type(raw).__name__}")
    if len(raw) != len(responses):
        raise ValueError(f"reward function {name} returned {len(raw)} scores for {len(responses)} responses")
    bad = [(i, v) for i, v in enumerate(raw) if not isinstance(v, numbers.Real) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"reward function {name} returned non-numbers, e.g. at {bad[0][0]}: {bad[0][1]!r}")
    scores = torch.tensor([float(v) for v in raw], dtype=torch.float32)
    if not bool(torch.isfinite(scores).all()):
        where = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"reward function {name} returned non-finite scores (NaN or inf) at {where}")
    return scores


class RewardModelScorer:
    """A sequence-classification reward model as a reward: prompt + response (+ EOS when the
    policy emitted it) tokenized with the reward model's tokenizer, right-padded, scored by the
    classifier at its last non-pad token (the pooling it was trained with)."""

    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification

        adapter_config = Path(path) / "adapter_config.json"
        if adapter_config.is_file():
            from peft import PeftConfig, PeftModel

            base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
            tokenizer_path = path if (Path(path) / "tokenizer.json").is_file() else base_path
        else:
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"reward_model {path} is not a model or adapter directory")
            model = AutoModelForSequenceClassification.from_pretrained(path)
            tokenizer_path = path
        self.tokenizer = load_tokenizer(tokenizer_path, padding_side="right")
        if model.config.num_labels != 1:
            raise ValueError(f"reward_model {path} has {model.config.num_labels} labels; a reward model has 1")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], contains_eos: torch.Tensor) -> torch.Tensor:
        tok = self.tokenizer
        rows = []
        for prompt, response, eos in zip(prompts, responses, contains_eos.tolist(), strict=True):
            ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
            rows.append(ids + ([tok.eos_token_id] if eos and tok.eos_token_id is not None else []))
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        return logits[:, 0].float().cpu()


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """One rollout batch. Queries are left-padded (B, P), responses right-padded (B, T)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    """(B, T) sampled tokens; the pad id after the first EOS."""
    response_mask: torch.Tensor
    """(B, T) bool, True up to and including the first EOS."""
    contains_eos: torch.Tensor
    """(B,) bool, whether the response ended with EOS (False: cut off at max_new_tokens)."""


def _encode_prompts(tokenizer: Any, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def generate_rollout(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, temperature: float,
                     top_k: int, top_p: float, device: torch.device) -> Rollout:
    """Sample one response per prompt (global torch RNG); mask everything after the first EOS."""
    from transformers import GenerationConfig

    query_ids, query_mask = _encode_prompts(tokenizer, prompts, device)
    generation_config = GenerationConfig(
        do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    output = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config)
    response_ids = output[:, query_ids.shape[1]:]
    is_eos = response_ids == tokenizer.eos_token_id
    contains_eos = is_eos.any(dim=1)
    positions = torch.arange(response_ids.shape[1], device=device)
    first_eos = torch.where(is_eos, positions, response_ids.shape[1]).min(dim=1).values
    response_mask = positions[None, :] <= first_eos[:, None]
    response_ids = torch.where(response_mask, response_ids, tokenizer.pad_token_id)
    return Rollout(query_ids, query_mask, response_ids, response_mask, contains_eos)


def _full_sequence(rollout: Rollout, rows: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask and position_ids (positions count real tokens only) of query + response."""
    input_ids = torch.cat([rollout.query_ids[rows], rollout.response_ids[rows]], dim=1)
    attention_mask = torch.cat([rollout.query_mask[rows], rollout.response_mask[rows].long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _response_labels(rollout: Rollout, rows: torch.Tensor | slice) -> torch.Tensor:
    return torch.where(rollout.response_mask[rows], rollout.response_ids[rows], IGNORE_INDEX)


def _response_slice(tensor: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Positions P-1 .. P+T-2 of a (B, P+T, ...) output: the ones that predict the response tokens."""
    start = rollout.query_ids.shape[1] - 1
    return tensor[:, start: start + rollout.response_ids.shape[1]]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...) entropy of softmax(logits)."""
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


def policy_forward(model: PolicyWithValueHead, rollout: Rollout, rows: torch.Tensor | slice, temperature: float,
                   *, entropy: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log pi(response tokens) (b, T), V(s_t) (b, T) and the entropy (b, T) for `rows` of the rollout.

    entropy: None (not computed), "detached" (for the stats) or "grad" (for an entropy bonus).
    """
    input_ids, attention_mask, position_ids = _full_sequence(rollout, rows)
    logits, values = model(input_ids, attention_mask, position_ids)
    logits = _response_slice(logits, rollout).float() / temperature
    logprobs = token_logprobs(logits, _response_labels(rollout, rows))
    per_token_entropy = None
    if entropy is not None:
        per_token_entropy = entropy_from_logits(logits if entropy == "grad" else logits.detach())
    return logprobs, _response_slice(values, rollout), per_token_entropy


@torch.no_grad()
def reference_logprobs(reference: Callable, rollout: Rollout, rows: torch.Tensor | slice,
                       temperature: float) -> torch.Tensor:
    input_ids, attention_mask, position_ids = _full_sequence(rollout, rows)
    logits = reference(input_ids, attention_mask, position_ids=position_ids)
    logits = _response_slice(logits, rollout).float() / temperature
    return token_logprobs(logits, _response_labels(rollout, rows))


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# The embedded default
# ----------------------------------------------------------------------------------------------

# PPO settings of the embedded default, measured on 2 CPU cores (docs/rlhf.md): full fine-tuning of
# the ~1M-parameter demo model with a frozen reference copy learns faster and stays more coherent
# than LoRA on it. With use_peft the demo's learning rate is DEMO_LORA_LEARNING_RATE instead.
DEMO_OVERRIDES: dict[str, Any] = {
    "max_steps": 40,
    "per_device_train_batch_size": 64,
    "mini_batch_size": 16,
    "ppo_epochs": 2,
    "learning_rate": 1e-4,
    "response_length": 24,
    "init_kl_coef": 0.1,
    "target": 3.0,
    "horizon": 1000,
    "missing_eos_penalty": 1.0,
}
DEMO_LORA_LEARNING_RATE = 5e-4


def demo_config(**overrides: Any) -> PPOConfig:
    """A PPOConfig with the embedded default's settings (DEMO_OVERRIDES), then `overrides`
    (kept as given, even where they equal a class default: demo_defaults is False)."""
    return PPOConfig(**{**DEMO_OVERRIDES, "demo_defaults": False, **overrides})


def demo_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The embedded default's reward: 1.0 for a helpful answer (alignlib.demo.is_helpful), else 0.0."""
    from alignlib.demo import is_helpful

    return [1.0 if is_helpful(response) else 0.0 for response in responses]


def _demo_prompts(path: Path) -> list[str]:
    from alignlib.demo import read_pairs

    return [row["prompt"] for row in read_pairs(path) if "colour" not in row["prompt"]]


def embedded_default(config: PPOConfig, model_config: ModelConfig) -> tuple[PPOConfig, ModelConfig]:
    """The embedded default's model and settings, for a run given no model.

    The model becomes the demo base model (alignlib.demo.prepare_base_model, built once into
    output_dir/base-model; full fine-tuning unless model_config.use_peft). With
    config.demo_defaults, every PPOConfig field still at its class default takes the demo's
    value (DEMO_OVERRIDES; a field set explicitly to its class default is replaced too: build
    the config with demo_config(), or set demo_defaults False, to keep it). Prompts and reward
    are filled in by train_ppo.
    """
    from alignlib.demo import prepare_base_model

    demo_values = dict(DEMO_OVERRIDES)
    if model_config.use_peft:
        demo_values["learning_rate"] = DEMO_LORA_LEARNING_RATE
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    overrides = {k: v for k, v in demo_values.items() if config.demo_defaults and getattr(config, k) == defaults[k]}
    config = dataclasses.replace(config, **overrides)
    base = prepare_base_model(Path(config.output_dir) / "base-model")
    model_config = dataclasses.replace(model_config, model_name_or_path=str(base))
    shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"alignlib ppo: embedded default: model {base} ({'LoRA' if model_config.use_peft else 'full fine-tuning'})"
          f"{', settings ' + shown if shown else ''}")
    return config, model_config


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def _as_prompt_list(prompts: Any, what: str) -> list[str]:
    if prompts is None:
        raise ValueError(f"no {what} given")
    if hasattr(prompts, "column_names"):  # a datasets.Dataset
        if "prompt" not in prompts.column_names:
            raise ValueError(f"{what}: the dataset has no 'prompt' column (columns {prompts.column_names})")
        prompts = prompts["prompt"]
    if isinstance(prompts, str):
        raise ValueError(f"{what} must be a list of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what} is empty: PPO needs at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{what}: entries {bad[:5]} are not non-empty strings (e.g. {prompts[bad[0]]!r})")
    return prompts


def _check_prompt_lengths(tokenizer: Any, prompts: list[str], model: Any, response_length: int, what: str) -> None:
    limit_total = getattr(model.config, "max_position_embeddings", None)
    if limit_total is None:
        return
    limit = limit_total - response_length
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"{what}: {len(too_long)} prompt(s) are too long for the context: prompt {i} has {lengths[i]} tokens, "
            f"but max_position_embeddings ({limit_total}) - response_length ({response_length}) leaves {limit}"
        )


def _load_prompts(source: str, split: str, tokenizer: Any) -> list[str]:
    from alignlib.data import load_prompt_dataset

    return list(load_prompt_dataset(source, split=split, tokenizer=tokenizer)["prompt"])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything a PPO step touches."""

    config: PPOConfig
    model: PolicyWithValueHead
    tokenizer: Any
    reference: Any
    reward: Callable[[list[str], list[str], torch.Tensor], torch.Tensor]
    device: torch.device

    def generate(self, prompts: list[str], max_new_tokens: int, *, use_reference: bool = False) -> Rollout:
        cfg = self.config
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                  "top_p": cfg.top_p, "device": self.device}
        if not use_reference:
            return generate_rollout(self.model.policy, self.tokenizer, prompts, **kwargs)
        if self.reference.disable_adapter:
            with self.model.policy.disable_adapter():
                return generate_rollout(self.model.policy, self.tokenizer, prompts, **kwargs)
        return generate_rollout(self.reference.model, self.tokenizer, prompts, **kwargs)

    def decode(self, rollout: Rollout) -> list[str]:
        return self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)

    def scores(self, prompts: list[str], rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw scores, final scores) (B,) float32 on the device."""
        raw = self.reward(prompts, self.decode(rollout), rollout.contains_eos.cpu()).to(self.device)
        cfg = self.config
        scores = penalize_missing_eos(raw, rollout.contains_eos, cfg.missing_eos_penalty) - cfg.reward_baseline
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return raw, scores

    @torch.no_grad()
    def old_logprobs_values(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        logprobs, values, ref_logprobs = [], [], []
        for rows in _chunks(rollout.query_ids.shape[0], cfg.mini_batch_size):
            lp, v, _ = policy_forward(self.model, rollout, rows, cfg.temperature)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(reference_logprobs(self.reference, rollout, rows, cfg.temperature))
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

    @torch.no_grad()
    def evaluate(self, prompts: list[str], *, use_reference: bool, seed: int) -> dict[str, float]:
        """Mean reward of sampled answers to `prompts`, and their mean sequence KL (k1) to the
        reference. Runs on its own RNG stream, so training is unaffected."""
        cfg = self.config
        rewards, kls = [], []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for rows in _chunks(len(prompts), max(cfg.per_device_train_batch_size, 64)):
                batch = prompts[rows]
                rollout = self.generate(batch, cfg.response_length, use_reference=use_reference)
                raw, _ = self.scores(batch, rollout)
                rewards.append(raw)
                if use_reference:
                    kls.append(torch.zeros_like(raw))
                    continue
                logprobs, _, _ = policy_forward(self.model, rollout, slice(None), cfg.temperature)
                ref = reference_logprobs(self.reference, rollout, slice(None), cfg.temperature)
                kls.append(torch.where(rollout.response_mask, logprobs - ref, 0.0).sum(dim=1))
        return {"reward_mean": torch.cat(rewards).mean().item(), "kl": torch.cat(kls).mean().item()}


def _reward_callable(config: PPOConfig, reward_fn: RewardFunction | None, device: torch.device,
                     demo: bool) -> Callable[[list[str], list[str], torch.Tensor], torch.Tensor]:
    if reward_fn is not None and (config.reward or config.reward_model):
        raise ValueError("a reward_fn was passed and config names a reward too: give one")
    if config.reward_model is not None:
        return RewardModelScorer(config.reward_model, device)
    if reward_fn is None and config.reward is not None:
        reward_fn = load_reward_function(config.reward)
    if reward_fn is None:
        if not demo:
            raise ValueError("no reward: give reward_model (a sequence classifier) or reward ('module:function')")
        reward_fn = demo_reward
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
    return lambda prompts, responses, contains_eos: call_reward_function(reward_fn, prompts, responses)


def _resolve_checkpoint(config: PPOConfig) -> Path | None:
    spec = config.resume_from_checkpoint
    if spec is None or spec is False or str(spec).lower() in ("", "false", "none"):
        return None
    if spec is True or str(spec).lower() in ("true", "latest"):
        found = find_latest_checkpoint(config.output_dir)
        if found is None:
            raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {config.output_dir}")
        return found
    return Path(spec)


def _prompt_batch(sampler: SeededSampler, step: int, batch_size: int) -> list[int]:
    """Prompt indices of PPO step `step`: positions [step*B, (step+1)*B) of the stream of
    per-epoch permutations; depends only on (seed, step), so a resumed run draws the same."""
    n = sampler.num_samples
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch = position // n
        if epoch not in orders:
            sampler.set_epoch(epoch)
            orders[epoch] = sampler.order()
        indices.append(orders[epoch][position % n])
    return indices


def _max_new_tokens(config: PPOConfig, step: int) -> int:
    if config.min_response_length is None:
        return config.response_length
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    low, high = config.min_response_length, config.response_length
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def ppo_update(run: _Run, optimizer: torch.optim.Optimizer, rollout: Rollout, old_logprobs: torch.Tensor,
               targets: PPOTargets, step: int) -> dict[str, float]:
    """ppo_epochs passes of shuffled minibatches; returns the minibatch stats averaged, "ppo/"-prefixed."""
    cfg = run.config
    batch_size = rollout.query_ids.shape[0]
    params = [p for p in run.model.parameters() if p.requires_grad]
    collected: list[dict[str, torch.Tensor]] = []
    early_stopped = False
    epochs_done = 0
    for epoch in range(cfg.ppo_epochs):
        generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 101 + epoch)
        order = torch.randperm(batch_size, generator=generator).to(run.device)
        for rows in _chunks(batch_size, cfg.mini_batch_size):
            index = order[rows]
            logprobs, values, entropy = policy_forward(run.model, rollout, index, cfg.temperature,
                                                       entropy="grad" if cfg.entropy_coef > 0 else "detached")
            mb_targets = PPOTargets(*(t[index] for t in targets))
            out, stats = ppo_minibatch_loss(logprobs, values, old_logprobs[index], mb_targets,
                                            rollout.response_mask[index], config=cfg, entropy=entropy)
            if not torch.isfinite(out.loss):
                raise RuntimeError(f"PPO step {step}: the loss is {out.loss.item()} (non-finite)")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.max_grad_norm is not None:
                stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).detach()
            optimizer.step()
            collected.append(stats)
            if cfg.target_kl is not None and float(out.approx_kl) > 1.5 * cfg.target_kl:
                early_stopped = True
                break
        epochs_done = epoch + 1
        if early_stopped:
            break
    optimizer.zero_grad(set_to_none=True)
    averaged = {f"ppo/{k}": torch.stack([s[k] for s in collected]).mean().item() for k in collected[0]}
    averaged.update({"ppo/epochs": epochs_done, "ppo/early_stopped": float(early_stopped),
                     "ppo/minibatch_updates": len(collected)})
    return averaged


def _step_stats(raw: torch.Tensor, scores: torch.Tensor, rollout: Rollout, old_logprobs: torch.Tensor,
                targets: PPOTargets, kl_coef: float) -> dict[str, float]:
    """Classic TRL's objective/*, env/* and tokens/* stats of one rollout batch."""
    mask = rollout.response_mask
    kl_per_sequence = targets.kl.sum(dim=1)
    response_lengths = mask.sum(dim=1).float()
    return {
        "objective/kl": kl_per_sequence.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": torch.where(mask, -old_logprobs, 0.0).sum(dim=1).mean().item(),
        "env/reward_mean": raw.mean().item(),
        "env/reward_std": raw.std().item() if raw.numel() > 1 else 0.0,
        "ppo/mean_scores": scores.mean().item(),
        "ppo/mean_non_score_reward": targets.non_score_rewards.sum(dim=1).mean().item(),
        "tokens/queries_len_mean": rollout.query_mask.sum(dim=1).float().mean().item(),
        "tokens/responses_len_mean": response_lengths.mean().item(),
        "tokens/responses_with_eos": rollout.contains_eos.float().mean().item(),
    }


def train_ppo(
    config: PPOConfig,
    model_config: ModelConfig,
    *,
    reward_fn: RewardFunction | None = None,
    prompts: Sequence[str] | Any | None = None,
    eval_prompts: Sequence[str] | Any | None = None,
) -> dict[str, Any]:
    """Run PPO; return the final stats, with the mean reward on the evaluation prompts before and
    after training (`eval/reward_before`, `eval/reward_after`) and the policy's KL to the
    reference there (`eval/kl_after`).

    With no model (model_config.model_name_or_path None) this runs the embedded default
    (see `embedded_default`): the demo base model, the demo's "how do i ..." prompts
    (held-out ones for the evaluation) and `demo_reward`. Otherwise prompts come from `prompts`
    (a list of strings or a Dataset with a 'prompt' column) or config.dataset, and the reward
    from `reward_fn`, config.reward or config.reward_model.

    Writes output_dir/metrics.jsonl (one record per logging step, classic TRL's names),
    checkpoints every save_steps (resume with resume_from_checkpoint), and the final model or
    adapter in output_dir/final.
    """
    from alignlib.demo import HELDOUT_FILE, TRAIN_FILE

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would run its own PPO into the same output_dir
        raise ValueError("PPO runs in one process: torchrun / several ranks are supported by the pairwise "
                         "trainer (dpo, orpo, simpo, cpo, reward) only")
    demo = model_config.model_name_or_path is None
    if demo:
        config, model_config = embedded_default(config, model_config)
        if prompts is None and config.dataset is None:
            prompts = _demo_prompts(TRAIN_FILE)
            eval_prompts = eval_prompts if eval_prompts is not None else _demo_prompts(HELDOUT_FILE)

    set_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_config.model_name_or_path, padding_side="left",
                               trust_remote_code=model_config.trust_remote_code)
    if prompts is None and config.dataset is not None:
        prompts = _load_prompts(config.dataset, config.dataset_split, tokenizer)
    prompts = _as_prompt_list(prompts, "the prompt set")
    if eval_prompts is None and config.eval_dataset is not None:
        eval_prompts = _load_prompts(config.eval_dataset, config.eval_split, tokenizer)
    eval_prompts = _as_prompt_list(eval_prompts, "the eval prompt set") if eval_prompts is not None else prompts
    eval_prompts = eval_prompts[: config.num_eval_prompts]

    policy = load_causal_lm(model_config)
    if not getattr(policy, "is_loaded_in_4bit", False) and not getattr(policy, "is_loaded_in_8bit", False):
        policy.to(device)
    device = next(policy.parameters()).device  # a quantised model sits where bitsandbytes put it
    model = PolicyWithValueHead(policy)
    model.value_head.to(device)
    model.eval()  # dropout off for the whole run
    _check_prompt_lengths(tokenizer, prompts, policy, config.response_length, "the prompt set")
    _check_prompt_lengths(tokenizer, eval_prompts, policy, config.response_length, "the eval prompt set")
    strategy = "adapter_disabled" if model_config.use_peft else "model"
    reference = make_reference(strategy, policy, model_config)
    reward = _reward_callable(config, reward_fn, device, demo)

    optimizer = make_optimizer(model, config.optim, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config.lr_scheduler_type, num_training_steps=config.max_steps,
                               num_warmup_steps=config.warmup_steps)
    kl_controller = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
                     if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))
    run = _Run(config, model, tokenizer, reference, reward, device)

    start_step = 0
    checkpoint = _resolve_checkpoint(config)
    eval_seed = config.seed + 12345
    before = run.evaluate(eval_prompts, use_reference=True, seed=eval_seed)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start_step = state["step"]
        kl_controller.value = float(state["metadata"]["kl_coef"])

    sampler = SeededSampler(len(prompts), seed=config.seed)
    output_dir = Path(config.output_dir)
    logger = MetricsLogger(output_dir, resume_step=start_step if checkpoint is not None else None)
    step_stats: dict[str, Any] = {}
    started = time.perf_counter()
    with logger, Progress(total=config.max_steps, initial=start_step, desc="ppo",
                          disable=config.disable_tqdm) as bar:
        for step in range(start_step, config.max_steps):
            step_start = time.perf_counter()
            batch_prompts = [prompts[i] for i in _prompt_batch(sampler, step, config.per_device_train_batch_size)]
            rollout = run.generate(batch_prompts, _max_new_tokens(config, step))
            raw, scores = run.scores(batch_prompts, rollout)
            old_logprobs, ref_logprobs, values = run.old_logprobs_values(rollout)
            targets = compute_targets(scores, old_logprobs, ref_logprobs, values, rollout.response_mask,
                                      kl_coef=kl_controller.value, config=config)
            step_stats = _step_stats(raw, scores, rollout, old_logprobs, targets, kl_controller.value)
            step_stats.update(ppo_update(run, optimizer, rollout, old_logprobs, targets, step))
            kl_controller.update(step_stats["objective/kl"], len(batch_prompts))
            step_stats["learning_rate"] = scheduler.get_last_lr()[0]
            scheduler.step()
            elapsed = time.perf_counter() - step_start
            tokens = int(rollout.query_mask.sum()) + int(rollout.response_mask.sum())
            step_stats.update({"tokens_per_second": tokens / elapsed, "time/ppo/total": elapsed})
            done = step + 1
            if done % config.logging_steps == 0 or done == config.max_steps:
                logger.log(step_stats, step=done)
            bar.update(reward=step_stats["env/reward_mean"], kl=step_stats["objective/kl"])
            if config.save_steps is not None and done % config.save_steps == 0:
                save_checkpoint(output_dir, done, model=model, optimizer=optimizer, scheduler=scheduler,
                                data_state={"prompts_seen": done * config.per_device_train_batch_size,
                                            "seed": config.seed},
                                metadata={"kl_coef": kl_controller.value, "config": dataclasses.asdict(config)},
                                save_total_limit=config.save_total_limit)

        after = run.evaluate(eval_prompts, use_reference=False, seed=eval_seed)
        final = {
            "eval/reward_before": before["reward_mean"],
            "eval/reward_after": after["reward_mean"],
            "eval/kl_after": after["kl"],
            "eval/num_prompts": len(eval_prompts),
        }
        logger.log(final, step=config.max_steps)
    save_model(policy, tokenizer, output_dir / "final")
    torch.save(model.value_head.state_dict(), output_dir / "final" / "value_head.pt")
    return {**step_stats, **final, "steps": config.max_steps, "resumed_from_step": start_step,
            "train_runtime": time.perf_counter() - started, "kl_coef": kl_controller.value,
            "model_name_or_path": model_config.model_name_or_path, "use_peft": model_config.use_peft}

