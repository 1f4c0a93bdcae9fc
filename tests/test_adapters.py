"""Adapters between stages (issue 14, item 2): a LoRA adapter directory as `--model` (continued, or merged
then a new adapter), `--ref_model`, the reference strategy "ref_adapter" (the start adapter loaded twice),
`alignlib merge`, and a run's checkpoints, resume and final adapter with each.

The oracle for "what the start model computes" is always peft itself: the saved SFT adapter put over
its base with `peft.PeftModel.from_pretrained` (or the SFT model still in memory), never alignlib's
loaders. Every model is a 2-layer Llama (hidden 32) over the demo tokenizer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import peft
import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignlib import demo
from alignlib.cli import main
from alignlib.metrics import read_metrics
from alignlib.models import (
    ModelConfig,
    is_quantized,
    load_causal_lm,
    load_model_tokenizer,
    make_reference,
)
from alignlib.saved_models import load_for_generation, merge_saved_adapter, save_model
from alignlib.training import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))


def lora_cfg(path, **overrides) -> ModelConfig:
    settings = dict(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    lora_target_modules=["q_proj", "v_proj"])
    settings.update(overrides)
    return ModelConfig(**settings)


def perturb(model, seed: int) -> None:
    """Random values in every trainable tensor (a fresh LoRA is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=g).to(param))


def logits_of(model, ids=IDS) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
    model.train(was_training)
    return out


def peft_over_base(base_dir, adapter_dir) -> torch.nn.Module:
    """The oracle: transformers' base, peft's adapter, nothing of alignlib."""
    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """base/ (a tiny Llama), sft/ (a trained-looking LoRA adapter over it, with the tokenizer), wide/ (another
    base, hidden 48), and sft-qlora/ (an adapter trained over the 4-bit base) with its in-memory logits."""
    root = tmp_path_factory.mktemp("stages")
    base = save_tiny_llama(root / "base")
    torch.manual_seed(0)
    sft = load_causal_lm(lora_cfg(base))
    perturb(sft, seed=1)
    save_model(sft, load_model_tokenizer(ModelConfig(model_name_or_path=base)), root / "sft")
    qlora = load_causal_lm(lora_cfg(base, load_in_4bit=True))
    perturb(qlora, seed=2)
    save_model(qlora, None, root / "sft-qlora")
    return {"root": root, "base": base, "sft": str(root / "sft"), "wide": save_tiny_llama(root / "wide", hidden=48),
            "big_vocab": save_tiny_llama(root / "big-vocab", vocab_size=120),
            "sft_logits": logits_of(peft_over_base(base, root / "sft")), "qlora_logits": logits_of(qlora)}


# ----------------------------------------------------------------------------------------------
# --model ADAPTER_DIR: continue, or merge then a new adapter
# ----------------------------------------------------------------------------------------------


def test_continue_trains_the_saved_adapter_itself(stages):
    policy = load_causal_lm(ModelConfig(model_name_or_path=stages["sft"], use_peft=True))
    torch.testing.assert_close(logits_of(policy), stages["sft_logits"], rtol=0, atol=1e-6)
    with safe_open(os.path.join(stages["sft"], "adapter_model.safetensors"), framework="pt") as saved:
        saved_names = set(saved.keys())
    trained = {name.replace(".default", "") for name, p in policy.named_parameters() if p.requires_grad}
    assert trained == saved_names  # exactly the saved adapter's tensors train, no fresh adapter beside them
    policy.train()
    policy(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)


def test_continue_over_a_4bit_base_loads_the_adapter_trainable_over_nf4(stages):
    import bitsandbytes as bnb

    policy = load_causal_lm(ModelConfig(model_name_or_path=str(stages["root"] / "sft-qlora"), use_peft=True,
                                        load_in_4bit=True))
    layer = policy.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.lora_A["default"].weight.requires_grad
    torch.testing.assert_close(logits_of(policy), stages["qlora_logits"], rtol=0, atol=1e-5)


def test_merge_then_a_new_adapter_starts_from_the_sft_model(stages, tmp_path):
    policy = load_causal_lm(lora_cfg(stages["sft"], start_adapter="merge", lora_r=2))
    names = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name and ".default." in name for name in names)
    assert policy.peft_config["default"].r == 2  # the new adapter's settings, not the SFT adapter's r=4
    torch.testing.assert_close(logits_of(policy), stages["sft_logits"], rtol=1e-5, atol=1e-5)
    # the adapter-disabled reference is the merged SFT model, not the bare base
    torch.testing.assert_close(make_reference("adapter_disabled", policy)(IDS), stages["sft_logits"],
                               rtol=1e-5, atol=1e-5)
    perturb(policy, seed=3)
    save_model(policy, None, tmp_path / "dpo")
    assert json.loads((tmp_path / "dpo" / "adapter_base.json").read_text()) == {"merged_start": stages["sft"]}
    reloaded, _ = load_for_generation(tmp_path / "dpo")
    torch.testing.assert_close(logits_of(reloaded), logits_of(policy), rtol=1e-5, atol=1e-5)


def test_merging_a_qlora_adapter_dequantises_its_base(stages, tmp_path):
    """The SFT model trained over NF4 weights: merged into their dequantised values it computes what it
    computed; with load_in_4bit the merged weights are quantised again for the new QLoRA adapter."""
    qlora_dir = str(stages["root"] / "sft-qlora")
    merged_start = load_causal_lm(lora_cfg(qlora_dir, start_adapter="merge"))
    assert not is_quantized(merged_start.get_base_model())
    torch.testing.assert_close(logits_of(merged_start), stages["qlora_logits"], rtol=1e-5, atol=1e-5)

    requantised = load_causal_lm(lora_cfg(qlora_dir, start_adapter="merge", load_in_4bit=True))
    assert is_quantized(requantised.get_base_model())
    perturb(requantised, seed=4)
    expected = logits_of(requantised)
    save_model(requantised, None, tmp_path / "dpo")
    assert {"adapter_base.json", "base_quantization_config.json"} <= set(os.listdir(tmp_path / "dpo"))
    reloaded, _ = load_for_generation(tmp_path / "dpo")
    assert is_quantized(reloaded.get_base_model())
    torch.testing.assert_close(logits_of(reloaded), expected, rtol=0, atol=1e-5)

    # `alignlib merge`: the adapter merged into the dequantised 4-bit base, in the dtype asked for
    assert main(["merge", "--model", str(tmp_path / "dpo"), "--output", str(tmp_path / "full"),
                 "--dtype", "float32"]) == 0
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert full.dtype == torch.float32 and getattr(full.config, "quantization_config", None) is None
    torch.testing.assert_close(logits_of(full), expected, rtol=1e-4, atol=1e-4)
    assert main(["merge", "--model", str(tmp_path / "dpo"), "--output", str(tmp_path / "bf16"),
                 "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_merge_command_on_a_plain_adapter_writes_a_full_model_with_its_tokenizer(stages, tmp_path):
    output = merge_saved_adapter(stages["sft"], tmp_path / "merged")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(output))
    assert "adapter_config.json" not in os.listdir(output)
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(output)), stages["sft_logits"],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The reference: the start adapter loaded twice, --ref_model
# ----------------------------------------------------------------------------------------------


def test_ref_adapter_is_the_frozen_start_adapter_and_never_in_the_optimizer(stages, tmp_path):
    policy = load_causal_lm(ModelConfig(model_name_or_path=stages["sft"], use_peft=True, model_adapter_name="policy"))
    reference = make_reference("ref_adapter", policy)
    frozen = {name: p.detach().clone() for name, p in policy.named_parameters() if ".reference." in name}
    assert frozen and not any(p.requires_grad for name, p in policy.named_parameters() if ".reference." in name)
    optimizer = make_optimizer(policy, "adamw_torch", lr=1e-2)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = [p for name, p in policy.named_parameters() if ".policy." in name]
    assert in_optimizer == {id(p) for p in trained}

    policy.train()
    for _ in range(3):
        torch.testing.assert_close(reference(IDS), stages["sft_logits"], rtol=0, atol=1e-6)
        assert policy.active_adapter == "policy" and all(p.requires_grad for p in trained)
        policy(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (logits_of(policy) - stages["sft_logits"]).abs().max() > 1e-3  # the policy moved
    assert all(torch.equal(p, frozen[name]) for name, p in policy.named_parameters() if name in frozen)

    save_model(policy, None, tmp_path / "final")  # the trained adapter alone, at the top of the folder
    assert sorted(p.name for p in (tmp_path / "final").iterdir() if p.is_dir()) == []
    reloaded, _ = load_for_generation(tmp_path / "final")
    torch.testing.assert_close(logits_of(reloaded), logits_of(policy), rtol=0, atol=1e-6)


def test_precomputed_reference_of_a_continued_adapter_is_the_start_model(stages):
    policy = load_causal_lm(ModelConfig(model_name_or_path=stages["sft"], use_peft=True))
    torch.testing.assert_close(make_reference("precomputed", policy)(IDS), stages["sft_logits"], rtol=0, atol=1e-6)


def test_ref_model_may_be_an_adapter_or_a_model(stages):
    policy = load_causal_lm(lora_cfg(stages["base"]))
    adapter_ref = make_reference("model", policy, lora_cfg(stages["base"]), ref_model_name_or_path=stages["sft"])
    torch.testing.assert_close(adapter_ref(IDS), stages["sft_logits"], rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in adapter_ref.model.parameters())
    as_second_adapter = make_reference("ref_adapter", policy, ref_model_name_or_path=stages["sft"],
                                       ref_adapter_name="sft")
    torch.testing.assert_close(as_second_adapter(IDS), stages["sft_logits"], rtol=0, atol=1e-6)


def test_reference_mistakes_are_one_line_errors(stages):
    policy = load_causal_lm(lora_cfg(stages["base"]))
    with pytest.raises(ValueError, match="'ref_adapter' loads the start adapter a second time"):
        make_reference("ref_adapter", policy)
    with pytest.raises(ValueError, match=f"--ref_model {stages['base']} is not a LoRA adapter directory"):
        make_reference("ref_adapter", policy, ref_model_name_or_path=stages["base"])
    with pytest.raises(ValueError, match=r"--ref_model .*big-vocab: its vocabulary has 120 ids and the policy's 105"):
        make_reference("model", policy, lora_cfg(stages["base"]), ref_model_name_or_path=stages["big_vocab"])
    wide_policy = load_causal_lm(lora_cfg(stages["wide"]))
    with pytest.raises(ValueError, match=r"--ref_model .*sft is an adapter for the base .*base, and the policy's "
                                         r"base is .*wide"):
        make_reference("ref_adapter", wide_policy, ref_model_name_or_path=stages["sft"])
    with pytest.raises(ValueError, match="--ref_model .* is not read by reference strategy 'adapter_disabled'"):
        make_reference("adapter_disabled", policy, ref_model_name_or_path=stages["sft"])
    with pytest.raises(ValueError, match="--ref_adapter_name ref names the frozen adapter"):
        make_reference("model", policy, lora_cfg(stages["base"]), ref_adapter_name="ref")


def test_starting_adapter_mistakes_are_one_line_errors(stages):
    with pytest.raises(ValueError, match=r"--model .*sft is a LoRA adapter: --start_adapter continue trains it, "
                                         r"which needs --use_peft true"):
        load_causal_lm(ModelConfig(model_name_or_path=stages["sft"]))
    with pytest.raises(ValueError, match=r"lora_r=8 is given, but --model .*sft is an adapter that training "
                                         r"continues with its own r=4"):
        load_causal_lm(lora_cfg(stages["sft"], lora_r=8))
    # the same settings as the adapter's own are accepted (a TRL YAML that repeats them)
    load_causal_lm(lora_cfg(stages["sft"]))
    moved = stages["root"] / "sft-moved-base"
    if not moved.exists():  # the SFT adapter, its adapter_config.json pointing at another base
        moved.mkdir()
        for entry in Path(stages["sft"]).iterdir():
            (moved / entry.name).write_bytes(entry.read_bytes())
        settings = json.loads((moved / "adapter_config.json").read_text())
        (moved / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": stages["wide"]}))
    for mode in ("continue", "merge"):
        with pytest.raises(ValueError, match=r"sft-moved-base.* was saved for a different base model than "
                                             r".*wide: .*size mismatch"):
            load_causal_lm(lora_cfg(str(moved), start_adapter=mode))
    with pytest.raises(ValueError, match="model_adapter_name 'train' cannot name a peft adapter"):
        lora_cfg(stages["sft"], model_adapter_name="train")
    with pytest.raises(ValueError, match="start_adapter must be one of continue, merge; got 'fresh'"):
        ModelConfig(model_name_or_path=stages["sft"], start_adapter="fresh")


# ----------------------------------------------------------------------------------------------
# A DPO run from the SFT adapter: checkpoints, resume, the final adapter
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(stages) -> str:
    return write_pairs(stages["root"] / "pairs.jsonl", demo.read_pairs()[:16])


def dpo_flags(stages, pairs, output_dir, *extra: str, max_steps: int = 3) -> list[str]:
    return ["train", "dpo", "--model", stages["sft"], "--dataset", pairs, "--output_dir", str(output_dir),
            "--use_peft", "true", "--max_steps", str(max_steps), "--save_steps", "2", "--per_device_train_batch_size",
            "4", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--max_length", "48",
            "--max_prompt_length", "24", "--logging_steps", "1", "--disable_tqdm", "true", "--plot", "false", *extra]


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "adapter_model.safetensors")


@pytest.mark.parametrize("start", [[], ["--model_adapter_name", "policy", "--ref_adapter_name", "sft"],
                                   ["--load_in_4bit", "true"], ["--start_adapter", "merge", "--lora_r", "2"]],
                         ids=["continue", "continue-named-adapters", "continue-qlora", "merge"])
def test_a_run_from_the_sft_adapter_checkpoints_resumes_and_saves_an_adapter_that_generates(
        stages, pairs, tmp_path, monkeypatch, capfd, start):
    whole, cut, short = tmp_path / "whole", tmp_path / "cut", tmp_path / "short"
    assert main(dpo_flags(stages, pairs, whole, *start)) == 0
    config = json.loads((whole / "config.json").read_text())
    merge = "merge" in start
    assert config["model"]["start_adapter"] == ("merge" if merge else "continue")
    # The reference is the SFT model (not the base under the adapter): before the first update the
    # policy equals it, so the first step's implicit rewards are exactly 0.
    first = next(record for record in read_metrics(whole / "metrics.jsonl") if "loss" in record)
    assert first["step"] == 1 and first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    final = adapter_tensors(whole / "final")
    if merge:  # a new adapter (r=2) over the merged SFT model, which the saved adapter records
        assert json.loads((whole / "final" / "adapter_base.json").read_text()) == {"merged_start": stages["sft"]}
        assert {tensor.shape[0] for name, tensor in final.items() if "lora_A" in name} == {2}
    else:  # the SFT adapter itself trained on; its frozen copy (the reference) is not saved
        assert set(final) == set(adapter_tensors(stages["sft"]))
        assert not any((whole / "final").glob("*/adapter_model.safetensors"))
    policy, _ = load_for_generation(whole / "final")
    assert (logits_of(policy) - stages["sft_logits"]).abs().max() > 1e-3  # it trained
    capfd.readouterr()
    assert main(["generate", "--model", str(whole / "final"), "--prompt", "how do i fix a boat ?",
                 "--max_new_tokens", "4"]) == 0
    assert capfd.readouterr().out.startswith("how do i fix a boat ? ")

    # Interrupted after its checkpoint at step 2, then resumed: the same final adapter, bit for bit.
    import alignlib.trainer

    real_step, calls = alignlib.trainer.train_step, []

    def step_then_interrupt(run, step):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(alignlib.trainer, "train_step", step_then_interrupt)
    assert main(dpo_flags(stages, pairs, cut, *start)) == 130
    monkeypatch.undo()
    assert (cut / "checkpoint-2").is_dir() and not (cut / "final").exists()
    capfd.readouterr()
    assert main([*dpo_flags(stages, pairs, cut, *start), "--resume_from_checkpoint", "latest",
                 "--ref_model", stages["sft"]]) == 1  # another reference setting: another run
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to a different run" in err[0] and "ref_model: None then" in err[0], err
    assert main([*dpo_flags(stages, pairs, cut, *start), "--resume_from_checkpoint", "latest"]) == 0
    resumed = adapter_tensors(cut / "final")
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[name], final[name]) for name in final)

    # The checkpoint loads for generation as the model of step 2 (a 2-step run's final, constant LR).
    assert main(dpo_flags(stages, pairs, short, *start, max_steps=2)) == 0
    at_step_2, _ = load_for_generation(cut / "checkpoint-2")
    two_steps, _ = load_for_generation(short / "final")
    torch.testing.assert_close(logits_of(at_step_2), logits_of(two_steps), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input through the command: one line naming the flag and the value, nothing written
# ----------------------------------------------------------------------------------------------


def error_line(capfd, args: list[str], status: int = 1) -> str:
    capfd.readouterr()
    try:
        returned = main(args)
    except SystemExit as exit_:  # the flag parser's own errors exit
        returned = exit_.code
    err = capfd.readouterr().err.strip().splitlines()
    assert returned == status and len(err) == 1 and "Traceback" not in err[0], (returned, err)
    return err[0]


@pytest.fixture(scope="module")
def moved_adapter(stages) -> str:
    """The SFT adapter, its adapter_config.json naming the wide base: an adapter for another base."""
    moved = stages["root"] / "sft-for-wide"
    moved.mkdir()
    for entry in Path(stages["sft"]).iterdir():
        (moved / entry.name).write_bytes(entry.read_bytes())
    settings = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": stages["wide"]}))
    return str(moved)


def train_cases(stages, moved_adapter) -> dict[str, tuple[list[str], int, str]]:
    sft, base, missing = stages["sft"], stages["base"], str(stages["root"] / "no-such-model")
    return {
        "an adapter without --use_peft": (["--model", sft], 1, rf"--model {sft} is a LoRA adapter: --start_adapter "
                                                             "continue trains it, which needs --use_peft true"),
        "other LoRA settings for a continued adapter": (["--model", sft, "--use_peft", "true", "--lora_r", "8"], 1,
                                                         rf"lora_r=8 is given, but --model {sft} is an adapter"),
        "an adapter for another base": (["--model", moved_adapter, "--use_peft", "true"], 1,
                                        rf"--model {moved_adapter}: the adapter was saved for a different base model "
                                        rf"than {stages['wide']}: size mismatch"),
        "an unknown --start_adapter": (["--model", sft, "--start_adapter", "fresh"], 2,
                                       r".*--start_adapter.*invalid choice: 'fresh'"),
        "a --ref_model that does not exist": (["--model", base, "--ref_model", missing], 1,
                                              rf"--ref_model path {missing} does not exist"),
        "a --ref_model with another vocabulary": (["--model", base, "--ref_model", stages["big_vocab"]], 1,
                                                  rf"--ref_model {stages['big_vocab']}: its vocabulary has 120 ids"),
        "ref_adapter without a start adapter": (["--model", base, "--use_peft", "true", "--reference_strategy",
                                                 "ref_adapter"], 1, "reference strategy 'ref_adapter' loads the start "
                                                                    "adapter a second time"),
        "--ref_adapter_name with strategy model": (["--model", sft, "--use_peft", "true", "--reference_strategy",
                                                    "model", "--ref_adapter_name", "sft"], 1,
                                                   "--ref_adapter_name sft names the frozen adapter of "
                                                   "reference_strategy ref_adapter, not of model"),
        "a reserved adapter name": (["--model", sft, "--use_peft", "true", "--model_adapter_name", "train"], 1,
                                    "model_adapter_name 'train' cannot name a peft adapter"),
    }


def test_train_refuses_bad_stage_settings_in_one_line_and_writes_nothing(stages, pairs, moved_adapter, tmp_path,
                                                                          capfd):
    for name, (flags, status, message) in train_cases(stages, moved_adapter).items():
        output_dir = tmp_path / name.replace(" ", "-")
        args = ["train", "dpo", "--dataset", pairs, "--output_dir", str(output_dir), "--max_steps", "1",
                "--max_length", "48", "--max_prompt_length", "24", "--disable_tqdm", "true", *flags]
        line = error_line(capfd, args, status)
        assert re.match(rf"(alignlib: error: |alignlib train dpo: error: ){message}", line), (name, line)
        assert not output_dir.exists(), name
    output_dir = tmp_path / "orpo"
    line = error_line(capfd, ["train", "orpo", "--model", stages["base"], "--dataset", pairs, "--output_dir",
                              str(output_dir), "--ref_model", stages["sft"]])
    assert line == f"alignlib: error: --ref_model {stages['sft']}: orpo has no reference model (dpo and kto have one)"
    assert not output_dir.exists()


def test_merge_refuses_bad_input_in_one_line_and_writes_nothing(stages, moved_adapter, tmp_path, capfd):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    new = tmp_path / "new" / "merged"
    cases = {
        "an output folder that is not empty": (["--model", stages["sft"], "--output", str(taken)], 1,
                                               rf"--output {taken} already exists and is not empty"),
        "a full model": (["--model", stages["base"], "--output", str(new)], 1,
                         rf"--model {stages['base']} holds a full model, not a LoRA adapter"),
        "an adapter for another base": (["--model", moved_adapter, "--output", str(new)], 1,
                                        rf"the adapter in {moved_adapter} was saved for a different base model"),
        "a missing model": (["--model", str(tmp_path / "nothing"), "--output", str(new)], 1,
                            rf"model path {tmp_path / 'nothing'} does not exist"),
        "an unknown dtype": (["--model", stages["sft"], "--output", str(new), "--dtype", "float64"], 2,
                             r".*--dtype: invalid choice: 'float64'"),
    }
    for name, (flags, status, message) in cases.items():
        line = error_line(capfd, ["merge", *flags], status)
        assert re.match(rf"(alignlib: error: |alignlib merge: error: ){message}", line), (name, line)
        assert not (tmp_path / "new").exists(), name
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
