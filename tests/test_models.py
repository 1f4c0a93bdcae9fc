"""alignlib.models: loading (LoRA, QLoRA, reward model), reference strategies, saving, errors.

Every model is a 2-layer Llama with hidden size 32 and a 64-token vocabulary, saved into a
temporary directory with a WordLevel tokenizer, so the whole file runs on CPU in seconds.
"""

import json
import os
import sys

import peft
import pytest
import torch
from helpers.tiny_llama import save_tiny_llama
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    HfArgumentParser,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from alignlib.models import (
    ModelConfig,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    make_reference,
)
from alignlib.saved_models import load_for_generation, save_model
from alignlib.training import make_optimizer

VOCAB = 64


def word_level_tokenizer(with_pad: bool = False, with_eos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "unk_token": "<unk>"}
    if with_eos:
        special["eos_token"] = "</s>"
    if with_pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def save_tiny_model(path, hidden: int = 32, seed: int = 0) -> str:
    return save_tiny_llama(path, hidden=hidden, seed=seed, tokenizer=word_level_tokenizer(), vocab_size=VOCAB,
                           max_position_embeddings=64, pad_token_id=None)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def wide_base_dir(tmp_path_factory):
    """Same architecture, hidden size 48: an adapter for base_dir does not fit it."""
    return save_tiny_model(tmp_path_factory.mktemp("wide"), hidden=48)


def lora_cfg(path, **overrides) -> ModelConfig:
    settings = dict(model_name_or_path=path, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    lora_target_modules=["q_proj", "v_proj"])
    settings.update(overrides)
    return ModelConfig(**settings)


def perturb_adapter(model, seed: int = 1) -> None:
    """LoRA starts as the identity (B = 0): give every adapter weight random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=g))


def input_batch(seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, input_ids, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def device_of(model) -> torch.device:
    """Quantised models go to the GPU when there is one (bitsandbytes quantises there)."""
    return next(model.parameters()).device


def trainable_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


# ----------------------------------------------------------------------------------------------
# ModelConfig
# ----------------------------------------------------------------------------------------------


def test_model_config_parses_from_the_command_line_and_prints_help():
    parser = HfArgumentParser((ModelConfig,))
    (cfg,) = parser.parse_args_into_dataclasses(args=[
        "--model_name_or_path", "m", "--use_peft", "--lora_r", "8", "--lora_target_modules", "all-linear",
        "--load_in_4bit", "--dtype", "bfloat16",
    ])
    assert (cfg.use_peft, cfg.lora_r, cfg.load_in_4bit, cfg.dtype) == (True, 8, True, "bfloat16")
    assert cfg.lora_target_modules == "all-linear"
    assert cfg.bnb_4bit_quant_type == "nf4" and cfg.use_bnb_nested_quant
    help_text = parser.format_help()
    assert "--lora_alpha" in help_text and "LoRA rank" in help_text and "Double quantisation" in help_text

    (listed,) = parser.parse_args_into_dataclasses(args=["--use_peft", "--lora_target_modules", "q_proj", "v_proj"])
    assert listed.lora_target_modules == ["q_proj", "v_proj"]


def test_model_config_from_a_trl_style_dict():
    (cfg,) = HfArgumentParser((ModelConfig,)).parse_dict(
        {"model_name_or_path": "m", "torch_dtype": "float16", "use_peft": True, "lora_target_modules": "q_proj,v_proj"}
    )
    assert cfg.dtype == "float16" and cfg.torch_dtype_value == torch.float16
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True, "use_peft": True}, "exclusive"),
        ({"lora_r": 8}, "use_peft is False"),
        ({"lora_target_modules": ["q_proj"]}, "lora_target_modules"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"use_peft": True, "lora_dropout": 1.0}, "lora_dropout"),
        ({"use_peft": True, "lora_r": 0}, "lora_r"),
        ({"use_peft": True, "lora_target_modules": ["all-linear", "q_proj"]}, "cannot be combined"),
        ({"lora_task_type": "TOKEN_CLS"}, "lora_task_type"),
        ({"bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
    ],
)
def test_model_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(model_name_or_path="m", **settings)


# ----------------------------------------------------------------------------------------------
# Tokenizer and policy
# ----------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_uses_eos(tmp_path, base_dir):
    tokenizer = load_tokenizer(base_dir)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2
    padded = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert load_tokenizer(base_dir, padding_side="left").padding_side == "left"

    word_level_tokenizer(with_pad=True).save_pretrained(tmp_path / "with_pad")
    assert load_tokenizer(tmp_path / "with_pad").pad_token == "<pad>"
    word_level_tokenizer(with_eos=False).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        load_tokenizer(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_lora_policy_trains_only_the_adapters(base_dir):
    model = load_causal_lm(lora_cfg(base_dir))
    assert isinstance(model, peft.PeftModel)
    names = trainable_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    # q_proj: 32 -> 32, v_proj: 32 -> 2 kv heads x 8 = 16; rank 4; 2 layers.
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_all_linear_targets_every_linear_layer_but_the_output_head(base_dir):
    model = load_causal_lm(lora_cfg(base_dir, lora_target_modules=["all-linear"]))
    plain = LlamaForCausalLM.from_pretrained(base_dir)
    linear = {name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linear and len(linear) == 2 * 7


def test_gradient_checkpointing_gives_the_same_gradients(base_dir):
    x = input_batch()

    def grads(checkpointing):
        model = load_causal_lm(lora_cfg(base_dir), gradient_checkpointing=checkpointing)
        perturb_adapter(model)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    model, with_checkpointing = grads(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.config.use_cache is False
    _, without = grads(False)
    assert all(g is not None and g.abs().sum() > 0 for g in with_checkpointing.values())
    for name, grad in without.items():
        torch.testing.assert_close(with_checkpointing[name], grad, rtol=1e-5, atol=1e-7)


def test_qlora_4bit_step_eval_and_adapter_reload(base_dir, tmp_path):
    import bitsandbytes as bnb

    cfg = lora_cfg(base_dir, load_in_4bit=True, lora_target_modules=["all-linear"])
    model = load_causal_lm(cfg, gradient_checkpointing=True)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    x = input_batch().to(device_of(model))

    def lora_grads():
        model.train()
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, "adamw_8bit", lr=1e-2)
    first = lora_grads()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.endswith("lora_B.default.weight"))

    # An eval-mode, no-grad pass (a reference or an evaluation) must not change later gradients
    # (bitsandbytes' CPU repacking would; alignlib turns it off).
    before_eval = lora_grads()
    model.eval()
    policy_logits = logits_of(model, x)
    after_eval = lora_grads()
    assert set(first) == set(after_eval)
    for name in before_eval:
        torch.testing.assert_close(after_eval[name], before_eval[name], rtol=0, atol=0)

    save_model(model, load_tokenizer(base_dir), tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(tmp_path / "adapter"))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map=device_map)
    for module in base.modules():  # the same CPU setting alignlib uses
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, x), policy_logits, rtol=0, atol=1e-6)

    # Merging dequantises the NF4 base: the merged float model computes what the QLoRA model did.
    save_model(model, None, tmp_path / "merged", merge_adapter=True)
    merged, _ = load_for_generation(tmp_path / "merged")
    assert not hasattr(merged.config, "quantization_config") or merged.config.quantization_config is None
    torch.testing.assert_close(logits_of(merged, x.cpu()), policy_logits.cpu(), rtol=1e-5, atol=1e-5)


def test_lora_over_an_8bit_base_trains_and_merges(base_dir, tmp_path):
    import bitsandbytes as bnb

    model = load_causal_lm(lora_cfg(base_dir, load_in_8bit=True))
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    perturb_adapter(model)
    model.train()
    x = input_batch().to(device_of(model))
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    save_model(model, None, tmp_path / "merged", merge_adapter=True)
    merged, _ = load_for_generation(tmp_path / "merged")
    # int8 inference also rounds the activations: agreement to int8 precision
    torch.testing.assert_close(logits_of(merged, x.cpu()), logits_of(model, x).cpu(), rtol=0, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------------------------


def test_reward_model_trains_adapters_and_score_head_and_reads_the_last_real_token(base_dir, tmp_path):
    model = load_reward_model(lora_cfg(base_dir, lora_task_type="SEQ_CLS"))
    names = trainable_names(model)
    assert any("score" in n for n in names) and all("lora_" in n or "score" in n for n in names)
    assert model.config.pad_token_id == 2  # eos, as the tokenizer's pad
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 2, 2]])  # the second row is right-padded
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    scores = logits_of(model, ids, mask)
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores[1], logits_of(model, ids[1:, :2])[0])

    save_model(model, None, tmp_path / "rm")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "rm" / "adapter_model.safetensors")
    assert any("score" in key for key in saved)


def test_a_qlora_reward_model_merges_into_its_dequantised_base(base_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = load_reward_model(lora_cfg(base_dir, lora_task_type="SEQ_CLS", load_in_4bit=True))
    perturb_adapter(model)
    model.eval()
    ids = input_batch(seed=4).to(device_of(model))
    expected = logits_of(model, ids).cpu()
    save_model(model, None, tmp_path / "merged", merge_adapter=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits_of(merged, ids.cpu()), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Reference strategies
# ----------------------------------------------------------------------------------------------


def test_adapter_disabled_reference_is_the_untouched_base(base_dir):
    policy = load_causal_lm(lora_cfg(base_dir, lora_dropout=0.1))
    perturb_adapter(policy)
    policy.train()
    reference = make_reference("adapter_disabled", policy)
    x = input_batch()
    mask = torch.ones_like(x)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    ref_logits = reference(x, mask)
    torch.testing.assert_close(ref_logits, logits_of(base, x, mask), rtol=0, atol=1e-6)
    assert not ref_logits.requires_grad
    # the policy is back in training mode with its adapter active
    assert policy.training and all(m.training for m in policy.modules())
    assert (logits_of(policy.eval(), x, mask) - ref_logits).abs().max() > 1e-3


def test_model_reference_equals_a_separately_loaded_base(base_dir, wide_base_dir):
    cfg = lora_cfg(base_dir)
    policy = load_causal_lm(cfg)
    perturb_adapter(policy)
    reference = make_reference("model", policy, cfg)
    assert reference.model is not policy and not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    x = input_batch(seed=3)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    torch.testing.assert_close(reference(x), logits_of(base, x), rtol=0, atol=0)

    other = make_reference("model", policy, cfg, ref_model_name_or_path=wide_base_dir)
    assert other.model.config.hidden_size == 48


def test_precomputed_reference_is_the_policy_before_training(base_dir):
    policy = load_causal_lm(ModelConfig(model_name_or_path=base_dir))  # full fine-tuning
    reference = make_reference("precomputed", policy)
    assert reference.precompute_only
    ids = input_batch(seed=5, batch=6, length=5)

    def sequence_logps(batch_ids):
        logits = reference(batch_ids, torch.ones_like(batch_ids))
        logps = logits[:, :-1].log_softmax(-1).gather(-1, batch_ids[:, 1:, None]).squeeze(-1)
        return logps.sum(-1)

    stored = torch.cat([sequence_logps(ids[:4]), sequence_logps(ids[4:])])  # as the trainer precomputes: in batches
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    direct = logits_of(base, ids)[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    assert stored.shape == (6,)
    torch.testing.assert_close(stored, direct, rtol=0, atol=1e-5)

    # Once the policy has been stepped, the precomputed reference refuses to run.
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match="before the first optimizer step"):
        reference(ids)


def test_precomputed_reference_of_a_lora_policy_is_the_base(base_dir):
    policy = load_causal_lm(lora_cfg(base_dir))
    perturb_adapter(policy)
    reference = make_reference("precomputed", policy)
    ids = input_batch(seed=6, batch=3)
    stored = torch.cat([reference(ids[:2])[:, -1, :], reference(ids[2:])[:, -1, :]])
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    torch.testing.assert_close(stored, logits_of(base, ids)[:, -1, :], rtol=0, atol=1e-6)


def test_reference_errors(base_dir):
    full = load_causal_lm(ModelConfig(model_name_or_path=base_dir))
    with pytest.raises(ValueError, match="'adapter_disabled' needs a LoRA"):
        make_reference("adapter_disabled", full)
    with pytest.raises(ValueError, match="unknown reference strategy 'frozen'.*adapter_disabled"):
        make_reference("frozen", full)
    with pytest.raises(ValueError, match="needs cfg or ref_model_name_or_path"):
        make_reference("model", full)


# ----------------------------------------------------------------------------------------------
# Saving and loading for generation
# ----------------------------------------------------------------------------------------------


def test_save_adapter_and_merged_round_trips(base_dir, tmp_path):
    policy = load_causal_lm(lora_cfg(base_dir))
    perturb_adapter(policy)
    policy.eval()
    x = input_batch(seed=2)
    expected = logits_of(policy, x)
    tokenizer = load_tokenizer(base_dir)

    save_model(policy, tokenizer, tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == base_dir
    loaded, loaded_tokenizer = load_for_generation(tmp_path / "adapter")
    assert isinstance(loaded, peft.PeftModel) and loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(logits_of(loaded, x), expected, rtol=0, atol=1e-6)

    save_model(policy, tokenizer, tmp_path / "merged", merge_adapter=True)
    files = set(os.listdir(tmp_path / "merged"))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    merged, _ = load_for_generation(tmp_path / "merged")
    assert not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(logits_of(merged, x), expected, rtol=1e-5, atol=1e-5)
    # the training model itself was not merged
    assert isinstance(policy, peft.PeftModel) and any("lora_A" in n for n in trainable_names(policy))
    torch.testing.assert_close(logits_of(policy, x), expected, rtol=0, atol=0)


def test_save_model_is_atomic(base_dir, tmp_path, monkeypatch):
    model = LlamaForCausalLM.from_pretrained(base_dir)
    target = tmp_path / "final"
    save_model(model, None, target)
    first = (target / "model.safetensors").read_bytes()
    torch.manual_seed(9)
    with torch.no_grad():
        model.lm_head.weight.normal_()
    save_model(model, None, target)  # replacing an existing directory
    assert (target / "model.safetensors").read_bytes() != first
    second = (target / "model.safetensors").read_bytes()

    def half_written(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", half_written)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, None, target)
    assert (target / "model.safetensors").read_bytes() == second
    assert sorted(os.listdir(tmp_path)) == ["final"]  # no temporary directory left behind


def test_load_for_generation_rejects_an_adapter_for_another_base(base_dir, wide_base_dir, tmp_path):
    policy = load_causal_lm(lora_cfg(base_dir))
    save_model(policy, None, tmp_path / "adapter")
    with pytest.raises(ValueError, match="different base model.*size mismatch"):
        load_for_generation(tmp_path / "adapter", base_model_name_or_path=wide_base_dir)

    config_path = tmp_path / "adapter" / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    config_path.write_text(json.dumps(adapter_config))
    with pytest.raises(FileNotFoundError, match="base model of the adapter.*does not exist"):
        load_for_generation(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_generation(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_load_errors_are_one_line(base_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model path .*missing does not exist"):
        load_causal_lm(ModelConfig(model_name_or_path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no model path given"):
        load_causal_lm(ModelConfig())
    # looks like a Hub id, is not in the cache: fails at once (nothing is downloaded)
    with pytest.raises(FileNotFoundError, match="does not exist.*huggingface-cli download no-such-org/no-such-model"):
        load_causal_lm(ModelConfig(model_name_or_path="no-such-org/no-such-model"))
    policy = load_causal_lm(lora_cfg(base_dir))
    save_model(policy, None, tmp_path / "adapter")
    # an adapter as the starting point: continuing it trains LoRA (alignlib.models' start_adapter)
    with pytest.raises(ValueError, match="is a LoRA adapter: --start_adapter continue trains it, which needs "
                                         "--use_peft true"):
        load_causal_lm(ModelConfig(model_name_or_path=str(tmp_path / "adapter")))
    with pytest.raises(ValueError, match="is a LoRA adapter: a reward model starts from a full model"):
        load_reward_model(ModelConfig(model_name_or_path=str(tmp_path / "adapter")))
    with pytest.raises(ValueError, match="cannot be trained directly"):
        load_causal_lm(ModelConfig(model_name_or_path=base_dir, load_in_4bit=True))
    with pytest.raises(ValueError, match="LoRA could not be applied.*not_a_module"):
        load_causal_lm(lora_cfg(base_dir, lora_target_modules=["not_a_module"]))
    with pytest.raises(ValueError, match="merge_adapter=True needs a peft model"):
        save_model(policy.get_base_model(), None, tmp_path / "x", merge_adapter=True)
    with pytest.raises(ValueError, match="num_labels"):
        load_reward_model(ModelConfig(model_name_or_path=base_dir), num_labels=0)

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails
    with pytest.raises(ValueError, match="load_in_4bit needs bitsandbytes"):
        load_causal_lm(lora_cfg(base_dir, load_in_4bit=True))
