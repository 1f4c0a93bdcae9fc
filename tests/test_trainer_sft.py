"""alignlib.trainer with SFT: the step's token-weighted mean whatever the split, packing that changes
nothing but the speed, a model that cannot keep packed sequences apart refused, learning.

Models are float64 (dtype "auto" keeps it), so "the same" means agreement to 1e-10.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, tiny_llama, write_pairs
from test_trainer_kto import recorded_gradients, relative_difference
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from alignlib import demo
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig
from alignlib.objectives import check_packing_isolated
from alignlib.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model64(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model64"), dtype=torch.float64)


@pytest.fixture(scope="module")
def nine_pairs(tmp_path_factory) -> str:
    """9 demo pairs: SFT reads each as its prompt and chosen answer."""
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs9.jsonl", demo.read_pairs()[:9])


def sft_config(output_dir, dataset: str, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(output_dir), dataset_name=dataset, max_steps=1, logging_steps=1, save_steps=0,
                    max_length=64, learning_rate=1e-3, seed=0, plot=False, disable_tqdm=True,
                    lr_scheduler_type="constant", max_grad_norm=0.0)
    settings.update(overrides)
    return TrainConfig(**settings)


def first_step(tmp_path: Path, name: str, model: str, dataset: str, monkeypatch, **overrides):
    gradients = recorded_gradients(monkeypatch)
    train("sft", sft_config(tmp_path / name, dataset, **overrides), ModelConfig(model_name_or_path=model, dtype="auto"))
    (record,) = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    return record, gradients[0]


def test_the_step_is_a_token_weighted_mean_whatever_the_micro_batches(model64, nine_pairs, tmp_path, monkeypatch):
    """9 sequences in one step: 1 micro-batch of 9, or 4 of 3, 3, 3 (one empty per the schedule's
    split), or 9 of 1: each micro-batch's NLL is divided by the whole step's trained tokens."""
    whole, whole_grads = first_step(tmp_path, "whole", model64, nine_pairs, monkeypatch,
                                    per_device_train_batch_size=9)
    for batch, accumulation in ((3, 3), (1, 9)):
        split, split_grads = first_step(tmp_path, f"split{batch}", model64, nine_pairs, monkeypatch,
                                        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-10)
        assert relative_difference(split_grads, whole_grads) < 1e-10
    assert "nll_loss" not in whole  # the loss is the NLL; it is logged once


def test_packing_changes_the_rows_not_the_step(model64, nine_pairs, tmp_path, monkeypatch, capsys):
    """The 9 sequences packed into fewer rows of at most 64 tokens give the loss and gradient of the
    9 unpacked, when one step holds them all (4 rows: best-fit decreasing on these lengths)."""
    unpacked, unpacked_grads = first_step(tmp_path, "unpacked", model64, nine_pairs, monkeypatch,
                                          per_device_train_batch_size=9)
    packed, packed_grads = first_step(tmp_path, "packed", model64, nine_pairs, monkeypatch,
                                      per_device_train_batch_size=9, packing=True)
    assert "packing: 9 sequences in 4 rows" in capsys.readouterr().out
    assert packed["loss"] == pytest.approx(unpacked["loss"], rel=1e-10)
    assert relative_difference(packed_grads, unpacked_grads) < 1e-10


def test_fused_log_probs_give_the_same_step(model64, nine_pairs, tmp_path, monkeypatch):
    plain, plain_grads = first_step(tmp_path, "plain", model64, nine_pairs, monkeypatch, per_device_train_batch_size=9,
                                    packing=True)
    fused, fused_grads = first_step(tmp_path, "fused", model64, nine_pairs, monkeypatch, per_device_train_batch_size=9,
                                    packing=True, use_kernels=True)
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-10)
    assert relative_difference(fused_grads, plain_grads) < 1e-9


def _attention_that_ignores_the_mask(module, query, key, value, attention_mask, **kwargs):
    """A causal attention that does not read the mask transformers builds: packed sequences would leak."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_packing_is_refused_for_attention_that_cannot_keep_sequences_apart(nine_pairs, tmp_path):
    AttentionInterface.register("test_causal_only", _attention_that_ignores_the_mask)
    check_packing_isolated(tiny_llama(attn_implementation="sdpa"))  # passes
    check_packing_isolated(tiny_llama(attn_implementation="eager"))  # passes
    with pytest.raises(ValueError, match="'test_causal_only'.* lets a packed sequence attend to the one before it"):
        check_packing_isolated(tiny_llama(attn_implementation="test_causal_only"))

    model = save_tiny_llama(tmp_path / "model")
    output_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="packing: this model's attention"):
        train("sft", sft_config(output_dir, nine_pairs, packing=True),
              ModelConfig(model_name_or_path=model, attn_implementation="test_causal_only"))
    assert not output_dir.exists()  # refused before anything was written
    train("sft", sft_config(output_dir, nine_pairs), ModelConfig(model_name_or_path=model,
                                                                   attn_implementation="test_causal_only"))


def test_sft_learns_the_chosen_answers(tmp_path):
    """From the untrained demo model: 60 steps on the demo's prompts and chosen answers; the held-out
    loss per trained token falls from near log(vocab) to a fraction of it."""
    base = demo.prepare_base_model(tmp_path / "base", steps=0, show_progress=False)
    cfg = sft_config(tmp_path / "run", str(demo.TRAIN_FILE), eval_dataset_name=str(demo.HELDOUT_FILE),
                     dataset_test_split="train", max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3,
                     max_grad_norm=1.0, packing=True)
    result = train("sft", cfg, ModelConfig(model_name_or_path=str(base)))
    assert result.eval_before["loss"] > 4.0
    assert result.eval_after["loss"] < 0.4 * result.eval_before["loss"]
