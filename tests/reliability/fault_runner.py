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
             "unprivileged": true}      optional: give up every capability first (see drop_capabilities)
    reply   {"status": exit status, or -N for a child killed by signal N,
             "seconds": wall time of the life, "user": the uid the life ran as (None: killed before),
             "permissions_enforced": whether the kernel checked file permissions for the life (None: ditto),
             "clock_started_s": when the kill clock started, seconds after the fork (None: never)}

Faults are injected by patching alignlib.checkpoint and alignlib.metrics (and torch.save) in the child before it calls
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
                     real EACCES for a life that permissions bind (any user's, or root's without
                     capabilities: "unprivileged"); for one they do not stop (root with
                     CAP_DAC_OVERRIDE), the next write raises EROFS instead (simulated)
"""

from __future__ import annotations

import contextlib
import ctypes
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

import datasets  # noqa: F401 - imported once here, so each forked life starts warm
import peft  # noqa: F401 - what alignlib imports lazily (peft pulls bitsandbytes, which pulls torch.compile)
import torch
import transformers.trainer_utils  # noqa: F401
from transformers import LlamaForCausalLM

import alignlib.checkpoint as checkpoint
import alignlib.cli
import alignlib.metrics as metrics
import alignlib.trainer  # noqa: F401 - imported once here, so each forked life starts warm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as pytest's pythonpath has it
from helpers.tiny_llama import tiny_llama  # noqa: E402 - one builder of tiny Llamas for every test

CAP_DAC_OVERRIDE = 1  # the capability that lets root write where permissions say no


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
                if state["read_only"]:  # permissions are not enforced here: say what the kernel would
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))
                result = real_save(obj, target, *args, **kwargs)
                if Path(name).name == "model.pt":
                    os.chmod(Path(name).parent, 0o555)
                    os.chmod(Path(name).parent.parent, 0o555)
                    state["read_only"] = not permissions_enforced()
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
        real_sha256 = checkpoint._sha256

        def sha256(path):
            if in_save_of(path, step):
                die()
            return real_sha256(path)

        checkpoint._sha256 = sha256
    elif kind == "before_rename":
        real_fsync_tree = checkpoint._fsync_tree

        def fsync_tree(root):
            real_fsync_tree(root)
            if Path(root).name.startswith(f".checkpoint-{step}.tmp-"):
                die()

        checkpoint._fsync_tree = fsync_tree
    elif kind == "before_latest":
        real_write = checkpoint.write_text_atomic

        def write_text_atomic(path, text):
            if Path(path).name == checkpoint.LATEST_FILE and text.strip() == f"checkpoint-{step}":
                die()
            return real_write(path, text)

        checkpoint.write_text_atomic = write_text_atomic
    elif kind == "mid_latest":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            source = Path(src)
            if (Path(dst).name == checkpoint.LATEST_FILE and source.is_file()
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
        real_log = metrics.MetricsLogger.log

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

        metrics.MetricsLogger.log = log
    else:
        raise ValueError(f"unknown fault kind {kind!r}")


def drop_capabilities() -> None:
    """Give up every capability (capset(2) with empty sets; a process may always drop its own).

    Root ignores file permissions only through capabilities (CAP_DAC_OVERRIDE above all); without
    them the kernel checks this process's permissions as it does any user's. The uid stays 0, so
    what root owns stays readable and writable: the interpreter, the virtual environment and the
    caches, wherever they live (a /root that no other user may enter included). Becoming another
    user (nobody) instead would need every one of those readable by that user."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x 2 words, all empty
    if libc.capset(header, data) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"capset: {os.strerror(error)}")


def permissions_enforced() -> bool:
    """Whether the kernel checks file permissions for this process: not with CAP_DAC_OVERRIDE."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:  # no /proc: root overrides permissions, other users do not
        return os.geteuid() != 0
    effective = int(re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.M).group(1), 16)
    return not effective & (1 << CAP_DAC_OVERRIDE)


def child(request: dict) -> int:
    log = request["log"]
    stdout = os.open(f"{log}.stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    stderr = os.open(f"{log}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    user_file = os.open(f"{log}.user", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if request.get("unprivileged"):
            with contextlib.suppress(OSError, AttributeError):  # no capset(2): the life keeps its capabilities
                drop_capabilities()
        os.write(user_file, json.dumps({"uid": os.geteuid(), "permissions_enforced": permissions_enforced()}).encode())
        os.close(user_file)
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
    user_file = Path(f"{request['log']}.user")
    user = json.loads(user_file.read_text() or "{}") if user_file.exists() else {}
    return {"status": status, "seconds": time.monotonic() - started, "user": user.get("uid"),
            "permissions_enforced": user.get("permissions_enforced"),
            "clock_started_s": None if clock_started is None else clock_started - started}


def warm_up() -> None:
    """Save and load a small Llama once, so that transformers' one-time set-up (lazy modules, the
    checkpoint-conversion regexes) is done before the first fork instead of in every life."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        tiny_llama(hidden=16, seed=None, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   vocab_size=32, max_position_embeddings=2048, pad_token_id=None).save_pretrained(scratch)
        LlamaForCausalLM.from_pretrained(scratch)


def main() -> None:
    warm_up()
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_life(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
