"""torchrun data parallelism: two gloo processes on this CPU compute what one process computes.

Each test starts `torchrun --standalone --nproc_per_node 2 -m alignlib train ...` itself (the
command a user types), and compares with `train()` run in this process on the same global
batch: the loss logged at every step and the final weights must agree to 1e-6.

The data has 21 pairs and the global batch is 8, so an epoch has steps of 8, 8 and 5 pairs:
the last step splits unevenly (3 pairs on rank 0, 2 on rank 1), which is where a careless
split (a mean per rank, or padding with repeated pairs as DistributedSampler does) would
give a different gradient from one process.

The online loop (PPO, GRPO, RLOO) likewise: a float64 model, one process taking the global batch
against 2 ranks taking half of it each (GRPO's groups spanning the ranks), to 1e-9 in every
logged metric (rewards, losses, KL, gradient norms, the evaluation) and in the final weights;
and a GRPO run resumed on 2 ranks ends with the weights of the uninterrupted one.
"""

from __future__ import annotations

import json
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
    for key, value in args.items():  # a list gives several values to one flag
        command += [f"--{key}", *map(str, value if isinstance(value, (list, tuple)) else [value])]
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


def test_sft_packed_two_ranks_equal_one_process(model64_dir, pairs, heldout, tmp_path):
    """SFT on the pairs' prompts and chosen answers, packed into rows of at most 64 tokens, 2 epochs.
    The step's loss is the NLL over the trained tokens of both ranks' rows, so 2 ranks of 2 packed
    rows equal one process of 4, in float64 to 1e-9; the held-out loss too."""
    model_cfg = ModelConfig(model_name_or_path=model64_dir, dtype="auto")
    settings = {key: value for key, value in COMMON.items() if key != "max_prompt_length"}
    settings.update(num_train_epochs=2, learning_rate=1e-2, packing=True)
    train("sft", TrainConfig(output_dir=str(tmp_path / "one"), dataset_name=pairs, eval_dataset_name=heldout,
                             per_device_train_batch_size=4, **settings), model_cfg)
    run = torchrun("sft", {"model": model64_dir, "dataset": pairs, "eval_dataset": heldout,
                           "output_dir": tmp_path / "two", "dtype": "auto", "per_device_train_batch_size": 2,
                           **settings})
    rows = int(run.stdout.split("[train] packing: 21 sequences in ")[1].split()[0])
    steps = 2 * -(-rows // 4)
    assert rows < 21 and rows % 4  # packed, and the last step of an epoch is short
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=steps, tolerance=1e-9)
    for one, two in zip(eval_records(tmp_path / "one"), eval_records(tmp_path / "two"), strict=True):
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-9, abs=1e-12)


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


# ----------------------------------------------------------------------------------------------
# The online loop: PPO, GRPO, RLOO
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def online_model(tmp_path_factory) -> str:
    """The demo's warm-started base model (its answers earn demo_reward about a quarter of the time, so
    rewards vary within a group), saved in float64."""
    from transformers import AutoModelForCausalLM

    from alignlib.models import load_tokenizer

    base = demo.prepare_base_model(tmp_path_factory.mktemp("online") / "base", steps=100, show_progress=False)
    path = tmp_path_factory.mktemp("online64") / "base"
    AutoModelForCausalLM.from_pretrained(base).double().save_pretrained(path)
    load_tokenizer(base).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def online_prompts(tmp_path_factory) -> tuple[list[str], str]:
    prompts = demo.demo_prompts(demo.TRAIN_FILE)[:40]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts, str(path)


ONLINE_COMMON = dict(max_steps=3, learning_rate=1e-3, seed=3, logging_steps=1, num_eval_prompts=6,
                     lr_scheduler_type="linear", disable_tqdm=True)


def online_single(objective: str, output_dir: Path, model_cfg: ModelConfig, prompts: list[str], **settings) -> None:
    from alignlib.configs import ONLINE_CONFIGS
    from alignlib.rl import train_online

    config = ONLINE_CONFIGS[objective](output_dir=str(output_dir), **{**ONLINE_COMMON, **settings})
    train_online(config, model_cfg, reward_fn=[demo.demo_reward] * len(config.reward_weights or [1]), prompts=prompts)


def online_records(output_dir: Path) -> list[dict]:
    return [{key: value for key, value in record.items()
             if "time" not in key and key != "tokens_per_second" and value is not None}
            for record in read_metrics(output_dir / "metrics.jsonl")]


def assert_same_online_run(single: Path, ranks: Path, tolerance: float = 1e-9) -> None:
    ours, theirs = online_records(ranks), online_records(single)
    assert len(ours) == len(theirs) == ONLINE_COMMON["max_steps"] + 1  # each step once (rank 0 writes), the evaluation
    for mine, expected in zip(ours, theirs, strict=True):  # rewards, losses, clip ratios, KL, grad norms, evaluation
        assert mine.keys() == expected.keys()
        assert mine == pytest.approx(expected, rel=tolerance, abs=tolerance, nan_ok=True)
    final_single, final_ranks = weights(single / "final"), weights(ranks / "final")
    assert final_single.keys() == final_ranks.keys()
    for name in final_single:
        torch.testing.assert_close(final_ranks[name], final_single[name], rtol=tolerance, atol=tolerance,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_grpo_two_ranks_equal_one_process_and_resume_on_two_ranks(online_model, online_prompts, tmp_path):
    """12 completions per step, groups of 4: one process takes them as one micro-batch; 2 ranks take 6
    each in micro-batches of 3, so the second group spans the ranks (its mean and std come from the
    gathered rewards). KL to a frozen reference, 2 iterations per rollout, bnpo (a token-normalised
    loss: the step's tokens over both ranks divide it). Then the 2-rank run resumed from its step-2
    checkpoint on 2 ranks ends with the same weights."""
    prompts, prompts_file = online_prompts
    settings = dict(num_generations=4, beta=0.1, num_iterations=2, loss_type="bnpo", max_completion_length=24,
                    save_steps=2)
    single = ModelConfig(model_name_or_path=online_model, dtype="auto")
    online_single("grpo", tmp_path / "one", single, prompts, per_device_train_batch_size=12, **settings)
    flags = {"model": online_model, "dtype": "auto", "dataset": prompts_file, "reward_funcs": "alignlib.demo:demo_reward",
             "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, **ONLINE_COMMON, **settings}
    run = torchrun("grpo", {**flags, "output_dir": tmp_path / "two"})
    assert run.stdout.count("trained 3 GRPO steps") == 1
    assert_same_online_run(tmp_path / "one", tmp_path / "two")
    rewards = [r["reward"] for r in online_records(tmp_path / "two") if "reward" in r]
    assert 0 < min(rewards) and max(rewards) < 1  # the groups had something to compare

    torchrun("grpo", {**flags, "output_dir": tmp_path / "resumed",
                      "resume_from_checkpoint": tmp_path / "two" / "checkpoint-2"})
    resumed, uninterrupted = weights(tmp_path / "resumed" / "final"), weights(tmp_path / "two" / "final")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_ppo_two_ranks_equal_one_process(online_model, online_prompts, tmp_path):
    """8 prompts per step in minibatches of 4, 2 epochs: on 2 ranks 4 prompts each in minibatches of 2
    per rank. The value head, GAE's whitening (over the gathered batch) and the adaptive KL controller
    must all agree."""
    prompts, prompts_file = online_prompts
    settings = dict(ppo_epochs=2, response_length=24, init_kl_coef=0.2, target=1.0, horizon=100)
    online_single("ppo", tmp_path / "one", ModelConfig(model_name_or_path=online_model, dtype="auto"), prompts,
                  per_device_train_batch_size=8, mini_batch_size=4, **settings)
    torchrun("ppo", {"model": online_model, "dtype": "auto", "dataset": prompts_file, "output_dir": tmp_path / "two",
                     "reward": "alignlib.demo:demo_reward", "per_device_train_batch_size": 4, "mini_batch_size": 2,
                     **ONLINE_COMMON, **settings})
    assert_same_online_run(tmp_path / "one", tmp_path / "two")


def test_rloo_with_lora_and_two_reward_functions_two_ranks_equal_one_process(online_model, online_prompts, tmp_path):
    """LoRA (the reference: the adapter disabled), the KL in the reward, two weighted reward functions."""
    prompts, prompts_file = online_prompts
    settings = dict(num_generations=4, num_iterations=2, max_completion_length=24, reward_weights=[1.0, 0.5],
                    learning_rate=1e-2)
    single = ModelConfig(model_name_or_path=online_model, dtype="auto", use_peft=True, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0, lora_target_modules=["all-linear"])
    online_single("rloo", tmp_path / "one", single, prompts, per_device_train_batch_size=8, **settings)
    torchrun("rloo", {"model": online_model, "dtype": "auto", "dataset": prompts_file, "output_dir": tmp_path / "two",
                      "reward_funcs": ["alignlib.demo:demo_reward"] * 2, "per_device_train_batch_size": 4,
                      **LORA_FLAGS, "lora_dropout": 0.0, **ONLINE_COMMON, **settings})
    assert_same_online_run(tmp_path / "one", tmp_path / "two")
