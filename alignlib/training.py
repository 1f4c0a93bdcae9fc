"""What every training loop shares: seeds, optimizer and scheduler, the step schedule, the
non-finite policy, resume, and checkpoints that know about ranks.

The offline trainer (alignlib.trainer) and the online loop (alignlib.rl) both build on these
pieces; neither writes its own. Checkpoint files and atomic writes are alignlib.checkpoint's;
metrics.jsonl and progress are alignlib.metrics'.

- `make_optimizer`, `make_scheduler`: transformers' optimizer and scheduler names.
- `SeededSampler`, `Schedule`: an example order that depends only on (seed, epoch), so a
  resumed run sees the same batches; a step's examples split over ranks and micro-batches.
- `NonFiniteGuard`: `on_nonfinite`, one meaning for every command: "stop" ends the run at a
  step whose loss or gradient norm is NaN/inf, "skip" drops that update (and stops after
  MAX_SKIPPED_IN_A_ROW in a row).
- `checkpoint_to_resume`: `resume_from_checkpoint`, one meaning for every command.
- `save_training_checkpoint`, `resume_training`: checkpoints of a run on one or several ranks
  (every rank's RNG state; FSDP's full weights gathered on rank 0).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from alignlib.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from alignlib.distributed import (
    SINGLE_PROCESS,
    FullStateHolder,
    Processes,
    full_optimizer_state,
    gather_objects,
    gathered_full_model,
    load_full_state,
    run_on_main,
    shard,
)

__all__ = [
    "MAX_SKIPPED_IN_A_ROW",
    "Interrupted",
    "OPTIMIZER_NAMES",
    "NonFiniteGuard",
    "Schedule",
    "SeededSampler",
    "MixedPrecision",
    "check_devices",
    "checkpoint_to_resume",
    "clip_grad_norm",
    "finite_or_poisoned",
    "make_optimizer",
    "make_scheduler",
    "rank_batches",
    "resume_requested",
    "resume_training",
    "save_training_checkpoint",
    "set_seed",
    "step_scheduler",
]


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (every device); `deterministic` also asks torch for
    deterministic kernels (slower on GPU). A thin wrapper over transformers.set_seed."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------
# Optimizer and scheduler
# ----------------------------------------------------------------------------------------------

# transformers' `optim` names (TrainingArguments.optim) that alignlib supports.
OPTIMIZER_NAMES = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters of `model` in two groups: matrices (weight decay) and vectors
    (biases, norm scales: no weight decay), the usual GPT-2/nanoGPT rule `ndim < 2`."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def make_optimizer(
    params: torch.nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str = "adamw_torch",
    lr: float = 5e-5,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """An AdamW optimizer by its transformers `optim` name.

    Args:
        params: a model (its trainable parameters are split into decay / no-decay groups, see
            `parameter_groups`), or parameters / parameter groups used as given.
        name: "adamw_torch", "adamw_torch_fused" (torch.optim.AdamW), "adamw_8bit" (= "adamw_bnb_8bit"),
            "paged_adamw_8bit", "paged_adamw_32bit" (bitsandbytes; on CPU the paged ones behave
            as the plain ones, with a warning from bitsandbytes).
        lr, weight_decay, betas, eps: the AdamW hyper-parameters.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZER_NAMES)}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a positive number, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if isinstance(params, torch.nn.Module):
        groups = parameter_groups(params, weight_decay)
    else:
        groups = list(params)
    if not groups or all(isinstance(g, dict) and not g["params"] for g in groups):
        raise ValueError("the optimizer got no trainable parameters (did you freeze the whole model?)")
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
    if name.startswith("adamw_torch"):
        return torch.optim.AdamW(groups, fused=name == "adamw_torch_fused" or None, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError(f"optimizer {name!r} needs bitsandbytes, which could not be imported: {exc}") from None
    bnb_class = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "adamw_bnb_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return bnb_class(groups, **kwargs)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "linear",
    *,
    num_training_steps: int,
    num_warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    **scheduler_specific_kwargs: Any,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A learning-rate schedule by its transformers name (transformers.get_scheduler).

    Args:
        name: a transformers SchedulerType: "linear", "cosine", "constant", "constant_with_warmup",
            "cosine_with_min_lr" (pass min_lr or min_lr_rate), ...
        num_training_steps: optimizer steps in the whole run (> 0).
        num_warmup_steps / warmup_ratio: the warm-up, as a step count or as a fraction of
            num_training_steps (rounded up, as transformers does); at most one of them.
    """
    from transformers import SchedulerType, get_scheduler

    known = [s.value for s in SchedulerType]
    if name not in known:
        raise ValueError(f"unknown lr scheduler {name!r}; known: {', '.join(known)}")
    if not isinstance(num_training_steps, int) or num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be a positive int, got {num_training_steps!r}")
    if num_warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("give num_warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {warmup_ratio}")
        num_warmup_steps = math.ceil(warmup_ratio * num_training_steps)
    num_warmup_steps = num_warmup_steps or 0
    if num_warmup_steps < 0 or num_warmup_steps > num_training_steps:
        raise ValueError(f"num_warmup_steps must lie in [0, {num_training_steps}], got {num_warmup_steps}")
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=scheduler_specific_kwargs or None,
    )


class SeededSampler(Sampler[int]):
    """Indices 0..n-1, shuffled by a permutation that depends only on (seed, epoch).

    Resuming mid-epoch: call `set_epoch(epoch, skip=k)` to drop the first k indices of that
    epoch's order (k = batches consumed x batch size); the batches that follow are exactly
    those the uninterrupted run saw. The global RNG is never touched.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must lie in [0, {self.num_samples}], got {skip}")
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


# ----------------------------------------------------------------------------------------------
# Which examples each step uses
# ----------------------------------------------------------------------------------------------


def rank_batches(indices: list[int], size: int, processes: Processes = SINGLE_PROCESS) -> list[list[int]]:
    """This rank's share of `indices` (`distributed.shard`), in batches of at most `size`.

    Every rank gets the same number of batches, so each joins every collective (a gradient
    all-reduce, an FSDP forward): where a rank's share is shorter, its list ends with empty
    batches, which the caller runs with zero weight.
    """
    mine = shard(indices, processes)
    count = math.ceil(math.ceil(len(indices) / processes.world_size) / size)
    batches = [mine[i : i + size] for i in range(0, len(mine), size)]
    return batches + [[] for _ in range(count - len(batches))]


@dataclass(frozen=True)
class Schedule:
    """Which examples each optimizer step uses: depends only on (seed, epoch, step).

    pairs_per_step is global: per_device_train_batch_size x gradient_accumulation_steps x the
    number of ranks. Under torchrun each rank takes its share of a step and splits it into
    micro-batches of `micro_batch` (`rank_batches`).
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
        """This rank's example indices of step `step`, split into micro-batches (see rank_batches)."""
        return rank_batches(self.step_indices(step), self.micro_batch, processes)


# ----------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------

MAX_SKIPPED_IN_A_ROW = 8  # on_nonfinite="skip" gives up after this many non-finite updates in a row


class NonFiniteGuard:
    """The `on_nonfinite` policy for updates whose loss or gradient norm is NaN or inf.

    `allows(where, loss, grad_norm)` is True for a finite update. For a non-finite one, "stop"
    raises FloatingPointError before the weights are touched; "skip" logs
    `skipped_nonfinite_step`, prints a line and returns False (the caller drops the update),
    and raises once MAX_SKIPPED_IN_A_ROW updates in a row were non-finite.

    The check runs on the loss and gradient norm every rank agrees on (summed and all-reduced),
    so every rank takes the same branch.
    """

    def __init__(self, policy: str, log: Callable[[dict, int], Any] | None = None, *, verbose: bool = True) -> None:
        self.policy, self.log, self.verbose = policy, log, verbose
        self.skipped_in_a_row = 0

    def allows(self, step: int, loss: float, grad_norm: float, *, where: str | None = None) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.skipped_in_a_row = 0
            return True
        what = f"{where or f'step {step}'}: the loss is {loss} and the gradient norm {grad_norm}"
        if self.policy == "stop":
            raise FloatingPointError(f"{what}; stopping before the weights are corrupted (on_nonfinite='skip' skips "
                                     "such steps instead)")
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(f"{what}; {self.skipped_in_a_row} steps in a row were non-finite, stopping")
        if self.log is not None:
            self.log({"skipped_nonfinite_step": step}, step)
        if self.verbose:
            print(f"{what}; update skipped (on_nonfinite='skip')", flush=True)
        return False


def finite_or_poisoned(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` with NaN/inf replaced by 0, and a term to add to the loss: 0 when every value was
    finite, NaN otherwise (and NaN gradients behind it).

    NaN or inf logits are a property of the step, not of the input to a loss function (which
    refuses non-finite log-probs): this carries them past the loss functions' checks to the
    step's own check (`NonFiniteGuard`), where `on_nonfinite` stops the run or skips the update
    on every rank.
    """
    if bool(torch.isfinite(values).all()):
        return values, values.new_zeros(())
    finite = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    return finite, values.sum() * 0.0


def step_scheduler(scheduler: Any) -> None:
    """scheduler.step() once per step, also after a skipped update, so the schedule follows the step
    count. torch warns when that happens before the first optimizer step (a skipped first step);
    here it is meant, so the warning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()


def clip_grad_norm(params: list[torch.Tensor], max_grad_norm: float | None) -> float:
    """The gradient norm over all ranks, as a float, after clipping to max_grad_norm (None or <= 0: no clip)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor
        norm = norm.full_tensor()
    return float(norm)


# ----------------------------------------------------------------------------------------------
# Devices, interruptions
# ----------------------------------------------------------------------------------------------


def check_devices(*, bf16: bool = False, fsdp: bool = False, fp16: bool = False) -> None:
    """Refuse settings this machine cannot honour, before anything is loaded: bf16 and fp16 together,
    bf16 without a GPU that has it, fp16 without a GPU, FSDP without torchrun's processes."""
    if bf16 and fp16:
        raise ValueError("bf16 and fp16: choose one mixed precision (bf16 on Ampere GPUs and newer, fp16 on older "
                         "ones such as the T4)")
    if fp16:
        if not torch.cuda.is_available():
            raise ValueError("fp16: fp16 mixed precision runs on a CUDA GPU and this machine has none; drop --fp16")
        if fsdp:
            raise ValueError("fp16 with fsdp: fp16's gradient scaler is not wired to FSDP's sharded gradients; "
                             "drop --fsdp (DDP) or use bf16")
    if bf16:
        if not torch.cuda.is_available():
            raise ValueError("bf16: bf16 mixed precision runs on a CUDA GPU and this machine has none; drop --bf16")
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"bf16: {torch.cuda.get_device_name()} has no bf16 arithmetic; drop --bf16")
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ValueError("fsdp: FSDP shards the model across torchrun's processes and this is one process; start "
                         "it with torchrun --nproc_per_node N, or drop --fsdp")


class MixedPrecision:
    """bf16 or fp16 autocast around the forward passes and, for fp16, the gradient scaler.

    fp16 has a narrow range: the loss is multiplied by a scale before backward (so that small
    gradients do not flush to zero) and the gradients divided by it again (`unscale`) before they
    are clipped. When the scaled gradients overflow, the scaler skips the update and halves the
    scale: an expected event of fp16 training, not a non-finite step (`step` reports it; the
    trainer logs it as fp16_skipped_step), while a non-finite *loss* still goes to on_nonfinite.
    Without bf16 or fp16 every method is a no-op and `step` is optimizer.step().
    """

    def __init__(self, device: torch.device, *, bf16: bool = False, fp16: bool = False) -> None:
        self.device_type = device.type
        self.dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else None
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients back to their true size (before clipping and the norm)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def overflowed(self, loss: float, grad_norm: float) -> bool:
        """fp16: a finite loss whose gradients overflowed at the current scale (the scaler's skip)."""
        return self.scaler is not None and math.isfinite(loss) and not math.isfinite(grad_norm)

    def step(self, optimizer: torch.optim.Optimizer, *, update: bool) -> None:
        """The optimizer step when `update`; with fp16, then the scaler's next scale (halved after an
        overflow, which `unscale` recorded; grown after a run of good steps)."""
        if update:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()

    @property
    def scale(self) -> float | None:
        return None if self.scaler is None else float(self.scaler.get_scale())

    def check_trainable(self, params: list[torch.Tensor]) -> None:
        """fp16 trains float32 weights under float16 autocast; float16 weights cannot be unscaled."""
        if self.scaler is not None and any(p.dtype == torch.float16 for p in params):
            raise ValueError("fp16: the trainable weights are float16; fp16 mixed precision keeps them in float32 "
                             "(load the model with --dtype float32, or train LoRA adapters, which peft keeps in "
                             "float32)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, as one line: the step reached and how to go on from the newest
    complete checkpoint (which an interrupted save never damages)."""

    def __init__(self, step: int | None, output_dir: str | Path) -> None:
        latest = find_latest_checkpoint(output_dir, verify_hashes=False) if Path(output_dir).is_dir() else None
        where = "before the first step" if step is None else f"at step {step}"
        if latest is not None:
            how = f"{latest.name} is the newest complete checkpoint: resume with --resume_from_checkpoint latest"
        else:
            how = "no checkpoint was saved: start again (with --overwrite_output_dir true if the folder holds its files)"
        super().__init__(f"interrupted {where}; {how}")
        self.step, self.checkpoint = step, latest


# ----------------------------------------------------------------------------------------------
# Resume and checkpoints of a run
# ----------------------------------------------------------------------------------------------

_LATEST = ("latest", "true")  # "true" is the older PPO spelling (and YAML's `true`)
_NONE = ("", "none", "false")


def resume_requested(spec: str | Path | bool | None) -> bool:
    """Whether `resume_from_checkpoint` asks to resume at all (None, "", "none", "false" do not)."""
    return not (spec is None or spec is False or str(spec).strip().lower() in _NONE)


def checkpoint_to_resume(spec: str | Path | bool | None, output_dir: str | Path, *, verbose: bool = True) -> Path | None:
    """`resume_from_checkpoint` as a checkpoint directory, or None for a fresh start.

    None (or "", "none", "false"): a fresh start. "latest" (or "true"): the newest complete
    checkpoint in output_dir (`checkpoint.find_latest_checkpoint`); with none there, a fresh
    start, said in one printed line. Anything else: a checkpoint directory, which must exist.
    """
    if not resume_requested(spec):
        return None
    if spec is True or str(spec).strip().lower() in _LATEST:
        found = find_latest_checkpoint(output_dir)
        if found is None and verbose:
            print(f"resume_from_checkpoint={spec}: no complete checkpoint in {output_dir}; starting from step 0",
                  flush=True)
        return found
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint directory at {spec}")
    return path


def save_training_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    processes: Processes = SINGLE_PROCESS,
    epoch: float | None = None,
    data_state: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    save_total_limit: int | None = None,
    fsdp_vessel: Callable[[], torch.nn.Module] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> None:
    """`checkpoint.save_checkpoint` for a run on any number of ranks; every rank calls it.

    Every rank's RNG state is gathered into the checkpoint (each continues its own dropout
    stream on resume) and the world size recorded; rank 0 writes while the others wait, and a
    failed write raises on every rank. Under FSDP (`fsdp_vessel`: builds an unsharded copy of
    the model on the CPU) the full weights and optimizer state are gathered into that copy.
    """
    rng_states = gather_objects(rng_state(), processes)
    if fsdp_vessel is not None:
        full_optimizer = full_optimizer_state(model, optimizer)
        model, optimizer = gathered_full_model(model, fsdp_vessel, processes), FullStateHolder(full_optimizer)
    run_on_main(lambda: save_checkpoint(
        output_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
        data_state={**dict(data_state or {}), "world_size": processes.world_size}, metadata=metadata,
        save_total_limit=save_total_limit,
        extra_state={"rank_rng_states": rng_states,
                     **({"grad_scaler": grad_scaler.state_dict()} if grad_scaler is not None else {})}), processes)


def resume_training(
    checkpoint: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    processes: Processes = SINGLE_PROCESS,
    fsdp_vessel: Callable[[], torch.nn.Module] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Load a checkpoint of `save_training_checkpoint` on every rank; returns its trainer state
    (`checkpoint.load_checkpoint`'s). Refuses a checkpoint saved by another number of ranks
    (the data order depends on it). fp16's `grad_scaler` continues from its saved scale."""
    if fsdp_vessel is not None:  # read the full state into an unsharded copy, then shard it onto this rank
        copy, held = fsdp_vessel(), FullStateHolder()
        state = load_checkpoint(checkpoint, copy, held, scheduler)
        load_full_state(model, optimizer, copy.state_dict(), held.state)
    else:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    saved_world = state["data_state"].get("world_size", 1)
    if saved_world != processes.world_size:
        raise ValueError(f"checkpoint {checkpoint} was saved by {saved_world} process(es), this run has "
                         f"{processes.world_size}: resume with the same number of ranks (the data order depends on it)")
    rank_states = (state.get("extra_state") or {}).get("rank_rng_states")
    if rank_states:  # each rank continues its own random stream (dropout)
        set_rng_state(rank_states[processes.rank])
    scaler_state = (state.get("extra_state") or {}).get("grad_scaler")
    if grad_scaler is not None and scaler_state is not None:
        grad_scaler.load_state_dict(scaler_state)
    return state
