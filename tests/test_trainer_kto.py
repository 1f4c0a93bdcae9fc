"""alignlib.trainer with KTO: the step's reference point z0 whatever the split, learning, settings.

KTO's loss depends on every example of a step through z0, the policy's KL to the reference on
mismatched prompt/completion pairs. alignlib estimates z0 over the whole step (every micro-batch
and rank), so a step split into micro-batches gives the gradient of the step taken whole; TRL's
KTOTrainer estimates it per micro-batch, whose gradient the test shows to differ. Models are
float64 (dtype "auto" keeps it), so "the same" means agreement to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs

import alignlib.trainer as trainer_module
from alignlib import demo
from alignlib.losses import kto_loss
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig, load_causal_lm, make_reference
from alignlib.objectives import kto_kl, micro_batch_terms
from alignlib.run_data import load_unpaired
from alignlib.trainer import TrainConfig, collate, train
from alignlib.training import Schedule, set_seed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model64"), dtype=torch.float64)


@pytest.fixture(scope="module")
def seven_pairs(tmp_path_factory) -> str:
    """7 demo pairs, read by KTO as 14 unpaired rows (each pair's chosen, then its rejected)."""
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs7.jsonl", demo.read_pairs()[:7])


def kto_config(output_dir, dataset: str, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(output_dir), dataset_name=dataset, max_steps=1, logging_steps=1, save_steps=0,
                    max_length=64, max_prompt_length=32, learning_rate=1e-3, seed=0, plot=False, disable_tqdm=True,
                    lr_scheduler_type="constant", beta=0.5, max_grad_norm=0.0)
    settings.update(overrides)
    return TrainConfig(**settings)


def recorded_gradients(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every trainable gradient (by name) just before each optimizer step of train()."""
    recorded: list[dict[str, torch.Tensor]] = []
    real_make_optimizer = trainer_module.make_optimizer

    def make_optimizer(model, *args, **kwargs):
        optimizer = real_make_optimizer(model, *args, **kwargs)
        names = {id(param): name for name, param in model.named_parameters()}
        optimizer.register_step_pre_hook(lambda opt, _a, _k: recorded.append(
            {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None}))
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", make_optimizer)
    return recorded


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)).item() for k in a)


def per_micro_batch_z0_gradient(cfg: TrainConfig, policy_path: str, reference_path: str,
                                micro_batches: list[list[int]]) -> dict[str, torch.Tensor]:
    """TRL's way, rebuilt from alignlib's pieces: z0 from each micro-batch's own mismatched pairs."""
    set_seed(cfg.seed)
    tokenizer = demo.load_tokenizer()
    dataset, _ = load_unpaired(cfg.dataset_name, "train", cfg, tokenizer, "train")
    model = load_causal_lm(ModelConfig(model_name_or_path=policy_path, dtype="auto"))
    model.train()
    reference = make_reference("model", model, ModelConfig(model_name_or_path=reference_path, dtype="auto"))
    collator = trainer_module._collator("kto", cfg, tokenizer)
    policy = trainer_module.PolicyOutputs(model, "kto", False)
    total = sum(map(len, micro_batches))
    for indices in micro_batches:
        kl_batch = collator.mismatched([dataset[i] for i in indices],
                                       [dataset[indices[j - 1]] for j in range(len(indices))])
        part = kto_kl(policy, reference, kl_batch)
        z0 = max(0.0, float(part.total / part.count))
        batch = collate(dataset, indices, collator, torch.device("cpu"))
        terms = micro_batch_terms("kto", cfg, model, batch, reference, z0=z0)
        (terms.loss_sum / total).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_a_kto_step_does_not_depend_on_how_it_is_split(model64, seven_pairs, tmp_path, monkeypatch):
    """14 unpaired rows as micro-batches of 3 + 3 + 3 + 3 + 2 give the loss, the logged z0 and the
    gradient of the 14 rows in one micro-batch; z0 estimated per micro-batch (TRL's KTOTrainer) does not.
    Step 2 is compared: at step 1 the policy equals the reference, so z0 is 0 however it is estimated."""
    model_cfg = ModelConfig(model_name_or_path=model64, dtype="auto")
    recorded = recorded_gradients(monkeypatch)
    split_cfg = kto_config(tmp_path / "split", seven_pairs, per_device_train_batch_size=3,
                           gradient_accumulation_steps=5, max_steps=2)
    whole_cfg = kto_config(tmp_path / "whole", seven_pairs, per_device_train_batch_size=14, max_steps=2)
    micro_batches = Schedule(14, 15, 3, seed=split_cfg.seed).micro_batches(1)
    assert [len(indices) for indices in micro_batches] == [3, 3, 3, 3, 2]
    train("kto", split_cfg, model_cfg)
    train("kto", whole_cfg, model_cfg)
    assert len(recorded) == 4
    split_grads, whole_grads = recorded[1], recorded[3]
    assert relative_difference(split_grads, whole_grads) < 1e-10
    (_, split_log), (_, whole_log) = ([r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
                                      for name in ("split", "whole"))
    assert whole_log["kl"] > 0.05 and split_log["kl"] == pytest.approx(whole_log["kl"], rel=1e-10)
    assert split_log["loss"] == pytest.approx(whole_log["loss"], rel=1e-10)

    after_one_step = train("kto", kto_config(tmp_path / "one", seven_pairs, per_device_train_batch_size=14), model_cfg)
    trl_way = per_micro_batch_z0_gradient(split_cfg, str(after_one_step.model_dir), model64, micro_batches)
    assert relative_difference(trl_way, whole_grads) > 1e-4


def test_the_logged_loss_is_kto_loss_of_the_step(model64, seven_pairs, tmp_path):
    """The step's logged loss and metrics, rebuilt with kto_loss on the step's log-probs and z0."""
    cfg = kto_config(tmp_path / "run", seven_pairs, per_device_train_batch_size=14, learning_rate=1e-12,
                     desirable_weight=1.5, undesirable_weight=0.5)
    model_cfg = ModelConfig(model_name_or_path=model64, dtype="auto")
    train("kto", cfg, model_cfg)
    (log,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]

    set_seed(cfg.seed)
    tokenizer = demo.load_tokenizer()
    dataset, _ = load_unpaired(cfg.dataset_name, "train", cfg, tokenizer, "train")
    order = Schedule(14, 14, 14, seed=cfg.seed).step_indices(0)
    model = load_causal_lm(model_cfg).train()
    reference = make_reference("model", model, model_cfg)
    collator = trainer_module._collator("kto", cfg, tokenizer)
    policy = trainer_module.PolicyOutputs(model, "kto", False)
    kl = kto_kl(policy, reference, collator.mismatched([dataset[i] for i in order],
                                                       [dataset[order[j - 1]] for j in range(14)]))
    z0 = max(0.0, float(kl.total / kl.count))
    batch = collate(dataset, order, collator, torch.device("cpu"))
    with torch.no_grad():
        logps, _ = policy(batch["input_ids"], batch["attention_mask"], batch["labels"])
        ref = reference.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        from alignlib.logprobs import sequence_logprobs

        ref_logps = sequence_logprobs(ref, batch["labels"])
    out = kto_loss(logps, ref_logps, batch["desirable"], kl=z0, beta=0.5, desirable_weight=1.5, undesirable_weight=0.5)
    assert log["loss"] == pytest.approx(out.losses.mean().item(), rel=1e-9)
    assert log["kl"] == pytest.approx(z0, rel=1e-9)
    assert log["rewards/chosen"] == pytest.approx(out.chosen_rewards.mean().item(), rel=1e-9, abs=1e-12)
    assert log["rewards/margins"] == pytest.approx(
        (out.chosen_rewards.mean() - out.rejected_rewards.mean()).item(), rel=1e-9, abs=1e-12)
    assert log["logps/rejected"] == pytest.approx(logps[~batch["desirable"]].mean().item(), rel=1e-9)


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory) -> str:
    return str(demo.prepare_base_model(tmp_path_factory.mktemp("kto") / "base", steps=100, show_progress=False))


def test_kto_learns_on_the_demo_rows(demo_base, tmp_path):
    """The demo's pairs, read as unpaired rows: the held-out implicit-reward margin between desirable
    and undesirable completions grows from 0 (policy = reference). Measured with these settings and
    seeds 0, 1, 2 (base model and run seeded alike): 1.78, 2.61, 2.60; the bound 0.5 leaves a wide margin."""
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset_name=str(demo.TRAIN_FILE),
                      eval_dataset_name=str(demo.HELDOUT_FILE), dataset_test_split="train", max_steps=60,
                      per_device_train_batch_size=16, per_device_eval_batch_size=64, learning_rate=1e-4,
                      lr_scheduler_type="constant", max_length=64, max_prompt_length=32, logging_steps=10, seed=0,
                      plot=False, disable_tqdm=True, save_steps=0, beta=0.1)
    result = train("kto", cfg, ModelConfig(model_name_or_path=demo_base))
    assert result.eval_before["rewards/margins"] == 0.0
    assert result.eval_after["rewards/margins"] > 0.5
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
                "loss", "learning_rate", "grad_norm"):
        assert all(math.isfinite(record[key]) for record in records), key


def test_kto_with_lora_and_its_settings_refused_elsewhere(model64, seven_pairs, tmp_path):
    cfg = kto_config(tmp_path / "lora", seven_pairs, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=2, loss_type="apo_zero_unpaired")
    lora = ModelConfig(model_name_or_path=model64, dtype="auto", use_peft=True, lora_r=4, lora_alpha=8)
    result = train("kto", cfg, lora)
    assert (result.model_dir / "adapter_config.json").is_file()
    with pytest.raises(ValueError, match="precomputed' cannot serve KTO"):
        kto_config(tmp_path / "x", seven_pairs, reference_strategy="precomputed").check("kto")
    with pytest.raises(ValueError, match="unknown KTO loss_type 'sigmoid'"):
        kto_config(tmp_path / "x", seven_pairs, loss_type="sigmoid").check("kto")
    with pytest.raises(ValueError, match="desirable_weight and undesirable_weight are KTO options"):
        kto_config(tmp_path / "x", seven_pairs, desirable_weight=2.0).check("dpo")
    with pytest.raises(ValueError, match="kto: .*undesirable_weight"):
        kto_config(tmp_path / "x", seven_pairs, undesirable_weight=-1.0).check("kto")
