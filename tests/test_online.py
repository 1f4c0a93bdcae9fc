"""alignlib.rl's one online loop with GRPO and RLOO (PPO's own tests are tests/test_rl.py; 2 ranks = 1
process in tests/test_distributed.py).

- Sampling is seeded per completion: a row samples the same tokens whatever else is in its batch,
  and top_k=1 is greedy decoding.
- GRPO and RLOO raise the demo's helpful rate on held-out prompts, logging TRL's metric names.
- A step split into micro-batches (gradient accumulation) updates the weights as one batch does,
  for a loss normalised per sequence (grpo) and per token (dapo): the step-wide normaliser.
- use_kernels (the fused lm_head log-probs) computes what the plain path computes.
- LoRA with the adapter-disabled reference; QLoRA; resume gives the weights of an uninterrupted run.
- Bad input: a reward function that raises, returns the wrong length, NaN or a non-number is
  one line naming the function and the row; the step stops (nothing written half: the last
  checkpoint and its metrics stay whole) or the row is marked unscorable, as on_reward_error says;
  group sizes that cannot work are refused by name.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignlib import demo
from alignlib.configs import GRPOConfig, PPOConfig, RLOOConfig
from alignlib.demo import demo_reward, online_demo_config, prepare_base_model
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig, load_tokenizer
from alignlib.rewards import Rewards, call_reward_function
from alignlib.rl import train_online
from alignlib.rollout import PolicyWithValueHead, completion_seed, generate_rollout, policy_forward

pytestmark = pytest.mark.usefixtures("one_thread")

TRL_GRPO_METRICS = ("reward", "reward_std", "rewards/demo_reward/mean", "rewards/demo_reward/std",
                    "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "loss",
                    "grad_norm", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                    "clip_ratio/region_mean", "learning_rate")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return str(prepare_base_model(tmp_path_factory.mktemp("online") / "base", steps=100, show_progress=False))


@pytest.fixture(scope="module")
def base_model64(base_model, tmp_path_factory) -> str:
    """The same model saved in float64: round-off ~1e-15, far below any real difference."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("online64") / "base"
    AutoModelForCausalLM.from_pretrained(base_model).double().save_pretrained(path)
    load_tokenizer(base_model).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts():
    return demo.demo_prompts(demo.TRAIN_FILE), demo.demo_prompts(demo.HELDOUT_FILE)


def config(objective: str, output_dir: Path, **overrides):
    values = {"output_dir": str(output_dir), "disable_tqdm": True, "num_eval_prompts": 8, "max_steps": 2,
              "per_device_train_batch_size": 16, "num_generations": 4, "max_completion_length": 16}
    return online_demo_config(objective, **{**values, **overrides})


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def assert_same_weights(a: Path, b: Path, tolerance: float) -> None:
    first, second = weights(a), weights(b)
    assert first and first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=tolerance, atol=tolerance, msg=name)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_a_completion_samples_the_same_tokens_whatever_its_batch(base_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model).eval()
    tokenizer = load_tokenizer(base_model, padding_side="left")
    prompts = ["how do i fix a door ?", "can you tell me how i should paint the old wooden fence ?", "how do i wash a car ?"]
    seeds = [completion_seed(0, "train", 3, k) for k in range(3)]
    options = dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, device=torch.device("cpu"))
    together = generate_rollout(model, tokenizer, prompts, seeds=seeds, **options)
    # the first prompt alone (no padding) and the third beside another long prompt: the same tokens
    alone = generate_rollout(model, tokenizer, prompts[:1], seeds=seeds[:1], **options)
    paired = generate_rollout(model, tokenizer, prompts[1:], seeds=seeds[1:], **options)
    for row, (part, index) in enumerate(((alone, 0), (paired, 0), (paired, 1))):
        width = int(together.response_mask[row].sum())
        assert int(part.response_mask[index].sum()) == width
        assert torch.equal(part.response_ids[index, :width], together.response_ids[row, :width])
    other = generate_rollout(model, tokenizer, prompts, seeds=[s + 1 for s in seeds], **options)
    assert not torch.equal(other.response_ids[:, :4], together.response_ids[:, :4])  # the seed matters

    # top_k=1 leaves one token: greedy decoding
    greedy = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), do_sample=False, max_new_tokens=16,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    top1 = generate_rollout(model, tokenizer, prompts, seeds=seeds, **{**options, "top_k": 1})
    width = top1.query_ids.shape[1]
    for row in range(3):
        length = int(top1.response_mask[row].sum())
        assert torch.equal(top1.response_ids[row, :length], greedy[row, width: width + length])


# ----------------------------------------------------------------------------------------------
# One update of the loop against TRL's GRPOTrainer
# ----------------------------------------------------------------------------------------------


def _lora_llama():
    from helpers.tiny_llama import tiny_llama
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # B random too: the adapter changes the model
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(hidden=32), lora)


def _fixed_rollout(vocab: int, groups: int = 2, group: int = 4, prompt: int = 6, completion: int = 10):
    from alignlib.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    B = groups * group
    query_mask = torch.arange(prompt).expand(B, prompt) >= torch.tensor([0, 2]).repeat_interleave(group)[:, None]
    query_ids = torch.randint(3, vocab, (groups, prompt), generator=g).repeat_interleave(group, dim=0)
    lengths = torch.randint(2, completion + 1, (B,), generator=g)
    response_mask = torch.arange(completion).expand(B, completion) < lengths[:, None]
    response_ids = torch.randint(3, vocab, (B, completion), generator=g)
    rollout = Rollout(query_ids.masked_fill(~query_mask, 0), query_mask.long(), response_ids.masked_fill(~response_mask, 0),
                      response_mask, lengths < completion)
    return rollout, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize(("loss_type", "beta"), [("dapo", 0.04), ("grpo", 0.0), ("dr_grpo", 0.1)])
def test_one_update_of_the_loop_is_trl_grpotrainers_training_step(loss_type, beta, tmp_path):
    """alignlib.rl.update (the loop's stage 5, with plain SGD at lr 1, so the weight change is minus the
    gradient) against GRPOTrainer.training_step (its compute_loss and backward; its generation replaced
    by the same fixed rollout) on the same LoRA model: the same loss, gradients, KL, entropy, clip ratio."""
    from types import SimpleNamespace

    from datasets import Dataset
    from helpers.tiny_tokenizer import tiny_tokenizer
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from alignlib.distributed import SINGLE_PROCESS
    from alignlib.losses import group_advantages
    from alignlib.models import ReferenceForward
    from alignlib.rl import update
    from alignlib.rl_objectives import GroupTargets, make_objective
    from alignlib.rollout import reference_logprobs
    from alignlib.training import NonFiniteGuard

    model = _lora_llama()
    rollout, rewards = _fixed_rollout(model.config.vocab_size)
    advantages = group_advantages(rewards, 4, "group")
    ref = reference_logprobs(ReferenceForward("adapter_disabled", model, disable_adapter=True), rollout, slice(None),
                             1.0)
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    # alignlib: the loop's update stage
    cfg = GRPOConfig(per_device_train_batch_size=8, num_generations=4, beta=beta, loss_type=loss_type,
                     max_completion_length=10, learning_rate=1.0, max_grad_norm=None)
    policy = PolicyWithValueHead(model, value_head=False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    run = SimpleNamespace(objective=make_objective(cfg), config=cfg, processes=SINGLE_PROCESS, model=policy,
                          trainable=trainable, optimizer=torch.optim.SGD(trainable, lr=1.0),
                          guard=NonFiniteGuard("stop", verbose=False), device=torch.device("cpu"))
    stats = update(run, rollout, None, GroupTargets(advantages, ref if beta else None), step=0)
    ours = {name.removeprefix("policy."): adapter[name.removeprefix("policy.")] - p.detach()
            for name, p in policy.named_parameters() if p.requires_grad}

    # TRL: GRPOTrainer on the same base and adapter
    args = TRLGRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=beta,
                         per_device_train_batch_size=8, num_generations=4, loss_type=loss_type,
                         max_completion_length=10, logging_steps=10**9, save_strategy="no", gradient_checkpointing=False)
    lora_config = model.peft_config["default"]
    trainer = GRPOTrainer(model=_lora_llama().unload(), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=args, peft_config=lora_config, processing_class=tiny_tokenizer(),
                          train_dataset=Dataset.from_list([{"prompt": "Hello"}] * 4))
    params = dict(trainer.model.named_parameters())
    with torch.no_grad():
        for name, value in adapter.items():
            params[name].copy_(value)
    trainer._prepare_inputs = lambda batch: batch
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": rollout.query_ids, "prompt_mask": rollout.query_mask, "completion_ids": rollout.response_ids,
              "completion_mask": rollout.response_mask.long(), "advantages": advantages, "old_per_token_logps": None,
              "ref_per_token_logps": ref if beta else None, "num_items_in_batch": rollout.response_mask.sum()}
    trl_loss = float(trainer.training_step(trainer.model, inputs, None))
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    assert stats["loss"] == pytest.approx(trl_loss, rel=1e-5, abs=1e-7)
    assert ours.keys() == adapter.keys() and any(float(g.abs().max()) > 1e-4 for g in ours.values())
    for name, gradient in ours.items():
        torch.testing.assert_close(gradient, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("entropy", "clip_ratio/region_mean", *(("kl",) if beta else ())):
        assert stats[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name


# ----------------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_the_helpful_rate_on_held_out_prompts(objective, base_model, prompts, tmp_path):
    """A shortened embedded default (the full one is measured in docs/rlhf.md)."""
    train, heldout = prompts
    cfg = online_demo_config(objective, output_dir=str(tmp_path / "out"), max_steps=15, disable_tqdm=True,
                             num_eval_prompts=64)
    result = train_online(cfg, ModelConfig(model_name_or_path=base_model), reward_fn=demo_reward, prompts=train,
                          eval_prompts=heldout)
    print(f"{objective}: helpful rate on 64 held-out prompts {result['eval/reward_before']:.3f} -> "
          f"{result['eval/reward_after']:.3f}, KL to the reference {result['eval/kl_after']:.2f} nats")
    assert result["eval/reward_before"] < 0.4
    assert result["eval/reward_after"] > result["eval/reward_before"] + 0.25
    records = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in records] == list(range(1, 16))
    for name in TRL_GRPO_METRICS:
        assert all(math.isfinite(r[name]) for r in records), name
    assert records[-1]["reward"] > records[0]["reward"]
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    assert not (tmp_path / "out" / "final" / "value_head.pt").exists()  # no value model


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_micro_batches_update_as_one_batch(loss_type, base_model64, prompts, tmp_path):
    """16 completions in one micro-batch, or in 4 of 4 (gradient accumulation): the same samples
    (seeded per completion) and, with the step-wide normaliser, the same update; in float64, to 1e-10.
    num_iterations 2 and a truncated-completion mask make the old log-probs and the normaliser matter."""
    model = ModelConfig(model_name_or_path=base_model64, dtype="auto")
    common = dict(loss_type=loss_type, num_iterations=2, beta=0.1, mask_truncated_completions=True,
                  max_completion_length=14, learning_rate=1e-3, max_steps=2)
    train_online(config("grpo", tmp_path / "one", per_device_train_batch_size=16, **common), model,
                 reward_fn=demo_reward, prompts=prompts[0])
    train_online(config("grpo", tmp_path / "four", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                        **common), model, reward_fn=demo_reward, prompts=prompts[0])
    one, four = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "four"))
    for a, b in zip(one, four, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if "time" not in key and "tokens_per_second" not in key and a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-10), key
    assert one[0]["completions/clipped_ratio"] > 0  # some completions were left out of the loss
    assert 0 < one[0]["reward"] < 1 and one[0]["grad_norm"] > 0  # and the others had something to learn
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "four" / "final", 1e-10)


def test_use_kernels_computes_what_the_plain_path_computes(base_model64, prompts, tmp_path):
    """The fused lm_head + log-softmax: the same log-probs and values (PPO's head) as the model's own head."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(base_model64).eval()
    model = PolicyWithValueHead(policy).double()
    torch.nn.init.normal_(model.value_head.weight)
    tokenizer = load_tokenizer(base_model64, padding_side="left")
    rollout = generate_rollout(policy, tokenizer, prompts[0][:4], max_new_tokens=12, temperature=0.7, top_k=0,
                               top_p=1.0, device=torch.device("cpu"), seeds=[1, 2, 3, 4])
    plain = policy_forward(model, rollout, slice(None), 0.7)
    fused = policy_forward(model, rollout, slice(None), 0.7, use_kernels=True)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-10, atol=1e-10)
    assert fused[2] is None  # no entropy without the logits

    model_cfg = ModelConfig(model_name_or_path=base_model64, dtype="auto")
    for name, kernels in (("plain", False), ("kernels", True)):
        train_online(config("grpo", tmp_path / name, use_kernels=kernels, beta=0.0), model_cfg, reward_fn=demo_reward,
                     prompts=prompts[0])
    assert_same_weights(tmp_path / "plain" / "final", tmp_path / "kernels" / "final", 1e-10)


# ----------------------------------------------------------------------------------------------
# LoRA, QLoRA, resume
# ----------------------------------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_on_step(step: int, batch: int):
    """demo_reward that raises on the training batch of step `step` (batches of `batch` completions)."""
    calls = {"train": 0}

    def reward(prompts, completions):
        if len(completions) == batch:
            calls["train"] += 1
            if calls["train"] == step:
                raise Crash(f"simulated crash at step {step}")
        return demo_reward(prompts, completions)

    return reward


def test_lora_resume_gives_the_weights_of_an_uninterrupted_run(base_model, prompts, tmp_path):
    """LoRA with the KL to the adapter-disabled reference; a run stopped by a reward function that raises
    at step 3 keeps checkpoint-2 and the metrics of steps 1-2 whole, writes nothing of step 3, and
    resumed from checkpoint-2 ends with the adapter of the uninterrupted run."""
    model = ModelConfig(model_name_or_path=base_model, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        lora_target_modules=["all-linear"])

    def cfg(name, **kw):
        return config("grpo", tmp_path / name, max_steps=4, save_steps=2, beta=0.04, learning_rate=5e-3,
                      lr_scheduler_type="linear", **kw)

    straight = train_online(cfg("straight"), model, reward_fn=demo_reward, prompts=prompts[0])
    assert math.isfinite(straight["eval/kl_after"]) and straight["eval/kl_after"] != 0.0  # the reference is the base
    with pytest.raises(ValueError, match=r"test_online\.crash_on_step\.<locals>\.reward raised Crash: simulated crash "
                                         r"at step 3 on the batch of 16 .* completion 0 of step 3"):
        train_online(cfg("resumed"), model, reward_fn=crash_on_step(3, batch=16), prompts=prompts[0])
    folder = tmp_path / "resumed"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (folder / "final").exists()
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == [1, 2]
    result = train_online(cfg("resumed", resume_from_checkpoint="latest"), model, reward_fn=demo_reward,
                          prompts=prompts[0])
    assert result["resumed_from_step"] == 2
    assert result["eval/reward_before"] == straight["eval/reward_before"]  # carried in the checkpoint
    assert_same_weights(tmp_path / "straight" / "final", folder / "final", 0.0)

    def trajectory(name):
        return [(r["step"], r["reward"], r["loss"], r["kl"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")
                if "reward" in r]

    assert trajectory("resumed") == trajectory("straight")


def test_qlora_trains_an_adapter_over_4_bit_weights(base_model, prompts, tmp_path):
    model = ModelConfig(model_name_or_path=base_model, use_peft=True, load_in_4bit=True,
                        lora_target_modules=["all-linear"])
    result = train_online(config("rloo", tmp_path / "out", max_steps=1), model, reward_fn=demo_reward,
                          prompts=prompts[0])
    assert math.isfinite(result["loss"]) and result["use_peft"]
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Bad input: reward functions
# ----------------------------------------------------------------------------------------------


def raises_on_boat(prompts, completions):
    return [1 / 0 if "boat" in c else 1.0 for c in completions]


def nan_on_second(prompts, completions):
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def text_on_first(prompts, completions):
    return ["good" if i == 0 else 0.5 for i in range(len(completions))]


def length_three(prompts, completions):
    return [0.0, 0.0, 0.0]


def trl_style(completions, **kwargs):
    """A TRL reward function: keywords, None where it does not apply."""
    return [None if "skip" in c else float(len(kwargs["prompts"])) for c in completions]


COMPLETIONS = ["fix the door", "sail the boat", "skip this", "paint it"]


def where(row):
    return f"completion {row} of step 7"


@pytest.mark.parametrize(("fn", "message"), [
    (raises_on_boat, r"test_online\.raises_on_boat raised ZeroDivisionError: division by zero at completion 1 of step 7"),
    (nan_on_second, r"test_online\.nan_on_second returned a non-finite score, nan, at completion 1 of step 7"),
    (text_on_first, r"test_online\.text_on_first returned a non-number, 'good', at completion 0 of step 7"),
    (length_three, r"test_online\.length_three returned 3 scores for 4 completions for completion 0 of step 7 \.\. "
                   r"completion 3 of step 7"),
])
def test_a_failing_reward_function_is_one_line_naming_it_and_the_row(fn, message):
    with pytest.raises(ValueError, match=message) as error:
        Rewards([fn])(["p"] * 4, COMPLETIONS, torch.ones(4, dtype=torch.bool), where)
    assert "\n" not in str(error.value) and "on_reward_error='unscorable'" in str(error.value)

    result = Rewards([fn, demo_reward], on_error="unscorable")(["p"] * 4, COMPLETIONS, torch.ones(4, dtype=torch.bool),
                                                              where)
    failed = {1} if fn in (raises_on_boat, nan_on_second) else {0} if fn is text_on_first else {0, 1, 2, 3}
    assert set(torch.nonzero(result.total.isnan()).flatten().tolist()) == failed  # the failed rows, whole
    assert all(message.split(" ")[0].replace("\\", "") in line for line in result.failures)


def test_rewards_are_weighted_and_summed_as_trl_sums_them():
    def halves(prompts, completions):
        return [0.5] * len(completions)

    rewards = Rewards([trl_style, halves], weights=[2.0, -1.0])
    result = rewards(["p"] * 4, COMPLETIONS, torch.ones(4, dtype=torch.bool))
    # trl_style sees prompts and completions as keywords; None (does not apply) is left out of the sum
    assert result.total.tolist() == [2 * 4 - 0.5, 2 * 4 - 0.5, -0.5, 2 * 4 - 0.5]
    assert math.isnan(result.per_function[2, 0]) and rewards.names == ["trl_style", "halves"]
    none_apply = Rewards([trl_style])(["p"], ["skip me"], torch.ones(1, dtype=torch.bool))
    assert math.isnan(none_apply.total[0])  # no function applies: unscorable, as in TRL
    assert call_reward_function(trl_style, ["p"], ["x"]).tolist() == [1.0]


def test_unscorable_completions_carry_no_signal_and_the_run_goes_on(base_model, prompts, tmp_path, capsys):
    """on_reward_error='unscorable': GRPO keeps the completions with advantage 0, PPO drops them; one line
    each names the function and the row."""
    model = ModelConfig(model_name_or_path=base_model)
    ppo = online_demo_config("ppo", output_dir=str(tmp_path / "ppo"), disable_tqdm=True, num_eval_prompts=8, max_steps=2,
                             per_device_train_batch_size=8, mini_batch_size=4, response_length=16,
                             on_reward_error="unscorable")
    for cfg in (config("grpo", tmp_path / "grpo", on_reward_error="unscorable"), ppo):
        result = train_online(cfg, model, reward_fn=[demo_reward, nan_on_second], prompts=prompts[0])
        assert math.isfinite(result["eval/reward_after"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "nan_on_second" in line]
    assert lines and all("returned a non-finite score, nan, at " in line and line.endswith("marked unscorable")
                         for line in lines)
    assert any("completion 1 of step 2 (prompt #" in line for line in lines)
    grpo = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "reward" in r]
    assert all(r["completions/unscorable_ratio"] == pytest.approx(1 / 16) for r in grpo)


def test_a_failing_reward_stops_the_command_with_one_line(base_model, prompts, tmp_path):
    """Through the command, as a user meets it: exit status 1, one line on stderr naming the function
    and the row, checkpoint-1 and the metrics of step 1 whole, nothing of step 2."""
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text("calls = []\n\ndef picky(prompts, completions):\n    calls.append(1)\n"
                           "    if len(calls) == 3:\n        return [1.0] * (len(completions) - 1)\n"
                           "    return [float('helps' in c) for c in completions]\n")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[0][:32]))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "alignlib", "train", "grpo", "--model", base_model, "--dataset", str(prompts_file),
               "--reward_funcs", f"{reward_file}:picky", "--output_dir", str(out), "--max_steps", "3",
               "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
               "--num_eval_prompts", "4", "--save_steps", "1", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("alignlib:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "my_rewards.picky returned 7 scores for 8 completions for completion 0 of step 2" in errors[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert not (out / "final").exists()


# ----------------------------------------------------------------------------------------------
# Bad settings
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: GRPOConfig(per_device_train_batch_size=6, num_generations=4),
     r"num_generations \(4\) must divide the completions of a step: per_device_train_batch_size \(6\) x "
     r"gradient_accumulation_steps \(1\) x 1 process\(es\) = 6"),
    (lambda: GRPOConfig(num_generations=1, per_device_train_batch_size=4),
     r"num_generations=1: grpo compares each completion .* \(with scale_rewards='group' a group of 1 has no std"),
    (lambda: GRPOConfig(num_generations=1, per_device_train_batch_size=4, scale_rewards="none"),
     r"num_generations=1: .*a group of 1 is its own mean"),
    (lambda: RLOOConfig(num_generations=1), r"num_generations=1: rloo compares"),
    (lambda: GRPOConfig(loss_type="ppo"), r"unknown GRPO loss_type 'ppo'; known: grpo, bnpo"),
    (lambda: GRPOConfig(scale_rewards="row"), r"scale_rewards must be one of group, batch, none"),
    (lambda: GRPOConfig(reward_funcs=["a:b", "c:d"], reward_weights=[1.0]),
     r"reward_weights has 1 weight\(s\) for 2 reward function\(s\)"),
    (lambda: GRPOConfig(on_reward_error="ignore"), r"on_reward_error must be one of stop, unscorable"),
    (lambda: GRPOConfig(epsilon=1.5), r"epsilon must lie in \[0, 1\]"),
    (lambda: PPOConfig(mini_batch_size=65), r"mini_batch_size \(65\) cannot exceed"),
])
def test_settings_that_cannot_work_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_group_size_is_checked_against_the_number_of_processes(monkeypatch):
    with pytest.raises(ValueError, match=r"x 1 process\(es\) = 4"):
        GRPOConfig(per_device_train_batch_size=4, num_generations=8)
    monkeypatch.setenv("WORLD_SIZE", "2")  # on 2 ranks a group of 8 spans both
    assert GRPOConfig(per_device_train_batch_size=4, num_generations=8).group_size == 8


# ----------------------------------------------------------------------------------------------
# The command and the embedded default
# ----------------------------------------------------------------------------------------------


def test_train_grpo_and_rloo_commands_report_the_reward_before_and_after(base_model, prompts, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[0][:32]))
    for objective in ("grpo", "rloo"):
        out = tmp_path / objective
        command = [sys.executable, "-m", "alignlib", "train", objective, "--model", base_model,
                   "--dataset", str(prompts_file), "--reward_funcs", "alignlib.demo:demo_reward",
                   "alignlib.demo:demo_reward", "--reward_weights", "1", "0.5", "--output_dir", str(out),
                   "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
                   "--max_completion_length", "8", "--num_eval_prompts", "4", "--disable_tqdm", "true"]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"trained 2 {objective.upper()} steps" in result.stdout
        assert "mean reward on the first 4 training prompts (no --eval_dataset given): " in result.stdout
        saved = json.loads((out / "config.json").read_text())
        assert saved["objective"] == objective and saved[objective]["reward_weights"] == [1.0, 0.5]
        record = read_metrics(out / "metrics.jsonl")[0]
        assert record["reward"] == pytest.approx(1.5 * record["rewards/demo_reward/mean"])


def test_train_online_without_a_model_runs_the_embedded_default(base_model, tmp_path, monkeypatch):
    import alignlib.demo

    monkeypatch.setattr(alignlib.demo, "prepare_base_model", lambda path, **kwargs: base_model)
    cfg = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=16,
                     num_eval_prompts=8, disable_tqdm=True)
    result = train_online(cfg, ModelConfig())
    assert result["model_name_or_path"] == base_model and result["objective"] == "grpo"
    assert 0.0 <= result["eval/reward_before"] <= 1.0 and result["eval/held_out"] == 1.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["grpo"]
    assert saved["max_completion_length"] == demo.GRPO_SETTINGS["max_completion_length"] != 512
    assert saved["per_device_train_batch_size"] == 16  # given: kept
