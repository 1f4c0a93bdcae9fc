"""Faults during training (issue 7): SIGKILL at any point, a checkpoint write included, then
resume; a full disk and a read-only output directory during a save.

Every run is `alignlib train dpo` on a tiny Llama (2 layers, hidden 32, attention dropout on, so
that a resumed run only matches when the RNG state is restored too), full fine-tuning on 12
pairs, 2 pairs a step, 16 steps (nearly three epochs), a checkpoint every 2 steps, two kept. Each
"life" of a run is its own OS process, forked from tests/reliability/fault_runner.py, which has
imported alignlib once and injects the faults by patching alignlib.training in the child
(alignlib itself has no test hooks).

- SIGKILL: the seven stages of a save (a torn model.pt, a torn optimizer.pt, no manifest yet,
  not renamed yet, `latest` not rewritten, `latest` half-replaced, a rotated-out checkpoint half
  deleted) are dealt at random (seeded) onto the seven saves, two metrics kills (after a step's
  line, and halfway through it) land on random steps, and a checkpoint is damaged on disk once
  (a flipped byte). After each, the run is resumed with `--resume_from_checkpoint latest`.
  After every kill: the checkpoint that find_latest_checkpoint picks is the newest whose save
  completed (no completed step is lost), it checks out against its manifest by this file's own
  hashing and loads; the torn state is on disk (a temporary directory, a torn file, a stale
  pointer) and is not what is picked; the next life says it resumed from that step. At the end
  the final weights are bitwise those of an uninterrupted run, and metrics.jsonl holds steps
  1..16 once each, in order, with the uninterrupted run's values and no torn line. In a second
  run, kills come from outside at random moments of the training loop, wherever they land.
- Disk full: the output directory is a tmpfs with room for one and a half checkpoints (mount -t
  tmpfs; where mounting is refused, ENOSPC is simulated by patching torch.save). The save of
  checkpoint-4 fails: one line on stderr naming it and "No space left on device", exit 1;
  checkpoint-2 intact and still `latest`, no temporary directory left. After space is freed
  the resumed run ends with the uninterrupted run's weights.
- Read-only: the life runs unprivileged (as root, it gives up every capability, so that the kernel
  checks its file permissions like any user's; it keeps uid 0, so the interpreter, the virtual
  environment and the caches stay readable wherever they live) and its output directory turns
  read-only (chmod 0o555) halfway through the save of checkpoint-4: a real EACCES from the kernel.
  Same assertions; the temporary directory cannot be removed on a read-only directory, so it
  stays until the next successful save removes it. Where permissions cannot be made to bind the
  life (not Linux, and root) the fault runner simulates EROFS instead.
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
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama
from safetensors.torch import load_file

from alignlib import demo
from alignlib.checkpoint import find_latest_checkpoint, save_checkpoint, validate_checkpoint
from alignlib.metrics import MetricsLogger, read_metrics

RUNNER = Path(__file__).with_name("fault_runner.py")
MAX_STEPS, SAVE_STEPS = 16, 2
SAVE_POINTS = tuple(range(SAVE_STEPS, MAX_STEPS, SAVE_STEPS))  # 2, 4, ..., 14 (no save after the last step)
SAVE_FAULTS = ("torn_file:model.pt", "torn_file:optimizer.pt", "before_manifest", "before_rename", "before_latest",
               "mid_latest", "mid_rotation")
PAGE = 4096


# ----------------------------------------------------------------------------------------------
# The workspace, the fault runner, the uninterrupted run
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace():
    """The tiny model (model/), 12 pairs (pairs.jsonl), logs/, and home/: HOME and the caches of the
    lives (so they depend on no cache of the machine's, wherever it lives)."""
    root = Path(tempfile.mkdtemp(prefix="alignlib-faults-"))
    save_tiny_llama(root / "model", attention_dropout=0.1)
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo.read_pairs()[:12]))
    (root / "logs").mkdir()
    yield root
    with contextlib.suppress(OSError):
        for path in root.rglob("*"):  # a failed read-only test may have left 0o555 directories
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Life:
    """One process of a run: its exit status (-9: SIGKILLed), output, the uid it ran as, and whether
    the kernel checked its file permissions (root's with CAP_DAC_OVERRIDE are not checked)."""

    status: int
    seconds: float
    stdout: str
    stderr: str
    uid: int | None
    permissions_enforced: bool | None
    clock_started_s: float | None  # with kill_clock: when the child first wrote that file


class Runner:
    """The client side of fault_runner.py: one request per life."""

    def __init__(self, workspace: Path) -> None:
        self.logs = workspace / "logs"
        home = workspace / "home"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(workspace / "hf-datasets"), "HOME": str(home),
               "XDG_CACHE_HOME": str(home / ".cache"), "HF_HOME": str(home / ".cache" / "huggingface"),
               "TRITON_CACHE_DIR": str(home / ".triton" / "cache"), "MPLCONFIGDIR": str(home / ".matplotlib")}
        self.stderr = open(self.logs / "runner.stderr", "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, str(RUNNER)], cwd=workspace, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        ready = self.process.stdout.readline()
        assert ready.startswith('{"ready": true'), (ready, (self.logs / "runner.stderr").read_text()[-3000:])

    def life(self, name: str, argv: list[str], *, fault: dict | None = None, kill_after_s: float | None = None,
             kill_clock: Path | None = None, unprivileged: bool = False) -> Life:
        request = {"argv": argv, "log": str(self.logs / name), "fault": fault, "kill_after_s": kill_after_s,
                   "kill_clock": str(kill_clock) if kill_clock else None, "unprivileged": unprivileged}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the fault runner died: {(self.logs / 'runner.stderr').read_text()[-3000:]}"
        reply = json.loads(line)
        return Life(reply["status"], reply["seconds"], (self.logs / f"{name}.stdout").read_text(),
                    (self.logs / f"{name}.stderr").read_text(), reply["user"], reply["permissions_enforced"],
                    reply["clock_started_s"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.process.stdout.close()
        self.stderr.close()


@pytest.fixture(scope="module")
def runner(workspace):
    client = Runner(workspace)
    yield client
    client.close()


def train_argv(workspace: Path, output_dir: Path, *, resume: bool = False) -> list[str]:
    settings = {"model": workspace / "model", "dataset": workspace / "pairs.jsonl", "output_dir": output_dir,
                "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 2, "logging_steps": 1,
                "per_device_train_batch_size": 2, "learning_rate": 1e-3, "lr_scheduler_type": "linear",
                "warmup_steps": 2, "max_length": 48, "max_prompt_length": 24, "seed": 3, "disable_tqdm": "true",
                "plot": "false"}
    argv = ["train", "dpo", *[part for key, value in settings.items() for part in (f"--{key}", str(value))]]
    return argv + (["--resume_from_checkpoint", "latest"] if resume else [])


@dataclass
class Reference:
    weights: dict[str, torch.Tensor]
    records: list[dict]
    loop_seconds: float  # from the (re)writing of metrics.jsonl, as the loop starts, to the end
    checkpoint_pages: int  # 4 KiB pages that one checkpoint's files take


@pytest.fixture(scope="module")
def reference(runner, workspace) -> Reference:
    """The same run, uninterrupted."""
    out = workspace / "reference"
    life = runner.life("reference", train_argv(workspace, out), kill_clock=out / "metrics.jsonl")
    assert life.status == 0 and life.clock_started_s is not None, life.stderr[-3000:]
    checkpoint = out / f"checkpoint-{SAVE_POINTS[-1]}"
    pages = sum(math.ceil(path.stat().st_size / PAGE) for path in checkpoint.iterdir())
    return Reference(load_file(out / "final" / "model.safetensors"), train_records(out),
                     life.seconds - life.clock_started_s, pages)


# ----------------------------------------------------------------------------------------------
# What is checked after a fault
# ----------------------------------------------------------------------------------------------


def train_records(output_dir: Path) -> list[dict]:
    """The training records of metrics.jsonl, read strictly: a torn line fails here."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def check_checkpoint(path: Path, step: int) -> None:
    """A complete checkpoint, by this test's own reading (not alignlib's validation): the manifest
    lists every other file with its size and sha256, each .pt loads, the step is right."""
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == step, (path, manifest["step"])
    listed = set(manifest["files"])
    assert {"model.pt", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"} <= listed, listed
    assert listed == {p.name for p in path.iterdir()} - {"manifest.json"}, path
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], (path, name)
        if name.endswith(".pt"):
            torch.load(path / name, map_location="cpu", weights_only=True)
    assert json.loads((path / "trainer_state.json").read_text())["step"] == step


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Steps of the visible checkpoint-N directories (hidden temporaries excluded), ascending."""
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if p.is_dir())


def hidden_entries(output_dir: Path) -> list[str]:
    """Hidden leftovers of killed saves; the run folder's lock file (alignlib.run_folder) stays by design."""
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith(".") and p.name != ".alignlib.lock")


def latest_pointer(output_dir: Path) -> str | None:
    path = output_dir / "latest"
    return path.read_text().strip() if path.exists() else None


def picked_checkpoint(output_dir: Path) -> tuple[Path | None, list[str]]:
    """What a resume would load (find_latest_checkpoint), and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picked = find_latest_checkpoint(output_dir)
    return picked, [str(w.message) for w in caught]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_resumed_from(life: Life, output_dir: Path, step: int) -> None:
    if step == 0:
        assert "resumed from" not in life.stdout, life.stdout
    else:
        assert f"resumed from {output_dir / f'checkpoint-{step}'} at step {step}\n" in life.stdout, life.stdout


def assert_finished_like_the_reference(output_dir: Path, reference: Reference) -> None:
    weights = load_file(output_dir / "final" / "model.safetensors")
    assert weights.keys() == reference.weights.keys() and weights
    different = [name for name in weights if not torch.equal(weights[name], reference.weights[name])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    records = train_records(output_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    for got, expected in zip(records, reference.records, strict=True):
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins", "rewards/accuracies", "epoch"):
            assert got[key] == expected[key], (got["step"], key, got[key], expected[key])


# ----------------------------------------------------------------------------------------------
# SIGKILL at random points, then resume
# ----------------------------------------------------------------------------------------------


def kill_plan(rng: random.Random) -> list[tuple[str, int]]:
    """(fault, step) in the order the lives meet them: the seven save faults dealt onto the seven
    saves (mid_rotation at or after step 6, the first save that rotates one out on a fresh run),
    the two metrics faults on random steps (before a save fault on the same step: the line is
    written before the save)."""
    while True:
        order = rng.sample(SAVE_FAULTS, len(SAVE_FAULTS))
        if SAVE_POINTS[order.index("mid_rotation")] >= 6:
            break
    plan = [(fault, step, 1) for fault, step in zip(order, SAVE_POINTS, strict=True)]
    plan += [(fault, rng.randint(1, MAX_STEPS - 1), 0) for fault in ("after_log", "torn_metrics")]
    plan.sort(key=lambda item: (item[1], item[2]))
    return [(fault, step) for fault, step, _ in plan]


def fault_request(fault: str, step: int) -> dict:
    kind, _, file = fault.partition(":")
    return {"kind": kind, "step": step, **({"file": file} if file else {})}


def last_save_before(step: int) -> int:
    """The newest save point strictly before training step `step` (0: none)."""
    return max((s for s in SAVE_POINTS if s < step), default=0)


def expected_resume(fault: str, step: int, resumed: int, out: Path) -> tuple[int, set[int]]:
    """The newest checkpoint whose save completed before the kill, from what the fault did (not
    from alignlib's validation), and the steps of visible checkpoints the fault damaged. Also
    checks that the torn state the fault leaves is on disk."""
    temporaries = [name for name in hidden_entries(out) if name.startswith(f".checkpoint-{step}.tmp-")]
    if fault.startswith("torn_file") or fault in ("before_manifest", "before_rename"):
        assert len(temporaries) == 1 and f"checkpoint-{step}" not in os.listdir(out), hidden_entries(out)
        torn = out / temporaries[0]
        if fault.startswith("torn_file"):
            assert not (torn / "manifest.json").exists() and (torn / fault.split(":")[1]).stat().st_size > 0
        else:
            assert (torn / "manifest.json").exists() == (fault == "before_rename")
        return step - SAVE_STEPS, set()
    if fault == "before_latest":
        assert latest_pointer(out) != f"checkpoint-{step}"
        return step, set()
    if fault == "mid_latest":
        pending = [name for name in hidden_entries(out) if name.startswith(".latest.tmp-")]
        assert len(pending) == 1 and (out / pending[0]).read_text().strip() == f"checkpoint-{step}"
        assert latest_pointer(out) != f"checkpoint-{step}"
        return step, set()
    if fault == "mid_rotation":
        saved = int(latest_pointer(out).split("-")[1])
        assert resumed < saved <= step
        victims = {s for s in checkpoint_steps(out) if not (out / f"checkpoint-{s}" / "model.pt").exists()}
        assert len(victims) == 1 and min(victims) < saved, victims
        assert "model.pt is missing" in validate_checkpoint(out / f"checkpoint-{min(victims)}")
        return saved, victims
    assert fault in ("after_log", "torn_metrics"), fault
    if fault == "torn_metrics":
        text = (out / "metrics.jsonl").read_text()
        assert text and not text.endswith("\n"), "the metrics line was not torn"
    return max(resumed, last_save_before(step)), set()  # killed before the save of `step`


def complete(path: Path, step: int) -> bool:
    try:
        check_checkpoint(path, step)
    except (AssertionError, OSError, ValueError):
        return False
    return True


def test_sigkill_at_random_points_then_resume_loses_nothing_and_ends_like_the_uninterrupted_run(
        runner, workspace, reference):
    """Nine lives killed at the points of `kill_plan` (seeded), one byte of a checkpoint flipped,
    each followed by --resume_from_checkpoint latest; see the module docstring."""
    rng = random.Random(20250607)
    out = workspace / "killed"
    plan = kill_plan(rng)
    resumed, damaged_on_disk, corrupted = 0, set(), None
    history = []
    for index, (fault, step) in enumerate(plan):
        life = runner.life(f"kill-{index}-{fault.replace(':', '-')}", train_argv(workspace, out, resume=index > 0),
                           fault=fault_request(fault, step))
        assert life.status == -signal.SIGKILL, f"{fault} at step {step}: status {life.status}\n{life.stderr[-3000:]}"
        assert_resumed_from(life, out, resumed)
        if corrupted is not None:  # the life after the damage said why it did not take the newest
            assert f"skipping checkpoint {out / f'checkpoint-{corrupted}'}: model.pt does not match" in life.stderr
        corrupted = None
        # a damaged checkpoint stops counting as such once it is rotated out or saved again
        damaged_on_disk = {s for s in damaged_on_disk
                           if (out / f"checkpoint-{s}").exists() and not complete(out / f"checkpoint-{s}", s)}

        resumed, damaged = expected_resume(fault, step, resumed, out)
        damaged_on_disk |= damaged
        if fault == "before_latest":  # and then a byte of the newest checkpoint rots on disk
            model_file = out / f"checkpoint-{resumed}" / "model.pt"
            data = bytearray(model_file.read_bytes())
            data[len(data) // 2] ^= 0xFF
            model_file.write_bytes(bytes(data))
            corrupted, damaged_on_disk = resumed, damaged_on_disk | {resumed}
            resumed = max((s for s in checkpoint_steps(out) if s < corrupted and s not in damaged_on_disk), default=0)

        for visible in set(checkpoint_steps(out)) - damaged_on_disk:  # nothing torn under a final name
            check_checkpoint(out / f"checkpoint-{visible}", visible)
        picked, skipped = picked_checkpoint(out)
        assert picked == (out / f"checkpoint-{resumed}" if resumed else None), (fault, step, picked, skipped)
        if picked is not None:
            check_checkpoint(picked, resumed)
        if corrupted is not None:
            assert any(f"checkpoint-{corrupted}: model.pt does not match its sha256" in w for w in skipped), skipped
        history.append((fault, step, resumed))

    final = runner.life("kill-final", train_argv(workspace, out, resume=True))
    assert final.status == 0, final.stderr[-3000:]
    assert_resumed_from(final, out, resumed)
    assert_finished_like_the_reference(out, reference)
    assert all(validate_checkpoint(out / f"checkpoint-{s}") is None for s in checkpoint_steps(out))
    if resumed < SAVE_POINTS[-1]:  # the last life saved: it removed what killed saves had left
        assert hidden_entries(out) == [], hidden_entries(out)
    print(f"\n{len(plan)} kills (fault, step, resumed from): {history}")


def test_sigkill_from_outside_at_random_moments_then_resume(runner, workspace, reference):
    """Kills sent from outside (SIGKILL from the runner) at a random (seeded) moment of the training
    loop (the clock starts when the life rewrites metrics.jsonl, just before its first step; the
    delay is a random share of the uninterrupted loop's time for the steps left), each followed
    by a resume, until a life finishes. Wherever a kill lands (a step, a save, a rotation, the
    final save), the newest visible checkpoint is complete and is the one picked, the next life
    resumes from it, and the end matches the uninterrupted run."""
    rng = random.Random(11)
    out = workspace / "killed-outside"
    resumed, landed = 0, []
    for index in range(4):
        delay = rng.uniform(0.0, 1.0) * reference.loop_seconds * (MAX_STEPS - resumed) / MAX_STEPS
        life = runner.life(f"outside-{index}", train_argv(workspace, out, resume=index > 0), kill_after_s=delay,
                           kill_clock=out / "metrics.jsonl")
        if "resumed from" in life.stdout or life.status == 0:  # a kill may come before the print
            assert_resumed_from(life, out, resumed)
        if life.status == 0:
            landed.append(f"{delay:.2f}s: finished first")
            break
        assert life.status == -signal.SIGKILL, life.stderr[-3000:]
        visible = checkpoint_steps(out)
        newest = max(visible, default=0)
        assert newest >= resumed
        if newest:  # older ones may be half rotated out; the newest was renamed into place complete
            check_checkpoint(out / f"checkpoint-{newest}", newest)
        assert picked_checkpoint(out)[0] == (out / f"checkpoint-{newest}" if newest else None)
        logged = [r["step"] for r in read_metrics(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
        landed.append(f"{delay:.2f}s: after step {max(logged, default=0)}, resume from {newest}")
        resumed = newest
    if life.status != 0:
        life = runner.life("outside-final", train_argv(workspace, out, resume=True))
        assert life.status == 0, life.stderr[-3000:]
        assert_resumed_from(life, out, resumed)
    assert_finished_like_the_reference(out, reference)
    print(f"\noutside kills: {landed}")


# ----------------------------------------------------------------------------------------------
# Disk full during a save
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int):
    """Yield True with a tmpfs of `size_bytes` mounted at `path`, False where mounting is refused."""
    path.mkdir(parents=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def grow_filesystem(path: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True, capture_output=True)


def test_disk_full_during_a_save_gives_one_clear_line_keeps_the_previous_checkpoint_and_resumes(
        runner, workspace, reference):
    out = workspace / "disk-full"
    # room for config.json, metrics.jsonl, latest, checkpoint-2 and half of checkpoint-4
    size = (4 + reference.checkpoint_pages * 3 // 2) * PAGE
    with small_filesystem(out, size) as real:
        fault = None if real else {"kind": "enospc", "step": 4, "file": "optimizer.pt"}
        life = runner.life("disk-full", train_argv(workspace, out), fault=fault)
        mechanism = f"a real {size // 1024} KiB tmpfs" if real else "simulated ENOSPC (mount refused)"
        print(f"\ndisk full: {mechanism}")
        lines = error_lines(life.stderr)
        assert life.status == 1 and len(lines) == 1 and "Traceback" not in life.stderr, life.stderr[-3000:]
        assert lines[0].startswith("alignlib: error: ") and "checkpoint-4" in lines[0], lines[0]
        assert os.strerror(errno.ENOSPC) in lines[0] and "checkpoint-2 is still the latest" in lines[0], lines[0]
        assert checkpoint_steps(out) == [2] and latest_pointer(out) == "checkpoint-2"
        check_checkpoint(out / "checkpoint-2", 2)
        assert picked_checkpoint(out) == (out / "checkpoint-2", [])
        assert hidden_entries(out) == [], "the failed save left its temporary directory"
        assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]

        if real:  # space is freed
            grow_filesystem(out, 64 << 20)
        resumed = runner.life("disk-full-resumed", train_argv(workspace, out, resume=True))
        assert resumed.status == 0, resumed.stderr[-3000:]
        assert_resumed_from(resumed, out, 2)
        assert_finished_like_the_reference(out, reference)


def test_disk_full_in_process_keeps_the_previous_checkpoint_and_names_the_metrics_file(tmp_path, monkeypatch):
    """save_checkpoint and MetricsLogger on a 192 KiB tmpfs (ENOSPC patched into torch.save and the
    metrics file's write where mounting is refused): OSError with errno ENOSPC naming what could
    not be written; nothing of the failed save left; the next save, once there is room, works."""
    torch.manual_seed(0)
    model = torch.nn.Linear(96, 96)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.randn(2, 96)).sum().backward()
    optimizer.step()
    disk = tmp_path / "disk"
    with small_filesystem(disk, 192 * 1024) as real:
        if not real:
            real_save = torch.save

            def full_disk(obj, handle, *args, **kwargs):
                if Path(getattr(handle, "name", str(handle))).parent.name.startswith(".checkpoint-2.tmp-"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_save(obj, handle, *args, **kwargs)

            monkeypatch.setattr(torch, "save", full_disk)
        save_checkpoint(disk, 1, model=model, optimizer=optimizer, scheduler=scheduler)  # ~114 KiB: fits once, not twice
        before = sorted(p.name for p in disk.iterdir())
        with pytest.raises(OSError, match=re.escape(f"checkpoint-2 in {disk}: No space left on device; "
                                                    "checkpoint-1 is still the latest")) as info:
            save_checkpoint(disk, 2, model=model, optimizer=optimizer, scheduler=scheduler)
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in disk.iterdir()) == before and latest_pointer(disk) == "checkpoint-1"
        check_checkpoint(disk / "checkpoint-1", 1)

        logger = MetricsLogger(disk)
        if real:
            with open(disk / "filler", "wb") as filler, contextlib.suppress(OSError):
                filler.write(b"\0" * (192 * 1024))
        else:
            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(logger, "_handle", type("Full", (), {"write": no_space, "flush": no_space,
                                                                     "close": lambda self: None})())
        with pytest.raises(OSError, match=rf"metrics of step \d+ to {re.escape(str(disk / 'metrics.jsonl'))}: "
                                          "No space") as info:
            for step in range(1, 10_000):
                logger.log({"loss": 1.0, "padding": "x" * 500}, step=step)
        assert info.value.errno == errno.ENOSPC
        logger.close()

        if real:  # space is freed
            grow_filesystem(disk, 1 << 20)
        else:
            monkeypatch.undo()
        model.weight.data.add_(1.0)
        save_checkpoint(disk, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                        save_total_limit=1)
        assert checkpoint_steps(disk) == [2] and latest_pointer(disk) == "checkpoint-2"
        check_checkpoint(disk / "checkpoint-2", 2)
        print(f"\nin-process disk full: {'a real 192 KiB tmpfs' if real else 'simulated ENOSPC'}")


# ----------------------------------------------------------------------------------------------
# Read-only output directory during a save
# ----------------------------------------------------------------------------------------------


def make_writable(output_dir: Path) -> None:
    """What an administrator does after the fault: the directory and what is in it writable again."""
    for path in [output_dir, *output_dir.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)


def test_read_only_output_dir_during_a_save_gives_one_clear_line_and_the_next_save_cleans_up(
        runner, workspace, reference):
    out = workspace / "read-only"
    out.mkdir()
    try:  # unprivileged: as root, the life gives up the capabilities by which root ignores permissions
        life = runner.life("read-only", train_argv(workspace, out), fault={"kind": "read_only", "step": 4},
                           unprivileged=True)
    finally:
        failed_state = hidden_entries(out)
        make_writable(out)
    enforced = life.permissions_enforced
    mechanism = (f"chmod 0o555, the life running as uid {life.uid} with permissions enforced: real EACCES"
                 if enforced else "simulated EROFS")
    print(f"\nread-only: {mechanism}")
    if sys.platform == "linux":  # a process may always drop its capabilities there: the real fault, not a stand-in
        assert enforced, f"the read-only life ran with permissions not enforced (uid {life.uid})"
    lines = error_lines(life.stderr)
    assert life.status == 1 and len(lines) == 1 and "Traceback" not in life.stderr, life.stderr[-3000:]
    reason = os.strerror(errno.EACCES) if enforced else os.strerror(errno.EROFS)
    assert lines[0].startswith("alignlib: error: ") and "checkpoint-4" in lines[0] and reason in lines[0], lines[0]
    assert "checkpoint-2 is still the latest" in lines[0], lines[0]
    assert checkpoint_steps(out) == [2] and latest_pointer(out) == "checkpoint-2"
    check_checkpoint(out / "checkpoint-2", 2)
    if enforced:  # the half-written temporary directory could not be removed from a read-only directory
        assert len(failed_state) == 1 and failed_state[0].startswith(".checkpoint-4.tmp-"), failed_state
        assert (out / failed_state[0] / "model.pt").exists() and not (out / failed_state[0] / "manifest.json").exists()
    else:
        assert failed_state == []
    assert picked_checkpoint(out) == (out / "checkpoint-2", [])

    resumed = runner.life("read-only-resumed", train_argv(workspace, out, resume=True), unprivileged=True)
    assert resumed.status == 0, resumed.stderr[-3000:]
    assert_resumed_from(resumed, out, 2)
    assert hidden_entries(out) == [], "the next successful save did not remove the failed save's temporary directory"
    assert_finished_like_the_reference(out, reference)
