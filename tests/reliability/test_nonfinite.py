"""NaN or inf appearing in the logits mid-run: the trainer stops or skips the step, as configured
(`on_nonfinite`), and says which step.

The fault is injected from outside the trainer: a forward hook on the policy's lm_head turns
its output into NaN (or inf) on chosen training forwards only (the hook checks `module.training`,
so reference and evaluation passes stay clean). Each step here is one micro-batch, so training
forward n is step n.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs
from safetensors.torch import load_file

import alignlib.trainer as trainer_module
from alignlib import demo
from alignlib.checkpoint import find_latest_checkpoint
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig
from alignlib.trainer import TrainConfig, train
from alignlib.training import MAX_SKIPPED_IN_A_ROW

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", demo.read_pairs()[:16])


def poison_logits(monkeypatch, bad_steps: set[int] | None, value: float) -> None:
    """Make train()'s policy emit `value` logits on the training forwards numbered in bad_steps
    (1-based; None: every one)."""
    real_load = trainer_module.load_causal_lm
    calls = {"training": 0}

    def load_causal_lm(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls["training"] += 1
            if bad_steps is None or calls["training"] in bad_steps:
                return output + value  # NaN or inf everywhere, still attached to the graph
            return output

        model.get_output_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer_module, "load_causal_lm", load_causal_lm)


def config(tmp_path, pairs: str, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(tmp_path / "out"), dataset_name=pairs, max_steps=6, per_device_train_batch_size=2,
                    logging_steps=1, save_steps=2, max_length=64, max_prompt_length=32, learning_rate=1e-3, seed=0,
                    plot=False, disable_tqdm=True)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_stop_names_the_step_and_keeps_the_last_checkpoint(model_dir, pairs, tmp_path, monkeypatch, value):
    poison_logits(monkeypatch, {5}, value)
    with pytest.raises(FloatingPointError, match=r"step 5: the loss is (nan|inf)"):
        train("dpo", config(tmp_path, pairs), ModelConfig(model_name_or_path=model_dir))
    out = tmp_path / "out"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert find_latest_checkpoint(out).name == "checkpoint-4"  # complete, resumable
    assert not (out / "final").exists()  # no model saved from a run that stopped


def test_skip_leaves_the_weights_and_logs_the_step(model_dir, pairs, tmp_path, monkeypatch, capsys):
    poison_logits(monkeypatch, {3}, math.nan)
    train("dpo", config(tmp_path, pairs, on_nonfinite="skip", save_steps=1, save_total_limit=None), ModelConfig(model_name_or_path=model_dir))
    out = tmp_path / "out"
    records = read_metrics(out / "metrics.jsonl")
    assert {"step": 3, "epoch": None, "skipped_nonfinite_step": 3} in records
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in trained)
    assert "step 3: the loss is nan" in capsys.readouterr().out

    # The skipped step changed no weight: checkpoint-3 holds checkpoint-2's model; step 4 moves on.
    def model_at(step: int) -> dict[str, torch.Tensor]:
        return torch.load(out / f"checkpoint-{step}" / "model.pt", weights_only=True)

    for name, tensor in model_at(2).items():
        assert torch.equal(model_at(3)[name], tensor), name
    assert any(not torch.equal(model_at(4)[name], tensor) for name, tensor in model_at(3).items())
    final = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_skip_gives_up_after_too_many_in_a_row(model_dir, pairs, tmp_path, monkeypatch):
    poison_logits(monkeypatch, None, math.nan)
    with pytest.raises(FloatingPointError, match=f"{MAX_SKIPPED_IN_A_ROW} steps in a row"):
        train("dpo", config(tmp_path, pairs, on_nonfinite="skip", max_steps=MAX_SKIPPED_IN_A_ROW + 2, save_steps=0),
              ModelConfig(model_name_or_path=model_dir))
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["skipped_nonfinite_step"] for r in records] == list(range(1, MAX_SKIPPED_IN_A_ROW))


def test_unknown_policy_is_refused(pairs, tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite must be one of stop, skip"):
        config(tmp_path, pairs, on_nonfinite="ignore").check("dpo")
