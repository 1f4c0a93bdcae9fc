"""torchrun data parallelism: two gloo processes on this CPU compute what one process computes.

Each test starts `torchrun --standalone --nproc_per_node 2 -m alignlib train ...` itself (the
command a user types), and compares with `train()` run in this process on the same global
batch: the loss logged at every step and the final weights must agree to 1e-6.

The data has 21 pairs and the global batch is 8, so an epoch has steps of 8, 8 and 5 pairs:
the last step splits unevenly (3 pairs on rank 0, 2 on rank 1), which is where a careless
split (a mean per rank, or padding with repeated pairs as DistributedSampler does) would
give a different gradient from one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs
from safetensors.torch import load_file

from alignlib import demo
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig
from alignlib.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(max_length=64, max_prompt_length=32, learning_rate=5e-3, seed=0, logging_steps=1, save_steps=0,
              num_train_epochs=1, lr_scheduler_type="linear", plot=False, disable_tqdm=True,
              per_device_eval_batch_size=4)
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def model64_dir(tmp_path_factory) -> str:
    """Saved in float64 (and loaded as saved): round-off then sits ~1e-15 below any real difference."""
    return save_tiny_llama(tmp_path_factory.mktemp("model64"), dtype=torch.float64)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs21.jsonl", demo.read_pairs()[:21])


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("heldout") / "heldout.jsonl", demo.read_pairs(demo.HELDOUT_FILE)[:7])


def torchrun(objective: str, args: dict, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node nproc -m alignlib train objective --key value ...`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "alignlib", "train", objective]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    # start_new_session: if the test times out, the whole torchrun process group is killed with it
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            raise
    result = subprocess.CompletedProcess(command, process.returncode, output, "")
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{output[-4000:]}"
    return result


def single_process(objective: str, output_dir: Path, model_cfg: ModelConfig, **settings) -> None:
    train(objective, TrainConfig(output_dir=str(output_dir), **{**COMMON, **settings}), model_cfg)


def step_records(output_dir: Path) -> list[dict]:
    """The logged training records, without the one that measures the machine (tokens_per_second)."""
    return [{key: value for key, value in record.items() if key != "tokens_per_second"}
            for record in read_metrics(output_dir / "metrics.jsonl") if "loss" in record]


def eval_records(output_dir: Path) -> list[dict]:
    return [record for record in read_metrics(output_dir / "metrics.jsonl") if "eval_loss" in record]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no weights saved in {model_dir}"
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


def assert_same_run(single: Path, ranks: Path, steps: int, tolerance: float = TOLERANCE) -> None:
    ours, theirs = step_records(ranks), step_records(single)
    assert len(theirs) == steps and len(ours) == steps  # each step logged once: only rank 0 writes
    for mine, expected in zip(ours, theirs, strict=True):  # loss, grad_norm, rewards/*, logps/*, learning_rate...
        assert mine.keys() == expected.keys()
        assert mine == pytest.approx(expected, rel=tolerance, abs=tolerance)
    assert ours[0]["loss"] != pytest.approx(ours[-1]["loss"], rel=1e-3)  # the model did train
    final_single, final_ranks = weights(single / "final"), weights(ranks / "final")
    assert final_single.keys() == final_ranks.keys()
    for name in final_single:
        torch.testing.assert_close(final_ranks[name], final_single[name], rtol=tolerance, atol=tolerance, msg=lambda m, name=name: f"{name}: {m}")


def test_dpo_two_ranks_of_4_equal_one_process_of_8(model_dir, pairs, heldout, tmp_path):
    """Full fine-tuning with a frozen reference copy, replicated (DDP) and sharded (FSDP); held-out
    metrics are reduced over ranks too."""
    model_cfg = ModelConfig(model_name_or_path=model_dir)
    single_process("dpo", tmp_path / "one", model_cfg, dataset_name=pairs, eval_dataset_name=heldout,
                   per_device_train_batch_size=8)
    for parallelism in ("ddp", "fsdp"):
        run = torchrun("dpo", {"model": model_dir, "dataset": pairs, "eval_dataset": heldout,
                         "output_dir": tmp_path / parallelism, "fsdp": parallelism == "fsdp",
                         "per_device_train_batch_size": 4, **COMMON})
        assert_same_run(tmp_path / "one", tmp_path / parallelism, steps=3)
        assert run.stdout.count("trained 3 steps") == 1  # rank 0 reports, once
        before_after_one, before_after_two = eval_records(tmp_path / "one"), eval_records(tmp_path / parallelism)
        assert len(before_after_two) == 2
        for one, two in zip(before_after_one, before_after_two, strict=True):
            for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_accuracy_ties_half"):
                assert two[key] == pytest.approx(one[key], rel=TOLERANCE, abs=TOLERANCE), (parallelism, key)


def test_reward_model_two_ranks_equal_one_process(model64_dir, pairs, tmp_path):
    """In float64, to 1e-9: the split is exact, not merely close. (In float32 at this learning rate,
    Adam turns reduction-order round-off in near-zero gradients into weight differences of ~2e-6.)"""
    model_cfg = ModelConfig(model_name_or_path=model64_dir, dtype="auto")
    single_process("reward", tmp_path / "one", model_cfg, dataset_name=pairs, per_device_train_batch_size=8,
                   learning_rate=2e-2)
    torchrun("reward", {"model": model64_dir, "dataset": pairs, "output_dir": tmp_path / "two", "dtype": "auto",
                        "per_device_train_batch_size": 4, **{**COMMON, "learning_rate": 2e-2}})
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=3, tolerance=1e-9)


def test_kto_two_ranks_equal_one_process(model64_dir, pairs, heldout, tmp_path):
    """KTO on 21 pairs read as 42 unpaired rows, steps of 16 rows (the last of 10: uneven over ranks),
    2 epochs. z0, the reference point, is estimated over each whole step (both ranks' mismatched
    pairs, summed), so 2 ranks of 8 rows equal one process of 16, in float64 to 1e-9; the held-out
    metrics (z0 over the whole eval set) too. The second step onward has z0 > 0 (checked)."""
    model_cfg = ModelConfig(model_name_or_path=model64_dir, dtype="auto")
    settings = {**COMMON, "num_train_epochs": 2, "learning_rate": 1e-2, "beta": 0.5}
    single_process("kto", tmp_path / "one", model_cfg, dataset_name=pairs, eval_dataset_name=heldout,
                   per_device_train_batch_size=16, **settings)
    torchrun("kto", {"model": model64_dir, "dataset": pairs, "eval_dataset": heldout, "output_dir": tmp_path / "two",
                     "dtype": "auto", "per_device_train_batch_size": 8, **settings})
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=6, tolerance=1e-9)
    assert any(record["kl"] > 0 for record in step_records(tmp_path / "one"))
    for one, two in zip(eval_records(tmp_path / "one"), eval_records(tmp_path / "two"), strict=True):
        for key in ("eval_loss", "eval_kl", "eval_rewards/margins"):
            assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key


LORA_FLAGS = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": "all-linear"}
LORA_SETTINGS = {**COMMON, "rpo_alpha": 0.5, "per_device_train_batch_size": 2, "learning_rate": 5e-3}


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_lora_with_accumulation_and_an_uneven_step(model_dir, pairs, tmp_path, parallelism):
    """LoRA, 2 pairs x 2 micro-batches per rank, RPO's NLL term (normalised by the chosen tokens of
    all ranks), the adapter-disabled reference. The last step has 5 pairs: rank 0 runs 2 micro-batches,
    rank 1 one and an empty (zero-weight) one. Under FSDP the frozen base and the adapters share
    each sharded block."""
    model_cfg = ModelConfig(model_name_or_path=model_dir, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                            lora_target_modules=["all-linear"])
    single_process("dpo", tmp_path / "one", model_cfg, dataset_name=pairs,
                   **{**LORA_SETTINGS, "gradient_accumulation_steps": 4})
    torchrun("dpo", {"model": model_dir, "dataset": pairs, "output_dir": tmp_path / "two", "lora_dropout": 0.0,
                     "gradient_accumulation_steps": 2, "fsdp": parallelism == "fsdp", **LORA_FLAGS, **LORA_SETTINGS})
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=3)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_resume_on_two_ranks_continues_each_ranks_dropout(model_dir, pairs, tmp_path, parallelism):
    """With LoRA dropout on, each rank draws its own masks; a run resumed from its step-2 checkpoint
    restores every rank's RNG state and ends with the adapter of the uninterrupted run. Under FSDP
    the checkpoint holds the full (gathered) weights and optimizer state, sharded again on resume."""
    flags = {"model": model_dir, "dataset": pairs, "lora_dropout": 0.1, "gradient_accumulation_steps": 2,
             "fsdp": parallelism == "fsdp", **LORA_FLAGS, **LORA_SETTINGS}
    torchrun("dpo", {**flags, "output_dir": tmp_path / "full", "save_steps": 2})
    assert (tmp_path / "full" / "checkpoint-2").is_dir()
    torchrun("dpo", {**flags, "output_dir": tmp_path / "resumed",
                     "resume_from_checkpoint": tmp_path / "full" / "checkpoint-2"})
    resumed, uninterrupted = weights(tmp_path / "resumed" / "final"), weights(tmp_path / "full" / "final")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")

    # The checkpoint was written by 2 ranks: one process refuses it instead of reading the data in another order.
    model_cfg = ModelConfig(model_name_or_path=model_dir, use_peft=True, lora_r=4, lora_alpha=8,
                            lora_target_modules=["all-linear"])
    with pytest.raises(ValueError, match="belongs to a different run: the number of processes: 2 then, 1 now"):
        single_process("dpo", tmp_path / "wrong", model_cfg, dataset_name=pairs,
                       resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"),
                       **{**LORA_SETTINGS, "gradient_accumulation_steps": 4})


def test_ppo_refuses_to_run_on_several_ranks(monkeypatch, tmp_path):
    """PPO has no data parallelism: under torchrun every rank would train its own copy into one output_dir."""
    from alignlib.rl import PPOConfig, train_ppo

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="PPO runs in one process"):
        train_ppo(PPOConfig(output_dir=str(tmp_path)), ModelConfig())
