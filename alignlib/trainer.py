r"""The offline trainer: SFT, DPO (every `dpo_loss` type), ORPO, SimPO, CPO, KTO and reward models.

One optimizer step, for any objective (`train_step`):

    examples = the step's N examples: pairs, unpaired rows or SFT sequences (Schedule; this rank's
               share under torchrun)
    KTO only: z0 = KL(policy || reference) on the step's mismatched prompt/completion pairs (`_kto_z0`)
    for each micro-batch of per_device_train_batch_size examples (a pair's two sides in one forward):
        terms = micro_batch_terms(...)   per-example losses (alignlib.losses), summed; the NLL's tokens
        backward( terms.loss_sum / N  +  alpha * terms.nll_sum / N_nll_tokens )
    clip the gradient norm
    if the loss and the norm are finite: optimizer step      (else on_nonfinite: stop, or skip the update)
    scheduler step

N, N_nll_tokens and z0 are the whole step's (over every micro-batch and rank), so gradient
accumulation is exact: k micro-batches of b examples give the gradient of one batch of k*b,
also when the last micro-batch is smaller (dividing each micro-batch by its own size, as peers
do, weights the examples of a short micro-batch more; estimating z0 per micro-batch, as TRL
does, makes the loss depend on the split). alpha is the objective's NLL weight (`nll_weight`:
ORPO 1, CPO cpo_alpha, DPO rpo_alpha, else 0). SFT has no per-example loss and alpha 1: its loss
is the NLL of the step's trained tokens over their count, TRL's token-weighted mean.

The run (`setup`) is built once: tokenizer, data, model (LoRA/QLoRA), the reference, DDP or
FSDP wrapping, optimizer and scheduler, resume, the metrics logger. The loop (`train`) runs
`train_step` and, when due, writes a metrics line, evaluates and saves a checkpoint; at the
end it evaluates and saves the model.

The reference policy of DPO and KTO (`reference_strategy`): "adapter_disabled" (LoRA: the same model
with its adapter off), "model" (a frozen copy loaded from the same path), "precomputed"
(reference log-probs computed once before training); "auto" picks the first for a LoRA policy
and the second otherwise.

Data order depends only on (seed, epoch); with the optimizer, scheduler and RNG states saved
in each checkpoint, a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlib.checkpoint import read_trainer_state, write_text_atomic
from alignlib.configs import OFFLINE_OBJECTIVES, TrainConfig, report_integrations
from alignlib.data import (
    PACKED_COLUMNS,
    SEQUENCE_COLUMNS,
    TOKENIZED_COLUMNS,
    UNPAIRED_COLUMNS,
    PreferenceCollator,
    SequenceCollator,
    UnpairedCollator,
    check_token_ids,
    pad_token_id_for,
)
from alignlib.distributed import (
    SINGLE_PROCESS,
    Processes,
    decoder_blocks,
    gathered_full_model,
    no_sync,
    run_on_main,
    sum_across,
    sum_tensor,
    teardown,
    wrap,
)
from alignlib.distributed import setup as setup_processes
from alignlib.logprobs import sequence_logprobs
from alignlib.metrics import MetricsLogger, MetricWindow, Progress, read_metrics, report_writers
from alignlib.models import (
    ModelConfig,
    ReferenceForward,
    auto_reference_strategy,
    is_quantized,
    load_causal_lm,
    load_model_tokenizer,
    load_reward_model,
    make_reference,
    vocabulary_size,
)
from alignlib.objectives import (
    DATA_KINDS,
    BatchTerms,
    PolicyOutputs,
    check_packing_isolated,
    kto_kl,
    metric_means,
    micro_batch_terms,
    nll_tokens,
    nll_weight,
)
from alignlib.run_data import load_run_datasets
from alignlib.run_folder import (
    OutputDirLock,
    check_output_dir,
    check_restart,
    check_same_run,
    claim_output_dir,
    dataset_fingerprint,
    portable_settings,
    run_record,
)
from alignlib.saved_models import save_model
from alignlib.training import (
    Interrupted,
    MixedPrecision,
    NonFiniteGuard,
    Schedule,
    check_devices,
    checkpoint_to_resume,
    clip_grad_norm,
    make_optimizer,
    make_scheduler,
    rank_batches,
    resume_requested,
    resume_training,
    save_training_checkpoint,
    set_seed,
    step_scheduler,
)

__all__ = ["OBJECTIVES", "Run", "StepResult", "TrainConfig", "TrainResult", "setup", "train", "train_step"]

OBJECTIVES = OFFLINE_OBJECTIVES


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    seconds: float


@dataclass
class Run:
    """Everything a step touches, built once by `setup`."""

    objective: str
    cfg: TrainConfig
    processes: Processes
    tokenizer: Any
    train_set: Any  # tokenized pairs (alignlib.data.tokenize_preference_dataset)
    eval_set: Any | None
    collator: PreferenceCollator | UnpairedCollator | SequenceCollator
    model: torch.nn.Module  # the model being trained (a peft model with LoRA)
    policy: torch.nn.Module  # its PolicyOutputs, wrapped in DDP under torchrun
    sync_target: torch.nn.Module  # what holds back the gradient all-reduce (the DDP wrapper, or the FSDP model)
    reference: ReferenceForward | None  # DPO's reference policy
    ref_logps: dict[str, torch.Tensor | None]  # "train", "eval": (N, 2) precomputed reference log-probs
    schedule: Schedule
    total_steps: int
    trainable: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    guard: NonFiniteGuard
    precision: MixedPrecision  # bf16/fp16 autocast, fp16's gradient scaler
    logger: MetricsLogger
    start_step: int
    device: torch.device
    fsdp_vessel: Callable[[], torch.nn.Module] | None  # FSDP: builds an unsharded copy for checkpoints
    unfuse_lora: Callable[[], None] | None  # use_kernels: routes the LoRA layers back to peft
    started: float
    record: dict  # what makes this run this run (alignlib.run_folder.run_record), kept in every checkpoint
    step: int  # optimizer steps done

    @property
    def nll_alpha(self) -> float:
        return nll_weight(self.objective, self.cfg)

    @property
    def accuracy_key(self) -> str | None:
        """The metric the progress bar shows: pair accuracy (None for unpaired rows)."""
        if DATA_KINDS[self.objective] != "pairs":
            return None
        return "accuracy" if self.objective == "reward" else "rewards/accuracies"

    def epoch(self, step: int) -> float:
        return step / self.schedule.steps_per_epoch

    def autocast(self):
        return self.precision.autocast()

    def collate(self, split: str, indices: list[int]) -> dict:
        """The micro-batch of examples `indices` of the train or eval set, on the device."""
        dataset = self.train_set if split == "train" else self.eval_set
        return collate(dataset, indices, self.collator, self.device, self.ref_logps[split])


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(objective: str, cfg: TrainConfig, model_cfg: ModelConfig) -> TrainResult:
    """Train `objective` on cfg.dataset_name starting from model_cfg.model_name_or_path; see the module docstring.

    Under torchrun every rank calls this; see alignlib.distributed for how the work is split.
    """
    cfg.check(objective)
    if not model_cfg.model_name_or_path:
        raise ValueError("no model: give model_name_or_path (--model PATH)")
    if not cfg.dataset_name:
        raise ValueError("no dataset: give dataset_name (--dataset PATH)")
    check_devices(bf16=cfg.bf16, fp16=cfg.fp16, fsdp=cfg.fsdp)
    processes = setup_processes()
    lock = OutputDirLock(cfg.output_dir)
    run = None
    try:
        # Nothing is written before everything is validated: the folder is checked here (another run's
        # files, a run holding its lock), and locked and claimed (another run moved aside, config.json
        # and metrics.jsonl written) at the end of setup.
        checkpoint = checkpoint_to_resume(cfg.resume_from_checkpoint, cfg.output_dir, verbose=processes.is_main)
        restarting = checkpoint is None and resume_requested(cfg.resume_from_checkpoint)
        run_on_main(lock.check_free, processes)
        run_on_main(lambda: check_output_dir(cfg.output_dir, resuming=checkpoint is not None,
                                             overwrite=cfg.overwrite_output_dir, restarting=restarting), processes)
        run = setup(objective, cfg, model_cfg, processes, checkpoint=checkpoint, lock=lock)
        return train_loop(run)
    except KeyboardInterrupt:
        raise Interrupted(run.step if run is not None else None, cfg.output_dir) from None
    finally:
        if run is not None:  # a run that failed: metrics.jsonl and the report_to writers closed (done at a normal end)
            run.logger.close()
        lock.release()
        # DDP's wrapper sits in reference cycles (its hooks): collect it while the process group
        # still exists, not at interpreter exit after destroy_process_group (gloo then aborts).
        gc.collect()
        teardown(processes)


def train_loop(run: Run) -> TrainResult:
    """Steps from run.start_step to run.total_steps; a metrics line, an evaluation and a checkpoint
    whenever they are due; then the last evaluation and the saved model."""
    cfg = run.cfg
    log_every, save_every = cfg.interval("logging_steps", run.total_steps), cfg.interval("save_steps", run.total_steps)
    eval_every = cfg.eval_interval(run.total_steps, run.schedule.steps_per_epoch)  # 0: before and after only
    eval_before = evaluate_and_log(run, step=0) if run.eval_set is not None and run.start_step == 0 else {}
    window = MetricWindow()  # the steps since the last metrics line
    run.model.train()
    with Progress(run.total_steps, initial=run.start_step, desc=f"alignlib {run.objective}",
                  disable=cfg.disable_tqdm) as bar:
        for step in range(run.start_step, run.total_steps):
            done, last = step + 1, step + 1 == run.total_steps
            result = train_step(run, step)
            run.step = done
            window.tokens.add(result.tokens)
            if result.updated:
                window.add(result.metric_sums, loss=result.loss, pairs=result.examples,
                           local_pairs=result.local_examples, grad_norm=result.grad_norm)
            shown = {"acc": window.local_mean(run.accuracy_key)} if run.accuracy_key else {}
            bar.update(loss=result.loss, **shown)
            if done % log_every == 0 or last or (cfg.logging_first_step and done == 1):
                record = window.summary(run.processes, means=lambda sums, n: metric_means(run.objective, sums, n),
                                        learning_rate=run.scheduler.get_last_lr()[0])
                if record is not None:
                    run.logger.log(record, step=done, epoch=run.epoch(done))
            if run.eval_set is not None and eval_every and done % eval_every == 0 and not last:
                evaluate_and_log(run, step=done)
            if save_every and done % save_every == 0 and not last:
                save_run_checkpoint(run, step=done)
    eval_after = evaluate_and_log(run, step=run.total_steps) if run.eval_set is not None else {}
    model_dir = save_final_model(run)
    return TrainResult(Path(cfg.output_dir), model_dir, run.total_steps, eval_before, eval_after,
                       time.perf_counter() - run.started)


# ----------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float  # the step's loss, over every rank
    grad_norm: float
    updated: bool  # False when on_nonfinite='skip' dropped the update
    metric_sums: dict[str, float]  # this rank's metric sums over its examples
    examples: int  # the step's examples (pairs or unpaired rows), over every rank
    local_examples: int  # this rank's
    tokens: int  # this rank's tokens (for tokens_per_second)


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step (0-based `step`): the pseudo-code of the module docstring."""
    cfg, processes = run.cfg, run.processes
    everyone = run.schedule.step_indices(step)  # the step's examples, over every rank
    mine = run.schedule.micro_batches(step, processes)  # this rank's, in micro-batches
    # An empty micro-batch (a short last step) runs the step's first example with zero weight.
    batches = [run.collate("train", indices or everyone[:1]) for indices in mine]
    n_examples = len(everyone)
    n_nll_tokens = _nll_tokens(run, batches, mine) if run.nll_alpha else 0
    z0 = _kto_z0(run, "train", everyone) if run.objective == "kto" else None

    loss_value, metric_sums, tokens = 0.0, {}, 0
    for position, (batch, indices) in enumerate(zip(batches, mine, strict=True)):
        weight = processes.world_size if indices else 0.0  # ranks' gradients are averaged; an empty micro-batch adds 0
        with no_sync(run.sync_target, skip=position < len(batches) - 1):
            with run.autocast():
                terms = micro_batch_terms(run.objective, cfg, run.model, batch, run.reference, policy=run.policy,
                                          z0=z0)
                loss = terms.loss_sum / n_examples
                if run.nll_alpha:
                    loss = loss + run.nll_alpha * terms.nll_sum / max(n_nll_tokens, 1)
            run.precision.backward(loss * weight)
        if indices:
            loss_value += loss.item()
            _add_metrics(metric_sums, terms, n_examples, n_nll_tokens, run.nll_alpha if run.objective != "sft" else 0)
            tokens += int(batch["attention_mask"].sum())
    loss_value = sum_tensor(torch.tensor([loss_value], dtype=torch.float64, device=run.device), processes).item()

    run.precision.unscale(run.optimizer)
    grad_norm = clip_grad_norm(run.trainable, cfg.max_grad_norm)
    overflowed = run.precision.overflowed(loss_value, grad_norm)  # fp16: the scaler skips the step, halves its scale
    updated = not overflowed and run.guard.allows(step + 1, loss_value, grad_norm)
    run.precision.step(run.optimizer, update=updated)
    if overflowed:
        run.logger.log({"fp16_skipped_step": step + 1, "loss_scale": run.precision.scale}, step=step + 1)
    step_scheduler(run.scheduler)
    run.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm, updated, metric_sums, n_examples, sum(map(len, mine)), tokens)


def _nll_tokens(run: Run, batches: list[dict], mine: list[list[int]]) -> int:
    """The tokens the step's NLL term covers (the chosen responses'), over every rank."""
    count = sum(nll_tokens(run.objective, batch) for batch, indices in zip(batches, mine, strict=True) if indices)
    return int(sum_tensor(torch.tensor([count], device=run.device), run.processes).item())


def _kto_z0(run: Run, split: str, indices: list[int]) -> float:
    """KTO's reference point for the examples `indices` (a step's, in the step's order, over every
    rank): the mean of log pi - log pi_ref over the mismatched pairs (prompt of example j, completion
    of example j - 1, the first taking the last's), each rank computing its share, clamped at 0.
    The same whatever the split into micro-batches and ranks. A single example is paired with itself."""
    dataset = run.train_set if split == "train" else run.eval_set
    pairs = [(indices[j], indices[j - 1]) for j in range(len(indices))]
    total, count = 0.0, 0.0
    for chunk in rank_batches(list(range(len(pairs))), run.cfg.per_device_train_batch_size, run.processes):
        chosen = [pairs[k] for k in (chunk or [0])]  # an empty share still runs the forward (FSDP needs every rank)
        kl_batch = run.collator.mismatched([dataset[a] for a, _ in chosen], [dataset[b] for _, b in chosen])
        with run.autocast():
            part = kto_kl(run.policy, run.reference, {key: value.to(run.device) for key, value in kl_batch.items()})
        if chunk:
            total, count = total + float(part.total), count + float(part.count)
    sums = sum_across({"total": total, "count": count}, run.processes)
    return max(0.0, sums["total"] / sums["count"])


def _add_metrics(sums: dict[str, float], terms: BatchTerms, n_examples: int, n_nll_tokens: int,
                 nll_alpha: float) -> None:
    """Add a micro-batch's metric sums (the NLL as its share of the step's mean, times the step's examples;
    not for SFT, whose loss is that NLL)."""
    for key, value in terms.metric_sums.items():
        sums[key] = sums.get(key, 0.0) + value
    if nll_alpha:
        sums["nll_loss"] = sums.get("nll_loss", 0.0) + terms.nll_sum.item() / max(n_nll_tokens, 1) * n_examples


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def setup(objective: str, cfg: TrainConfig, model_cfg: ModelConfig, processes: Processes = SINGLE_PROCESS, *,
          checkpoint: Path | None = None, lock: OutputDirLock | None = None) -> Run:
    """Build the run: data, model, reference, wrapping, optimizer, resume from `checkpoint`, and
    last (once all of that has been validated) the output folder and its logger."""
    started = time.perf_counter()
    set_seed(cfg.seed)
    tokenizer = load_model_tokenizer(model_cfg)  # with model_cfg.chat_template put on it
    train_set, eval_set = load_run_datasets(DATA_KINDS[objective], cfg, tokenizer, processes)
    if cfg.eval_strategy == "no":  # the eval rows are read and checked, never evaluated
        eval_set = None
    model = _load_model(objective, model_cfg, tokenizer, gradient_checkpointing=cfg.gradient_checkpointing)
    for dataset, what in ((train_set, "train dataset"), (eval_set, "eval dataset")):
        if dataset is not None:
            check_token_ids(dataset, vocabulary_size(model), what=what)
    device = _place(model, processes)
    if cfg.packing:
        check_packing_isolated(model, device)
    collator = _collator(objective, cfg, tokenizer)
    unfuse_lora = _maybe_fuse_lora(model, cfg)

    reference, ref_logps = None, {"train": None, "eval": None}
    if objective in ("dpo", "kto"):
        reference = make_reference(_reference_strategy(cfg, model_cfg), model, model_cfg,
                                   ref_model_name_or_path=cfg.ref_model, ref_adapter_name=cfg.ref_adapter_name)
        if reference.precompute_only:
            ref_logps["train"] = _precompute_reference(reference, train_set, collator, cfg, device, processes)
            if eval_set is not None:
                ref_logps["eval"] = _precompute_reference(reference, eval_set, collator, cfg, device, processes)

    # DDP wraps the whole policy forward; FSDP shards the model in place (each decoder block, then the root).
    policy = PolicyOutputs(model, objective, cfg.use_kernels)
    if cfg.fsdp:
        wrap(model, "fsdp", processes, layers=decoder_blocks(model))
        sync_target = model
    else:
        policy = wrap(policy, "ddp", processes)
        sync_target = policy

    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes.world_size
    schedule = Schedule(len(train_set), pairs_per_step, cfg.per_device_train_batch_size, cfg.seed)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * schedule.steps_per_epoch)
    optimizer = make_optimizer(model, cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, num_training_steps=total_steps,
                               num_warmup_steps=cfg.warmup_steps or None,
                               warmup_ratio=None if cfg.warmup_steps else cfg.warmup_ratio)
    fsdp_vessel = (lambda: _fresh_model(objective, model_cfg, tokenizer)) if cfg.fsdp else None

    columns = {"pairs": TOKENIZED_COLUMNS, "unpaired": UNPAIRED_COLUMNS,
               "sequences": PACKED_COLUMNS if cfg.packing else SEQUENCE_COLUMNS}[DATA_KINDS[objective]]
    record = run_record(objective, cfg, model_cfg, data=dataset_fingerprint(train_set, columns),
                        world_size=processes.world_size)
    precision = MixedPrecision(device, bf16=cfg.bf16, fp16=cfg.fp16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    precision.check_trainable(trainable)
    start_step = 0
    if checkpoint is None and resume_requested(cfg.resume_from_checkpoint) and not cfg.overwrite_output_dir:
        run_on_main(lambda: check_restart(cfg.output_dir, record), processes)
    if checkpoint is not None:
        check_same_run(read_trainer_state(checkpoint)["metadata"].get("run"), record, checkpoint,
                       verbose=processes.is_main)
        state = resume_training(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                processes=processes, fsdp_vessel=fsdp_vessel, grad_scaler=precision.scaler)
        start_step = state["step"]
        if processes.is_main:
            print(f"resumed from {checkpoint} at step {start_step}", flush=True)
    logger = _claim_output_dir(objective, cfg, model_cfg, processes, resume_step=start_step if checkpoint else None,
                               lock=lock, record=record)

    return Run(
        objective=objective, cfg=cfg, processes=processes, tokenizer=tokenizer, train_set=train_set,
        eval_set=eval_set, collator=collator, model=model, policy=policy, sync_target=sync_target,
        reference=reference, ref_logps=ref_logps, schedule=schedule, total_steps=total_steps,
        trainable=trainable, optimizer=optimizer, scheduler=scheduler,
        guard=NonFiniteGuard(cfg.on_nonfinite, lambda record, step: logger.log(record, step=step),
                             verbose=processes.is_main), precision=precision,
        logger=logger, start_step=start_step, device=device, fsdp_vessel=fsdp_vessel, unfuse_lora=unfuse_lora,
        started=started, record=record, step=start_step,
    )


def _claim_output_dir(objective: str, cfg: TrainConfig, model_cfg: ModelConfig, processes: Processes,
                      resume_step: int | None, lock: OutputDirLock | None, record: dict) -> MetricsLogger:
    """The first writes of the run, once everything is validated: the folder locked, another run's
    files moved aside (overwrite_output_dir), the report_to writers (TensorBoard, wandb) started,
    metrics.jsonl started (or trimmed to the resumed step), config.json."""
    if lock is not None:
        run_on_main(lock.acquire, processes)
    if resume_step is None and processes.is_main:
        moved = claim_output_dir(cfg.output_dir, overwrite=cfg.overwrite_output_dir)
        if moved is not None:
            print(f"overwrite_output_dir: the previous run's files in {cfg.output_dir} were moved to {moved}", flush=True)
    settings = {"objective": objective, "train": portable_settings(cfg), "model": portable_settings(model_cfg),
                "world_size": processes.world_size, "run": record}
    integrations = report_integrations(cfg.report_to)
    if not integrations and "all" in cfg.report_to and processes.is_main:
        print("report_to all: neither tensorboard nor wandb is installed; metrics go to metrics.jsonl only", flush=True)
    writers = report_writers(integrations, cfg.output_dir, logging_dir=cfg.logging_dir, run_name=cfg.run_name,
                             config=settings, resume_step=resume_step)
    logger = MetricsLogger(cfg.output_dir, resume_step=resume_step, writers=writers)
    if processes.is_main:
        try:
            write_text_atomic(Path(cfg.output_dir) / "config.json", json.dumps(settings, indent=2, default=str))
        except BaseException:
            logger.close()
            raise
    return logger


def _collator(objective: str, cfg: TrainConfig, tokenizer):
    pad = pad_token_id_for(tokenizer)
    if DATA_KINDS[objective] == "sequences":
        return SequenceCollator(pad)
    if DATA_KINDS[objective] == "unpaired":
        return UnpairedCollator(pad, max_length=cfg.max_length)
    return PreferenceCollator(pad, for_reward_model=objective == "reward")


def collate(dataset, indices: list[int], collator: PreferenceCollator | UnpairedCollator, device: torch.device,
            ref_logps: torch.Tensor | None = None) -> dict:
    """Rows `indices` of a tokenized dataset as one batch on `device`, with their precomputed
    reference log-probs (rows of the (N, 2) `ref_logps`) as batch["ref_logps"] (2B,)."""
    rows = [dataset[i] for i in indices]
    batch = {key: value.to(device) for key, value in collator(rows).items()}
    if ref_logps is not None:  # (N, 2): chosen, rejected
        picked = ref_logps[indices].to(device)
        batch["ref_logps"] = torch.cat([picked[:, 0], picked[:, 1]])
    return batch


def _load_model(objective: str, model_cfg: ModelConfig, tokenizer, *, gradient_checkpointing: bool = False):
    if objective == "reward":
        return load_reward_model(model_cfg, tokenizer=tokenizer, gradient_checkpointing=gradient_checkpointing)
    return load_causal_lm(model_cfg, gradient_checkpointing=gradient_checkpointing)


def _place(model: torch.nn.Module, processes: Processes) -> torch.device:
    """Move the model to this rank's device (quantised models are placed at load time); return the device."""
    if processes.device is not None and not is_quantized(model):
        model.to(processes.device)
    return next(model.parameters()).device


def _fresh_model(objective: str, model_cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """An unsharded model built as the trained one was (on the CPU): the vessel for FSDP's full weights.

    Building it draws random numbers (the LoRA initialisation); the random state is put back, so a
    checkpoint save does not change the run's dropout masks.
    """
    with torch.random.fork_rng():
        return _load_model(objective, model_cfg, tokenizer)


def _reference_strategy(cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    if cfg.reference_strategy != "auto":
        return cfg.reference_strategy
    return auto_reference_strategy(model_cfg, ref_model=cfg.ref_model, ref_adapter_name=cfg.ref_adapter_name)


def _maybe_fuse_lora(model: torch.nn.Module, cfg: TrainConfig) -> Callable[[], None] | None:
    """With use_kernels on a LoRA model, route LoRA layers through the Triton matmul where it runs;
    returns the function that undoes it."""
    if not cfg.use_kernels or not hasattr(model, "peft_config"):
        return None
    from alignlib.fused_lora import disable_fused_lora, enable_fused_lora

    enable_fused_lora(model)
    return lambda: disable_fused_lora(model)


def _precompute_reference(reference, dataset, collator, cfg: TrainConfig, device,
                          processes: Processes = SINGLE_PROCESS) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every pair, computed once before training.

    Each rank computes its share; the rows are summed over ranks (each row is filled by one rank).
    """
    values = None
    for indices in rank_batches(list(range(len(dataset))), cfg.per_device_eval_batch_size, processes):
        batch = collate(dataset, indices or [0], collator, device)
        logps = sequence_logprobs(reference(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        if values is None:
            values = logps.new_zeros(len(dataset), 2)
        if indices:
            pairs = logps.shape[0] // 2
            values[indices] = torch.stack([logps[:pairs], logps[pairs:]], dim=-1)
    return sum_tensor(values, processes).cpu()


# ----------------------------------------------------------------------------------------------
# Evaluation, checkpoints, the final model
# ----------------------------------------------------------------------------------------------


def evaluate(run: Run) -> dict[str, float]:
    """The held-out metrics (means over examples; KTO's z0 over the whole eval set) of the model as
    it is now, and `loss` as training computes it over a step (the per-example losses' mean, plus
    alpha times the NLL's token mean: SFT's loss, ORPO's and CPO's with their NLL); under torchrun
    each rank evaluates its share and the sums are added up. Leaves the model in eval mode."""
    # DDP's forward would also sync buffers; evaluation needs none of it. FSDP's runs the shards.
    evaluated = run.policy.module if hasattr(run.policy, "module") else run.policy
    run.model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        z0 = _kto_z0(run, "eval", _shuffled(len(run.eval_set), run.cfg.seed)) if run.objective == "kto" else None
        for indices in rank_batches(list(range(len(run.eval_set))), run.cfg.per_device_eval_batch_size,
                                    run.processes):
            batch = run.collate("eval", indices or [0])
            terms = micro_batch_terms(run.objective, run.cfg, run.model, batch, run.reference, policy=evaluated, z0=z0)
            if not indices:
                continue
            for key, value in terms.metric_sums.items():
                sums[key] = sums.get(key, 0.0) + value
            sums["loss"] = sums.get("loss", 0.0) + terms.loss_sum.item()
            sums["ties"] = sums.get("ties", 0.0) + terms.ties
            sums["examples"] = sums.get("examples", 0.0) + terms.examples
            sums["nll_sum"] = sums.get("nll_sum", 0.0) + terms.nll_sum.item()
            sums["nll_tokens"] = sums.get("nll_tokens", 0.0) + terms.nll_tokens
    sums = sum_across(sums, run.processes)
    examples, ties = sums.pop("examples"), sums.pop("ties")
    nll = sums.pop("nll_sum") / max(sums.pop("nll_tokens"), 1)
    metrics = metric_means(run.objective, sums, examples)
    if run.nll_alpha:
        metrics["loss"] += run.nll_alpha * nll
        if run.objective != "sft":
            metrics["nll_loss"] = nll
    if run.accuracy_key is not None:  # pairs: a tie (policy == reference before training) is a coin flip
        metrics["accuracy_ties_half"] = metrics[run.accuracy_key] + 0.5 * ties / examples
    return metrics


def _shuffled(n: int, seed: int) -> list[int]:
    """0..n-1 in a seeded order. KTO's eval z0 pairs each row with the one before it in this order: in
    file order, a pair's rejected row would follow its own chosen row and get that row's completion,
    a matched pair instead of a mismatched one."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def evaluate_and_log(run: Run, step: int) -> dict[str, float]:
    """`evaluate`, logged as eval_* metrics at `step`; the model goes back to train mode."""
    metrics = evaluate(run)
    run.logger.log({f"eval_{key}": value for key, value in metrics.items()}, step=step, epoch=run.epoch(step))
    run.model.train()
    return metrics


def save_run_checkpoint(run: Run, step: int) -> None:
    """checkpoint-{step} in output_dir (every rank calls this; rank 0 writes)."""
    save_training_checkpoint(
        run.cfg.output_dir, step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        processes=run.processes, epoch=run.epoch(step), data_state={"step": step, "seed": run.cfg.seed},
        metadata={"objective": run.objective, "run": run.record}, save_total_limit=run.cfg.save_total_limit,
        fsdp_vessel=run.fsdp_vessel, grad_scaler=run.precision.scaler)


def save_final_model(run: Run) -> Path:
    """The trained model (or adapter) in output_dir/final, the training curves, and the logger closed."""
    if run.unfuse_lora is not None:
        run.unfuse_lora()
    output_dir = Path(run.cfg.output_dir)
    model_dir = output_dir / "final"
    saved = gathered_full_model(run.model, run.fsdp_vessel, run.processes) if run.cfg.fsdp else run.model
    run_on_main(lambda: save_model(saved, run.tokenizer, model_dir, merge_adapter=run.cfg.merge_adapter),
                run.processes)
    if run.processes.is_main and run.cfg.plot:
        run.logger.plot(output_dir / "training_curves.png", keys=_plot_keys(run.objective, run.logger.path))
    run.logger.close()
    return model_dir


def _plot_keys(objective: str, metrics_path: Path) -> list[str] | None:
    seen = {key for record in read_metrics(metrics_path) for key in record}
    wanted = ["loss", "accuracy", "margin"] if objective == "reward" else ["loss", "rewards/accuracies", "rewards/margins"]
    wanted += ["eval_loss"] if objective == "sft" else ["eval_accuracy_ties_half"]
    keys = [key for key in wanted if key in seen]
    return keys or None
