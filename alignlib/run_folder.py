"""The run's output folder belongs to the user: whose files are there, who writes, which run resumes.

Three guarantees, each checked before a run writes anything:

- **Another run's files are never touched without a flag.** `check_output_dir` refuses a
  folder holding another run's files (RUN_ENTRIES: config.json, metrics.jsonl, checkpoints,
  final/, ...) unless the run resumes it (`resume_from_checkpoint`) or `overwrite_output_dir`
  is set; then `claim_output_dir` moves the old run's files, untouched, into a sibling folder
  `<output_dir>.replaced-<time>` (deleting nothing). Files that are not a run's (a dataset, the
  demo's base-model/) stay where they are.
- **One run writes into a folder at a time.** `OutputDirLock` holds an exclusive advisory lock
  (flock) on output_dir/.alignlib.lock for the whole run; the kernel releases it on any exit,
  kill -9 included, so a lock left by a dead process is simply taken over. A second run into
  the folder fails at once naming the holder's PID.
- **Resume continues the same run.** Every checkpoint records the run (`run_record`: the
  objective, the resolved model path, every setting that changes the trajectory, a fingerprint
  of the training data, the number of ranks); `check_same_run` refuses to resume with any of
  them changed, by name. Settings that only change what is logged, evaluated or kept
  (SAFE_TO_CHANGE) may differ; the change is said in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE",
    "RUN_ENTRIES",
    "SAFE_TO_CHANGE",
    "OutputDirLock",
    "check_output_dir",
    "check_restart",
    "check_same_run",
    "claim_output_dir",
    "dataset_fingerprint",
    "portable_settings",
    "run_entries",
    "run_record",
]

LOCK_FILE = ".alignlib.lock"
RUN_ENTRIES = ("metrics.jsonl", "config.json", "final", "latest", "training_curves.png", "runs", "wandb")
"""The files and folders a run writes into output_dir, besides its checkpoint-N folders (runs/: TensorBoard's
event files, wandb/: an offline wandb run, with report_to)."""
_RUN_ENTRY = re.compile(r"^(checkpoint-\d+|\.(checkpoint-\d+|latest|final|metrics\.jsonl|config\.json)\.(tmp|old)-.*)$")

SAFE_TO_CHANGE = frozenset({
    "output_dir", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint",
    "overwrite_output_dir", "disable_tqdm", "plot", "per_device_eval_batch_size", "eval_dataset_name",
    "dataset_test_split", "eval_dataset", "eval_split", "num_eval_prompts", "on_nonfinite", "merge_adapter",
    "demo_defaults", "report_to", "logging_dir", "run_name", "logging_first_step", "eval_strategy",
})
"""Settings a resumed run may change: what is logged, evaluated, checkpointed or kept, not what is trained."""


# ----------------------------------------------------------------------------------------------
# Another run's files
# ----------------------------------------------------------------------------------------------


def run_entries(output_dir: str | os.PathLike) -> list[str]:
    """The names in output_dir that a run wrote (RUN_ENTRIES, checkpoint-N, a killed save's temporaries)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [entry.name for entry in folder.iterdir() if entry.name in RUN_ENTRIES or _RUN_ENTRY.match(entry.name)]

    def order(name: str) -> tuple:  # RUN_ENTRIES first, then checkpoints by step, then temporaries
        if name in RUN_ENTRIES:
            return (0, RUN_ENTRIES.index(name))
        return (1, int(name.split("-")[1])) if name.startswith("checkpoint-") else (2, name)

    return sorted(found, key=order)


def check_output_dir(output_dir: str | os.PathLike, *, resuming: bool, overwrite: bool,
                     restarting: bool = False) -> None:
    """Refuse to start a new run in a folder that holds another run's files (read-only: writes nothing).

    `resuming`: the run continues a checkpoint of this folder; `overwrite`: the user asked for
    the old run to be moved aside (`claim_output_dir` does it, once everything is validated);
    `restarting`: resume was asked for but the folder has no complete checkpoint (a run killed
    before its first one): allowed here, and `check_restart` then requires the folder's run to
    be this same run.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output_dir {folder} is a file, not a folder")
    found = run_entries(folder)
    if not found or resuming or overwrite or restarting:
        return
    raise _another_run(folder, found)


def _another_run(folder: Path, found: list[str]) -> FileExistsError:
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return FileExistsError(
        f"--output_dir {folder} holds another run ({shown}): continue it with --resume_from_checkpoint latest, "
        f"or start afresh with --overwrite_output_dir true (the old run is moved to {folder}.replaced-<time>/)")


def check_restart(output_dir: str | os.PathLike, record: Mapping[str, Any], *, verbose: bool = True) -> None:
    """Resume was asked for and there is no complete checkpoint: the folder may hold the files of
    this same run, killed before its first checkpoint (its config.json records the run); starting
    it again from step 0 replaces them. Another run's files are refused as `check_output_dir` does."""
    folder = Path(output_dir)
    found = run_entries(folder)
    if not found:
        return
    saved = None
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((folder / "config.json").read_text()).get("run")
    if not saved:
        raise _another_run(folder, found)
    check_same_run(saved, record, folder, what=f"--output_dir {folder} holds", verbose=verbose)
    if verbose:
        print(f"{folder} holds this same run, stopped before its first checkpoint: starting it again from step 0",
              flush=True)


def claim_output_dir(output_dir: str | os.PathLike, *, overwrite: bool) -> Path | None:
    """Make output_dir ready for a new run: with `overwrite`, move another run's files (whole,
    untouched) into a new sibling folder `<output_dir>.replaced-<YYYYmmdd-HHMMSS>` and return
    it; None when there was nothing to move. Call `check_output_dir` first."""
    folder = Path(output_dir)
    found = run_entries(folder)
    if not found or not overwrite:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.replaced-{stamp}")
    suffix = 1
    while aside.exists():
        aside, suffix = folder.with_name(f"{folder.name}.replaced-{stamp}-{suffix}"), suffix + 1
    aside.mkdir()
    for name in found:
        os.replace(folder / name, aside / name)
    return aside


# ----------------------------------------------------------------------------------------------
# One writer at a time
# ----------------------------------------------------------------------------------------------


class OutputDirLock:
    """An exclusive advisory lock on output_dir for the length of a run.

        lock = OutputDirLock(output_dir)
        lock.check_free()    # at the start: fails at once naming the PID of a run holding it
        ...                  # validate everything
        lock.acquire()       # before the first write (the same error if another run took it meanwhile)
        ...
        lock.release()       # also done by the kernel when the process ends, however it ends

    The lock is fcntl.flock on output_dir/.alignlib.lock, which holds the holder's PID for the
    message. A folder the lock had to create, and that holds nothing else when the lock is
    released (the run failed before writing), is removed again.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self._handle = None
        self._created_folder = False

    @property
    def held(self) -> bool:
        return self._handle is not None

    def check_free(self) -> None:
        """Raise at once if another run holds the lock; writes nothing (the lock itself is taken by
        `acquire`, just before the run's first write, once everything is validated)."""
        if self.held or not self.path.is_file():
            return
        with open(self.path) as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise self._in_use(handle.read().strip()) from None
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _in_use(self, holder: str) -> BlockingIOError:
        return BlockingIOError(f"--output_dir {self.folder} is in use by another alignlib run (PID {holder or 'unknown'}): "
                               "wait for it to finish, or choose another --output_dir")

    def acquire(self) -> None:
        if self.held:
            return
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run, closed in release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise self._in_use(holder) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        with contextlib.suppress(OSError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
        if self._created_folder:  # nothing was written: leave no empty folder behind
            with contextlib.suppress(OSError):
                if [entry.name for entry in self.folder.iterdir()] == [LOCK_FILE]:
                    self.path.unlink()
                    self.folder.rmdir()

    def __enter__(self) -> OutputDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# The same run
# ----------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset: Any, columns: Iterable[str] | None = None) -> str:
    """sha256 (16 hex digits) of a Dataset's columns (default: all), read with Arrow 8192 rows at a
    time: equal for the same examples in the same order, whatever file they were read from."""
    import pyarrow as pa

    digest = hashlib.sha256()
    names = [name for name in (columns or dataset.column_names) if name in dataset.column_names]
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), 8192):
        table = arrow[start : start + 8192].select(names)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue().to_pybytes())
    digest.update(str(len(dataset)).encode())
    return digest.hexdigest()[:16]


def _resolved_model(path: str | None) -> str | None:
    """A local model path as an absolute path (a Hub id as it is), so a run resumed from another
    working directory still matches."""
    if path and os.path.exists(path):
        return os.path.realpath(path)
    return path


MODEL_PATH_SETTINGS = ("model_name_or_path", "ref_model", "reward_model")


def portable_settings(config: Any) -> dict[str, Any]:
    """A config dataclass as a dict for config.json, with local model paths (the model, the reference
    model, the reward model) made absolute, so a checkpoint of the run loads from any working directory."""
    settings = dataclasses.asdict(config)
    for key in MODEL_PATH_SETTINGS:
        if isinstance(settings.get(key), str):
            settings[key] = _resolved_model(settings[key])
    return settings


def run_record(objective: str, *configs: Any, data: str, world_size: int = 1, **extra: Any) -> dict[str, Any]:
    """What makes a run this run: the objective, every field of the config dataclasses (model path
    resolved), the training data's fingerprint, the number of ranks, and `extra` facts."""
    settings: dict[str, Any] = {}
    for config in configs:
        for key, value in dataclasses.asdict(config).items():
            settings[key] = _resolved_model(value) if key in ("model_name_or_path", "ref_model") else value
    return {"objective": objective, "settings": settings, "data": data, "world_size": world_size, **extra}


def check_same_run(saved: Mapping[str, Any] | None, current: Mapping[str, Any], checkpoint: str | os.PathLike,
                   *, verbose: bool = True, what: str | None = None) -> None:
    """Refuse to resume `checkpoint` (whose run record is `saved`) with a different run.

    Differences in SAFE_TO_CHANGE settings are allowed and said in one line; any other one (the
    objective, the model, the data, a setting that changes the trajectory) is a ValueError
    naming each. A checkpoint without a record (saved before alignlib recorded runs) is
    resumed with one line saying its settings could not be compared.
    """
    if not saved:
        if verbose:
            print(f"checkpoint {checkpoint} records no run settings (an older alignlib saved it): resuming "
                  "without comparing them", flush=True)
        return
    differences, allowed = [], []
    for key in ("objective", "data", "world_size"):
        if saved.get(key) != current.get(key):
            name = {"data": "the training data (its fingerprint)", "world_size": "the number of processes"}.get(key, key)
            differences.append(f"{name}: {saved.get(key)!r} then, {current.get(key)!r} now")
    old, new = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key == "dataset_name":  # the data is compared by its fingerprint
            continue
        change = f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
        (allowed if key in SAFE_TO_CHANGE else differences).append(change)
    if differences:
        raise ValueError(f"{what or f'resume_from_checkpoint {checkpoint}'} belongs to a different run: "
                         f"{'; '.join(differences)} (a resumed run must be the same run; start a new one in another "
                         "--output_dir, or with --overwrite_output_dir true)")
    if allowed and verbose:
        print(f"resuming {checkpoint} with changed settings that do not change the training: {'; '.join(allowed)}",
              flush=True)
