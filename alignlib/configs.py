"""The settings of every `alignlib train` objective, as dataclasses the command parses.

Field names follow TRL's configs (DPOConfig, ORPOConfig, CPOConfig, RewardConfig, the classic
and the later PPOConfig), so a TRL user's YAML works unchanged; `alignlib.cli` parses them with
transformers' HfArgumentParser, together with `alignlib.models.ModelConfig`.

- `TrainConfig`: the offline objectives of `alignlib.trainer` (OFFLINE_OBJECTIVES).
- `OnlineConfig`: what the online loop of `alignlib.rl` reads for every objective, with
  `PPOConfig`, `GRPOConfig` and `RLOOConfig` (ONLINE_OBJECTIVES, ONLINE_CONFIGS) adding theirs.

Settings shared by every loop mean the same thing in each: `resume_from_checkpoint`
(None, "latest", or a checkpoint directory; see `alignlib.training.checkpoint_to_resume`) and
`on_nonfinite` ("stop" or "skip"; see `alignlib.training.NonFiniteGuard`).
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignlib.losses import (
    ADVANTAGE_SCALES,
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    KTO_LOSS_TYPES,
)

OFFLINE_OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "cpo", "kto", "reward")
ONLINE_OBJECTIVES = ("ppo", "grpo", "rloo")
OBJECTIVES = OFFLINE_OBJECTIVES + ONLINE_OBJECTIVES
"""Every objective of `alignlib train`, in the order the command lists them."""

REFERENCE_STRATEGY_CHOICES = ("auto", "adapter_disabled", "model", "precomputed", "ref_adapter")
NONFINITE_POLICIES = ("stop", "skip")
EVAL_STRATEGIES = ("no", "steps", "epoch")
REWARD_ERROR_POLICIES = ("stop", "unscorable")
CLASSIC_ESTIMATOR_NAMES = {"kl": "k1"}  # classic TRL's kl_penalty="kl" is the k1 estimate


@dataclass
class TrainConfig:
    """Training settings; the names are TRL's (SFTConfig, DPOConfig, ORPOConfig, CPOConfig, KTOConfig,
    RewardConfig)."""

    output_dir: str = field(default="alignlib-output", metadata={"help": "Where checkpoints, metrics and the model go."})
    dataset_name: str | None = field(default=None, metadata={"help": "Training pairs: a JSON/JSONL/Parquet file, a "
                                     "datasets directory or a Hub name. None with no model: the embedded demo.",
                                     "aliases": ["--dataset"]})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out pairs (same formats).",
                                                                  "aliases": ["--eval_dataset"]})
    dataset_test_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name to evaluate on."})
    dataset_format: str = field(default="auto", metadata={"help": "Row format: auto, standard, conversational, "
                                "orca_dpo_pairs, stack_exchange_paired; SFT also text, prompt_completion, "
                                "messages, conversations."})
    dataset_config: str | None = field(default=None, metadata={"help": "The named configuration of a dataset folder "
                                       "or Hub dataset (datasets.load_dataset's name)."})
    data_dir: str | None = field(default=None, metadata={"help": "A sub-folder of dataset_name's data files (e.g. "
                                 "stack-exchange-paired's data/finetune)."})
    eval_data_dir: str | None = field(default=None, metadata={"help": "A sub-folder of eval_dataset_name's data "
                                      "files (e.g. data/evaluation)."})
    eval_split_size: float | None = field(default=None, metadata={"help": "Hold out this share (0 < x < 1) of the "
                                          "training rows for evaluation, chosen with the seed (instead of "
                                          "eval_dataset_name)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on this many rows, drawn with the "
                                          "seed (before eval_split_size takes its share)."})
    dataset_text_field: str = field(default="text", metadata={"help": "SFT: the column of plain-text rows."})
    completion_only_loss: bool | None = field(default=None, metadata={"help": "SFT on prompt-completion rows: train on "
                                              "the completion only (None/true) or on the whole text (false)."})
    assistant_only_loss: bool = field(default=True, metadata={"help": "SFT on conversations: train on the assistant "
                                      "messages only (true; TRL's default is false) or on the whole conversation."})
    packing: bool = field(default=False, metadata={"help": "SFT: pack several sequences into each row of max_length "
                          "tokens, kept apart (position ids restart; checked on the model before training)."})
    max_length: int | None = field(default=1024, metadata={"help": "Most tokens in prompt + response (SFT: per "
                                   "sequence, and per packed row)."})
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
    logging_steps: float = field(default=10, metadata={"help": "Log metrics every this many steps (a number in "
                                 "(0, 1): that share of the total steps, rounded up)."})
    logging_first_step: bool = field(default=False, metadata={"help": "Also write the metrics of step 1 when "
                                     "logging_steps > 1."})
    eval_strategy: str | None = field(default=None, metadata={"help": "When to evaluate the eval set. None "
                                      "(alignlib's default): before training, every eval_steps if set, and at the "
                                      "end; 'steps': the same, with eval_steps defaulting to logging_steps; 'epoch': "
                                      "before training, at each epoch's end and at the end; 'no': never."})
    eval_steps: float | None = field(default=None, metadata={"help": "Evaluate every this many steps (a number in "
                                     "(0, 1): that share of the total steps, rounded up; None: see eval_strategy)."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every this many steps (0: never; a number in "
                              "(0, 1): that share of the total steps, rounded up)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep this many newest checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint dir, or 'latest' for "
                                               "the newest valid one in output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an output_dir that holds "
                                       "another run's files: they are moved, whole, to <output_dir>.replaced-<time>/."})
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order and dropout."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA, Ampere and newer)."})
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast with a gradient scaler (CUDA; for GPUs "
                       "without bf16, such as the T4)."})
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
    reference_strategy: str = field(default="auto", metadata={"help": "auto, adapter_disabled, model, precomputed, "
                                    "ref_adapter (the start adapter loaded twice: one copy trained, one frozen)."})
    ref_model: str | None = field(default=None, metadata={"help": "DPO/KTO reference: a model or LoRA adapter "
                                  "directory loaded frozen (strategy model); with strategy ref_adapter, the adapter "
                                  "loaded into the policy as its frozen copy. Default: the policy's starting point."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "Strategy ref_adapter: the name of the frozen "
                                         "adapter in the policy (TRL's ref_adapter_name; default 'reference')."})
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
    report_to: list[str] | None = field(default_factory=lambda: ["none"], metadata={"help": "Where metrics go "
                                        "besides output_dir/metrics.jsonl: none (the default, as in transformers 5; "
                                        "transformers 4's 'all' reached network services), tensorboard (event files "
                                        "in logging_dir), wandb (an offline run in output_dir/wandb), or all (those "
                                        "of the two that are installed). One name or several."})
    logging_dir: str | None = field(default=None, metadata={"help": "Where TensorBoard's event files go "
                                    "(report_to tensorboard); default output_dir/runs."})
    run_name: str | None = field(default=None, metadata={"help": "The run's name: the wandb run's name "
                                 "(report_to wandb); recorded in config.json."})
    push_to_hub: bool = field(default=False, metadata={"help": "Refused: alignlib does not upload (that needs a "
                              "network and a Hub token). After training: hf upload REPO_ID OUTPUT_DIR/final."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Refused, as push_to_hub (the repository it "
                                     "would upload to)."})
    hub_token: str | None = field(default=None, metadata={"help": "Refused, as push_to_hub (log in with "
                                  "`hf auth login` before `hf upload`)."})

    def __post_init__(self) -> None:
        # The command line gives floats (10.0); a whole number is kept as an int, a fraction as it is.
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, name)
            if _is_number(value) and value == int(value):
                setattr(self, name, int(value))
        if self.report_to is None or isinstance(self.report_to, str):  # YAML's `report_to: wandb`, Python's None
            self.report_to = [self.report_to or "none"]
        if self.eval_strategy is False:  # YAML reads an unquoted `eval_strategy: no` as false
            self.eval_strategy = "no"

    def interval(self, name: str, total_steps: int) -> int:
        """Steps between two metrics lines (`logging_steps`), evaluations (`eval_steps`) or checkpoints
        (`save_steps`) in a run of total_steps; 0: never. A fraction in (0, 1) is that share of total_steps,
        rounded up (transformers' rule, without its float round-off: 0.1 of 30 steps is 3, not 4)."""
        value = getattr(self, name)
        if not value:
            return 0
        if value < 1:
            return max(1, math.ceil(round(value * total_steps, 6)))
        return int(value)

    def eval_interval(self, total_steps: int, steps_per_epoch: int) -> int:
        """Steps between two evaluations during training (eval_strategy); 0: none between the one before
        training and the one at the end."""
        if self.eval_strategy == "no":
            return 0
        if self.eval_strategy == "epoch":
            return steps_per_epoch
        if self.eval_strategy == "steps" and self.eval_steps is None:  # transformers: eval_steps = logging_steps
            return self.interval("logging_steps", total_steps)
        return self.interval("eval_steps", total_steps)

    def check(self, objective: str) -> None:
        """Raise ValueError (FileNotFoundError for a missing checkpoint) naming the first setting
        that cannot work for `objective`. Reads nothing but the settings and writes nothing; the
        objective's loss options are tried on the loss function itself (`_check_loss_options`), so
        they are refused here, before a run touches its output folder."""
        if objective not in OFFLINE_OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OFFLINE_OBJECTIVES)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if _whole(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if _whole(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be a whole number >= 0 (0: none), got {self.warmup_steps!r}")
        if self.save_total_limit is not None and _whole(self.save_total_limit) < 1:
            raise ValueError(f"save_total_limit must be None or a whole number >= 1, got {self.save_total_limit!r}")
        for name, least, none in (("logging_steps", 1, ""), ("eval_steps", 1, "None or "), ("save_steps", 0, "")):
            value = getattr(self, name)
            if not (value is None and none) and not _is_interval(value, least):
                raise ValueError(f"{name} must be {none}a whole number >= {least}{' (0: never)' if least == 0 else ''} "
                                 f"or a fraction in (0, 1) of the total steps, got {value!r}")
        self._check_reporting()
        if self.eval_split_size is not None:
            if not _is_number(self.eval_split_size) or not 0 < self.eval_split_size < 1:
                raise ValueError(f"eval_split_size must lie strictly between 0 and 1 (a share of the training rows), "
                                 f"got {self.eval_split_size!r}")
            if self.eval_dataset_name:
                raise ValueError("eval_split_size and eval_dataset_name both name the eval rows: give one")
        if self.max_train_samples is not None and _whole(self.max_train_samples) < 1:
            raise ValueError(f"max_train_samples must be a whole number >= 1, got {self.max_train_samples!r}")
        if self.eval_data_dir and not self.eval_dataset_name:
            raise ValueError("eval_data_dir is a sub-folder of eval_dataset_name, which is not given")
        self._check_evaluation()
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
        self._check_reference_options(objective)
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint directory at {self.resume_from_checkpoint}")
        self._check_loss_options(objective)

    def _check_evaluation(self) -> None:
        """eval_strategy and eval_steps, against each other and the eval set (eval_dataset_name or
        eval_split_size): an evaluation asked for without an eval set, or a setting nothing reads, is refused."""
        if self.eval_strategy not in (None, *EVAL_STRATEGIES):
            raise ValueError(f"eval_strategy must be one of {', '.join(EVAL_STRATEGIES)} (or None: alignlib's default), "
                             f"got {self.eval_strategy!r}")
        if self.eval_steps is not None and self.eval_strategy in ("no", "epoch"):
            raise ValueError(f"eval_steps {self.eval_steps!r} is not read with eval_strategy {self.eval_strategy}: "
                             "drop one of them")
        if self.eval_strategy == "no" and self.eval_split_size is not None:
            raise ValueError(f"eval_split_size {self.eval_split_size!r} holds training rows out for evaluation, which "
                             "eval_strategy no turns off: drop one of them")
        held_out = bool(self.eval_dataset_name) or self.eval_split_size is not None
        if not held_out and (self.eval_strategy in ("steps", "epoch") or self.eval_steps is not None):
            given = (f"eval_strategy {self.eval_strategy}" if self.eval_strategy in ("steps", "epoch")
                     else f"eval_steps {self.eval_steps!r}")
            raise ValueError(f"{given}: there is no eval set to evaluate: give eval_dataset_name or eval_split_size")

    def _check_reporting(self) -> None:
        """report_to (its packages imported here, so a missing one is refused before anything is
        written), logging_dir, and the Hub keys, which are refused."""
        check_hub_keys(self)
        integrations = report_integrations(self.report_to)
        if self.logging_dir is not None and "tensorboard" not in integrations:
            raise ValueError(f"logging_dir {self.logging_dir} is where TensorBoard's event files go, and report_to "
                             f"{_shown(self.report_to)} writes none: add tensorboard to report_to, or drop logging_dir")

    def _check_reference_options(self, objective: str) -> None:
        """ref_model, ref_adapter_name and strategy ref_adapter: read by dpo and kto, and only where they act."""
        ref_adapter = self.reference_strategy == "ref_adapter" or self.ref_adapter_name is not None
        if (self.ref_model is not None or ref_adapter) and objective not in ("dpo", "kto"):
            given = f"--ref_model {self.ref_model}" if self.ref_model is not None else (
                f"--ref_adapter_name {self.ref_adapter_name}" if self.ref_adapter_name is not None
                else "--reference_strategy ref_adapter")
            raise ValueError(f"{given}: {objective} has no reference model (dpo and kto have one)")
        if self.ref_model is not None and self.reference_strategy in ("adapter_disabled", "precomputed"):
            raise ValueError(f"--ref_model {self.ref_model} is not read by reference_strategy "
                             f"{self.reference_strategy}, which uses the policy itself: use 'model' or 'ref_adapter'")
        if self.ref_adapter_name is not None and self.reference_strategy not in ("auto", "ref_adapter"):
            raise ValueError(f"--ref_adapter_name {self.ref_adapter_name} names the frozen adapter of "
                             f"reference_strategy ref_adapter, not of {self.reference_strategy}")
        if ref_adapter and self.fsdp:
            raise ValueError("reference_strategy ref_adapter switches the active adapter of the policy for the "
                             "reference forward, which FSDP's sharded model does not support: use one of them")

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
            elif objective == "reward":
                reward_ranking_loss(chosen, rejected, center_rewards_coefficient=self.center_rewards_coefficient)
        except ValueError as exc:
            raise ValueError(f"{objective}: {exc}") from None
        for name in ("rpo_alpha", "cpo_alpha"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"{name} must be None or a finite number >= 0, got {value!r}")
        # Options the objective does not read are refused rather than ignored.
        if objective in ("sft", "orpo", "simpo", "reward") and self.loss_type is not None:
            raise ValueError(f"{objective} has no loss_type (got {self.loss_type!r}); loss_type is read by dpo, cpo "
                             "and kto")
        if objective != "kto" and (self.desirable_weight != 1.0 or self.undesirable_weight != 1.0):
            raise ValueError(f"desirable_weight and undesirable_weight are KTO options; {objective} does not read them")
        if objective in ("sft", "orpo", "reward", "kto") and self.label_smoothing != 0:
            raise ValueError(f"{objective} does not read label_smoothing (got {self.label_smoothing!r})")
        if objective != "dpo" and (self.rpo_alpha is not None or self.f_divergence_type != "reverse_kl"):
            raise ValueError(f"rpo_alpha and f_divergence_type are DPO options; {objective} does not read them")
        if objective != "sft" and (self.packing or self.completion_only_loss is not None
                                   or not self.assistant_only_loss or self.dataset_text_field != "text"):
            raise ValueError(f"packing, completion_only_loss, assistant_only_loss and dataset_text_field are SFT "
                             f"options; {objective} does not read them")
        if objective == "sft" and self.packing and self.max_length is None:
            raise ValueError("packing needs max_length (the length of a packed row); got max_length None")
        if objective == "sft" and self.max_prompt_length != _DEFAULT_MAX_PROMPT_LENGTH:
            raise ValueError(f"sft does not cut prompts (got max_prompt_length {self.max_prompt_length!r}); "
                             "max_length cuts each sequence from the right")
        if objective == "sft" and self.beta != 0.1:
            raise ValueError(f"sft has no beta (got {self.beta!r}); beta is read by the preference objectives")
        if objective == "sft" and self.reference_strategy != "auto":
            raise ValueError(f"sft has no reference model (got reference_strategy {self.reference_strategy!r})")
        if objective != "reward" and self.center_rewards_coefficient is not None:
            raise ValueError(f"center_rewards_coefficient is a reward-model option; {objective} does not read it")


_DEFAULT_MAX_PROMPT_LENGTH = TrainConfig.max_prompt_length


def _whole(value: Any) -> float:
    """value if it is a whole number (an int, not a bool), else -inf (so any lower-bound check fails)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -math.inf


def _is_interval(value: Any, least: int) -> bool:
    """A number of steps between two events: a whole number >= least (10 or 10.0), or a fraction in (0, 1)
    of the total steps (transformers' logging_steps, eval_steps, save_steps)."""
    return _is_number(value) and (0 < value < 1 or (value >= least and value == int(value)))


# ----------------------------------------------------------------------------------------------
# Reporting and the Hub: keys of TRL/transformers configs
# ----------------------------------------------------------------------------------------------

REPORT_INTEGRATIONS = ("tensorboard", "wandb")
"""What report_to may name besides "none" and "all" (every one of these that is installed)."""
_INTEGRATION_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def report_integrations(report_to: str | list[str] | None) -> tuple[str, ...]:
    """The integrations that `report_to` (TrainingArguments' key: a name or a list of names) writes
    to besides metrics.jsonl: () for None or "none"; "all" gives each of REPORT_INTEGRATIONS that is
    installed. Each one named is imported here: a missing package is a ValueError naming the pip
    command, as is an unknown name."""
    if report_to is not None and not isinstance(report_to, (str, list, tuple)):
        raise ValueError(f"report_to must be a name or a list of names, got {report_to!r}")
    names = [report_to] if report_to is None or isinstance(report_to, str) else list(report_to)
    names = ["none" if name is None else name for name in names]
    known = ("none", "all", *REPORT_INTEGRATIONS)
    for name in names:
        if name not in known:
            raise ValueError(f"report_to {name!r} is not an integration alignlib writes to: give one or more of "
                             f"{', '.join(known)} (metrics always go to output_dir/metrics.jsonl)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to {_shown(names)}: 'none' cannot be combined with other names")
    chosen: list[str] = []
    for name in names:
        if name == "all":
            chosen += [integration for integration in REPORT_INTEGRATIONS if _importable(integration)]
        elif name != "none":
            if not _importable(name):
                raise ValueError(f"report_to {name} needs the {name} package: pip install {name}")
            chosen.append(name)
    return tuple(dict.fromkeys(chosen))


def _importable(integration: str) -> bool:
    try:
        for module in _INTEGRATION_MODULES[integration]:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def _shown(report_to: Any) -> str:
    """report_to as it would be typed: `tensorboard wandb`."""
    if isinstance(report_to, (list, tuple)) and all(isinstance(name, str) for name in report_to):
        return " ".join(report_to)
    return repr(report_to)


def check_hub_keys(config: Any) -> None:
    """Refuse push_to_hub, hub_model_id and hub_token, in one line that says what to run instead:
    alignlib never uploads (that needs a network and a Hub token). The token is never shown."""
    upload = f"hf upload {config.hub_model_id or 'REPO_ID'} {Path(config.output_dir) / 'final'}"
    why = "alignlib does not upload to the Hugging Face Hub (that needs a network and a Hub token)"
    if config.push_to_hub:
        raise ValueError(f"push_to_hub: {why}; after training, run `{upload}` (logged in with `hf auth login`)")
    if config.hub_model_id is not None:
        raise ValueError(f"hub_model_id {config.hub_model_id}: the repository push_to_hub would upload to; {why}: "
                         f"after training, run `{upload}`")
    if config.hub_token is not None:
        raise ValueError(f"hub_token (not shown): {why}; drop it, and after training log in with `hf auth login` "
                         f"and run `{upload}`")


@dataclass
class OnlineConfig:
    """What every objective of the online loop (alignlib.rl) reads: prompts, rewards, the optimizer,
    sampling, bookkeeping. `PPOConfig`, `GRPOConfig` and `RLOOConfig` add their objective's fields;
    the names are TRL's."""

    # --- where from, where to
    output_dir: str = field(default="online-output", metadata={"help": "Checkpoints, metrics.jsonl and the final "
                                                                      "model (output_dir/final) go here."})
    dataset: str | None = field(default=None, metadata={"help": "Prompts: a file, datasets directory or Hub name "
                                                                "read by alignlib.data.load_prompt_dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of `dataset` to train on."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out prompts for the before/after "
                                                                     "evaluation (default: the first training "
                                                                     "prompts)."})
    eval_split: str = field(default="train", metadata={"help": "Split of `eval_dataset`."})
    num_eval_prompts: int = field(default=128, metadata={"help": "Prompts evaluated before and after training."})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Reward functions 'module:function' or "
                                           "'path/file.py:function' (fn(prompts, completions) -> one number, or "
                                           "None, per completion), or reward-model directories; several are "
                                           "weighted and summed."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function "
                                                                               "(default: 1 each)."})
    reward_model: str | None = field(default=None, metadata={"help": "A sequence-classification reward model "
                                                                     "(full model or SEQ_CLS LoRA adapter dir), "
                                                                     "e.g. from `alignlib train reward`."})
    on_reward_error: str = field(default="stop", metadata={"help": "A reward function that raises, returns the "
                                 "wrong length, NaN/inf or a non-number: 'stop' the run before the step updates "
                                 "anything, or mark the rows it failed on 'unscorable' (no learning signal).",
                                 "choices": list(REWARD_ERROR_POLICIES)})
    seed: int = field(default=0, metadata={"help": "Seed of the whole run (sampling, shuffling, init)."})

    # --- optimisation
    max_steps: int = field(default=100, metadata={"help": "Steps: one rollout batch and its updates each."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Completions per rollout batch on "
                                                                           "each process."})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (alignlib.training.OPTIMIZER_NAMES)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name, stepped "
                                                                        "once per step."})
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the scheduler."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (None: no clip)."})
    use_kernels: bool = field(default=False, metadata={"help": "Log-probs of the update fused with the lm_head "
                                                               "(the (B, T, V) logits never exist); no entropy "
                                                               "metric then."})

    # --- sampling
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs use it too)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0: off)."})

    # --- bookkeeping
    logging_steps: int = field(default=1, metadata={"help": "Write metrics.jsonl every N steps."})
    save_steps: int | None = field(default=None, metadata={"help": "Checkpoint every N steps (None: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint dir, or 'latest' for "
                                                                               "the newest valid one in output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a new run in an output_dir that "
                                       "holds another run's files: they are moved, whole, to "
                                       "<output_dir>.replaced-<time>/."})
    on_nonfinite: str = field(default="stop", metadata={"help": "When an update's loss or gradient norm is "
                                                            "NaN/inf: 'stop' the run, or 'skip' that update "
                                                            "(logged; stops after 8 skips in a row)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    report_to: list[str] | None = field(default_factory=lambda: ["none"], metadata={"help": "Only none: the online "
                                        "loop writes output_dir/metrics.jsonl (the offline objectives also write "
                                        "tensorboard and wandb)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Refused: alignlib does not upload (that needs a "
                              "network and a Hub token). After training: hf upload REPO_ID OUTPUT_DIR/final."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Refused, as push_to_hub."})
    hub_token: str | None = field(default=None, metadata={"help": "Refused, as push_to_hub."})
    demo_defaults: bool = field(default=True, metadata={"help": "In the embedded default (no model given), "
                                                                "fields still at their class default take the "
                                                                "demo's tuned values (alignlib.demo)."})

    objective = "online"  # the objective these settings are for (a class attribute, not a setting)

    @property
    def max_new_tokens(self) -> int:
        """Most tokens sampled per completion (PPO's response_length, GRPO's max_completion_length)."""
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        """Completions sampled per prompt."""
        return 1

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_train_batch_size", "logging_steps", "num_eval_prompts"):
            _check_whole(self, name, 1)
        if _whole(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}")
        for name in ("learning_rate", "temperature"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be None or a finite number > 0, got {self.max_grad_norm!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if _whole(self.top_k) < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k!r}")
        if self.save_steps is not None and _whole(self.save_steps) < 1:
            raise ValueError(f"save_steps must be None or a whole number >= 1, got {self.save_steps!r}")
        if self.save_total_limit is not None and _whole(self.save_total_limit) < 1:
            raise ValueError(f"save_total_limit must be None or a whole number >= 1, got {self.save_total_limit!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if self.on_reward_error not in REWARD_ERROR_POLICIES:
            raise ValueError(f"on_reward_error must be one of {', '.join(REWARD_ERROR_POLICIES)}, "
                             f"got {self.on_reward_error!r}")
        if isinstance(self.reward_funcs, str):  # one spec given in Python
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None:
            weights = list(self.reward_weights)
            if not all(_is_number(w) for w in weights):
                raise ValueError(f"reward_weights must be finite numbers, got {weights!r}")
            count = len(self.reward_funcs or []) + (self.reward_model is not None) + bool(getattr(self, "reward", None))
            if count and len(weights) != count:
                raise ValueError(f"reward_weights has {len(weights)} weight(s) for {count} reward function(s): give "
                                 "one per reward function")
            self.reward_weights = [float(w) for w in weights]
        if self.resume_from_checkpoint is True:  # YAML's `true`: the newest checkpoint, as 'latest'
            self.resume_from_checkpoint = "latest"
        check_hub_keys(self)
        if self.report_to is None or isinstance(self.report_to, str):
            self.report_to = [self.report_to or "none"]
        if list(self.report_to) not in (["none"], []):
            raise ValueError(f"report_to {_shown(self.report_to)}: the online loop ({', '.join(ONLINE_OBJECTIVES)}) "
                             "writes output_dir/metrics.jsonl only: give report_to none")


@dataclass
class PPOConfig(OnlineConfig):
    """Settings of a PPO run. Names follow TRL's PPOConfig (classic 0.11 and the later one).
    The objective's and the KL controller's defaults are classic TRL's (learning_rate, cliprange,
    cliprange_value, vf_coef, gamma, lam, init_kl_coef, target, horizon, ppo_epochs); the batch
    sizes are smaller (classic: 256 rollouts, minibatches of 128), and gradients are clipped at 1."""

    output_dir: str = field(default="ppo-output", metadata={"help": "Checkpoints, metrics.jsonl and the final "
                                                                   "model (output_dir/final) go here."})
    reward: str | None = field(default=None, metadata={"help": "A reward function 'module:function' or "
                                                               "'path/file.py:function' (one of reward_funcs)."})
    max_steps: int = field(default=100, metadata={"help": "PPO steps (one rollout batch and its update each)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Prompts per rollout batch on each "
                                                                           "process (classic TRL's batch_size)."})
    learning_rate: float = field(default=1.41e-5, metadata={"help": "AdamW learning rate."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "transformers scheduler name, "
                                                                          "stepped once per PPO step."})
    mini_batch_size: int = field(default=16, metadata={"help": "Rollout rows per optimizer step on each process."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})

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

    # --- scores
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a "
                                                                              "response cut off without EOS."})
    reward_baseline: float = field(default=0.0, metadata={"help": "Subtracted from every score."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-reward_clip, "
                                                                      "reward_clip] (classic TRL's score_clip)."})

    objective = "ppo"

    @property
    def max_new_tokens(self) -> int:
        return self.response_length

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kl_estimator = CLASSIC_ESTIMATOR_NAMES.get(self.kl_estimator, self.kl_estimator)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)} (or 'kl'), "
                             f"got {self.kl_estimator!r}")
        for name in ("mini_batch_size", "ppo_epochs", "response_length"):
            _check_whole(self, name, 1)
        if self.mini_batch_size > self.per_device_train_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) cannot exceed per_device_train_batch_size "
                             f"({self.per_device_train_batch_size})")
        for name in ("cliprange", "cliprange_value", "target", "horizon"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("vf_coef", "entropy_coef", "init_kl_coef"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("target_kl", "reward_clip"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
        if self.missing_eos_penalty is not None and (not _is_number(self.missing_eos_penalty)
                                                     or self.missing_eos_penalty < 0):
            raise ValueError(f"missing_eos_penalty must be None or a finite number >= 0, "
                             f"got {self.missing_eos_penalty!r}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma!r}, lam={self.lam!r}")
        if self.min_response_length is not None and not 1 <= self.min_response_length <= self.response_length:
            raise ValueError(f"min_response_length must lie in [1, response_length={self.response_length}], "
                             f"got {self.min_response_length!r}")
        if self.reward_model is not None and self.reward is not None:
            raise ValueError("give reward_model or reward, not both")


@dataclass
class GroupConfig(OnlineConfig):
    """What GRPO and RLOO share: groups of num_generations completions per prompt, compared with
    each other; num_iterations clipped updates on each rollout batch. Names and defaults are TRL's
    GRPOConfig/RLOOConfig. A step samples per_device_train_batch_size x gradient_accumulation_steps
    completions on each process (TRL's generation batch, steps_per_generation =
    gradient_accumulation_steps) and makes num_iterations optimizer steps on them."""

    output_dir: str = field(default="grpo-output", metadata={"help": "Checkpoints, metrics.jsonl and the final "
                                                                    "model (output_dir/final) go here."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per micro-batch on each "
                                                                          "process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step "
                                                                          "(and per rollout batch)."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the group); must "
                                                              "divide the completions of a step over all "
                                                              "processes."})
    num_iterations: int = field(default=1, metadata={"help": "Optimizer steps on each rollout batch (TRL's mu)."})
    max_completion_length: int = field(default=512, metadata={"help": "Most tokens sampled per completion."})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "Leave completions cut off "
                                                                              "without EOS out of the loss."})
    beta: float = field(default=0.0, metadata={"help": "Weight of the KL to the reference (0: no reference)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip eps of the importance ratio."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clip eps (None: epsilon; DAPO "
                                                                       "uses 0.28)."})

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_length

    @property
    def group_size(self) -> int:
        return self.num_generations

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gradient_accumulation_steps", "num_generations", "num_iterations", "max_completion_length"):
            _check_whole(self, name, 1)
        if self.num_generations < 2:
            raise ValueError(f"num_generations={self.num_generations}: {self.objective} compares each completion "
                             "with the others of its prompt's group, so a group needs at least 2 completions"
                             f"{self._one_group_reason()}")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps * world_size
        if per_step % self.num_generations:
            raise ValueError(f"num_generations ({self.num_generations}) must divide the completions of a step: "
                             f"per_device_train_batch_size ({self.per_device_train_batch_size}) x "
                             f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) x {world_size} "
                             f"process(es) = {per_step}")
        if not _is_number(self.beta) or not 0 <= self.beta <= 1e6:
            raise ValueError(f"beta must be a finite number in [0, 1e6], got {self.beta!r}")
        if not _is_number(self.epsilon) or not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon must lie in [0, 1], got {self.epsilon!r}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not _is_number(self.epsilon_high) or self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be None or a finite number >= 0, got {self.epsilon_high!r}")

    def _one_group_reason(self) -> str:
        return ""


@dataclass
class GRPOConfig(GroupConfig):
    """Settings of a GRPO run: TRL's GRPOConfig names and defaults (loss_type dapo, beta 0,
    scale_rewards group, num_generations 8, learning_rate 1e-6)."""

    loss_type: str = field(default="dapo", metadata={"help": "How per-token losses are reduced.",
                                                     "choices": list(GRPO_LOSS_TYPES)})
    importance_sampling_level: str = field(default="token", metadata={"help": "One importance ratio per token, "
                                           "or per sequence (GSPO).", "choices": list(IMPORTANCE_SAMPLING_LEVELS)})
    scale_rewards: str = field(default="group", metadata={"help": "Divide advantages by the group's reward std, "
                               "the batch's, or not at all (Dr. GRPO).", "choices": list(ADVANTAGE_SCALES)})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Weight the KL term by the importance "
                                                                         "ratio (TRL 1.16's default)."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "loss_type sapo: tau for A > 0."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "loss_type sapo: tau for A <= 0."})

    objective = "grpo"

    def __post_init__(self) -> None:
        if self.scale_rewards is True or self.scale_rewards is False:  # TRL's older boolean spelling
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super().__post_init__()
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown GRPO loss_type {self.loss_type!r}; known: {', '.join(GRPO_LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                             f"got {self.importance_sampling_level!r}")
        if self.scale_rewards not in ADVANTAGE_SCALES:
            raise ValueError(f"scale_rewards must be one of {', '.join(ADVANTAGE_SCALES)}, got {self.scale_rewards!r}")
        if self.loss_type == "cispo" and not self.epsilon_high > 0:
            raise ValueError(f"loss_type cispo caps the ratio at epsilon_high, which must be > 0; got "
                             f"{self.epsilon_high!r}")

    def _one_group_reason(self) -> str:
        return (" (with scale_rewards='group' a group of 1 has no std to divide by, and any scale gives it "
                "advantage 0)" if self.scale_rewards == "group" else " (a group of 1 is its own mean: advantage 0)")


@dataclass
class RLOOConfig(GroupConfig):
    """Settings of an RLOO run: TRL's RLOOConfig names and defaults (beta 0.05, the KL in the reward;
    num_generations 2; normalize_advantages off)."""

    output_dir: str = field(default="rloo-output", metadata={"help": "Checkpoints, metrics.jsonl and the final "
                                                                    "model (output_dir/final) go here."})
    num_generations: int = field(default=2, metadata={"help": "Completions sampled per prompt (the group); must "
                                                              "divide the completions of a step over all "
                                                              "processes."})
    beta: float = field(default=0.05, metadata={"help": "Weight of the sequence KL (k1) to the reference, "
                                                        "subtracted from each reward (0: no reference)."})
    normalize_advantages: bool = field(default=False, metadata={"help": "Standardise the advantages over the "
                                                                        "batch."})

    objective = "rloo"


ONLINE_CONFIGS: dict[str, type[OnlineConfig]] = {"ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig}
"""The config class of each online objective (ONLINE_OBJECTIVES)."""


def _check_whole(config: Any, name: str, least: int) -> None:
    value = getattr(config, name)
    if _whole(value) < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

