"""Chat and generation (issue 14, item 4): `--chat_template chatml` on a tokenizer without one (new
tokens, resized embeddings whose new rows train and are saved with the adapter), and `alignlib generate`
with the chat template, a system message, stop strings and tokens, top_k and streaming.

The expected ChatML text is written out here by hand, and the oracle for "the rows that trained" is
the effective embedding and lm_head read through the modules' own forward.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers.tiny_llama import save_tiny_llama, write_pairs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignlib import demo
from alignlib.chat import setup_chat_format
from alignlib.cli import Generator, main
from alignlib.models import ModelConfig, load_causal_lm, load_model_tokenizer, make_reference
from alignlib.saved_models import load_for_generation, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO_VOCAB = 105  # the demo tokenizer's ids; ChatML adds <|im_start|> 105 and <|im_end|> 106
CHATML_PROMPT = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhow do i fix a boat ?<|im_end|>\n"
                 "<|im_start|>assistant\n")


def lora_cfg(path, **overrides) -> ModelConfig:
    settings = dict(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    lora_target_modules=["q_proj", "v_proj"], chat_template="chatml")
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("chat") / "base")


def effective_rows(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding, lm_head weight) as the model computes with them, read through the modules' forward."""
    with torch.no_grad():
        embedding = model.get_input_embeddings()(torch.arange(model.get_input_embeddings().weight.shape[0])).clone()
        head = model.get_output_embeddings()
        hidden = head.in_features if hasattr(head, "in_features") else embedding.shape[1]
        return embedding, head(torch.eye(hidden)).T.clone()


# ----------------------------------------------------------------------------------------------
# The format on the tokenizer
# ----------------------------------------------------------------------------------------------


def test_chatml_on_a_tokenizer_without_a_template():
    tokenizer = demo.load_tokenizer()
    assert not tokenizer.chat_template and len(tokenizer) == DEMO_VOCAB
    assert setup_chat_format(tokenizer, "chatml") == [DEMO_VOCAB, DEMO_VOCAB + 1]
    assert len(tokenizer) == DEMO_VOCAB + 2 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<pad>"  # a real pad token is kept
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how do i fix a boat ?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == CHATML_PROMPT
    ids = tokenizer(CHATML_PROMPT, add_special_tokens=False)["input_ids"]
    assert ids.count(DEMO_VOCAB) == 3 and ids.count(DEMO_VOCAB + 1) == 2  # never split into pieces

    with pytest.raises(ValueError, match=r"^--chat_template chatml: the tokenizer already has a chat template; add "
                                         r"--force_chat_template true"):
        setup_chat_format(tokenizer, "chatml")
    assert setup_chat_format(tokenizer, "chatml", force=True) == [DEMO_VOCAB, DEMO_VOCAB + 1]
    assert len(tokenizer) == DEMO_VOCAB + 2  # nothing added twice
    with pytest.raises(ValueError, match="--chat_template 'zephyr' is not a known chat format; known: chatml"):
        setup_chat_format(demo.load_tokenizer(), "zephyr")
    with pytest.raises(ValueError, match="chat_template 'zephyr' is not a known chat format"):
        ModelConfig(model_name_or_path="m", chat_template="zephyr")
    with pytest.raises(ValueError, match="force_chat_template is given without chat_template"):
        ModelConfig(model_name_or_path="m", force_chat_template=True)


# ----------------------------------------------------------------------------------------------
# The model: resized, the new rows trained, saved and reloaded
# ----------------------------------------------------------------------------------------------


def test_lora_trains_exactly_the_new_token_rows_and_the_adapter_reloads_with_its_tokenizer(base, tmp_path):
    cfg = lora_cfg(base)
    policy = load_causal_lm(cfg)
    tokenizer = load_model_tokenizer(cfg)
    original = AutoModelForCausalLM.from_pretrained(base)
    old_embedding, old_head = original.get_input_embeddings().weight, original.get_output_embeddings().weight
    embedding, head = effective_rows(policy)
    assert embedding.shape[0] == head.shape[0] == DEMO_VOCAB + 2
    torch.testing.assert_close(embedding[:DEMO_VOCAB], old_embedding, rtol=0, atol=0)
    for rows, old in ((embedding, old_embedding), (head, old_head)):  # the new rows start at the mean row
        torch.testing.assert_close(rows[DEMO_VOCAB:], old.mean(0).expand(2, -1), rtol=1e-6, atol=1e-6)

    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert all("lora_" in name or "trainable_tokens" in name for name in trainable)
    assert sum("trainable_tokens" in name for name in trainable) == 2  # embedding and the (untied) lm_head
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([tokenizer(CHATML_PROMPT + "fix it<|im_end|>")["input_ids"]])
    policy.train()
    policy(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after_embedding, after_head = effective_rows(policy)
    for before, after in ((embedding, after_embedding), (head, after_head)):
        assert torch.equal(after[:DEMO_VOCAB], before[:DEMO_VOCAB])  # the old rows are untouched
        assert (after[DEMO_VOCAB:] - before[DEMO_VOCAB:]).abs().min() > 0  # each new row moved

    save_model(policy, tokenizer, tmp_path / "final")
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert not any(key.endswith(("embed_tokens.weight", "lm_head.weight")) for key in saved)  # no full matrices
    reloaded, reloaded_tokenizer = load_for_generation(tmp_path / "final")
    assert reloaded_tokenizer.chat_template and len(reloaded_tokenizer) == DEMO_VOCAB + 2
    assert reloaded_tokenizer.eos_token == "<|im_end|>"
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_use_kernels_sees_the_trained_token_rows(base):
    """The fused path reads the lm_head's .weight (peft's wrapper gives it with the trained rows in place)."""
    from alignlib.objectives import response_logps

    policy = load_causal_lm(lora_cfg(base))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "trainable_tokens" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    ids = torch.tensor([[1, DEMO_VOCAB, 20, 30, DEMO_VOCAB + 1, 40, DEMO_VOCAB + 1]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        fused, _ = response_logps(policy, batch, use_kernels=True)
        plain, _ = response_logps(policy, batch, use_kernels=False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_full_fine_tuning_resizes_and_saves_the_whole_model(base, tmp_path):
    cfg = ModelConfig(model_name_or_path=base, chat_template="chatml")
    model = load_causal_lm(cfg)
    assert all(p.requires_grad for p in model.parameters())
    assert model.get_input_embeddings().num_embeddings == DEMO_VOCAB + 2
    save_model(model, load_model_tokenizer(cfg), tmp_path / "full")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full").config.vocab_size == DEMO_VOCAB + 2


def test_a_separate_reference_gets_the_same_new_rows(base):
    cfg = lora_cfg(base)
    policy = load_causal_lm(cfg)
    ids = torch.tensor([[1, DEMO_VOCAB, 20, 30, DEMO_VOCAB + 1, 40]])
    separate = make_reference("model", policy, cfg)
    torch.testing.assert_close(separate(ids), make_reference("adapter_disabled", policy)(ids), rtol=0, atol=1e-6)


def test_continuing_an_adapter_cannot_take_new_tokens(base, tmp_path):
    save_model(load_causal_lm(lora_cfg(base, chat_template=None)), None, tmp_path / "sft")
    with pytest.raises(ValueError, match=r"--chat_template chatml with --model .*sft, an adapter that training "
                                         r"continues: .*use --start_adapter merge"):
        load_causal_lm(lora_cfg(tmp_path / "sft"))


# ----------------------------------------------------------------------------------------------
# ORPO with ChatML on a base tokenizer, then generate with the template
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_run(base, tmp_path_factory) -> Path:
    """ORPO, LoRA, --chat_template chatml, on conversational pairs: the final adapter and its tokenizer."""
    root = tmp_path_factory.mktemp("orpo")
    rows = [{"chosen": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "user", "content": row["prompt"]},
                          {"role": "assistant", "content": row["rejected"]}]} for row in demo.read_pairs()[:12]]
    pairs = write_pairs(root / "conversations.jsonl", rows)
    assert main(["train", "orpo", "--model", base, "--dataset", pairs, "--output_dir", str(root / "run"),
                 "--chat_template", "chatml", "--use_peft", "true", "--lora_r", "4", "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_length", "64",
                 "--max_prompt_length", "40", "--save_steps", "1", "--disable_tqdm", "true", "--plot", "false"]) == 0
    return root / "run"


def test_the_chat_run_trains_the_new_rows_and_its_checkpoint_and_final_load(chat_run):
    model, tokenizer = load_for_generation(chat_run / "final")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    embedding, head = effective_rows(model)
    assert embedding.shape[0] == DEMO_VOCAB + 2
    mean_row = embedding[:DEMO_VOCAB].mean(0)
    assert (embedding[DEMO_VOCAB:] - mean_row).abs().max() > 0  # trained away from their initial mean
    checkpoint, checkpoint_tokenizer = load_for_generation(chat_run / "checkpoint-1")
    assert checkpoint_tokenizer.chat_template and checkpoint.get_input_embeddings().weight.shape[0] == DEMO_VOCAB + 2
    assert json.loads((chat_run / "config.json").read_text())["model"]["chat_template"] == "chatml"


def test_generate_applies_the_template_with_a_system_message(chat_run):
    generator = Generator(str(chat_run / "final"))
    expected = generator.tokenizer(CHATML_PROMPT)["input_ids"]  # tokenized as the training data: with its BOS
    assert generator.prompt_ids("how do i fix a boat ?", system="be brief")[0].tolist() == expected
    raw = generator.prompt_ids("how do i fix a boat ?", raw=True)[0].tolist()
    assert raw == generator.tokenizer("how do i fix a boat ?")["input_ids"]
    assert DEMO_VOCAB + 1 in generator.eos_ids()  # <|im_end|> ends an answer


def test_plain_prompts_on_a_tokenizer_without_a_template_are_unchanged(base):
    generator = Generator(base)
    tokenizer = demo.load_tokenizer()
    assert generator.prompt_ids("how do i fix a boat ?")[0].tolist() == tokenizer("how do i fix a boat ?")["input_ids"]
    assert generator.eos_ids() == [tokenizer.eos_token_id]


def test_stops_top_k_and_eos_ids_reach_generate_and_the_answer_is_cut(chat_run, monkeypatch):
    generator = Generator(str(chat_run / "final"))
    assert generator.stops(("<|im_end|>", "a boat", "fix")) == ([DEMO_VOCAB + 1, demo.load_tokenizer().convert_tokens_to_ids("fix")],
                                                                 ["a boat"])
    seen = {}
    answer = generator.tokenizer("get the right tools , then fix the boat carefully .",
                                  add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, **kwargs):
        seen.update(kwargs)
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)

    monkeypatch.setattr(generator.model, "generate", fake_generate)
    text = generator("how do i fix a boat ?", temperature=0.7, top_k=3, stop=("the boat", "<|eot_id|>"))
    assert text == "get the right tools , then fix"
    assert seen["top_k"] == 3 and seen["do_sample"] and seen["temperature"] == 0.7
    criteria = seen["stopping_criteria"]  # "the boat" and "<|eot_id|>" (not one token here) are stop texts
    prompt_length = generator.prompt_ids("how do i fix a boat ?").shape[1]
    running = generator.tokenizer("x " * prompt_length + "get the right tools , then fix the", add_special_tokens=False)
    done = generator.tokenizer("x " * prompt_length + "get the right tools , then fix the boat", add_special_tokens=False)
    assert not criteria(torch.tensor([running["input_ids"]]), None).any()
    assert criteria(torch.tensor([done["input_ids"]]), None).all()
    assert {2, DEMO_VOCAB + 1} <= set(seen["eos_token_id"])


def test_streaming_prints_the_same_answer_as_it_comes_and_stops_at_a_stop_text(chat_run, capfd):
    model = str(chat_run / "final")
    prompt = ["--prompt", "how do i fix a boat ?", "--max_new_tokens", "6"]
    capfd.readouterr()
    assert main(["generate", "--model", model, *prompt]) == 0
    whole = capfd.readouterr().out
    assert main(["generate", "--model", model, *prompt, "--stream"]) == 0
    assert capfd.readouterr().out.split() == whole.split()
    words = whole.split()[len("how do i fix a boat ?".split()):]
    assert len(words) >= 3, whole
    stop = words[2]
    cut_at = words.index(stop)
    for stream in ([], ["--stream"]):
        assert main(["generate", "--model", model, *prompt, "--stop", stop, *stream]) == 0
        assert capfd.readouterr().out.split() == "how do i fix a boat ?".split() + words[:cut_at], stream


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the flag and the value, a non-zero exit, nothing written
# ----------------------------------------------------------------------------------------------


def one_error_line(capfd, args: list[str], status: int = 1) -> str:
    capfd.readouterr()
    try:
        returned = main(args)
    except SystemExit as exit_:  # the flag parser's own errors exit
        returned = exit_.code
    assert returned == status
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_generate_refuses_bad_settings_in_one_line(base, capfd):
    cases = {
        "--system without a template": (["--system", "be brief"], r"--system 'be brief' needs the chat template, and "
                                                                  r"the tokenizer of .* has none"),
        "negative top_k": (["--top_k", "-1"], r"--top_k must be >= 0 \(0: no limit\), got -1"),
        "top_k when greedy": (["--top_k", "5"], r"--top_k 5 acts only when sampling"),
        "an empty stop": (["--stop", ""], r"--stop '' is empty"),
    }
    for name, (flags, message) in cases.items():
        line = one_error_line(capfd, ["generate", "--model", base, "--prompt", "how do i fix a boat ?", *flags])
        assert re.match(rf"alignlib: error: {message}", line), (name, line)


def test_train_refuses_a_chat_template_on_a_tokenizer_that_has_one_and_writes_nothing(chat_run, base, tmp_path,
                                                                                      capfd):
    templated = tmp_path / "templated"  # a full model whose tokenizer has a chat template
    save_tiny_llama(templated, tokenizer=load_for_generation(chat_run / "final")[1], vocab_size=DEMO_VOCAB + 2)
    pairs = write_pairs(tmp_path / "pairs.jsonl", demo.read_pairs()[:8])
    output_dir = tmp_path / "out"
    common = ["--dataset", pairs, "--output_dir", str(output_dir), "--max_steps", "1", "--disable_tqdm", "true"]
    line = one_error_line(capfd, ["train", "orpo", "--model", str(templated), "--chat_template", "chatml", *common])
    assert re.match(r"alignlib: error: --chat_template chatml: the tokenizer of .*templated already has a chat "
                    r"template; add --force_chat_template true", line), line
    line = one_error_line(capfd, ["train", "orpo", "--model", base, "--chat_template", "zephyr", *common], status=2)
    assert "--chat_template" in line and "'zephyr'" in line, line
    line = one_error_line(capfd, ["train", "orpo", "--model", base, "--force_chat_template", "true", *common])
    assert "force_chat_template is given without chat_template" in line, line
    assert not output_dir.exists()
