"""What every training loop shares: optimizer and scheduler, checkpoints, metrics, progress.

The pairwise trainer (alignlib.trainer) and the PPO loop (alignlib.rl) both build on these
pieces; neither writes its own.

- `make_optimizer`, `make_scheduler`: transformers' optimizer and scheduler names.
- `save_checkpoint`, `find_latest_checkpoint`, `load_checkpoint`: atomic, validated
  checkpoints that resume bitwise-identically on CPU (model, optimizer, scheduler, every RNG,
  the data position).
- `SeededSampler`: a shuffling sampler whose order depends only on (seed, epoch), so a
  resumed run sees the same batches.
- `MetricsLogger`: metrics.jsonl, one JSON object per logging step, trimmed on resume.
- `Progress`, `Throughput`, `set_seed`, `is_main_process`.

A checkpoint directory, `output_dir/checkpoint-{step}/`, holds

    model.pt            trainable parameters (all of them, as a state dict, in full fine-tuning)
    optimizer.pt        optimizer.state_dict()
    scheduler.pt        scheduler.state_dict()
    rng_state.pt        python, numpy, torch (cpu, cuda) generator states
    trainer_state.json  step, epoch, data_state, metadata
    manifest.json       size and sha256 of every file above; written last

It is written into a hidden temporary directory, every file fsynced, then renamed into place
in one `os.replace`; only then is `output_dir/latest` (a one-line pointer) rewritten. A
checkpoint without a manifest that matches its files is never loaded. Killed at any point, a
save leaves the previous checkpoints loadable (tests/reliability/test_faults.py kills it at
each stage); the hidden temporaries it leaves are removed by the next successful save.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm

__all__ = [
    "OPTIMIZER_NAMES",
    "MetricsLogger",
    "Progress",
    "SeededSampler",
    "Throughput",
    "atomic_directory",
    "find_latest_checkpoint",
    "is_main_process",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "read_metrics",
    "save_checkpoint",
    "set_seed",
    "validate_checkpoint",
]

# ----------------------------------------------------------------------------------------------
# Processes and seeds
# ----------------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """True on rank 0 of a torch.distributed job, and always without one.

    The writers here (checkpoints, metrics, progress bars) act only on the main process. Multi-
    process training (issue 7) extends this hook; nothing else here is rank-aware yet.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


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
# Atomic writes
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory (deepest first)."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for filename in filenames:
            fd = os.open(Path(dirpath) / filename, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in reversed(dirs):
        _fsync_dir(directory)


def _umask() -> int:
    """The process umask, read from /proc where it can be (os.umask can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and os.replace.

    The file gets the usual permissions (0o666 less the umask), not mkstemp's private 0o600.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden directory next to `target`; on success it replaces `target`.

    Everything written inside is fsynced, then the directory is renamed onto `target` (an
    existing `target` is moved aside first, and removed after; put back if the rename fails).
    On any error the temporary directory is removed (where the filesystem still allows it; a
    crash or a read-only filesystem can leave it behind, and `save_checkpoint` clears its own on
    its next success) and `target` is left as it was. The directory gets the usual permissions
    (0o777 less the umask), not mkdtemp's private 0o700.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    aside = None
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / target.name
            os.replace(target, aside)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if aside is not None and aside.exists() and not target.exists():
            with contextlib.suppress(OSError):
                os.replace(aside, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside.parent, ignore_errors=True)


def _remove_stale_temporaries(directory: Path, pattern: str) -> None:
    """Delete the hidden temporaries (files or directories) in `directory` whose names match the
    regular expression `pattern`: what a killed save, or one on a filesystem that had turned
    read-only, left behind. Only call it where no save into `directory` runs at the same time."""
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if re.match(pattern, entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state a checkpoint must hold: the full state dict when every parameter trains
    (full fine-tuning), else only the trainable parameters (LoRA adapters, a reward head)."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return model.state_dict()
    return {name: p.detach() for name, p in params.items() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step can draw from."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"name": np_name, "keys": np_keys.tolist(), "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"the checkpoint holds RNG states for {len(cuda_states)} CUDA devices, this machine has "
                f"{torch.cuda.device_count()}; CUDA RNG states not restored",
                stacklevel=2,
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `checkpoint-{step}` directory, oldest first; temp dirs excluded."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: float | None = None,
    data_state: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    save_total_limit: int | None = None,
    extra_state: Any = None,
) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically, update `output_dir/latest`, rotate.

    Args:
        model: its `trainable_state_dict` is saved (adapters only for LoRA, everything for full FT).
        optimizer, scheduler: their state dicts, if given.
        epoch: the (fractional) epoch reached.
        data_state: where the data stream stands, e.g. {"epoch": 1, "batches_seen": 12, "seed": 0}
            (JSON-serialisable).
        metadata: any other JSON-serialisable facts (config, metrics...).
        save_total_limit: keep only the newest this many checkpoints (None: keep all).
        extra_state: anything else `torch.save` can write and `weights_only` can load (e.g. the
            RNG states of every rank of a distributed run); `load_checkpoint` returns it as
            state["extra_state"].

    Returns the checkpoint directory.

    Raises OSError when the write fails (disk full, read-only or vanished directory...): errno
    kept, the message names the checkpoint, the directory and the checkpoint `latest` still
    points to. The previous checkpoints and `latest` are untouched; the temporary directory is
    removed, or, where the filesystem no longer allows that, by the next successful save (which
    also clears what a killed save left). If only the `latest` pointer could not be rewritten,
    the new checkpoint is complete and the error says so.
    """
    output_dir = Path(output_dir)
    target = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if not is_main_process():
        return target
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit}")
    trainer_state = {"step": step, "epoch": epoch, "data_state": dict(data_state or {}),
                     "metadata": dict(metadata or {}), "time": time.time()}
    try:
        trainer_state_text = json.dumps(trainer_state, indent=2, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"data_state and metadata must be JSON-serialisable: {exc}") from None

    try:
        with atomic_directory(target) as tmp:
            _torch_save(trainable_state_dict(model), tmp / "model.pt")
            if optimizer is not None:
                _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            if scheduler is not None:
                _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
            _torch_save(rng_state(), tmp / "rng_state.pt")
            if extra_state is not None:
                _torch_save(extra_state, tmp / "extra_state.pt")
            (tmp / "trainer_state.json").write_text(trainer_state_text)
            files = {
                path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
                for path in sorted(tmp.iterdir())
            }
            manifest = {"format": 1, "step": step, "files": files}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    except OSError as exc:
        previous = _read_latest(output_dir)
        kept = f"; {previous} is still the latest checkpoint" if previous else ""
        raise OSError(exc.errno or errno.EIO,
                      f"could not save checkpoint {target.name} in {output_dir}: {exc.strerror or exc}{kept}") from exc
    try:
        _write_text_atomic(output_dir / LATEST_FILE, target.name + "\n")
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO,
                      f"checkpoint {target.name} was saved in {output_dir}, but the {LATEST_FILE} pointer "
                      f"could not be updated: {exc.strerror or exc}") from exc
    _remove_stale_temporaries(output_dir, rf"^\.({CHECKPOINT_PREFIX}\d+|{LATEST_FILE})\.(tmp|old)-")
    if save_total_limit is not None:
        _rotate_checkpoints(output_dir, save_total_limit, keep=target)
    return target


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save, with a failed write raised as the OSError it is.

    Given a path, torch's C++ writer reports a full disk as RuntimeError("unexpected pos ...")
    and drops the errno. Through a Python file object the OSError of the write surfaces, though
    torch may still wrap it in a RuntimeError from closing its archive; it is unwrapped here.
    """
    with open(path, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:
            cause = exc.__cause__ or exc.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror or str(cause)) from exc


def _read_latest(output_dir: Path) -> str | None:
    """The checkpoint name the `latest` pointer holds, or None."""
    try:
        return (output_dir / LATEST_FILE).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _rotate_checkpoints(output_dir: Path, save_total_limit: int, keep: Path) -> None:
    """Delete the oldest checkpoints beyond `save_total_limit` (never `keep`)."""
    checkpoints = [path for _, path in _checkpoint_dirs(output_dir) if path != keep]
    for path in checkpoints[: max(0, len(checkpoints) + 1 - save_total_limit)]:
        shutil.rmtree(path, ignore_errors=True)


def validate_checkpoint(path: str | os.PathLike, *, verify_hashes: bool = True) -> str | None:
    """None if `path` is a complete checkpoint (its manifest matches every file), else the
    reason it is not."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"no {MANIFEST_FILE} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST_FILE}: {exc}"
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            return f"{name} is missing"
        size = file_path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']}"
        if verify_hashes and _sha256(file_path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def find_latest_checkpoint(output_dir: str | os.PathLike, *, verify_hashes: bool = True) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None.

    Candidates are the `checkpoint-{step}` directories, newest step first (hidden temporary
    directories are never candidates). Each is validated against its manifest; an incomplete
    or corrupt one is skipped with a warning and the previous one is tried. The `latest`
    pointer is written for people and tools; the manifests decide.
    """
    for _, path in reversed(_checkpoint_dirs(Path(output_dir))):
        problem = validate_checkpoint(path, verify_hashes=verify_hashes)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    restore_rng: bool = True,
    verify_hashes: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by `save_checkpoint` into the given objects.

    The model must have the same trainable parameters (names and shapes) as the one saved;
    the optimizer and scheduler must be built the same way (same parameter order). With
    `restore_rng` every RNG is set back, so continuing gives bitwise the same run on CPU.

    Returns the trainer state: {"step", "epoch", "data_state", "metadata", "time", "extra_state"}
    (extra_state: what save_checkpoint was given, or None).
    Raises ValueError for an incomplete or corrupt checkpoint or mismatched parameters, and
    FileNotFoundError for a missing one.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    problem = validate_checkpoint(path, verify_hashes=verify_hashes)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {problem}")
    state = json.loads((path / "trainer_state.json").read_text())

    def load(name: str) -> Any:
        return torch.load(path / name, map_location="cpu", weights_only=True)

    if model is not None:
        _load_model_state(model, load("model.pt"), path)
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is not None:
            if not (path / name).is_file():
                raise ValueError(f"checkpoint {path} has no {name}, but a {name[:-3]} was given to restore")
            obj.load_state_dict(load(name))
    if restore_rng:
        set_rng_state(load("rng_state.pt"))
    state["extra_state"] = load("extra_state.pt") if (path / "extra_state.pt").is_file() else None
    return state


def _load_model_state(model: torch.nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} "
            "(was it saved with another model or other LoRA settings?)"
        )
    for name, tensor in saved.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"checkpoint {path} does not fit this model: {name} has shape {tuple(tensor.shape)} in the "
                f"checkpoint and {tuple(expected[name].shape)} in the model"
            )
    model.load_state_dict(saved, strict=False)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _to_number(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().float().item() if value.numel() == 1 else value.detach().float().tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl file (a torn last line is skipped)."""
    records = []
    with open(path) as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


class MetricsLogger:
    """Append one JSON object per logging step to `output_dir/metrics.jsonl`.

    Each record is {"step": int, "epoch": float | None, **metrics}, with TRL's metric names
    (`loss`, `learning_rate`, `rewards/chosen`, `rewards/accuracies`, ...). Lines are flushed
    as they are written, so a crash loses at most the line being written.

    `resume_step`: None starts a fresh file (an existing one is replaced). An int keeps the
    records with step <= resume_step and drops the rest (the steps the resumed run will log
    again), plus any torn line. Only the main process writes.
    """

    def __init__(self, output_dir: str | os.PathLike, *, resume_step: int | None = None,
                 filename: str = "metrics.jsonl") -> None:
        self.path = Path(output_dir) / filename
        self._handle = None
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= resume_step]
        _remove_stale_temporaries(self.path.parent, rf"^\.{re.escape(self.path.name)}\.tmp-")  # a killed rewrite
        try:
            _write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))
            self._handle = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"could not write metrics to {self.path}: {exc.strerror or exc}") from exc

    def log(self, metrics: Mapping[str, Any], *, step: int, epoch: float | None = None) -> dict[str, Any]:
        """Write one record; tensors and numpy scalars become numbers. Returns the record.

        The line goes out in one write and is flushed at once: a process killed meanwhile leaves
        at most that line torn, which `read_metrics` skips and a resumed logger drops.
        """
        record = {"step": step, "epoch": epoch, **{key: _to_number(value) for key, value in metrics.items()}}
        if self._handle is not None:
            try:
                self._handle.write(json.dumps(record) + "\n")
                self._handle.flush()
            except OSError as exc:  # close now: a later flush of the stuck buffer would only fail again
                handle, self._handle = self._handle, None
                with contextlib.suppress(OSError):
                    handle.close()
                raise OSError(exc.errno or errno.EIO, f"could not write the metrics of step {step} to {self.path}: "
                              f"{exc.strerror or exc}") from exc
        return record

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plot(self, png_path: str | os.PathLike, keys: Iterable[str] | None = None) -> Path | None:
        """Plot each metric against step into one PNG (one panel per metric).

        matplotlib is optional (`pip install matplotlib`, or the `bench` extra): without it a
        warning is issued and None returned. `keys` defaults to `loss` and the `rewards/*`
        metrics found.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            warnings.warn("matplotlib is not installed; metrics not plotted (pip install matplotlib)", stacklevel=2)
            return None
        if self._handle is not None:
            self._handle.flush()
        records = read_metrics(self.path)
        if keys is None:
            seen = {key for record in records for key in record}
            keys = [key for key in ("loss", "rewards/accuracies", "rewards/margins") if key in seen]
        keys = list(keys)
        if not keys:
            raise ValueError(f"nothing to plot: none of the requested metrics is in {self.path}")
        figure, axes = plt.subplots(len(keys), 1, figsize=(6, 2.5 * len(keys)), squeeze=False)
        for axis, key in zip(axes[:, 0], keys, strict=True):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            axis.plot([p[0] for p in points], [p[1] for p in points])
            axis.set_ylabel(key)
        axes[-1, 0].set_xlabel("step")
        figure.tight_layout()
        figure.savefig(png_path)
        plt.close(figure)
        return Path(png_path)


# ----------------------------------------------------------------------------------------------
# Progress and throughput
# ----------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over optimizer steps with the latest metrics in its postfix.

        with Progress(total=num_steps, initial=resumed_step) as bar:
            ...
            bar.update(loss=loss.item(), acc=accuracy)

    Hidden on every process but the main one (and when `disable`).
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", disable: bool = False) -> None:
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                        disable=disable or not is_main_process())

    def update(self, n: int = 1, **metrics: Any) -> None:
        if metrics:
            values = {key: _to_number(value) for key, value in metrics.items()}
            shown = {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in values.items()}
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Throughput:
    """Tokens per second between resets: `add(n_tokens)` after each step, read `rate()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int | torch.Tensor) -> None:
        self.tokens += int(tokens)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.tokens / elapsed if elapsed > 0 else 0.0
