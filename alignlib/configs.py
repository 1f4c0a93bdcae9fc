"""The settings of every `alignlib train` objective, as dataclasses the command parses.

Field names follow TRL's configs (DPOConfig, ORPOConfig, CPOConfig, RewardConfig, the classic
and the later PPOConfig), so a TRL user's YAML works unchanged; `alignlib.cli` parses them with
transformers' HfArgumentParser, together with `alignlib.models.ModelConfig`.

- `TrainConfig`: the offline objectives of `alignlib.trainer` (OFFLINE_OBJECTIVES).
- `PPOConfig`: the online loop of `alignlib.rl` (ONLINE_OBJECTIVES).

Settings shared by every loop mean the same thing in each: `resume_from_checkpoint`
(None, "latest", or a checkpoint directory; see `alignlib.training.checkpoint_to_resume`) and
`on_nonfinite` ("stop" or "skip"; see `alignlib.training.NonFiniteGuard`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlib.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES, KL_ESTIMATORS, KTO_LOSS_TYPES

OFFLINE_OBJECTIVES = ("dpo", "orpo", "simpo", "cpo", "kto", "reward")
ONLINE_OBJECTIVES = ("ppo",)
OBJECTIVES = OFFLINE_OBJECTIVES + ONLINE_OBJECTIVES
"""Every objective of `alignlib train`, in the order the command lists them."""

REFERENCE_STRATEGY_CHOICES = ("auto", "adapter_disabled", "model", "precomputed")
NONFINITE_POLICIES = ("stop", "skip")
CLASSIC_ESTIMATOR_NAMES = {"kl": "k1"}  # classic TRL's kl_penalty="kl" is the k1 estimate


@dataclass
class TrainConfig:
    """Training settings; the names are TRL's (DPOConfig, ORPOConfig, CPOConfig, RewardConfig)."""

    output_dir: str = field(default="alignlib-output", metadata={"help": "Where checkpoints, metrics and the model go."})
    dataset_name: str | None = field(default=None, metadata={"help": "Training pairs: a JSON/JSONL/Parquet file, a "
                                     "datasets directory or a Hub name. None with no model: the embedded demo.",
                                     "aliases": ["--dataset"]})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out pairs (same formats).",
                                                                  "aliases": ["--eval_dataset"]})
    dataset_test_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name to evaluate on."})
    dataset_format: str = field(default="auto", metadata={"help": "Row format: auto, standard, conversational, "
                                "orca_dpo_pairs, stack_exchange_paired."})
    max_length: int | None = field(default=1024, metadata={"help": "Most tokens in prompt + response."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Most prompt tokens (cut from the left)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Pairs per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides num_train_epochs."})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch, adamw_8bit, paged_adamw_8bit, ..."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of steps of linear warmup."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps (overrides warmup_ratio when > 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping)."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every this many steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every this many steps (None: at the end)."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every this many steps (0: never)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep this many newest checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint dir, or 'latest' for "
                                               "the newest valid one in output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an output_dir that holds "
                                       "another run's files: they are moved, whole, to <output_dir>.replaced-<time>/."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order and dropout."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    beta: float = field(default=0.1, metadata={"help": "DPO/CPO beta, ORPO lambda, SimPO beta (try 2.0)."})
    loss_type: str | None = field(default=None, metadata={"help": "DPO: any dpo_loss type (default sigmoid); CPO: "
                                  "sigmoid (default), hinge, ipo, simpo; KTO: kto (default), apo_zero_unpaired."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO / CPO / SimPO label noise."})
    rpo_alpha: float | None = field(default=None, metadata={"help": "DPO: weight of the NLL of chosen responses (RPO)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO: weight of the NLL of chosen responses."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO / CPO-simpo target margin."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "DPO f-divergence."})
    center_rewards_coefficient: float | None = field(default=None, metadata={"help": "Reward model centering."})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the desirable rows' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the undesirable rows' losses."})
    reference_strategy: str = field(default="auto", metadata={"help": "auto, adapter_disabled, model, precomputed."})
    use_kernels: bool = field(default=False, metadata={"help": "Fused log-probs from hidden states (and the "
                              "Triton LoRA matmul on CUDA)."})
    fsdp: bool = field(default=False, metadata={"help": "Under torchrun: shard parameters, gradients and optimizer "
                       "states across ranks (FSDP2) instead of replicating the model (DDP)."})
    on_nonfinite: str = field(default="stop", metadata={"help": "When a step's loss or gradient norm is NaN/inf: "
                              "'stop' the run, or 'skip' the update (logged; stops after "
                              "8 skips in a row: alignlib.training.MAX_SKIPPED_IN_A_ROW)."})
    merge_adapter: bool = field(default=False, metadata={"help": "Save the LoRA adapter merged into the base."})
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png (needs matplotlib)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def check(self, objective: str) -> None:
        """Raise ValueError (FileNotFoundError for a missing checkpoint) naming the first setting
        that cannot work for `objective`. Reads nothing but the settings and writes nothing; the
        objective's loss options are tried on the loss function itself (`_check_loss_options`), so
        they are refused here, before a run touches its output folder."""
        if objective not in OFFLINE_OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OFFLINE_OBJECTIVES)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if _whole(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("save_steps", "warmup_steps"):
            if _whole(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be a whole number >= 0 (0: {'never' if name == 'save_steps' else 'none'})"
                                 f", got {getattr(self, name)!r}")
        for name in ("eval_steps", "save_total_limit"):
            if getattr(self, name) is not None and _whole(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be None or a whole number >= 1, got {getattr(self, name)!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give max_steps > 0 or num_train_epochs > 0")
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not _is_number(self.max_grad_norm) or self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {self.max_grad_norm!r}")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.reference_strategy not in REFERENCE_STRATEGY_CHOICES:
            raise ValueError(f"reference_strategy must be one of {', '.join(REFERENCE_STRATEGY_CHOICES)}, "
                             f"got {self.reference_strategy!r}")
        if objective == "dpo" and self.loss_type not in (None, *DPO_LOSS_TYPES):
            raise ValueError(f"unknown DPO loss_type {self.loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")
        if objective == "cpo" and self.loss_type not in (None, *CPO_LOSS_TYPES):
            raise ValueError(f"unknown CPO loss_type {self.loss_type!r}; known: {', '.join(CPO_LOSS_TYPES)}")
        if objective == "kto" and self.loss_type not in (None, *KTO_LOSS_TYPES):
            raise ValueError(f"unknown KTO loss_type {self.loss_type!r}; known: {', '.join(KTO_LOSS_TYPES)}")
        if objective == "kto" and self.reference_strategy == "precomputed":
            raise ValueError("kto: reference_strategy 'precomputed' cannot serve KTO, whose reference point pairs each "
                             "step's prompts with other completions of the step: use 'auto', 'model' or 'adapter_disabled'")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if self.fsdp and self.use_kernels:
            raise ValueError("use_kernels reads the lm_head weight outside the model's forward, which FSDP shards: "
                             "use one of fsdp and use_kernels")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint directory at {self.resume_from_checkpoint}")
        self._check_loss_options(objective)

    def _check_loss_options(self, objective: str) -> None:
        """Call the objective's loss once on a dummy pair with these settings: the loss's own checks
        (beta, label_smoothing, f_divergence_type, simpo_gamma...) then refuse a bad option before
        anything is loaded or written, with the loss's message."""
        import torch

        from alignlib.losses import cpo_loss, dpo_loss, kto_loss, orpo_loss, reward_ranking_loss, simpo_loss

        chosen, rejected, ones = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.ones(1)
        try:
            if objective == "dpo":
                dpo_loss(chosen, rejected, chosen, rejected, beta=self.beta, loss_type=self.loss_type or "sigmoid",
                         label_smoothing=self.label_smoothing, chosen_lengths=ones, rejected_lengths=ones,
                         f_divergence_type=self.f_divergence_type)
            elif objective == "orpo":
                orpo_loss(chosen, rejected, beta=self.beta)
            elif objective == "simpo":
                simpo_loss(chosen, rejected, beta=self.beta, gamma=self.simpo_gamma, label_smoothing=self.label_smoothing)
            elif objective == "cpo":
                cpo_loss(chosen, rejected, beta=self.beta, loss_type=self.loss_type or "sigmoid",
                         label_smoothing=self.label_smoothing,
                         simpo_gamma=self.simpo_gamma)
            elif objective == "kto":
                loss_type = self.loss_type or "kto"
                kto_loss(chosen, rejected, torch.tensor([True]), kl=None if loss_type == "apo_zero_unpaired" else 0.0,
                         beta=self.beta, desirable_weight=self.desirable_weight,
                         undesirable_weight=self.undesirable_weight, loss_type=loss_type)
            else:
                reward_ranking_loss(chosen, rejected, center_rewards_coefficient=self.center_rewards_coefficient)
        except ValueError as exc:
            raise ValueError(f"{objective}: {exc}") from None
        for name in ("rpo_alpha", "cpo_alpha"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")
        # Options the objective does not read are refused rather than ignored.
        if objective in ("orpo", "simpo", "reward") and self.loss_type is not None:
            raise ValueError(f"{objective} has no loss_type (got {self.loss_type!r}); loss_type is read by dpo, cpo "
                             "and kto")
        if objective != "kto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            raise ValueError(f"desirable_weight and undesirable_weight are KTO options; {objective} does not read them")
        if objective in ("orpo", "reward", "kto") and self.label_smoothing != 0:
            raise ValueError(f"{objective} does not read label_smoothing (got {self.label_smoothing!r})")
        if objective != "dpo" and (self.rpo_alpha is not None or self.f_divergence_type != "reverse_kl"):
            raise ValueError(f"rpo_alpha and f_divergence_type are DPO options; {objective} does not read them")
        if objective != "reward" and self.center_rewards_coefficient is not None:
            raise ValueError(f"center_rewards_coefficient is a reward-model option; {objective} does not read it")


def _whole(value: Any) -> float:
    """value if it is a whole number (an int, not a bool), else -inf (so any lower-bound check fails)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -math.inf


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
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint dir, or 'latest' for "
                                                                               "the newest valid one in output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an output_dir that "
                                       "holds another run's files: they are moved, whole, to "
                                       "<output_dir>.replaced-<time>/."})
    on_nonfinite: str = field(default="stop", metadata={"help": "When a minibatch's loss or gradient norm is "
                                                            "NaN/inf: 'stop' the run, or 'skip' that update "
                                                            "(logged; stops after 8 skips in a row)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    demo_defaults: bool = field(default=True, metadata={"help": "In the embedded default (no model given), "
                                                                "fields still at their class default take the "
                                                                "demo's tuned values (alignlib.demo.PPO_SETTINGS)."})

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
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if self.resume_from_checkpoint is True:  # YAML's `true`: the newest checkpoint, as 'latest'
            self.resume_from_checkpoint = "latest"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

