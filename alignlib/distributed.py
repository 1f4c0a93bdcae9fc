"""More than one process: what the trainer needs from torch.distributed, in one place.

`torchrun --nproc_per_node N -m alignlib train dpo ...` starts N copies of the command with
RANK, WORLD_SIZE and LOCAL_RANK in their environment. `setup()` reads them and joins the
process group (NCCL on GPUs, gloo on CPUs); a plain `alignlib train` sees no WORLD_SIZE and
runs as one process with no process group at all.

How a step is split: every rank computes the same global schedule (which examples step s
uses; it depends only on the seed), and rank r takes every W-th of them, starting at r, as
torch's DistributedSampler does. Unlike DistributedSampler nothing is padded with repeated
examples: a short last step of an epoch is split unevenly, and a rank with fewer examples
runs a zero-weight micro-batch so that every rank joins every gradient all-reduce. Each rank
divides its summed losses by the pair count of the whole step and multiplies by W (DDP and
FSDP average gradients over ranks), so the gradient is exactly that of one process taking
the whole step.

The online loop (alignlib.rl) splits its rollout batch into contiguous blocks (`block`), one
per rank, gathers what the blocks produce (`gather_rows`) so every rank holds the whole batch,
and sums gradients by hand (`sum_gradients`); see alignlib.rl.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLELISMS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Processes:
    """Where this process stands: rank r of world_size, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # the device this rank trains on; None: wherever the model loads
    started_here: bool = False  # setup() created the process group (and teardown() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = Processes()
"""A plain run: one process, no process group."""


def is_main_process() -> bool:
    """True on rank 0 of a torch.distributed job, and always without one. Writers that are not
    handed a `Processes` (checkpoint and metrics files, progress bars) act only where it is True."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def setup(timeout_minutes: float = 30.0) -> Processes:
    """Join the torchrun process group if this process was started by torchrun (WORLD_SIZE > 1).

    On GPUs each rank uses cuda:LOCAL_RANK and NCCL; otherwise gloo on the CPU. A process group
    someone already initialised is used as it is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return Processes(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs: start "
                             "torchrun with --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = None
    started_here = False
    if not dist.is_initialized():
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE={world_size} is set but {name} is not: start several processes with "
                                 "torchrun (torchrun --nproc_per_node N -m alignlib train ...)")
        backend = "nccl" if device is not None else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        started_here = True
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, device, started_here)


def teardown(processes: Processes) -> None:
    """Leave the process group if setup() joined it."""
    if processes.started_here and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], processes: Processes) -> list[int]:
    """This rank's share of `indices`: positions rank, rank + W, rank + 2W, ... (no padding)."""
    return indices[processes.rank :: processes.world_size]


def barrier(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(processes: Processes) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. to fill the datasets cache), then the other ranks."""
    if not processes.is_main:
        barrier(processes)
    yield
    if processes.is_main:
        barrier(processes)


def run_on_main(fn: Callable[[], object], processes: Processes) -> None:
    """Run `fn` on rank 0 only (e.g. write a checkpoint); the other ranks wait for it, and if it
    raises, every rank raises (rank 0 its own error, the others an OSError quoting it), so that
    no rank is left waiting at the next collective."""
    error: BaseException | None = None
    if processes.is_main:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
            error = exc
    if processes.distributed:
        message = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            raise OSError(f"rank 0 failed while this rank waited: {message[0]}")
    if error is not None:
        raise error


def sum_across(values: dict[str, float], processes: Processes) -> dict[str, float]:
    """Sum a dict of numbers over ranks (keys missing on a rank count as 0); every rank gets the sums."""
    if not processes.distributed:
        return dict(values)
    gathered: list[dict[str, float] | None] = [None] * processes.world_size
    dist.all_gather_object(gathered, values)
    total: dict[str, float] = {}
    for part in gathered:
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0.0) + value
    return total


def sum_tensor(tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
    """`tensor` summed over ranks (in place; returned for convenience)."""
    if processes.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(value, processes: Processes) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not processes.distributed:
        return [value]
    gathered: list = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered


# ----------------------------------------------------------------------------------------------
# The online loop: a rollout batch split into blocks, gathered back; gradients summed by hand
# ----------------------------------------------------------------------------------------------


def block(items: list, processes: Processes) -> list:
    """This rank's contiguous block of `items`: W blocks whose sizes differ by at most one, in rank
    order (the online loop's split: a prompt's completions stay side by side)."""
    n, rank, world = len(items), processes.rank, processes.world_size
    return items[rank * n // world: (rank + 1) * n // world]


def gather_rows(tensor: torch.Tensor, processes: Processes, pad_value: float = 0) -> torch.Tensor:
    """Every rank's `tensor` (rows, ...) concatenated along dim 0 in rank order, on every rank.

    Ranks may hold different numbers of rows, and (for 2-d and wider tensors) different widths
    along dim 1: narrower ones are padded on the right with `pad_value` to the widest.
    """
    if not processes.distributed:
        return tensor
    shapes = gather_objects(tuple(tensor.shape), processes)
    rows = max(shape[0] for shape in shapes)
    padded_shape = list(tensor.shape)
    padded_shape[0] = rows
    if tensor.dim() >= 2:
        padded_shape[1] = max(shape[1] for shape in shapes)
    padded = tensor.new_full(padded_shape, pad_value)
    padded[tuple(slice(0, size) for size in tensor.shape)] = tensor
    parts = [torch.empty_like(padded) for _ in range(processes.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: shape[0]] for part, shape in zip(parts, shapes, strict=True)])


def sum_gradients(params: list[torch.Tensor], processes: Processes) -> None:
    """Sum the .grad of `params` over ranks, in one all-reduce (a parameter a rank left without a
    gradient counts as zeros there). The online loop divides each rank's loss by the whole step's
    normaliser, so the sum is the gradient of the step's loss."""
    if not processes.distributed:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}  # one all-reduce per dtype and device
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        buckets.setdefault((param.grad.dtype, param.grad.device), []).append(param)
    for bucket in buckets.values():
        flat = torch.cat([param.grad.reshape(-1) for param in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for param in bucket:
            param.grad.copy_(flat[offset: offset + param.grad.numel()].view_as(param.grad))
            offset += param.grad.numel()


def together(fn: Callable[[], object], processes: Processes):
    """fn() on every rank; if it raises a ValueError on any rank, every rank raises one with the
    first failing rank's message (so none is left waiting at the next collective). Returns fn()'s value."""
    error, value = None, None
    try:
        value = fn()
    except ValueError as exc:
        error = exc
    if processes.distributed:
        messages = gather_objects(None if error is None else str(error), processes)
        failed = [message for message in messages if message is not None]
        if failed and error is None:
            raise ValueError(failed[0])
    if error is not None:
        raise error
    return value


def wrap(module: torch.nn.Module, parallelism: str, processes: Processes,
         layers: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """`module` ready for data-parallel training across the ranks.

    - "ddp": torch's DistributedDataParallel; every rank holds the whole model and gradients
      are all-reduced (averaged) during backward.
    - "fsdp": torch's fully_shard (FSDP2) on each of `layers` (e.g. the decoder blocks) and on
      `module`: parameters, gradients and optimizer states are sharded across ranks, and each
      block's parameters are gathered only while it runs. Build the optimizer after wrapping.
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got {parallelism!r}")
    if not processes.distributed:
        return module
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [processes.device.index] if processes.device is not None else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for layer in layers or []:
        fully_shard(layer)
    fully_shard(module)
    return module


def no_sync(module: torch.nn.Module, skip: bool):
    """Hold back DDP's gradient all-reduce for this backward (all micro-batches but a step's last)."""
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    if skip and hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        return _restore_gradient_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_gradient_sync(module: torch.nn.Module) -> Iterator[None]:
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# ----------------------------------------------------------------------------------------------
# FSDP: the full state, gathered for a checkpoint and sharded back on resume
# ----------------------------------------------------------------------------------------------


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers names their class in _no_split_modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [module for module in base.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"fsdp: found no decoder blocks to shard in {type(base).__name__} "
                         f"(its _no_split_modules is {sorted(names)})")
    return blocks


def gathered_full_model(model: torch.nn.Module, vessel: Callable[[], torch.nn.Module],
                        processes: Processes) -> torch.nn.Module | None:
    """FSDP: the sharded model's full weights, gathered (every rank takes part) into `vessel()`,
    an unsharded copy built on rank 0; None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not processes.is_main:
        return None
    copy = vessel()
    copy.load_state_dict(full)
    return copy


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """FSDP: the optimizer state of every shard, gathered into one unsharded state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """FSDP: shard full (unsharded) model and optimizer state dicts onto this rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=full)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)


class FullStateHolder:
    """Stands in for the optimizer in save_checkpoint/load_checkpoint under FSDP: holds the full
    optimizer state dict gathered from (or to be sharded back onto) the ranks."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state
