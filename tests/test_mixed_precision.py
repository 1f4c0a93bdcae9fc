"""fp16 mixed precision (for GPUs without bf16, such as the T4): autocast, the gradient scaler, the
steps it skips, its state in checkpoints, and the settings refused.

fp16 is meant for CUDA, and `check_devices` refuses it on a CPU; torch runs float16 autocast and
the gradient scaler on the CPU too, so these tests lift that refusal (monkeypatch) and run the
same code the GPU runs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs

import alignlib.trainer as trainer_module
from alignlib import demo
from alignlib.checkpoint import load_checkpoint
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig
from alignlib.trainer import TrainConfig, train
from alignlib.training import MixedPrecision, check_devices

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", demo.read_pairs()[:16])


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    monkeypatch.setattr(trainer_module, "check_devices", lambda **settings: None)


def config(output_dir, dataset, **overrides) -> TrainConfig:
    settings = dict(output_dir=str(output_dir), dataset_name=dataset, max_steps=1, logging_steps=1, save_steps=0,
                    max_length=64, max_prompt_length=32, learning_rate=1e-3, per_device_train_batch_size=8, seed=0,
                    plot=False, disable_tqdm=True, lr_scheduler_type="constant")
    settings.update(overrides)
    return TrainConfig(**settings)


def logged(output_dir) -> list[dict]:
    return read_metrics(output_dir / "metrics.jsonl")


@pytest.mark.parametrize("objective", ["sft", "orpo"])
def test_fp16_runs_the_forward_in_half_precision(objective, model, pairs, tmp_path, fp16_on_cpu):
    """The first step's loss under fp16 autocast is the float32 loss up to float16 round-off, and not
    equal to it (the autocast did run)."""
    extra = {"max_prompt_length": 512} if objective == "sft" else {}
    losses = {}
    for fp16 in (False, True):
        out = tmp_path / f"fp16-{fp16}"
        train(objective, config(out, pairs, fp16=fp16, **extra), ModelConfig(model_name_or_path=model))
        (record,) = [r for r in logged(out) if "loss" in r]
        losses[fp16] = record["loss"]
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=5e-3)


def test_a_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_halved(model, pairs, tmp_path, fp16_on_cpu,
                                                                                 monkeypatch):
    """Starting from a scale of 2**21, the scaled gradients of this model overflow float16 for three
    steps: each is skipped (the weights untouched) and the scale halved, with on_nonfinite='stop'
    not stopping the run; from 2**18 on the steps update. The checkpoint keeps the scaler's state."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**21))
    out = tmp_path / "run"
    train("sft", config(out, pairs, fp16=True, max_steps=6, save_steps=2, on_nonfinite="stop", max_prompt_length=512),
          ModelConfig(model_name_or_path=model))
    records = logged(out)
    skipped = [(r["fp16_skipped_step"], r["loss_scale"]) for r in records if "fp16_skipped_step" in r]
    assert skipped == [(1, 2.0**20), (2, 2.0**19), (3, 2.0**18)]
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 6]
    state = load_checkpoint(out / "checkpoint-2", restore_rng=False)
    assert state["extra_state"]["grad_scaler"]["scale"] == 2.0**19


def test_a_scaler_resumed_from_its_state_continues_at_its_scale():
    saved = torch.amp.GradScaler("cpu", init_scale=2.0**19).state_dict()
    precision = MixedPrecision(torch.device("cpu"), fp16=True)
    assert precision.scale == 2.0**16  # torch's starting scale
    precision.scaler.load_state_dict(saved)
    assert precision.scale == 2.0**19


def test_settings_that_cannot_run_are_refused_in_one_line(monkeypatch):
    with pytest.raises(ValueError, match="bf16 and fp16: choose one"):
        check_devices(bf16=True, fp16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="fp16: fp16 mixed precision runs on a CUDA GPU and this machine has none"):
        check_devices(fp16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="fp16 with fsdp"):
        check_devices(fp16=True, fsdp=True)
    half = [torch.zeros(2, dtype=torch.float16, requires_grad=True)]
    with pytest.raises(ValueError, match="fp16: the trainable weights are float16"):
        MixedPrecision(torch.device("cpu"), fp16=True).check_trainable(half)
    MixedPrecision(torch.device("cpu"), fp16=False).check_trainable(half)  # without fp16, nothing to refuse
