"""The kernels switched on in the trainer change nothing but speed and memory.

One DPO step on a tiny LoRA Llama, with use_kernels off (plain torch: logits, log_softmax,
peft's LoRA forward) and on (log-probs fused from the hidden states through the Triton
kernels, peft's LoRA layers routed through the Triton LoRA matmul). Without a GPU the Triton
kernels run through the interpreter (tests/conftest.py).
"""

import json
import os

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama

import alignlib.fused_lora as fused_module
from alignlib import demo
from alignlib.data import (
    PreferenceCollator,
    load_preference_dataset,
    pad_token_id_for,
    tokenize_preference_dataset,
)
from alignlib.models import ModelConfig, load_causal_lm, make_reference
from alignlib.objectives import pairwise_terms
from alignlib.trainer import TrainConfig, train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Llama over the demo's tokenizer, and 8 demo pairs."""
    root = tmp_path_factory.mktemp("wiring")
    tokenizer = demo.load_tokenizer()
    save_tiny_llama(root / "model", tokenizer=tokenizer, vocab_size=len(tokenizer), intermediate_size=48,
                    max_position_embeddings=64)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in demo.read_pairs()[:8]))
    return root, tokenizer, data


def model_config(root):
    return ModelConfig(model_name_or_path=str(root / "model"), use_peft=True, lora_r=4, lora_alpha=8,
                       lora_dropout=0.0, lora_target_modules=["all-linear"])


def one_step_gradients(root, tokenizer, data, use_kernels, monkeypatch):
    monkeypatch.setenv("ALIGNLIB_LOGPROBS_BACKEND", "triton" if use_kernels else "torch")
    torch.manual_seed(1)  # lora_A's initialisation draws from the global generator
    model = load_causal_lm(model_config(root))
    for name, param in model.named_parameters():  # lora_B starts at zero; make the LoRA branch matter
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    cfg = TrainConfig(use_kernels=use_kernels, beta=0.1, max_length=64)
    pairs, _ = tokenize_preference_dataset(load_preference_dataset(str(data)), tokenizer, max_length=64)
    batch = PreferenceCollator(pad_token_id_for(tokenizer))([pairs[i] for i in range(len(pairs))])
    reference = make_reference("adapter_disabled", model)
    if use_kernels:
        assert fused_module.enable_fused_lora(model) == 14  # 7 linear layers x 2 blocks
    terms = pairwise_terms("dpo", cfg, model, batch, reference)
    loss = terms.loss_sum / terms.examples
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), terms.metric_sums, grads


def test_one_step_with_and_without_kernels_gives_the_same_loss_and_gradients(tiny_setup, monkeypatch):
    root, tokenizer, data = tiny_setup
    calls = {"lora": 0}
    real_kernel = fused_module.lora_linear

    def counting_kernel(*args, **kwargs):
        calls["lora"] += 1
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(fused_module, "lora_linear", counting_kernel)
    plain_loss, plain_metrics, plain_grads = one_step_gradients(root, tokenizer, data, False, monkeypatch)
    assert calls["lora"] == 0
    fused_loss, fused_metrics, fused_grads = one_step_gradients(root, tokenizer, data, True, monkeypatch)
    assert calls["lora"] >= 14  # the policy forward went through the Triton LoRA matmul
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fused_metrics.keys() == plain_metrics.keys()
    for key in plain_metrics:
        assert fused_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4, abs=1e-4), key
    assert fused_grads.keys() == plain_grads.keys() and len(plain_grads) == 28
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_with_use_kernels_logs_the_same_first_step(tiny_setup, tmp_path, monkeypatch):
    root, _, data = tiny_setup
    logged = {}
    for use_kernels in (False, True):
        monkeypatch.setenv("ALIGNLIB_LOGPROBS_BACKEND", "triton" if use_kernels else "torch")
        out = tmp_path / f"kernels-{use_kernels}"
        cfg = TrainConfig(output_dir=str(out), dataset_name=str(data), max_steps=1, per_device_train_batch_size=4,
                          learning_rate=1e-3, logging_steps=1, save_steps=0, use_kernels=use_kernels, plot=False,
                          disable_tqdm=True, max_length=64, max_prompt_length=32, seed=3)
        train("dpo", cfg, model_config(root))
        logged[use_kernels] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
        assert logged[True][key] == pytest.approx(logged[False][key], rel=1e-4, abs=1e-6), key
