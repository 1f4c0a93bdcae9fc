"""The `alignlib` command, run as a user runs it: `python -m alignlib ...` in a subprocess, in a
temporary working directory (never the repository root).

- Bad input: each case ends with one clear line on stderr, no traceback, a non-zero exit.
- SIGKILL mid-run, then `--resume_from_checkpoint latest`: the final weights are bitwise those of an
  uninterrupted run, and metrics.jsonl holds each step once.
- `--config FILE.yaml` with a flag that overrides one of its keys.
- The embedded default (`alignlib train dpo` with no model or dataset) learns (its seconds printed, not
  asserted), writes its outputs, and `alignlib generate` prints an answer from it.

The tiny model is a 2-layer Llama (hidden 32) over the demo tokenizer, with attention dropout on,
so that a resumed run only matches when the RNG state is restored too.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama
from safetensors.torch import load_file

from alignlib import demo

TRL_TRAIN_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "epoch", "step")


def alignlib_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignlib", *args]


def run_alignlib(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(alignlib_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def write_pairs(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def train_records(output_dir: Path) -> list[dict]:
    from alignlib.metrics import read_metrics

    return [r for r in read_metrics(output_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny model (model/), 24 training pairs (pairs.jsonl) and the bad inputs, in one directory."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "model", attention_dropout=0.1)
    write_pairs(root / "pairs.jsonl", demo.read_pairs()[:24])
    return root


def tiny_run_flags(workdir: Path, output_dir: Path, **overrides) -> list[str]:
    settings = {"model": str(workdir / "model"), "dataset": str(workdir / "pairs.jsonl"), "output_dir": str(output_dir),
                "max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_length": 48,
                "max_prompt_length": 24, "seed": 3, "disable_tqdm": "true", "plot": "false"}
    settings.update(overrides)
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, no traceback, a non-zero exit
# ----------------------------------------------------------------------------------------------


def bad_input_cases(workdir: Path) -> dict[str, tuple[list[str], dict | None, int, tuple[str, ...]]]:
    """name -> (arguments after `train` (an objective first, or dpo), extra environment, exit status,
    fragments the error must hold)."""
    bad = workdir / "bad"
    bad.mkdir(exist_ok=True)
    rows = demo.read_pairs()[:3]
    model, pairs = str(workdir / "model"), str(workdir / "pairs.jsonl")
    (bad / "empty.jsonl").write_text("")
    write_pairs(bad / "missing_field.jsonl", [rows[0], {"prompt": rows[1]["prompt"], "chosen": rows[1]["chosen"]},
                                              rows[2]])
    write_pairs(bad / "numbers.jsonl", [dict(row, chosen=5) for row in rows])
    write_pairs(bad / "one_list.jsonl", [rows[0], dict(rows[1], chosen=["a", "list"]), rows[2]])
    write_pairs(bad / "long_prompts.jsonl", [dict(row, prompt="how " * 40 + row["prompt"]) for row in rows])
    (bad / "no_prompt_cut.yaml").write_text("max_prompt_length: null\nmax_length: 16\n")
    (bad / "unknown_key.yaml").write_text("learning_rate: 0.001\nbogus_key: 3\n")
    (bad / "broken.yaml").write_text("learning_rate: [0.001\nbeta: 0.1\n")
    (bad / "scalar.yaml").write_text("just some words\n")
    (bad / "push_to_hub.yaml").write_text("push_to_hub: true\nhub_model_id: me/tiny-dpo\n")
    write_pairs(bad / "no_assistant.jsonl", [
        {"messages": [{"role": "user", "content": "how do i fix a boat ?"}, {"role": "assistant", "content": "slowly"}]},
        {"messages": [{"role": "user", "content": "how do i fix a boat ?"}]}])
    (bad / "not_a_model").mkdir(exist_ok=True)
    (bad / "not_a_model" / "config.json").write_text('{"model_type": "llama"}')
    (bad / "not_a_model" / "notes.txt").write_text("not a model\n")
    conversation = [{"role": "user", "content": "how do i fix a boat ?"}, {"role": "assistant", "content": "step by step"}]
    write_pairs(bad / "other_user_turns.jsonl", [
        {"chosen": conversation, "rejected": [{"role": "user", "content": "how do i paint a door ?"},
                                              {"role": "assistant", "content": "no"}]},
        {"chosen": conversation, "rejected": conversation[:1] + [{"role": "assistant", "content": "no"}]},
    ])
    shim = bad / "no_bitsandbytes" / "bitsandbytes"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named bitsandbytes (test shim)')\n")
    without_bnb = {**os.environ, "PYTHONPATH": str(shim.parent)}
    tensorboard_shim = bad / "no_tensorboard" / "tensorboard"
    tensorboard_shim.mkdir(parents=True, exist_ok=True)
    (tensorboard_shim / "__init__.py").write_text("raise ImportError('No module named tensorboard (test shim)')\n")
    without_tensorboard = {**os.environ, "PYTHONPATH": str(tensorboard_shim.parent)}
    runnable = tiny_run_flags(workdir, bad / "out")
    return {
        "dataset file missing": (["--model", model, "--dataset", str(bad / "nope.jsonl")], None, 1,
                                 ("nope.jsonl", "not found")),
        "dataset empty": (["--model", model, "--dataset", str(bad / "empty.jsonl")], None, 1, ("empty",)),
        "row without a field": (["--model", model, "--dataset", str(bad / "missing_field.jsonl")], None, 1,
                                ("row 2", "'rejected'", "missing")),
        "numbers for text": (["--model", model, "--dataset", str(bad / "numbers.jsonl")], None, 1,
                             ("row 1", "'chosen'", "must be a string")),
        # One bad row among good ones: the error must name the bad row, not a good one.
        "one row with a list": (["--model", model, "--dataset", str(bad / "one_list.jsonl")], None, 1,
                                ("row 2", "'chosen'")),
        # max_prompt_length null: prompts are not cut, and none leaves room for a response.
        "prompts longer than max_length": (["--model", model, "--dataset", str(bad / "long_prompts.jsonl"),
                                            "--config", str(bad / "no_prompt_cut.yaml")], None, 1,
                                           ("all 3 pairs were dropped", "max_length=16")),
        "model path missing": (["--model", str(bad / "no_model"), "--dataset", pairs], None, 1,
                               ("model path", "no_model", "does not exist")),
        "unknown flag": ([*runnable, "--bogus_flag", "1"], None, 2, ("unrecognized arguments", "--bogus_flag")),
        "unknown key in --config": ([*runnable, "--config", str(bad / "unknown_key.yaml")], None, 2,
                                    ("bogus_key",)),
        "--config file missing": ([*runnable, "--config", str(bad / "nope.yaml")], None, 1, ("nope.yaml",)),
        "load_in_4bit without bitsandbytes": ([*runnable, "--use_peft", "true", "--load_in_4bit", "true"],
                                              without_bnb, 1, ("load_in_4bit", "bitsandbytes")),
        "unknown loss_type": ([*runnable, "--loss_type", "bogus"], None, 1, ("loss_type", "'bogus'", "sigmoid")),
        "resume from nowhere": ([*runnable, "--resume_from_checkpoint", str(bad / "nowhere")], None, 1,
                                ("resume_from_checkpoint", "nowhere")),
        # Errors that pointed the wrong way or were a traceback (issue 17, item 6)
        "--config not valid YAML": ([*runnable, "--config", str(bad / "broken.yaml")], None, 1,
                                    ("broken.yaml", "not valid YAML", "line 2")),
        "--config holding a scalar": ([*runnable, "--config", str(bad / "scalar.yaml")], None, 1,
                                      ("scalar.yaml", "mapping of setting: value", "str")),
        "a folder that is not a model": ([*runnable, "--model", str(bad / "not_a_model")], None, 1,
                                         ("not_a_model", "holds no tokenizer")),
        "a model path that is a file": ([*runnable, "--model", pairs], None, 1, ("pairs.jsonl", "is a file")),
        # Settings that were accepted and ignored (item 7)
        "--bf16 on a CPU": ([*runnable, "--bf16", "true"], None, 1, ("bf16", "CUDA")),
        "--fsdp without torchrun": ([*runnable, "--fsdp", "true"], None, 1, ("fsdp", "torchrun")),
        "--max_grad_norm -1": ([*runnable, "--max_grad_norm", "-1"], None, 1, ("max_grad_norm", "-1")),
        "--save_steps -5": ([*runnable, "--save_steps", "-5"], None, 1, ("save_steps", "-5")),
        "a flag prefix": ([*runnable, "--learning-rat", "0.1"], None, 2, ("unrecognized arguments", "--learning-rat")),
        "conversations with other user turns": (["--model", model, "--dataset", str(bad / "other_user_turns.jsonl")],
                                                None, 1, ("row 1", "differ before their answers")),
        "a loss option of another objective": ([*runnable, "--center_rewards_coefficient", "0.01"], None, 1,
                                               ("center_rewards_coefficient", "dpo")),
        # Keys of TRL/transformers configs (issue 14, item 6)
        "push_to_hub in --config": ([*runnable, "--config", str(bad / "push_to_hub.yaml")], None, 1,
                                    ("push_to_hub", "needs a network", "hf upload me/tiny-dpo")),
        "report_to tensorboard without tensorboard": ([*runnable, "--report_to", "tensorboard"], without_tensorboard,
                                                      1, ("report_to tensorboard", "pip install tensorboard")),
        "--eval_steps 2.5": ([*runnable, "--eval_steps", "2.5"], None, 1, ("eval_steps", "2.5", "fraction")),
        # SFT, fp16 and the tutorials' data options (issue 14); a case may name its objective first
        "--fp16 on a CPU": ([*runnable, "--fp16", "true"], None, 1, ("fp16", "CUDA GPU")),
        "--bf16 with --fp16": ([*runnable, "--bf16", "true", "--fp16", "true"], None, 1, ("bf16 and fp16",)),
        "--packing for dpo": ([*runnable, "--packing", "true"], None, 1, ("packing", "SFT options", "dpo")),
        "sft with max_prompt_length": (["sft", *runnable], None, 1, ("sft does not cut prompts", "24")),
        "--eval_split_size 1.5": ([*runnable, "--eval_split_size", "1.5"], None, 1, ("eval_split_size", "1.5")),
        "--data_dir on a single file": ([*runnable, "--data_dir", "data/rl"], None, 1,
                                        ("data_dir", "pairs.jsonl", "single data file")),
        "sft conversation without an assistant turn": (
            ["sft", "--model", model, "--dataset", str(bad / "no_assistant.jsonl"), "--chat_template", "chatml"], None, 1,
            ("row 2", "no assistant message", "assistant_only_loss")),
    }


BAD_INPUT_NAMES = ("dataset file missing", "dataset empty", "row without a field", "numbers for text",
                   "one row with a list", "prompts longer than max_length", "model path missing", "unknown flag",
                   "unknown key in --config", "--config file missing", "load_in_4bit without bitsandbytes",
                   "unknown loss_type", "resume from nowhere", "--config not valid YAML", "--config holding a scalar",
                   "a folder that is not a model", "a model path that is a file", "--bf16 on a CPU",
                   "--fsdp without torchrun", "--max_grad_norm -1", "--save_steps -5", "a flag prefix",
                   "conversations with other user turns", "a loss option of another objective",
                   "push_to_hub in --config", "report_to tensorboard without tensorboard", "--eval_steps 2.5",
                   "--fp16 on a CPU", "--bf16 with --fp16", "--packing for dpo", "sft with max_prompt_length",
                   "--eval_split_size 1.5", "--data_dir on a single file", "sft conversation without an assistant turn")
AT_ONCE = 8  # bad-input commands running together (each spends most of its time importing torch)


def _with_objective(args: list[str]) -> list[str]:
    """A case's arguments after `train`: its own objective when it names one first, else dpo."""
    return args if args and not args[0].startswith("--") else ["dpo", *args]


@pytest.fixture(scope="module")
def bad_input_results(workdir) -> dict:
    """Every bad-input command, started together (each spends most of its time importing torch and
    transformers), then collected: name -> (expected status, fragments, CompletedProcess-like tuple)."""
    cases = bad_input_cases(workdir)
    assert set(cases) == set(BAD_INPUT_NAMES)
    cwd = workdir / "bad"
    names, results = list(cases), {}
    for first in range(0, len(names), AT_ONCE):
        running = {name: subprocess.Popen(alignlib_command("train", *_with_objective(cases[name][0])), cwd=cwd,
                                          env=cases[name][1], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for name in names[first:first + AT_ONCE]}
        for name, process in running.items():
            stdout, stderr = process.communicate(timeout=600)
            results[name] = (cases[name][2], cases[name][3], process.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_input_gets_one_clear_line_and_a_non_zero_exit(name, bad_input_results):
    expected_status, fragments, status, stdout, stderr = bad_input_results[name]
    assert "Traceback" not in stderr + stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == expected_status, f"exit status {status}; stderr:\n{stderr}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr, not one:\n{stderr}"
    assert "error:" in lines[0]
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, f"the error {lines[0]!r} does not say {missing}"


# ----------------------------------------------------------------------------------------------
# SIGKILL and resume
# ----------------------------------------------------------------------------------------------


def test_sigkill_then_resume_from_latest_ends_with_the_weights_of_an_uninterrupted_run(workdir, tmp_path):
    """12 steps, a checkpoint every 4. One run goes through; another, started alike, is SIGKILLed as
    soon as its first checkpoint is complete (the `latest` pointer is written after the checkpoint's
    manifest), then rerun with --resume_from_checkpoint latest. Full fine-tuning with attention
    dropout, two epochs of 24 pairs in batches of 4: the resumed run must restore the weights, the
    AdamW moments, the scheduler, the RNG and the data position to match bit for bit."""
    flags = {"max_steps": 12, "save_steps": 4, "logging_steps": 1, "lr_scheduler_type": "linear",
             "warmup_steps": 2}
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_stderr = open(tmp_path / "whole.stderr", "w")  # noqa: SIM115 - closed below, after the run
    whole = subprocess.Popen(alignlib_command("train", "dpo", *tiny_run_flags(workdir, whole_dir, **flags)),
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=whole_stderr)
    victim = subprocess.Popen(alignlib_command("train", "dpo", *tiny_run_flags(workdir, killed_dir, **flags)),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed_dir / "latest").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_dir / "final").exists(), "killed too late: the run had already finished"
    checkpoint = (killed_dir / "latest").read_text().strip()
    assert checkpoint in ("checkpoint-4", "checkpoint-8")
    assert len(train_records(killed_dir)) < 12

    resumed = run_alignlib("train", "dpo", *tiny_run_flags(workdir, killed_dir, **flags),
                           "--resume_from_checkpoint", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed_dir / checkpoint}" in resumed.stdout
    status = whole.wait(timeout=600)
    whole_stderr.close()
    assert status == 0, (tmp_path / "whole.stderr").read_text()[-2000:]

    expected = load_file(whole_dir / "final" / "model.safetensors")
    got = load_file(killed_dir / "final" / "model.safetensors")
    assert expected.keys() == got.keys() and len(expected) > 0
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

    whole_log, resumed_log = train_records(whole_dir), train_records(killed_dir)
    assert [r["step"] for r in resumed_log] == list(range(1, 13))
    for before, after in zip(whole_log, resumed_log, strict=True):
        for key in ("loss", "grad_norm", "learning_rate", "rewards/margins", "epoch"):
            assert after[key] == before[key], (after["step"], key)


# ----------------------------------------------------------------------------------------------
# --config YAML under the flags
# ----------------------------------------------------------------------------------------------


def test_config_yaml_sets_values_and_a_flag_overrides_it(workdir, tmp_path):
    """The YAML gives model, dataset, output_dir and hyper-parameters (TRL's names); --max_steps on
    the command line wins over the YAML's max_steps, the rest comes from the YAML."""
    (tmp_path / "run.yaml").write_text(
        f"model_name_or_path: {workdir / 'model'}\n"
        f"dataset_name: {workdir / 'pairs.jsonl'}\n"
        "output_dir: from-yaml\n"
        "max_steps: 5\n"
        "learning_rate: 0.002\n"
        "beta: 0.25\n"
        "per_device_train_batch_size: 3\n"
        "logging_steps: 1\n"
        "max_length: 48\n"
        "max_prompt_length: 24\n"
        "disable_tqdm: true\n"
        "plot: false\n"
    )
    done = run_alignlib("train", "dpo", "--config", "run.yaml", "--max_steps", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    output_dir = tmp_path / "from-yaml"
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["objective"] == "dpo"
    assert saved["train"]["max_steps"] == 2
    assert (saved["train"]["learning_rate"], saved["train"]["beta"]) == (0.002, 0.25)
    assert saved["train"]["per_device_train_batch_size"] == 3
    assert saved["model"]["model_name_or_path"] == str(workdir / "model")
    assert [r["step"] for r in train_records(output_dir)] == [1, 2]
    assert train_records(output_dir)[0]["learning_rate"] == pytest.approx(0.002 * (1 - 1 / 2))  # linear decay
    assert (output_dir / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# The embedded default
# ----------------------------------------------------------------------------------------------


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float, float]:
    """(working directory, the finished command, its wall seconds, its CPU seconds)."""
    cwd = tmp_path_factory.mktemp("demo")
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    done = run_alignlib("train", "dpo", cwd=cwd, timeout=1200)
    return cwd, done, time.perf_counter() - started, children_cpu_seconds() - cpu_before


def test_embedded_default_learns_on_held_out_pairs(demo_run):
    """`alignlib train dpo` with neither --model nor --dataset: the issue's bar is held-out implicit-reward
    accuracy of about 0.5 before training and at least 0.9 after, printed. The run's wall and CPU seconds
    are printed, not asserted: a test's verdict does not depend on how loaded the machine is (the issue's
    "under 3 minutes on 2 CPU cores" is a speed figure, for benchmarks to measure)."""
    cwd, done, seconds, cpu_seconds = demo_run
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    match = re.search(r"held-out implicit-reward accuracy: ([0-9.]+) -> ([0-9.]+)", done.stdout)
    assert match, done.stdout
    before, after = float(match.group(1)), float(match.group(2))
    assert abs(before - 0.5) <= 0.1, before
    assert after >= 0.9, after
    timing = f"{seconds:.0f} s wall, {cpu_seconds:.0f} s CPU, load average {os.getloadavg()[0]:.1f}"
    print(f"embedded default: {timing}; held-out accuracy {before} -> {after}")


def test_embedded_default_writes_model_metrics_and_curves(demo_run):
    cwd, done, *_ = demo_run
    assert done.returncode == 0, done.stderr[-2000:]
    output_dir = cwd / "alignlib-demo" / "dpo"
    assert (output_dir / "final" / "config.json").is_file()
    assert (output_dir / "final" / "model.safetensors").is_file()
    assert (output_dir / "final" / "tokenizer.json").is_file()
    records = train_records(output_dir)
    assert records and records[-1]["step"] == 150
    for record in records:
        missing = [key for key in TRL_TRAIN_METRICS if key not in record]
        assert not missing, f"step {record['step']}: missing {missing}"
        assert math.isfinite(record["loss"])
    assert records[-1]["rewards/accuracies"] > records[0]["rewards/accuracies"]
    from alignlib.metrics import read_metrics

    evals = [r for r in read_metrics(output_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 150]
    assert all(f"eval_{key}" in r for r in evals for key in TRL_TRAIN_METRICS[1:7])
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_prints_a_completion_from_the_trained_demo(demo_run):
    """The command the demo suggests at its end prints the prompt and the trained model's answer: a
    helpful one by the demo's own judgement (demo.is_helpful)."""
    cwd, done, *_ = demo_run
    assert done.returncode == 0, done.stderr[-2000:]
    prompt = "how do i paint a chair ?"
    assert f'alignlib generate --model alignlib-demo/dpo/final --prompt "{prompt}"' in done.stdout
    generated = run_alignlib("generate", "--model", "alignlib-demo/dpo/final", "--prompt", prompt, cwd=cwd)
    assert generated.returncode == 0, generated.stderr
    assert "Traceback" not in generated.stderr
    text = generated.stdout.strip()
    assert text.startswith(prompt)
    answer = text[len(prompt):].strip()
    assert len(answer.split()) >= 3, text
    assert demo.is_helpful(answer), answer


# ----------------------------------------------------------------------------------------------
# alignlib generate: bad settings; first impressions (--help, PPO's summary and folder)
# ----------------------------------------------------------------------------------------------


def test_generate_refuses_bad_sampling_settings_and_a_reward_model(workdir):
    """Each was accepted before: a negative or NaN temperature, top_p outside (0, 1], and a reward
    model (a sequence classifier) that "generated" from its base."""
    from helpers.tiny_llama import tiny_llama
    from transformers import LlamaForSequenceClassification

    reward_model = workdir / "reward_model"
    if not reward_model.exists():
        tiny_llama(model_class=LlamaForSequenceClassification, num_labels=1).save_pretrained(reward_model)
        demo.load_tokenizer().save_pretrained(reward_model)
    model = str(workdir / "model")
    cases = {
        "negative temperature": (["--model", model, "--temperature", "-1"], ("--temperature", "-1")),
        "NaN temperature": (["--model", model, "--temperature", "nan"], ("--temperature", "nan")),
        "top_p 0": (["--model", model, "--top_p", "0"], ("--top_p", "(0, 1]")),
        "top_p 1.5": (["--model", model, "--top_p", "1.5"], ("--top_p", "1.5")),
        "no new tokens": (["--model", model, "--max_new_tokens", "0"], ("--max_new_tokens",)),
        "a reward model": (["--model", str(reward_model)], ("reward model", "cannot generate")),
    }
    running = {name: subprocess.Popen(alignlib_command("generate", "--prompt", "how do i fix a boat ?", *args),
                                      cwd=workdir, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, (args, _) in cases.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=600)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 1 and len(lines) == 1 and "Traceback" not in stderr, (name, stderr)
        missing = [fragment for fragment in cases[name][1] if fragment not in lines[0]]
        assert not missing, (name, lines[0], missing)


def test_help_shows_the_defaults_of_a_run_with_a_model_and_lists_the_demos_apart(workdir):
    """Before: with no --model on the line, --help showed the demo's defaults as the defaults."""
    result = run_alignlib("train", "dpo", "--help", cwd=workdir)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    assert "--max_steps MAX_STEPS, --max-steps MAX_STEPS Optimizer steps; > 0 overrides num_train_epochs. " \
           "(default: -1)" in help_text
    assert "Most tokens in prompt + response (SFT: per sequence, and per packed row). (default: 1024)" in help_text
    assert "Without --model and --dataset (the embedded demo), these defaults change: --max_steps 150" in help_text


def test_ppo_says_what_it_evaluated_and_leaves_a_complete_run_folder(workdir, tmp_path):
    """Before: a "held-out" reward when the first training prompts were evaluated, a KL printed as
    -0.00, and no config.json."""
    result = run_alignlib("train", "ppo", "--model", str(workdir / "model"), "--reward", "alignlib.demo:demo_reward",
                          "--dataset", str(workdir / "pairs.jsonl"), "--output_dir", str(tmp_path / "ppo"),
                          "--max_steps", "1", "--per_device_train_batch_size", "4", "--mini_batch_size", "4",
                          "--response_length", "4", "--num_eval_prompts", "4", "--disable_tqdm", "true", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "mean reward on the first 4 training prompts (no --eval_dataset given)" in result.stdout
    assert "held-out" not in result.stdout and "-0.00" not in result.stdout
    config = json.loads((tmp_path / "ppo" / "config.json").read_text())
    assert config["objective"] == "ppo" and config["model"]["model_name_or_path"] == str((workdir / "model").resolve())
