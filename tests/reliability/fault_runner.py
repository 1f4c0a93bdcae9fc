"""Run `alignlib` commands as separate processes, each optionally with a fault injected.

Used by tests/reliability/test_faults.py. Importing torch and transformers takes seconds on a
busy 2-core machine, and a fault test runs a dozen "lives" of one training run (start, die,
resume, ...). So this script imports alignlib once, then forks one child per life: each life
is still its own OS process, which SIGKILL really ends, and which shares nothing with the
next life but the files on disk.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.

    request {"argv": [...],             arguments of `alignlib` (e.g. ["train", "dpo", ...])
             "log": "/path/prefix",     the child's stdout and stderr go to prefix.stdout/.stderr
             "fault": {...} or null,    see below
             "kill_after_s": float,     optional: the parent SIGKILLs the child after this long
             "kill_clock": "/path",     optional: ... counted from when the child first writes this file
             "user": "nobody" or null,  optional: drop root privileges first (as root only)
             "home": "/path"}           with "user": a home / datasets cache the user can write
    reply   {"status": exit status, or -N for a child killed by signal N,
             "seconds": wall time of the life, "user": the uid the life ran as (None: killed before),
             "clock_started_s": when the kill clock started, seconds after the fork (None: never)}

Faults are injected by patching alignlib.training (and torch.save) in the child before it calls
alignlib.cli.main; alignlib itself has no test hooks. Each names the checkpoint step whose save
it hits (`step`), and kills the process (SIGKILL, no clean-up) at one stage of that save:

    torn_file        while writing `file` (e.g. "optimizer.pt"): half its bytes are on disk
    before_manifest  every file written, the manifest not yet
    before_rename    manifest written and fsynced, the temporary directory not yet renamed
    before_latest    checkpoint renamed into place, the `latest` pointer not yet rewritten
    mid_latest       the new pointer written to its temporary file, not yet renamed over `latest`
    mid_rotation     (no step) while deleting the first checkpoint that save_total_limit rotates
                     out: its model.pt is gone, the rest of it not yet
    torn_metrics     while writing the metrics line of training step `step`: half a line on disk
    after_log        right after the metrics line of training step `step` (before its save)

and two that make the save fail instead:

    enospc           writing `file` of the checkpoint of `step` fails with ENOSPC after half
                     its bytes (a full disk, simulated)
    read_only        after model.pt of the checkpoint of `step` is written, the output directory
                     and the checkpoint's temporary directory become read-only (chmod 0o555):
                     real EACCES for a non-root life; as root, which permissions do not stop,
                     the next write raises EROFS instead (simulated)
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import datasets
import peft  # noqa: F401 - what alignlib imports lazily (peft pulls bitsandbytes, which pulls torch.compile)
import torch
import transformers.trainer_utils  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM

import alignlib.cli
import alignlib.trainer  # noqa: F401 - imported once here, so each forked life starts warm
import alignlib.training as training

NOBODY = 65534


def die() -> None:
    """What the kernel does to a process on SIGKILL: no clean-up, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)


def file_name(target) -> str:
    """The file name torch.save writes to, whether it was given a path or an open file."""
    if isinstance(target, (str, os.PathLike)):
        return os.fspath(target)
    return getattr(target, "name", "")


def in_save_of(path: str | os.PathLike, step: int) -> bool:
    """True for a path inside the temporary directory of the save of checkpoint-{step}."""
    return Path(path).parent.name.startswith(f".checkpoint-{step}.tmp-")


def write_partial(target, data: bytes) -> None:
    """Write `data` to a path or an open binary file, flushed and fsynced."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        target.write(data)
        target.flush()
        os.fsync(target.fileno())


def install_fault(fault: dict) -> None:
    kind, step = fault["kind"], fault.get("step")
    real_save = torch.save

    if kind in ("torn_file", "enospc", "read_only"):
        wanted = fault.get("file", "model.pt")
        state = {"read_only": False}

        def save(obj, target, *args, **kwargs):
            name = file_name(target)
            if not in_save_of(name, step):
                return real_save(obj, target, *args, **kwargs)
            if kind == "read_only":
                if state["read_only"]:  # root: permissions are not enforced, say what the kernel would
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
                result = real_save(obj, target, *args, **kwargs)
                if Path(name).name == "model.pt":
                    os.chmod(Path(name).parent, 0o555)
                    os.chmod(Path(name).parent.parent, 0o555)
                    state["read_only"] = os.geteuid() == 0
                return result
            if Path(name).name != wanted:
                return real_save(obj, target, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            write_partial(target, buffer.getvalue()[: len(buffer.getvalue()) // 2])
            if kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            die()

        torch.save = save
    elif kind == "before_manifest":
        real_sha256 = training._sha256

        def sha256(path):
            if in_save_of(path, step):
                die()
            return real_sha256(path)

        training._sha256 = sha256
    elif kind == "before_rename":
        real_fsync_tree = training._fsync_tree

        def fsync_tree(root):
            real_fsync_tree(root)
            if Path(root).name.startswith(f".checkpoint-{step}.tmp-"):
                die()

        training._fsync_tree = fsync_tree
    elif kind == "before_latest":
        real_write = training._write_text_atomic

        def write_text_atomic(path, text):
            if Path(path).name == training.LATEST_FILE and text.strip() == f"checkpoint-{step}":
                die()
            return real_write(path, text)

        training._write_text_atomic = write_text_atomic
    elif kind == "mid_latest":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            source = Path(src)
            if (Path(dst).name == training.LATEST_FILE and source.is_file()
                    and source.read_text().strip() == f"checkpoint-{step}"):
                die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif kind == "mid_rotation":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if re.fullmatch(r"checkpoint-\d+", path.name) and (path / "model.pt").is_file():
                (path / "model.pt").unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif kind in ("torn_metrics", "after_log"):
        real_log = training.MetricsLogger.log

        def log(self, metrics, *, step: int, epoch=None):
            if step != fault["step"] or self._handle is None:
                return real_log(self, metrics, step=step, epoch=epoch)
            if kind == "after_log":
                real_log(self, metrics, step=step, epoch=epoch)
                die()
            handle, self._handle = self._handle, io.StringIO()
            real_log(self, metrics, step=step, epoch=epoch)
            line, self._handle = self._handle.getvalue(), handle
            handle.write(line[: len(line) // 2])
            handle.flush()
            die()

        training.MetricsLogger.log = log
    else:
        raise ValueError(f"unknown fault kind {kind!r}")


def drop_privileges(home: str) -> None:
    """Become the unprivileged user `nobody` (from root), with a home and datasets cache it can write."""
    Path(home).mkdir(parents=True, exist_ok=True)
    os.chown(home, NOBODY, NOBODY)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    os.environ["HOME"] = home
    datasets.config.HF_DATASETS_CACHE = Path(home) / "datasets"  # read when a dataset is loaded


def child(request: dict) -> int:
    log = request["log"]
    stdout = os.open(f"{log}.stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stderr = os.open(f"{log}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    uid_file = os.open(f"{log}.uid", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # opened before any drop
    try:
        if request.get("user") == "nobody" and os.geteuid() == 0:
            with contextlib.suppress(PermissionError):  # no CAP_SETUID: the life runs as root
                drop_privileges(request["home"])
        os.write(uid_file, str(os.geteuid()).encode())
        os.close(uid_file)
        if request.get("fault"):
            install_fault(request["fault"])
        status = alignlib.cli.main(list(request["argv"]))
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 70
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def touched_since(path: str, wall_time: float) -> bool:
    try:
        return os.stat(path).st_mtime > wall_time
    except FileNotFoundError:
        return False


def run_life(request: dict) -> dict:
    """Fork the child; SIGKILL it `kill_after_s` after the fork, or, with "kill_clock": PATH, after
    the child first writes PATH (e.g. metrics.jsonl, rewritten when training starts)."""
    started, started_wall = time.monotonic(), time.time()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os._exit(child(request))
    kill_after, clock = request.get("kill_after_s"), request.get("kill_clock")
    clock_started = None if clock else started
    kill_at = started + kill_after if kill_after is not None and not clock else None
    deadline = started + request.get("timeout_s", 300)
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if clock_started is None and touched_since(clock, started_wall):
            clock_started = now
            kill_at = now + kill_after if kill_after is not None else None
        if (kill_at is not None and now >= kill_at) or now >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, wait_status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    status = -os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else os.WEXITSTATUS(wait_status)
    uid_file = Path(f"{request['log']}.uid")
    uid_text = uid_file.read_text() if uid_file.exists() else ""
    user = int(uid_text) if uid_text else None
    return {"status": status, "seconds": time.monotonic() - started, "user": user,
            "clock_started_s": None if clock_started is None else clock_started - started}


def warm_up() -> None:
    """Save and load a small Llama once, so that transformers' one-time set-up (lazy modules, the
    checkpoint-conversion regexes) is done before the first fork instead of in every life."""
    import tempfile

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32)
    with tempfile.TemporaryDirectory() as scratch:
        LlamaForCausalLM(config).save_pretrained(scratch)
        LlamaForCausalLM.from_pretrained(scratch)


def main() -> None:
    warm_up()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_life(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
