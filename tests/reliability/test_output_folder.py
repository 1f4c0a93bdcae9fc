"""Nothing a user already has is lost: the output folder, resume and portable outputs, through the
`alignlib` command as a user runs it (real folders, real processes, real signals).

- A run that fails validation (--beta -1, --label_smoothing 0.7, --f_divergence_type nope) leaves
  a finished run in its folder byte for byte as it was.
- A new run into a folder holding another run is refused with one line naming what is there and
  the two ways on; --overwrite_output_dir true moves the old run, whole, to a sibling folder and
  the folder then holds the new run only.
- Two runs into one folder: the second fails at once naming the first's PID; a lock left by a
  killed run is taken over.
- Resume refuses a different run (another objective, seed or batch size) by name, accepts a
  changed logging frequency, and `latest` with nothing to resume says so.
- An adapter trained from a relative --model path generates from any folder; a checkpoint folder
  can be given to `alignlib generate`.
- Ctrl-C is one line saying the step reached and the newest complete checkpoint, which resumes.

Each test failed on the code before these guarantees (alignlib 83b990b); the docstrings say how.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.tiny_llama import save_tiny_llama

from alignlib import demo


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignlib", *args]


def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


STARTED: list[subprocess.Popen] = []


def start(*args: str, cwd: Path) -> subprocess.Popen:
    process = subprocess.Popen(command(*args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A failed assertion must not leave a 100,000-step run behind."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


def one_error_line(result, *fragments: str) -> str:
    """The single line on stderr of a failed command, checked to hold every fragment."""
    output = result.stderr if hasattr(result, "stderr") else result[1]
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one:\n{output}"
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, f"{lines[0]!r} does not say {missing}"
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (lock file aside): relative path -> sha256."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".alignlib.lock"}


def metric_steps(folder: Path) -> list[int]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    save_tiny_llama(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo.read_pairs()[:24]))
    return root


def flags(workdir: Path, output_dir: Path | str, **overrides) -> list[str]:
    settings = {"model": str(workdir / "model"), "dataset": str(workdir / "pairs.jsonl"), "output_dir": str(output_dir),
                "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 48,
                "max_prompt_length": 24, "seed": 3, "disable_tqdm": "true", "plot": "false", "logging_steps": 1}
    settings.update(overrides)
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def finished_run(workdir) -> Path:
    """A finished 8-step DPO run with checkpoint-2, -4 and -6, built once and copied by the tests."""
    folder = workdir / "finished"
    result = run("train", "dpo", *flags(workdir, folder, max_steps=8, save_steps=2, save_total_limit=5), cwd=workdir)
    assert result.returncode == 0, result.stderr
    return folder


def copy_of(folder: Path, target: Path) -> Path:
    subprocess.run(["cp", "-a", str(folder), str(target)], check=True)
    return target


def test_a_run_that_fails_validation_leaves_the_previous_run_untouched(workdir, finished_run, tmp_path):
    """Before: metrics.jsonl truncated to 0 lines and config.json rewritten, then the loss refused beta -1."""
    victim = copy_of(finished_run, tmp_path / "victim")
    before = snapshot(victim)
    bad = {"beta": "-1", "label_smoothing": "0.7", "f_divergence_type": "nope"}
    running = {key: start("train", "dpo", *flags(workdir, victim, **{key: value}), cwd=workdir)
               for key, value in bad.items()}
    for key, process in running.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 1
        one_error_line((None, stderr), key if key != "beta" else "beta", "error:")
    assert snapshot(victim) == before


def test_a_new_run_into_a_used_folder_is_refused_and_overwrite_moves_the_old_run_aside(workdir, finished_run,
                                                                                       tmp_path):
    """Before: the new 2-step run silently truncated metrics to 2 lines, rotated checkpoint-2 and -4
    away and left the old checkpoint-6 beside the new checkpoint-1."""
    used = copy_of(finished_run, tmp_path / "used")
    before = snapshot(used)
    refused = run("train", "dpo", *flags(workdir, used, save_steps=1, seed=5), cwd=workdir)
    assert refused.returncode == 1
    one_error_line(refused, "holds another run", "metrics.jsonl", "--resume_from_checkpoint latest",
                   "--overwrite_output_dir true")
    assert snapshot(used) == before

    replaced = run("train", "dpo", *flags(workdir, used, save_steps=1, seed=5, overwrite_output_dir="true"),
                   cwd=workdir)
    assert replaced.returncode == 0, replaced.stderr
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("used.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, whole and untouched
    assert metric_steps(used) == [1, 2]
    assert sorted(path.name for path in used.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((used / "config.json").read_text())["train"]["seed"] == 5


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def checkpoint_at_least(folder: Path, step: int):
    """A condition: the folder holds a checkpoint of `step` or later (save_total_limit deletes older
    ones while the run goes on, so polling for one exact checkpoint can miss it)."""
    return lambda: any(int(path.name.split("-")[1]) >= step for path in folder.glob("checkpoint-*")
                       if path.name.split("-")[1].isdigit())


def holds_lock(folder: Path, process: subprocess.Popen):
    lock = folder / ".alignlib.lock"
    return lambda: lock.is_file() and lock.read_text().strip() == str(process.pid)


LONG = 100_000  # steps: runs that are interrupted, never finished


def test_a_second_run_into_the_same_folder_fails_at_once_naming_the_first(workdir, tmp_path):
    """Before: two runs (seeds 1 and 2) raced; one died mid-save, the other's folder mixed both."""
    folder = tmp_path / "shared"
    first = start("train", "dpo", *flags(workdir, folder, max_steps=LONG, seed=1, save_steps=20), cwd=workdir)
    wait_for(holds_lock(folder, first), first, "the first run to take the lock")
    second = run("train", "dpo", *flags(workdir, folder, max_steps=LONG, seed=2, save_steps=20), cwd=workdir)
    assert second.returncode == 1
    one_error_line(second, "in use by another alignlib run", f"PID {first.pid}")
    wait_for(checkpoint_at_least(folder, 20), first, "the first run's checkpoint")
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 130, stderr
    steps = metric_steps(folder)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 20  # one run's steps, each once
    assert json.loads((folder / "config.json").read_text())["train"]["seed"] == 1

    # A run killed while holding the lock leaves the lock file behind; the next run takes it over.
    stale = tmp_path / "stale"
    killed = start("train", "dpo", *flags(workdir, stale, max_steps=LONG), cwd=workdir)
    wait_for(holds_lock(stale, killed), killed, "the run to take the lock")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    after = run("train", "dpo", *flags(workdir, stale, overwrite_output_dir="true"), cwd=workdir)
    assert after.returncode == 0, after.stderr


def test_resume_refuses_a_different_run_by_name(workdir, finished_run, tmp_path):
    """Before: ORPO resumed a DPO run's checkpoint (DPO rows for steps 1-6, ORPO rows after), and a
    changed seed or batch size was accepted; `latest` with nothing to resume started silently."""
    resume = {"resume_from_checkpoint": "latest"}
    cases = {
        "objective": ("orpo", {}),
        "seed": ("dpo", {"seed": 4}),
        "per_device_train_batch_size": ("dpo", {"per_device_train_batch_size": 2}),
    }
    folders = {name: copy_of(finished_run, tmp_path / f"dpo-run-{index}") for index, name in enumerate(cases)}
    before = snapshot(folders["seed"])
    running = {name: start("train", objective, *flags(workdir, folders[name], max_steps=8, save_steps=2,
                                                         save_total_limit=5, **resume, **changes), cwd=workdir)
               for name, (objective, changes) in cases.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 1, (name, stderr)
        one_error_line((None, stderr), "belongs to a different run", f"{name}:")
        assert snapshot(folders[name]) == before
    folder = folders["seed"]

    # What is logged may change: the resumed run continues from checkpoint-6 and says what changed.
    resumed = run("train", "dpo", *flags(workdir, folder, max_steps=8, save_steps=2, save_total_limit=5,
                                         logging_steps=2, **resume), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "checkpoint-6" in resumed.stdout
    assert "logging_steps: 1 then, 2 now" in resumed.stdout

    fresh = run("train", "dpo", *flags(workdir, tmp_path / "new", **resume), cwd=workdir)
    assert fresh.returncode == 0, fresh.stderr
    assert "no complete checkpoint in" in fresh.stdout and "starting from step 0" in fresh.stdout


def test_latest_restarts_the_same_run_killed_before_its_first_checkpoint_and_refuses_another(workdir, tmp_path):
    """`--resume_from_checkpoint latest` in a folder whose run was killed before any checkpoint: the
    same run starts again from step 0 (a preemptible job's loop keeps working); another run is
    refused by name rather than overwriting the folder."""
    folder = tmp_path / "killed"
    settings = flags(workdir, folder, max_steps=LONG, save_steps=LONG // 2)
    process = start("train", "dpo", *settings, cwd=workdir)
    wait_for(lambda: (folder / "metrics.jsonl").is_file() and metric_steps(folder), process, "a logged step")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    before = snapshot(folder)

    other = run("train", "dpo", *flags(workdir, folder, max_steps=LONG, save_steps=LONG // 2, seed=11,
                                       resume_from_checkpoint="latest"), cwd=workdir)
    assert other.returncode == 1
    one_error_line(other, "belongs to a different run", "seed: 3 then, 11 now")
    assert snapshot(folder) == before

    written = (folder / "config.json").stat().st_mtime_ns
    again = start("train", "dpo", *settings, "--resume_from_checkpoint", "latest", cwd=workdir)
    wait_for(lambda: holds_lock(folder, again)() and (folder / "config.json").stat().st_mtime_ns > written, again,
             "the restarted run to write its config")
    again.send_signal(signal.SIGINT)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 130, stderr
    assert "holds this same run, stopped before its first checkpoint: starting it again from step 0" in stdout


def test_an_adapter_from_a_relative_model_path_and_a_checkpoint_generate_from_anywhere(workdir, tmp_path):
    """Before: adapter_config.json kept `../model` as typed, so generate failed from another folder
    (suggesting a Hub download), and a checkpoint folder was not a model to generate from."""
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["cp", "-a", str(workdir / "model"), str(tmp_path / "model")], check=True)
    trained = run("train", "dpo", *flags(workdir, "out", model="../model", use_peft="true", lora_r=4, save_steps=1),
                  cwd=project)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((project / "out" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for model in (project / "out" / "final", project / "out" / "checkpoint-1"):
        generated = run("generate", "--model", str(model), "--prompt", "how do i fix a boat ?",
                        "--max_new_tokens", "3", cwd=elsewhere)
        assert generated.returncode == 0, generated.stderr
        assert generated.stdout.startswith("how do i fix a boat ?")


def test_ctrl_c_says_where_the_run_stands_and_the_checkpoint_resumes(workdir, tmp_path):
    """Before: a KeyboardInterrupt traceback."""
    folder = tmp_path / "interrupted"
    settings = flags(workdir, folder, max_steps=LONG, save_steps=2)
    process = start("train", "dpo", *settings, cwd=workdir)
    wait_for(checkpoint_at_least(folder, 4), process, "checkpoint-4")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130
    line = one_error_line((None, stderr), "interrupted at step", "is the newest complete checkpoint",
                          "--resume_from_checkpoint latest")
    newest = max(int(path.name.split("-")[1]) for path in folder.glob("checkpoint-*"))
    assert f"checkpoint-{newest} is the newest" in line

    resumed = start("train", "dpo", *settings, "--resume_from_checkpoint", "latest", cwd=workdir)
    wait_for(checkpoint_at_least(folder, newest + 4), resumed, "a checkpoint of the resumed run")
    resumed.send_signal(signal.SIGINT)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 130, stderr
    assert f"resumed from {folder / f'checkpoint-{newest}'} at step {newest}" in stdout
    steps = metric_steps(folder)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= newest + 4  # each step once, in order


@pytest.mark.skipif(sys.platform != "linux", reason="flock semantics are checked on Linux")
def test_the_lock_file_is_the_only_trace_of_a_run_refused_before_writing(workdir, tmp_path):
    """A run that fails on its data leaves no folder behind (the lock is taken, then given back)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": 5, "rejected": "c"}\n')
    result = run("train", "dpo", *flags(workdir, tmp_path / "never", dataset=str(bad)), cwd=workdir)
    assert result.returncode == 1
    one_error_line(result, "row 1", "'chosen'")
    assert not (tmp_path / "never").exists(), os.listdir(tmp_path / "never")
