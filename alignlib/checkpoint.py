"""Checkpoints and atomic writes: what a run leaves on disk survives a kill at any moment.

- `atomic_directory`, `write_text_atomic`: a directory or a file appears whole or not at all
  (written into a hidden temporary, fsynced, renamed into place).
- `save_checkpoint`, `find_latest_checkpoint`, `load_checkpoint`, `validate_checkpoint`:
  validated checkpoints that resume bitwise-identically on CPU (model, optimizer, scheduler,
  every RNG, the data position).

A checkpoint directory, `output_dir/checkpoint-{step}/`, holds

    model.pt            trainable parameters (all of them, as a state dict, in full fine-tuning)
    optimizer.pt        optimizer.state_dict()
    scheduler.pt        scheduler.state_dict()
    rng_state.pt        python, numpy, torch (cpu, cuda) generator states
    extra_state.pt      anything else the loop asked to keep (e.g. every rank's RNG states)
    trainer_state.json  step, epoch, data_state, metadata
    manifest.json       size and sha256 of every file above; written last

It is written into a hidden temporary directory, every file fsynced, then renamed into place
in one `os.replace`; only then is `output_dir/latest` (a one-line pointer) rewritten. A
checkpoint without a manifest that matches its files is never loaded. Killed at any point, a
save leaves the previous checkpoints loadable (tests/reliability/test_faults.py kills it at
each stage); the hidden temporaries it leaves are removed by the next successful save.

This module imports nothing of alignlib but `distributed.is_main_process` (only rank 0 writes).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignlib.distributed import is_main_process

__all__ = [
    "CHECKPOINT_PREFIX",
    "atomic_directory",
    "find_latest_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
    "remove_stale_temporaries",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "trainable_state_dict",
    "validate_checkpoint",
    "write_text_atomic",
]


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


def write_text_atomic(path: Path, text: str) -> None:
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


def remove_stale_temporaries(directory: Path, pattern: str) -> None:
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
        write_text_atomic(output_dir / LATEST_FILE, target.name + "\n")
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO,
                      f"checkpoint {target.name} was saved in {output_dir}, but the {LATEST_FILE} pointer "
                      f"could not be updated: {exc.strerror or exc}") from exc
    remove_stale_temporaries(output_dir, rf"^\.({CHECKPOINT_PREFIX}\d+|{LATEST_FILE})\.(tmp|old)-")
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


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer_state.json of a complete checkpoint (step, epoch, data_state, metadata), read
    without loading any tensor; a ValueError for an incomplete or corrupt checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    problem = validate_checkpoint(path, verify_hashes=False)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {problem}")
    return json.loads((path / "trainer_state.json").read_text())


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
