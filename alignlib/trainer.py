r"""The minimal pairwise trainer: DPO (every `dpo_loss` type), ORPO, SimPO, CPO and reward models.

One optimizer step, for any objective:

    pairs   = the step's examples, split into micro-batches of per_device_train_batch_size
    for each micro-batch (chosen and rejected stacked into one forward pass):
        losses_i  = the objective's per-pair loss (alignlib.losses)        (B,)
        nll_sum   = summed -log p of the chosen response tokens (ORPO, CPO, rpo_alpha)
        backward( sum_i losses_i / N_pairs  +  alpha * nll_sum / N_chosen_tokens )
    clip the gradient norm, optimizer step, scheduler step

N_pairs and N_chosen_tokens count the whole step, so gradient accumulation is exact: k
micro-batches of b pairs give the gradient of one batch of k*b pairs, also when the last
micro-batch is smaller (dividing each micro-batch by its own size, as peers do, weights the
pairs of a short micro-batch more).

The reference policy of DPO (`reference_strategy`): "adapter_disabled" (LoRA: the same model
with its adapter off), "model" (a frozen copy loaded from the same path), "precomputed"
(reference log-probs computed once before training); "auto" picks the first for a LoRA policy
and the second otherwise.

Data order depends only on (seed, epoch); with the optimizer, scheduler and RNG states saved
in each checkpoint, a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignlib.data import (
    PreferenceCollator,
    check_token_ids,
    load_preference_dataset,
    pad_token_id_for,
    tokenize_preference_dataset,
)
from alignlib.distributed import (
    Processes,
    gather_objects,
    main_process_first,
    no_sync,
    run_on_main,
    shard,
    sum_across,
    sum_tensor,
    teardown,
    wrap,
)
from alignlib.distributed import setup as setup_processes
from alignlib.logprobs import sequence_logprobs, sequence_logprobs_from_hidden
from alignlib.losses import DPO_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, reward_ranking_loss, simpo_loss
from alignlib.models import (
    ModelConfig,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    make_reference,
    save_model,
)
from alignlib.training import (
    MetricsLogger,
    Progress,
    SeededSampler,
    Throughput,
    find_latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    rng_state,
    save_checkpoint,
    set_rng_state,
    set_seed,
)

SINGLE_PROCESS = Processes()

OBJECTIVES = ("dpo", "orpo", "simpo", "cpo", "reward")
REFERENCE_STRATEGY_CHOICES = ("auto", "adapter_disabled", "model", "precomputed")
NONFINITE_POLICIES = ("stop", "skip")
MAX_SKIPPED_IN_A_ROW = 8  # on_nonfinite="skip" gives up after this many non-finite steps in a row


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
    seed: int = field(default=42, metadata={"help": "Seed for initialisation, data order and dropout."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    beta: float = field(default=0.1, metadata={"help": "DPO/CPO beta, ORPO lambda, SimPO beta (try 2.0)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO: any dpo_loss type; CPO: sigmoid, hinge, ipo, simpo."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO / CPO / SimPO label noise."})
    rpo_alpha: float | None = field(default=None, metadata={"help": "DPO: weight of the NLL of chosen responses (RPO)."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "CPO: weight of the NLL of chosen responses."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO / CPO-simpo target margin."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "DPO f-divergence."})
    center_rewards_coefficient: float | None = field(default=None, metadata={"help": "Reward model centering."})
    reference_strategy: str = field(default="auto", metadata={"help": "auto, adapter_disabled, model, precomputed."})
    use_kernels: bool = field(default=False, metadata={"help": "Fused log-probs from hidden states (and the "
                              "Triton LoRA matmul on CUDA)."})
    fsdp: bool = field(default=False, metadata={"help": "Under torchrun: shard parameters, gradients and optimizer "
                       "states across ranks (FSDP2) instead of replicating the model (DDP)."})
    on_nonfinite: str = field(default="stop", metadata={"help": "When a step's loss or gradient norm is NaN/inf: "
                              "'stop' the run, or 'skip' the update (logged; stops after "
                              "MAX_SKIPPED_IN_A_ROW skips in a row)."})
    merge_adapter: bool = field(default=False, metadata={"help": "Save the LoRA adapter merged into the base."})
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png (needs matplotlib)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def check(self, objective: str) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give max_steps > 0 or num_train_epochs > 0")
        if self.reference_strategy not in REFERENCE_STRATEGY_CHOICES:
            raise ValueError(f"reference_strategy must be one of {', '.join(REFERENCE_STRATEGY_CHOICES)}, "
                             f"got {self.reference_strategy!r}")
        if objective == "dpo" and self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {self.loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")
        if objective == "cpo" and self.loss_type not in ("sigmoid", "hinge", "ipo", "simpo"):
            raise ValueError(f"unknown CPO loss_type {self.loss_type!r}; known: sigmoid, hinge, ipo, simpo")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        if self.fsdp and self.use_kernels:
            raise ValueError("use_kernels reads the lm_head weight outside the model's forward, which FSDP shards: "
                             "use one of fsdp and use_kernels")
        if self.resume_from_checkpoint not in (None, "latest") and not Path(self.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint directory at {self.resume_from_checkpoint}")


# ----------------------------------------------------------------------------------------------
# One micro-batch: log-probs, the objective's per-pair losses, metrics
# ----------------------------------------------------------------------------------------------


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
    """Weight of the chosen-response NLL in the step's loss."""
    if objective == "orpo":
        return 1.0
    if objective == "cpo":
        return cfg.cpo_alpha
    if objective == "dpo":
        return cfg.rpo_alpha or 0.0
    return 0.0


def response_logps(model: torch.nn.Module, batch: dict, *, use_kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens (2B,) and their counts (2B,).

    With use_kernels the lm_head and log-softmax run fused and chunked from the last hidden
    states (alignlib.logprobs.linear_token_logprobs), so the (2B, T, V) logits never exist.
    """
    labels = batch["labels"]
    counts = (labels[:, 1:] != -100).sum(-1)
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


def pairwise_terms(objective: str, cfg: TrainConfig, model: torch.nn.Module, batch: dict, reference,
                   *, policy: torch.nn.Module | None = None) -> BatchTerms:
    """The objective's per-pair losses for one micro-batch of B pairs (rows: B chosen, then B rejected).

    `policy`: the PolicyOutputs of `model` to run (e.g. wrapped in DDP); by default a plain one.
    """
    pairs = batch["input_ids"].shape[0] // 2
    policy = policy if policy is not None else PolicyOutputs(model, objective, cfg.use_kernels)
    if objective == "reward":
        scores = policy(batch["input_ids"], batch["attention_mask"])
        scores = scores if scores.dtype == torch.float64 else scores.float()  # bf16/fp16 scores upcast
        scores, poison = _finite_or_poisoned(scores)
        out = reward_ranking_loss(scores[:pairs], scores[pairs:], margin=batch.get("margin"),
                                  center_rewards_coefficient=cfg.center_rewards_coefficient)
        return BatchTerms(out.losses.sum() + poison, scores.new_zeros(()), 0, _reward_metric_sums(out), pairs,
                          _ties(out))

    logps_sum, counts = policy(batch["input_ids"], batch["attention_mask"], batch["labels"])
    logps_sum, poison = _finite_or_poisoned(logps_sum)
    average = uses_average_logps(objective, cfg)
    logps = logps_sum / counts.clamp(min=1) if average else logps_sum
    chosen, rejected = logps[:pairs], logps[pairs:]
    nll_sum = -logps_sum[:pairs].sum()
    chosen_tokens = int(counts[:pairs].sum())
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
    return BatchTerms(out.losses.sum() + poison, nll_sum, chosen_tokens, metrics, pairs, _ties(out))


def _finite_or_poisoned(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` with NaN/inf replaced by 0, and a term to add to the loss: 0 when every value was
    finite, NaN otherwise (and NaN gradients behind it).

    NaN or inf logits are a property of the step, not of the input to a loss function (which
    refuses non-finite log-probs): this carries them past the loss functions' checks to the
    step's own check, where `on_nonfinite` stops the run or skips the update on every rank.
    """
    if bool(torch.isfinite(values).all()):
        return values, values.new_zeros(())
    finite = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    return finite, values.sum() * 0.0


def _ties(out) -> int:
    return int((out.chosen_rewards == out.rejected_rewards).sum())


def _reward_metric_sums(out) -> dict[str, float]:
    return {
        "accuracy": (out.chosen_rewards > out.rejected_rewards).float().sum().item(),
        "margin": (out.chosen_rewards - out.rejected_rewards).sum().item(),
        "mean_reward": ((out.chosen_rewards + out.rejected_rewards) / 2).sum().item(),
    }


def reference_logps(reference, batch: dict, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's summed log-probs of chosen (B,) and rejected (B,)."""
    if "ref_logps" in batch:  # precomputed
        ref = batch["ref_logps"]
    else:
        ref = sequence_logprobs(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return ref[:pairs], ref[pairs:]


# ----------------------------------------------------------------------------------------------
# Data: tokenized pairs, the step schedule, batches
# ----------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Which examples each optimizer step uses: depends only on (seed, epoch, step).

    pairs_per_step is global: per_device_train_batch_size x gradient_accumulation_steps x the
    number of ranks. Under torchrun each rank takes its share of a step (`distributed.shard`)
    and splits it into micro-batches of `micro_batch`.
    """

    num_examples: int
    pairs_per_step: int
    micro_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.pairs_per_step)

    def step_indices(self, step: int) -> list[int]:
        """Example indices of step `step` (0-based), over all ranks."""
        epoch, position = divmod(step, self.steps_per_epoch)
        sampler = SeededSampler(self.num_examples, seed=self.seed)
        sampler.set_epoch(epoch)
        return sampler.order()[position * self.pairs_per_step : (position + 1) * self.pairs_per_step]

    def micro_batches(self, step: int, processes: Processes = SINGLE_PROCESS) -> list[list[int]]:
        """This rank's example indices of step `step`, split into micro-batches.

        Every rank gets the same number of micro-batches (so each joins every gradient
        all-reduce); where a short last step leaves a rank fewer examples, its list ends with
        empty micro-batches, which the loop runs with zero weight.
        """
        everyone = self.step_indices(step)
        mine = shard(everyone, processes)
        count = math.ceil(math.ceil(len(everyone) / processes.world_size) / self.micro_batch)
        batches = [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]
        return batches + [[] for _ in range(count - len(batches))]


def collate(dataset, indices: list[int], collator: PreferenceCollator, device: torch.device,
            ref_logps: torch.Tensor | None = None) -> dict:
    rows = [dataset[i] for i in indices]
    batch = {key: value.to(device) for key, value in collator(rows).items()}
    if ref_logps is not None:  # (N, 2): chosen, rejected
        picked = ref_logps[indices].to(device)
        batch["ref_logps"] = torch.cat([picked[:, 0], picked[:, 1]])
    return batch


def load_pairs(source: str, split: str, cfg: TrainConfig, tokenizer, what: str, *, verbose: bool = True):
    raw = load_preference_dataset(source, split=split, format=cfg.dataset_format, tokenizer=tokenizer)
    tokenized, stats = tokenize_preference_dataset(raw, tokenizer, max_length=cfg.max_length,
                                                   max_prompt_length=cfg.max_prompt_length)
    if not verbose:
        return tokenized, stats
    if stats.dropped_empty_response or stats.identical_pairs or stats.prompts_truncated or stats.responses_truncated:
        print(f"[{what}] {stats.pairs_in} pairs: {stats.dropped_empty_response} dropped (no response token left "
              f"after truncation), {stats.identical_pairs} with chosen identical to rejected (kept), "
              f"{stats.prompts_truncated} prompts cut to max_prompt_length, {stats.responses_truncated} "
              f"responses cut to max_length", flush=True)
    return tokenized, stats


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    seconds: float


def train(objective: str, cfg: TrainConfig, model_cfg: ModelConfig) -> TrainResult:
    """Train `objective` on cfg.dataset_name starting from model_cfg.model_name_or_path; see the module docstring.

    Under torchrun every rank calls this; see alignlib.distributed for how the work is split.
    """
    cfg.check(objective)
    if not model_cfg.model_name_or_path:
        raise ValueError("no model: give model_name_or_path (--model PATH)")
    if not cfg.dataset_name:
        raise ValueError("no dataset: give dataset_name (--dataset PATH)")
    processes = setup_processes()
    try:
        return _train(objective, cfg, model_cfg, processes)
    finally:
        # DDP's wrapper sits in reference cycles (its hooks): collect it while the process group
        # still exists, not at interpreter exit after destroy_process_group (gloo then aborts).
        gc.collect()
        teardown(processes)


def _train(objective: str, cfg: TrainConfig, model_cfg: ModelConfig, processes: Processes) -> TrainResult:
    started = time.perf_counter()
    output_dir = Path(cfg.output_dir)
    main = processes.is_main
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(model_cfg.model_name_or_path, revision=model_cfg.model_revision, what="model")
    with main_process_first(processes):  # rank 0 fills the datasets cache, the others read it
        train_set, _ = load_pairs(cfg.dataset_name, cfg.dataset_train_split, cfg, tokenizer, "train", verbose=main)
        eval_set = None
        if cfg.eval_dataset_name:
            eval_set, _ = load_pairs(cfg.eval_dataset_name, cfg.dataset_test_split, cfg, tokenizer, "eval",
                                     verbose=main)

    if objective == "reward":
        model = load_reward_model(model_cfg, tokenizer=tokenizer, gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = load_causal_lm(model_cfg, gradient_checkpointing=cfg.gradient_checkpointing)
    vocab_size = model.get_input_embeddings().num_embeddings
    check_token_ids(train_set, vocab_size, what="train dataset")
    if eval_set is not None:
        check_token_ids(eval_set, vocab_size, what="eval dataset")
    device = _place(model, processes)
    collator = PreferenceCollator(pad_token_id_for(tokenizer), for_reward_model=objective == "reward")
    fused_lora_off = _maybe_fuse_lora(model, cfg)

    reference, ref_train, ref_eval = None, None, None
    if objective == "dpo":
        reference = make_reference(_reference_strategy(cfg, model_cfg), model, model_cfg)
        if reference.precompute_only:
            ref_train = _precompute_reference(reference, train_set, collator, cfg, device, processes)
            ref_eval = eval_set and _precompute_reference(reference, eval_set, collator, cfg, device, processes)

    # DDP wraps the whole policy forward; FSDP shards the model in place (each decoder block, then the root).
    policy = PolicyOutputs(model, objective, cfg.use_kernels)
    if cfg.fsdp:
        wrap(model, "fsdp", processes, layers=_decoder_blocks(model))
        sync_target = model
    else:
        policy = wrap(policy, "ddp", processes)
        sync_target = policy

    world = processes.world_size
    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    schedule = Schedule(len(train_set), pairs_per_step, cfg.per_device_train_batch_size, cfg.seed)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * schedule.steps_per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, num_training_steps=total_steps,
                               num_warmup_steps=cfg.warmup_steps or None,
                               warmup_ratio=None if cfg.warmup_steps else cfg.warmup_ratio)

    def fresh():
        return _fresh_model(objective, model_cfg, tokenizer)

    start_step = 0
    checkpoint = _checkpoint_to_resume(cfg)
    if checkpoint is not None:
        start_step = _resume(checkpoint, model, optimizer, scheduler, cfg, processes, fresh)
        if main:
            print(f"resumed from {checkpoint} at step {start_step}", flush=True)
    logger = MetricsLogger(output_dir, resume_step=start_step if checkpoint is not None else None)
    if main:
        (output_dir / "config.json").write_text(json.dumps(
            {"objective": objective, "train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
             "world_size": world}, indent=2, default=str))

    evaluate_now = _evaluator(objective, cfg, model, policy, eval_set, collator, reference, ref_eval, device, processes)
    eval_before = evaluate_now() if eval_set is not None and start_step == 0 else {}
    if eval_before:
        logger.log({f"eval_{k}": v for k, v in eval_before.items()}, step=0, epoch=0.0)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                else contextlib.nullcontext())
    nll_alpha = nll_weight(objective, cfg)
    accuracy_key = "accuracy" if objective == "reward" else "rewards/accuracies"
    throughput = Throughput()
    window: dict[str, float] = {}  # this rank's metric sums since the last log (summed over ranks when logged)
    window_loss, window_pairs = 0.0, 0  # over all ranks
    window_local_pairs = 0  # this rank's (for the progress bar)
    skipped_in_a_row = 0
    model.train()
    with Progress(total_steps, initial=start_step, desc=f"alignlib {objective}", disable=cfg.disable_tqdm) as bar:
        for step in range(start_step, total_steps):
            done = step + 1
            index_batches = schedule.micro_batches(step, processes)
            everyone = schedule.step_indices(step)
            step_pairs = len(everyone)  # over all ranks
            # An empty micro-batch (a short last step) runs the step's first pair with zero weight.
            micro_batches = [collate(train_set, indices or everyone[:1], collator, device, ref_train)
                             for indices in index_batches]
            step_chosen_tokens = 0
            if nll_alpha:
                mine = sum(_chosen_tokens(b) for b, indices in zip(micro_batches, index_batches, strict=True) if indices)
                step_chosen_tokens = int(sum_tensor(torch.tensor([mine], device=device), processes).item())
            loss_value, step_metrics = 0.0, {}
            for position, (batch, indices) in enumerate(zip(micro_batches, index_batches, strict=True)):
                weight = world if indices else 0.0  # ranks' gradients are averaged; an empty micro-batch adds 0
                with no_sync(sync_target, skip=position < len(micro_batches) - 1):
                    with autocast:
                        terms = pairwise_terms(objective, cfg, model, batch, reference, policy=policy)
                        loss = terms.pair_loss_sum / step_pairs
                        if nll_alpha:
                            loss = loss + nll_alpha * terms.nll_sum / max(step_chosen_tokens, 1)
                    (loss * weight).backward()
                if not indices:
                    continue
                loss_value += loss.item()
                for key, value in terms.metric_sums.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value
                if nll_alpha:
                    step_metrics["nll_loss"] = (step_metrics.get("nll_loss", 0.0)
                                                + terms.nll_sum.item() / max(step_chosen_tokens, 1) * step_pairs)
                throughput.add(int(batch["attention_mask"].sum()))
            loss_value = sum_tensor(torch.tensor([loss_value], dtype=torch.float64, device=device), processes).item()
            grad_norm = _clip_grad_norm(trainable, cfg.max_grad_norm)
            if math.isfinite(loss_value) and math.isfinite(grad_norm):
                optimizer.step()
                skipped_in_a_row = 0
                for key, value in step_metrics.items():
                    window[key] = window.get(key, 0.0) + value
                window_loss += loss_value * step_pairs
                window_pairs += step_pairs
                window_local_pairs += sum(len(indices) for indices in index_batches)
                last_grad_norm = grad_norm
            else:
                skipped_in_a_row = _handle_nonfinite(cfg, done, loss_value, grad_norm, skipped_in_a_row, logger, main)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch = done / schedule.steps_per_epoch
            bar.update(loss=loss_value, acc=window.get(accuracy_key, 0.0) / max(window_local_pairs, 1))
            if done % cfg.logging_steps == 0 or done == total_steps:
                if window_pairs:
                    record = {key: value / window_pairs for key, value in sum_across(window, processes).items()}
                    record["loss"] = window_loss / window_pairs
                    record.update({"learning_rate": scheduler.get_last_lr()[0], "grad_norm": last_grad_norm,
                                   "tokens_per_second": sum_across({"rate": throughput.rate()}, processes)["rate"]})
                    logger.log(record, step=done, epoch=epoch)
                window, window_loss, window_pairs, window_local_pairs = {}, 0.0, 0, 0
                throughput.reset()
            if eval_set is not None and cfg.eval_steps and done % cfg.eval_steps == 0 and done != total_steps:
                logger.log({f"eval_{k}": v for k, v in evaluate_now().items()}, step=done, epoch=epoch)
                model.train()
            if cfg.save_steps and done % cfg.save_steps == 0 and done != total_steps:
                _save_checkpoint(output_dir, done, model, optimizer, scheduler, epoch, objective, cfg, processes, fresh)

    eval_after = evaluate_now() if eval_set is not None else {}
    if eval_after:
        logger.log({f"eval_{k}": v for k, v in eval_after.items()}, step=total_steps, epoch=total_steps / schedule.steps_per_epoch)
    if fused_lora_off is not None:
        fused_lora_off()
    model_dir = output_dir / "final"
    saved = _gathered_copy(model, fresh, processes) if cfg.fsdp else model
    run_on_main(lambda: save_model(saved, tokenizer, model_dir, merge_adapter=cfg.merge_adapter), processes)
    if main and cfg.plot:
        logger.plot(output_dir / "training_curves.png", keys=_plot_keys(objective, logger.path))
    logger.close()
    return TrainResult(output_dir, model_dir, total_steps, eval_before, eval_after, time.perf_counter() - started)


def _chosen_tokens(batch: dict) -> int:
    """Labelled tokens of the chosen rows (the first half) of a micro-batch."""
    labels = batch["labels"]
    return int((labels[: labels.shape[0] // 2, 1:] != -100).sum())


def _clip_grad_norm(params: list[torch.Tensor], max_grad_norm: float) -> float:
    """The gradient norm over all ranks (clipped to max_grad_norm if > 0), as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)


def _handle_nonfinite(cfg: TrainConfig, step: int, loss: float, grad_norm: float, skipped_in_a_row: int,
                      logger: MetricsLogger, main: bool) -> int:
    """Stop, or skip the update, for a step whose loss or gradient norm is NaN/inf; returns the skip count."""
    what = f"step {step}: the loss is {loss} and the gradient norm {grad_norm}"
    if cfg.on_nonfinite == "stop":
        raise FloatingPointError(f"{what}; stopping before the weights are corrupted (on_nonfinite='skip' skips "
                                 "such steps instead)")
    skipped_in_a_row += 1
    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise FloatingPointError(f"{what}; {skipped_in_a_row} steps in a row were non-finite, stopping")
    logger.log({"skipped_nonfinite_step": step}, step=step)
    if main:
        print(f"{what}; update skipped (on_nonfinite='skip')", flush=True)
    return skipped_in_a_row


def _place(model: torch.nn.Module, processes: Processes) -> torch.device:
    """Move the model to this rank's device (quantised models are placed at load time); return the device."""
    if processes.device is not None and not getattr(model, "is_loaded_in_4bit", False) \
            and not getattr(model, "is_loaded_in_8bit", False):
        model.to(processes.device)
    return next(model.parameters()).device


def _decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers names their class in _no_split_modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [module for module in base.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"fsdp: found no decoder blocks to shard in {type(base).__name__} "
                         f"(its _no_split_modules is {sorted(names)})")
    return blocks


def _fresh_model(objective: str, model_cfg: ModelConfig, tokenizer):
    """An unsharded model built as the trained one was (on the CPU): the vessel for FSDP's full weights.

    Building it draws random numbers (the LoRA initialisation); the random state is put back, so a
    checkpoint save does not change the run's dropout masks.
    """
    with torch.random.fork_rng():
        if objective == "reward":
            return load_reward_model(model_cfg, tokenizer=tokenizer)
        return load_causal_lm(model_cfg)


def _gathered_copy(model, fresh, processes: Processes):
    """FSDP: the sharded model's full weights, gathered (every rank takes part) into `fresh()` on
    rank 0; None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not processes.is_main:
        return None
    copy = fresh()
    copy.load_state_dict(full)
    return copy


class _HeldState:
    """Stands in for the optimizer in save_checkpoint/load_checkpoint under FSDP: holds the full
    optimizer state dict gathered from (or to be sharded back onto) the ranks."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, epoch: float, objective: str,
                     cfg: TrainConfig, processes: Processes, fresh) -> None:
    """Every rank calls this: their RNG states are gathered (and under FSDP the full weights and
    optimizer state), rank 0 writes, the others wait for it."""
    rng_states = gather_objects(rng_state(), processes)
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full_optimizer = get_optimizer_state_dict(model, optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model, optimizer = _gathered_copy(model, fresh, processes), _HeldState(full_optimizer)
    run_on_main(lambda: save_checkpoint(
        output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
        data_state={"step": step, "seed": cfg.seed, "world_size": processes.world_size},
        metadata={"objective": objective}, save_total_limit=cfg.save_total_limit,
        extra_state={"rank_rng_states": rng_states}), processes)


def _resume(checkpoint: Path, model, optimizer, scheduler, cfg: TrainConfig, processes: Processes, fresh) -> int:
    """Load `checkpoint` on every rank; returns the step it was saved at."""
    if cfg.fsdp:  # read the full state into an unsharded copy, then shard it onto this rank
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        copy, held = fresh(), _HeldState()
        state = load_checkpoint(checkpoint, copy, held, scheduler)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, copy.state_dict(), options=full)
        set_optimizer_state_dict(model, optimizer, held.state, options=full)
    else:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    saved_world = state["data_state"].get("world_size", 1)
    if saved_world != processes.world_size:
        raise ValueError(f"checkpoint {checkpoint} was saved by {saved_world} process(es), this run has "
                         f"{processes.world_size}: resume with the same number of ranks (the data order depends on it)")
    rank_states = (state.get("extra_state") or {}).get("rank_rng_states")
    if rank_states:  # each rank continues its own random stream (dropout)
        set_rng_state(rank_states[processes.rank])
    return state["step"]


def _reference_strategy(cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    if cfg.reference_strategy != "auto":
        return cfg.reference_strategy
    return "adapter_disabled" if model_cfg.use_peft else "model"


def _maybe_fuse_lora(model: torch.nn.Module, cfg: TrainConfig):
    """With use_kernels on a LoRA model, route LoRA layers through the Triton matmul where it runs."""
    if not cfg.use_kernels or not hasattr(model, "peft_config"):
        return None
    from alignlib.fused_lora import disable_fused_lora, enable_fused_lora

    enable_fused_lora(model)
    return lambda: disable_fused_lora(model)


def _rank_batches(num_examples: int, size: int, processes: Processes) -> list[list[int]]:
    """This rank's share of examples 0..N-1 in batches of `size`; every rank gets the same number of
    batches (FSDP needs every rank in every forward), padded with empty ones."""
    mine = shard(list(range(num_examples)), processes)
    count = math.ceil(math.ceil(num_examples / processes.world_size) / size)
    batches = [mine[i : i + size] for i in range(0, len(mine), size)]
    return batches + [[] for _ in range(count - len(batches))]


def _precompute_reference(reference, dataset, collator, cfg: TrainConfig, device,
                          processes: Processes = SINGLE_PROCESS) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every pair, computed once before training.

    Each rank computes its share; the rows are summed over ranks (each row is filled by one rank).
    """
    values = None
    for indices in _rank_batches(len(dataset), cfg.per_device_eval_batch_size, processes):
        batch = collate(dataset, indices or [0], collator, device)
        logps = sequence_logprobs(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        if values is None:
            values = logps.new_zeros(len(dataset), 2)
        if indices:
            pairs = logps.shape[0] // 2
            values[indices] = torch.stack([logps[:pairs], logps[pairs:]], dim=-1)
    return sum_tensor(values, processes).cpu()


def _evaluator(objective, cfg, model, policy, eval_set, collator, reference, ref_eval, device,
               processes: Processes = SINGLE_PROCESS):
    """A function that returns the held-out metrics (means over pairs) of the model as it is now;
    under torchrun each rank evaluates its share and the sums are added up."""
    # DDP's forward would also sync buffers; evaluation needs none of it. FSDP's runs the shards.
    evaluated = policy.module if hasattr(policy, "module") else policy

    def evaluate() -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for indices in _rank_batches(len(eval_set), cfg.per_device_eval_batch_size, processes):
                batch = collate(eval_set, indices or [0], collator, device, ref_eval)
                terms = pairwise_terms(objective, cfg, model, batch, reference, policy=evaluated)
                if not indices:
                    continue
                for key, value in terms.metric_sums.items():
                    sums[key] = sums.get(key, 0.0) + value
                sums["loss"] = sums.get("loss", 0.0) + terms.pair_loss_sum.item()
                sums["ties"] = sums.get("ties", 0.0) + terms.ties
                sums["pairs"] = sums.get("pairs", 0.0) + terms.pairs
        sums = sum_across(sums, processes)
        pairs_seen, ties = sums.pop("pairs"), sums.pop("ties")
        metrics = {key: value / pairs_seen for key, value in sums.items()}
        accuracy_key = "accuracy" if objective == "reward" else "rewards/accuracies"
        # A tie (policy == reference before training) is a coin flip: count it as half right.
        metrics["accuracy_ties_half"] = metrics[accuracy_key] + 0.5 * ties / pairs_seen
        return metrics

    return evaluate


def _checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from_checkpoint is None:
        return None
    if cfg.resume_from_checkpoint == "latest":
        return find_latest_checkpoint(cfg.output_dir)
    return Path(cfg.resume_from_checkpoint)


def _plot_keys(objective: str, metrics_path: Path) -> list[str] | None:
    from alignlib.training import read_metrics

    seen = {key for record in read_metrics(metrics_path) for key in record}
    wanted = ["loss", "accuracy", "margin"] if objective == "reward" else ["loss", "rewards/accuracies", "rewards/margins"]
    wanted += ["eval_accuracy_ties_half"]
    keys = [key for key in wanted if key in seen]
    return keys or None
