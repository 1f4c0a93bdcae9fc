"""alignlib's SFT against TRL 1.16's SFTTrainer: the same rows token for token, one step's loss and
gradients, packed rows, and the same learning curve.

The same rows go two ways. TRL: an `SFTTrainer` built with its config prepares the dataset
itself (EOS, chat template, tokenization, label masks, truncation, packing), its collator makes
the batches, `transformers.Trainer._get_num_items_in_batch` counts the step's trained tokens and
`trainer.compute_loss(model, batch, num_items_in_batch=...)` gives each micro-batch's loss.
alignlib: `load_sft_dataset` + `tokenize_sft_dataset` (+ `pack_sequences`) + `SequenceCollator`
+ `sft_terms`, the step's loss built as `alignlib.trainer.train_step` builds it (the micro-batch's
NLL sum over the whole step's trained tokens).

Documented difference, tested as such: TRL's `assistant_only_loss` needs a chat template with
`{% generation %}` markers (or one TRL ships a marked copy of); alignlib locates the assistant
turns by rendering the conversation up to each, so the plain template gives the mask TRL gets
from the marked one. alignlib's default is assistant_only_loss=True, TRL's False.

TRL's log-probs come from its fused LM head, which computes in float32 whatever the model's dtype
(trl/kernels/chunked_logprob.py): the models are float64 and compared at float32 round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from helpers.tiny_llama import tiny_llama
from helpers.tiny_tokenizer import tiny_tokenizer
from trl import SFTConfig, SFTTrainer

from alignlib.data import SequenceCollator, load_sft_dataset, pack_sequences, tokenize_sft_dataset
from alignlib.objectives import sft_terms
from alignlib.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
FLOAT32_TOL = 2e-5  # relative, of the largest value compared

SKY = [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "The sky is blue."}]
SEA = [{"role": "user", "content": "And the sea?"}, {"role": "assistant", "content": "The sea is green."}]
SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}]
TEXT_ROWS = [{"text": "The sky is blue."}, {"text": "Hello world! What color is the sky?</s>"},
             {"text": "def add(a, b):\n    return a + b"}]
PROMPT_COMPLETION_ROWS = [
    {"prompt": "What color is the sky?", "completion": " The sky is blue."},
    {"prompt": "Question: how do I sort a list in Python?", "completion": " Answer: use sorted(items)."},
    {"prompt": "def add(a, b):", "completion": "\n    return a + b"},
]
MESSAGES_ROWS = [{"messages": SKY}, {"messages": SYSTEM + SKY + SEA}, {"messages": SEA}]
CONVERSATIONAL_PROMPT_COMPLETION_ROWS = [
    {"prompt": SKY[:1], "completion": SKY[1:]},
    {"prompt": SYSTEM + SKY + SEA[:1], "completion": SEA[1:]},
]
# The tiny tokenizer's template with TRL's {% generation %} markers around each assistant turn (its
# content, EOS and newline): what TRL needs for assistant_only_loss.
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}\n{% endgeneration %}{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# (id, rows, TRL's SFTConfig options, alignlib's load_sft_dataset options, TRL's chat template)
FORMAT_CASES = [
    ("text", TEXT_ROWS, {}, {}, None),
    ("prompt-completion", PROMPT_COMPLETION_ROWS, {}, {}, None),
    ("prompt-completion, whole text", PROMPT_COMPLETION_ROWS, {"completion_only_loss": False},
     {"completion_only_loss": False}, None),
    ("messages, whole conversation", MESSAGES_ROWS, {}, {"assistant_only_loss": False}, None),
    ("messages, assistant turns", MESSAGES_ROWS, {"assistant_only_loss": True}, {}, MARKED_TEMPLATE),
    ("conversational prompt-completion", CONVERSATIONAL_PROMPT_COMPLETION_ROWS, {}, {}, None),
    ("truncated to max_length 12", PROMPT_COMPLETION_ROWS, {"max_length": 12}, {}, None),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> torch.nn.Module:
    return tiny_llama(hidden=16, dtype=DTYPE, vocab_size=len(tokenizer), num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def trl_trainer(model, tokenizer, rows: list[dict], output_dir, chat_template: str | None = None,
                **options) -> SFTTrainer:
    processing_class = copy.deepcopy(tokenizer)
    if chat_template is not None:
        processing_class.chat_template = chat_template
    settings = dict(output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_length=128,
                    per_device_train_batch_size=len(rows), shuffle_dataset=False)
    args = SFTConfig(**{**settings, **options})
    return SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=processing_class)


def alignlib_rows(tokenizer, rows: list[dict], max_length: int = 128, **options) -> Dataset:
    tokenized, _ = tokenize_sft_dataset(load_sft_dataset(Dataset.from_list(rows), tokenizer, **options), tokenizer,
                                        max_length=max_length)
    return tokenized


@pytest.mark.parametrize("case", FORMAT_CASES, ids=[case[0] for case in FORMAT_CASES])
def test_sft_tokens_and_labels_match_trl(case, model, tokenizer, tmp_path):
    _, rows, trl_options, options, template = case
    theirs = trl_trainer(model, tokenizer, rows, tmp_path, template, **trl_options).train_dataset
    ours = alignlib_rows(tokenizer, rows, max_length=trl_options.get("max_length", 128), **options)
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        assert ours[i]["input_ids"] == theirs[i]["input_ids"], f"row {i + 1}"
        assert ours[i]["labels"] == theirs[i]["labels"], f"row {i + 1}"
    trained = sum(label != -100 for row in ours for label in row["labels"])
    assert 0 < trained < sum(len(row["labels"]) for row in ours) or case[0] in (
        "text", "prompt-completion, whole text", "messages, whole conversation")


def test_alignlib_default_trains_on_assistant_turns_where_trl_default_trains_on_everything(model, tokenizer, tmp_path):
    theirs = trl_trainer(model, tokenizer, MESSAGES_ROWS, tmp_path).train_dataset
    ours = alignlib_rows(tokenizer, MESSAGES_ROWS)
    assert [row["input_ids"] for row in ours] == [row["input_ids"] for row in theirs]
    assert all(row["labels"] == row["input_ids"] for row in theirs)
    assert all(-100 in row["labels"] for row in ours)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    error = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert scale > 0, f"{what}: TRL's value is zero, nothing compared"
    assert error <= FLOAT32_TOL * scale, f"{what}: |diff| {error:.3g}, largest {scale:.3g}"


def _assert_grads_close(ours: dict, theirs: dict) -> None:
    scale = max(g.abs().max().item() for g in theirs.values())
    worst = max(((ours[k] - theirs[k]).abs().max().item(), k) for k in theirs)
    assert scale > 0 and worst[0] <= FLOAT32_TOL * scale, f"gradient of {worst[1]}: |diff| {worst[0]:.3g}"


def trl_step(trainer: SFTTrainer, batches: list[dict]) -> tuple[torch.Tensor, dict]:
    """One optimizer step's loss and gradient, TRL's way: each micro-batch's loss over the step's token count."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    total = torch.zeros((), dtype=DTYPE)
    for batch in batches:
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        loss.backward()
        total += loss.detach()
    return total, _grads(model)


def alignlib_step(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.Tensor, dict]:
    """The same step, alignlib's way (alignlib.trainer.train_step for sft)."""
    from alignlib.objectives import PolicyOutputs, nll_tokens

    model.train()
    model.zero_grad(set_to_none=True)
    policy = PolicyOutputs(model, "sft", use_kernels=False)
    step_tokens = sum(nll_tokens("sft", batch) for batch in batches)
    total = torch.zeros((), dtype=DTYPE)
    for batch in batches:
        terms = sft_terms(policy, batch)
        loss = terms.nll_sum / step_tokens
        loss.backward()
        total += loss.detach()
    return total, _grads(model)


def test_sft_step_of_two_micro_batches_matches_trl(model, tokenizer, tmp_path):
    """Gradient accumulation: two micro-batches of different token counts, each divided by the step's count."""
    rows = PROMPT_COMPLETION_ROWS + [{"prompt": "Hello world!", "completion": " Hello!"}]
    trainer = trl_trainer(model, tokenizer, rows, tmp_path)
    theirs_rows = [trainer.train_dataset[i] for i in range(len(rows))]
    trl_batches = [trainer.data_collator(theirs_rows[:1]), trainer.data_collator(theirs_rows[1:])]
    ours_rows = list(alignlib_rows(tokenizer, rows))
    collator = SequenceCollator(tokenizer.pad_token_id)
    our_batches = [collator(ours_rows[:1]), collator(ours_rows[1:])]
    for ours, theirs in zip(our_batches, trl_batches, strict=True):
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert ours["labels"].tolist() == theirs["labels"].tolist()

    trl_loss, trl_grads = trl_step(trainer, trl_batches)
    our_loss, our_grads = alignlib_step(copy.deepcopy(model), our_batches)
    _assert_close(our_loss, trl_loss, "step loss")
    _assert_grads_close(our_grads, trl_grads)


def test_packed_step_matches_trl_packed_and_unpacked(model, tokenizer, tmp_path):
    """Packed rows (TRL: best-fit decreasing, one padding-free row; alignlib: the same bins, padded rows
    with restarting position ids) give the loss and gradient of the sequences unpacked."""
    rows = PROMPT_COMPLETION_ROWS + [{"prompt": "Hello world!", "completion": " Hello!"}] + TEXT_ROWS[:2]
    rows = [{"text": row["text"]} if "text" in row else {"text": row["prompt"] + row["completion"]} for row in rows]
    trainer = trl_trainer(model, tokenizer, rows, tmp_path, packing=True, max_length=32)
    packed_theirs = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    trl_loss, trl_grads = trl_step(trainer, [trainer.data_collator(packed_theirs)])

    unpacked = alignlib_rows(tokenizer, rows, max_length=32)
    packed = pack_sequences(unpacked, 32)
    assert len(packed) < len(unpacked)
    assert sorted(map(sorted, packed["seq_lengths"])) == sorted(map(sorted, trainer.train_dataset["seq_lengths"]))
    collator = SequenceCollator(tokenizer.pad_token_id)
    packed_loss, packed_grads = alignlib_step(copy.deepcopy(model), [collator(list(packed))])
    unpacked_loss, unpacked_grads = alignlib_step(copy.deepcopy(model), [collator(list(unpacked))])

    _assert_close(packed_loss, trl_loss, "packed loss against TRL's")
    _assert_grads_close(packed_grads, trl_grads)
    _assert_close(packed_loss, unpacked_loss, "packed loss against unpacked")
    _assert_grads_close(packed_grads, unpacked_grads)


def test_training_curve_matches_trl(model, tokenizer, tmp_path):
    """Fifteen full-batch steps of AdamW from the same weights: TRL's SFTTrainer.train() and alignlib's
    trainer log the same losses step by step (full batches, so the data order cannot differ)."""
    rows = PROMPT_COMPLETION_ROWS + [{"prompt": "Hello world!", "completion": " Hello!"},
                                     {"prompt": "Where is the sun?", "completion": " It is in the sky."}]
    steps, lr = 15, 2e-2
    trainer = trl_trainer(model, tokenizer, rows, tmp_path / "trl", max_steps=steps, learning_rate=lr,
                          lr_scheduler_type="constant", logging_steps=1, max_grad_norm=1.0, seed=0,
                          save_strategy="no", disable_tqdm=True)
    trainer.train()
    trl_losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "rows.jsonl"
    Dataset.from_list(rows).to_json(str(data))
    from alignlib.metrics import read_metrics
    from alignlib.models import ModelConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "ours"), dataset_name=str(data), max_steps=steps,
                      learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, save_steps=0,
                      per_device_train_batch_size=len(rows), max_length=128, max_grad_norm=1.0, plot=False,
                      disable_tqdm=True)
    train("sft", cfg, ModelConfig(model_name_or_path=str(model_dir), dtype="auto"))
    ours = [record["loss"] for record in read_metrics(tmp_path / "ours" / "metrics.jsonl") if "loss" in record]

    assert len(ours) == len(trl_losses) == steps
    assert trl_losses[-1] < 0.6 * trl_losses[0]  # it learned
    for step, (a, b) in enumerate(zip(ours, trl_losses, strict=True), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: alignlib {a}, TRL {b}"
