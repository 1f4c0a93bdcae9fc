"""alignlib.trainer.train: exact gradient accumulation, QLoRA, reference strategies, metrics.

Everything goes through `train()` itself on tiny Llamas (hidden 32, 2 layers, the demo's
105-word tokenizer) saved into temporary directories, with a few of the demo's preference
pairs written to JSON lines. The models for the accumulation and reference tests are saved in
float64 (and loaded with dtype "auto", which keeps it), so that two ways of computing the same
gradient agree to ~1e-12 and a real difference (~1e-3 and more) stands far above round-off.
The QLoRA model has hidden size 64: bitsandbytes 0.50 on CPU mis-dequantises 4-bit weights
whose in_features is even but not a multiple of 64.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs

import alignlib.trainer as trainer_module
from alignlib import demo
from alignlib.data import PreferenceCollator, pad_token_id_for
from alignlib.metrics import read_metrics
from alignlib.models import (
    ModelConfig,
    load_causal_lm,
    load_reward_model,
    make_reference,
)
from alignlib.objectives import nll_weight, pairwise_terms
from alignlib.run_data import load_pairs
from alignlib.saved_models import load_for_generation
from alignlib.trainer import TrainConfig, collate, train
from alignlib.training import Schedule, set_seed

TRL_TRAIN_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "epoch", "step")


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model64"), dtype=torch.float64)


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("qlora"), hidden=64)


@pytest.fixture(scope="module")
def seven_pairs(tmp_path_factory) -> str:
    """7 demo pairs of varied lengths (so micro-batches pad differently and hold different token counts)."""
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs7.jsonl", demo.read_pairs()[:7])


@pytest.fixture(scope="module")
def heldout_pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("heldout") / "heldout.jsonl", demo.read_pairs(demo.HELDOUT_FILE)[:6])


def tiny_config(output_dir, dataset: str, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(output_dir), dataset_name=dataset, max_steps=1, logging_steps=1, save_steps=0,
                    max_length=64, max_prompt_length=32, learning_rate=1e-3, seed=0, plot=False, disable_tqdm=True,
                    lr_scheduler_type="constant")
    settings.update(overrides)
    return TrainConfig(**settings)


def gradients_at_each_step(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Make train()'s optimizer record every trainable gradient (by name) just before each step.

    train() builds its optimizer with alignlib.trainer.make_optimizer; the wrapper returns that very
    optimizer with a step pre-hook (torch.optim.Optimizer.register_step_pre_hook), so the update
    itself is untouched.
    """
    recorded: list[dict[str, torch.Tensor]] = []
    real_make_optimizer = trainer_module.make_optimizer

    def make_optimizer(model, *args, **kwargs):
        optimizer = real_make_optimizer(model, *args, **kwargs)
        names = {id(param): name for name, param in model.named_parameters()}

        def record(opt, _args, _kwargs):
            recorded.append({names[id(p)]: p.grad.detach().clone() for group in opt.param_groups
                             for p in group["params"] if p.grad is not None})

        optimizer.register_step_pre_hook(record)
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", make_optimizer)
    return recorded


def train_records(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir / "metrics.jsonl") if "loss" in r]


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)).item() for k in a)


def per_micro_batch_mean_gradient(objective: str, cfg: TrainConfig, model_cfg: ModelConfig,
                                  micro_batches: list[list[int]], *, exact: bool) -> dict[str, torch.Tensor]:
    """The step's gradient built outside train(), from the same pieces (load_pairs, collate,
    pairwise_terms) and the same initial weights (train() seeds with cfg.seed before loading).

    exact=True: train()'s combination, sum of per-pair losses / pairs of the step (+ alpha * NLL
    sum / chosen tokens of the step). exact=False: what peers do, each micro-batch's own mean
    (pairs and tokens of that micro-batch) divided by the number of micro-batches.
    """
    set_seed(cfg.seed)
    tokenizer = demo.load_tokenizer()
    dataset, _ = load_pairs(cfg.dataset_name, "train", cfg, tokenizer, "train")
    if objective == "reward":
        model = load_reward_model(model_cfg, tokenizer=tokenizer)
    else:
        model = load_causal_lm(model_cfg)
    model.train()
    reference = make_reference("model", model, model_cfg) if objective == "dpo" else None
    collator = PreferenceCollator(pad_token_id_for(tokenizer), for_reward_model=objective == "reward")
    batches = [collate(dataset, indices, collator, torch.device("cpu")) for indices in micro_batches]
    alpha = nll_weight(objective, cfg)
    step_pairs = sum(len(indices) for indices in micro_batches)
    step_tokens = sum(int((b["labels"][: b["labels"].shape[0] // 2, 1:] != -100).sum()) for b in batches
                      if "labels" in b)
    for batch in batches:
        terms = pairwise_terms(objective, cfg, model, batch, reference)
        if exact:
            loss = terms.loss_sum / step_pairs + alpha * terms.nll_sum / max(step_tokens, 1)
        else:
            loss = (terms.loss_sum / terms.examples + alpha * terms.nll_sum / max(terms.nll_tokens, 1))
            loss = loss / len(batches)
        loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# 1. Exact gradient accumulation
# ----------------------------------------------------------------------------------------------

ACCUMULATION_CASES = {
    "dpo-sigmoid": ("dpo", {"loss_type": "sigmoid", "beta": 0.1}),
    "dpo-rpo": ("dpo", {"loss_type": "sigmoid", "beta": 0.1, "rpo_alpha": 1.0}),
    "orpo": ("orpo", {"beta": 0.1}),
    "reward": ("reward", {}),
}


@pytest.mark.parametrize("case", list(ACCUMULATION_CASES))
def test_accumulation_is_exact_with_a_short_last_micro_batch(case, model64, seven_pairs, tmp_path, monkeypatch):
    """7 pairs as micro-batches of 3 + 3 + 1 (batch 3, accumulation 3) give the gradient and the loss of
    the 7 pairs in one micro-batch (batch 7, accumulation 1).

    How: train() runs for real, one step each way; its optimizer records the gradients just before
    it steps (a step pre-hook, see `gradients_at_each_step`), with clipping off (max_grad_norm 0) so
    they are the raw accumulated gradients. The logged loss and grad_norm in metrics.jsonl are
    compared too. The models are float64, so "the same" means agreement to 1e-10.

    Counter-example (the test can fail): averaging each micro-batch by its own size, as peers'
    trainers do, gives a gradient that differs from the full batch's by far more than the tolerance.
    Before that, the test rebuilds train()'s exact combination outside train() from the same pieces
    and checks that it reproduces the recorded gradient, so the counter-example starts from the
    very same weights and batches.
    """
    objective, settings = ACCUMULATION_CASES[case]
    model_cfg = ModelConfig(model_name_or_path=model64, dtype="auto")
    recorded = gradients_at_each_step(monkeypatch)
    split_cfg = tiny_config(tmp_path / "split", seven_pairs, per_device_train_batch_size=3,
                            gradient_accumulation_steps=3, max_grad_norm=0.0, **settings)
    whole_cfg = tiny_config(tmp_path / "whole", seven_pairs, per_device_train_batch_size=7,
                            gradient_accumulation_steps=1, max_grad_norm=0.0, **settings)
    split_schedule = Schedule(7, pairs_per_step=9, micro_batch=3, seed=split_cfg.seed).micro_batches(0)
    assert [len(indices) for indices in split_schedule] == [3, 3, 1]
    assert sorted(i for indices in split_schedule for i in indices) == list(range(7))

    train(objective, split_cfg, model_cfg)
    train(objective, whole_cfg, model_cfg)
    split_grads, whole_grads = recorded
    assert len(whole_grads) > 0
    assert max_relative_difference(split_grads, whole_grads) < 1e-10
    (split_log,), (whole_log,) = train_records(tmp_path / "split"), train_records(tmp_path / "whole")
    assert split_log["loss"] == pytest.approx(whole_log["loss"], rel=1e-10)
    assert split_log["grad_norm"] == pytest.approx(whole_log["grad_norm"], rel=1e-10)
    assert math.isfinite(whole_log["loss"]) and whole_log["grad_norm"] > 0

    exact = per_micro_batch_mean_gradient(objective, split_cfg, model_cfg, split_schedule, exact=True)
    assert max_relative_difference(exact, whole_grads) < 1e-10
    naive = per_micro_batch_mean_gradient(objective, split_cfg, model_cfg, split_schedule, exact=False)
    assert max_relative_difference(naive, whole_grads) > 1e-3


# ----------------------------------------------------------------------------------------------
# 2. QLoRA through the trainer
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(qlora_model, seven_pairs, tmp_path_factory) -> dict:
    """Three DPO steps of LoRA (every linear layer) over an NF4 base, through train(); the trained
    model is kept by wrapping alignlib.trainer.load_causal_lm (which train() calls to load it)."""
    kept = {}
    real_load = trainer_module.load_causal_lm

    def load_and_keep(cfg, **kwargs):
        model = real_load(cfg, **kwargs)
        kept["model"] = model
        kept["initial"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return model

    model_cfg = ModelConfig(model_name_or_path=qlora_model, use_peft=True, load_in_4bit=True, lora_r=4,
                            lora_alpha=8, lora_dropout=0.0, lora_target_modules=["all-linear"])
    output_dir = tmp_path_factory.mktemp("qlora-run")
    cfg = tiny_config(output_dir, seven_pairs, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                      optim="adamw_8bit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "load_causal_lm", load_and_keep)
        result = train("dpo", cfg, model_cfg)
    model = kept["model"].eval()
    input_ids = torch.tensor([demo.load_tokenizer()("how do i paint a chair ? first , paint")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return {"result": result, "model": model, "initial": kept["initial"], "input_ids": input_ids, "logits": logits}


def test_qlora_trains_a_few_dpo_steps_on_cpu(qlora_run):
    """load_in_4bit + use_peft: the base layers are bitsandbytes NF4 with double quantisation, only the
    LoRA weights train, the losses are finite and leave log 2, and every lora_B (zero at the start)
    has moved."""
    import bitsandbytes as bnb

    model, result = qlora_run["model"], qlora_run["result"]
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    records = train_records(result.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert abs(records[-1]["loss"] - math.log(2)) > 1e-4  # the policy moved off the reference
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    lora_b = [name for name in trained if "lora_B" in name]
    assert lora_b and all(not torch.equal(trained[n], qlora_run["initial"][n]) for n in lora_b)
    final = result.model_dir
    assert final == result.output_dir / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()


def test_qlora_adapter_reloads_with_peft_over_a_4bit_base(qlora_run):
    """output_dir/final loads with peft.PeftModel.from_pretrained over the same NF4 base and computes the
    trained model's logits. (bitsandbytes' CPU inference kernel, which an eval-mode no-grad pass
    switches to, computes in bf16; it is switched off here as alignlib switches it off for training,
    so both sides run the same dequantise-and-matmul path.)"""
    import bitsandbytes as bnb
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    result = qlora_run["result"]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    config_path = result.model_dir / "adapter_config.json"
    base = AutoModelForCausalLM.from_pretrained(json.loads(config_path.read_text())["base_model_name_or_path"],
                                                quantization_config=quantization)
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    reloaded = peft.PeftModel.from_pretrained(base, result.model_dir).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=qlora_run["input_ids"]).logits
    torch.testing.assert_close(logits, qlora_run["logits"], rtol=0, atol=1e-5)


def test_qlora_adapter_through_load_for_generation_computes_the_trained_model(qlora_run):
    """What `alignlib generate --model OUTPUT/final` loads (alignlib.models.load_for_generation) must
    compute what the trained QLoRA model computed. The adapter was trained over the NF4-dequantised
    base weights; over the original float weights the logits differ by the quantisation error
    (~3e-2 on this model), far beyond round-off."""
    result = qlora_run["result"]
    model, tokenizer = load_for_generation(result.model_dir)
    assert tokenizer is not None
    with torch.no_grad():
        logits = model(input_ids=qlora_run["input_ids"].to(next(model.parameters()).device)).logits
    torch.testing.assert_close(logits.cpu(), qlora_run["logits"].cpu(), rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 3. Reference strategies; 7. metrics under TRL's names
# ----------------------------------------------------------------------------------------------

STRATEGIES = ("model", "adapter_disabled", "precomputed")


@pytest.fixture(scope="module")
def strategy_runs(model64, seven_pairs, heldout_pairs, tmp_path_factory) -> dict:
    """Two DPO steps of a LoRA policy per reference strategy, logged every step, evaluated every step."""
    model_cfg = dict(model_name_or_path=model64, dtype="auto", use_peft=True, lora_r=4, lora_alpha=8,
                     lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    runs = {}
    for strategy in STRATEGIES:
        output_dir = tmp_path_factory.mktemp(f"ref-{strategy}")
        cfg = tiny_config(output_dir, seven_pairs, eval_dataset_name=heldout_pairs, dataset_test_split="train",
                          max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          per_device_eval_batch_size=4, eval_steps=1, learning_rate=5e-2,
                          reference_strategy=strategy, plot=True)
        result = train("dpo", cfg, ModelConfig(**model_cfg))
        runs[strategy] = (result, read_metrics(output_dir / "metrics.jsonl"))
    return runs


def test_reference_strategies_compute_the_same_reference(strategy_runs):
    """"model" (a frozen copy), "adapter_disabled" (the LoRA policy with its adapter off) and
    "precomputed" (reference log-probs stored before step 1) are three ways to the same reference:
    the same losses at steps 1 and 2 and the same held-out metrics. Step 1 alone would prove nothing
    (a fresh LoRA adapter is the identity, so the loss is log 2 against any reference equal to the
    policy); after one update the policy differs from the reference and the step-2 loss shows it."""
    def losses(records):
        return [r["loss"] for r in records if "loss" in r]

    def eval_losses(records):
        return [r["eval_loss"] for r in records if "eval_loss" in r]

    baseline_result, baseline = strategy_runs["model"]
    assert losses(baseline)[0] == pytest.approx(math.log(2), abs=1e-12)
    assert abs(losses(baseline)[1] - math.log(2)) > 1e-3
    assert len(eval_losses(baseline)) == 3  # before training, after step 1, at the end
    for strategy in ("adapter_disabled", "precomputed"):
        result, records = strategy_runs[strategy]
        assert losses(records) == pytest.approx(losses(baseline), rel=1e-10, abs=1e-12), strategy
        assert eval_losses(records) == pytest.approx(eval_losses(baseline), rel=1e-10, abs=1e-12), strategy
        for key, value in baseline_result.eval_after.items():
            assert result.eval_after[key] == pytest.approx(value, rel=1e-10, abs=1e-12), (strategy, key)


def test_metrics_use_trl_names_and_the_curves_are_plotted(strategy_runs):
    """metrics.jsonl: one record per logging step with TRL's training metric names, eval_-prefixed
    held-out metrics, and a PNG of the curves (matplotlib is installed with the test extra)."""
    result, records = strategy_runs["model"]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [1, 2]
    for record in train_logs:
        missing = [key for key in TRL_TRAIN_METRICS if key not in record]
        assert not missing, f"missing {missing} in {sorted(record)}"
        assert all(isinstance(record[key], (int, float)) and math.isfinite(record[key]) for key in TRL_TRAIN_METRICS)
        assert 0.0 <= record["rewards/accuracies"] <= 1.0
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"])
    assert [r["epoch"] for r in train_logs] == [0.5, 1.0]  # 4 pairs a step out of 7: 2 steps an epoch
    eval_logs = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in eval_logs] == [0, 1, 2]
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"):
        assert all(key in r for r in eval_logs), key
    png = result.output_dir / "training_curves.png"
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 100 and height > 100
