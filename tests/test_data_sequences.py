"""SFT data, as worked examples: rows -> text and trained spans -> tokens and labels -> packed rows -> batches.

The tokenizer is the tests' tiny byte-level BPE (helpers.tiny_tokenizer): BOS <s> (id 1) in front
of every encoded text, EOS </s> (id 2), and a Zephyr-like chat template ending each turn with
"</s>\\n". Labels are -100 wherever the loss does not look.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers.tiny_tokenizer import tiny_tokenizer

from alignlib.data import (
    SequenceCollator,
    best_fit_decreasing,
    load_sft_dataset,
    pack_sequences,
    tokenize_sft_dataset,
)

IGNORE = -100
SKY = [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "The sky is blue."}]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def normalised(tokenizer, rows, **options) -> list[dict]:
    return list(load_sft_dataset(Dataset.from_list(rows), tokenizer, **options))


def tokenized(tokenizer, rows, max_length=128, **options):
    return tokenize_sft_dataset(load_sft_dataset(Dataset.from_list(rows), tokenizer, **options), tokenizer,
                                max_length=max_length)


def trained_text(tokenizer, row: dict) -> str:
    """The text of the tokens the loss covers."""
    return tokenizer.decode([label for label in row["labels"] if label != IGNORE])


# ------------------------------------------------------------------ rows -> text and spans


def test_text_rows_are_trained_whole_and_end_with_one_eos(tokenizer):
    rows = normalised(tokenizer, [{"text": "The sky is blue."}, {"text": "Hello world!</s>"}])
    assert rows[0] == {"text": "The sky is blue.</s>", "spans": [[0, 20]], "chat": False}
    assert rows[1]["text"] == "Hello world!</s>"  # already ended with EOS: not doubled


def test_prompt_completion_trains_the_completion(tokenizer):
    (row,) = normalised(tokenizer, [{"prompt": "What color is the sky?", "completion": " Blue."}])
    assert row["text"] == "What color is the sky? Blue.</s>"
    assert row["text"][slice(*row["spans"][0])] == " Blue.</s>"
    (whole,) = normalised(tokenizer, [{"prompt": "What color is the sky?", "completion": " Blue."}],
                          completion_only_loss=False)
    assert whole["spans"] == [[0, len(whole["text"])]]


def test_conversation_trains_each_assistant_turn_with_its_end_of_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *SKY, {"role": "user", "content": "And the sea?"},
                {"role": "assistant", "content": "Green."}]
    (row,) = normalised(tokenizer, [{"messages": messages}])
    assert row["chat"] is True
    assert [row["text"][start:end] for start, end in row["spans"]] == ["The sky is blue.</s>\n", "Green.</s>\n"]
    (whole,) = normalised(tokenizer, [{"messages": messages}], assistant_only_loss=False)
    assert whole["spans"] == [[0, len(whole["text"])]]


def test_sharegpt_conversations_are_read_as_messages(tokenizer):
    sharegpt = [{"from": "human", "value": "What color is the sky?"}, {"from": "gpt", "value": "The sky is blue."}]
    assert normalised(tokenizer, [{"conversations": sharegpt}]) == normalised(tokenizer, [{"messages": SKY}])


def test_preference_pairs_train_on_prompt_and_chosen(tokenizer):
    pairs = [{"question": "What color is the sky?", "response_j": "Blue.", "response_k": "Green."}]
    (row,) = normalised(tiny_tokenizer(chat_template=False), pairs)  # no template: the Question/Answer text
    assert row["text"] == "Question: What color is the sky?\n\nAnswer: Blue.</s>"
    assert row["text"][slice(*row["spans"][0])] == "Blue.</s>"


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: the conversation has no assistant message"),
    ([{"text": "ok"}, {"text": None}], "row 2: field 'text' must be a string"),
    ([{"prompt": "a", "completion": None}], "row 1: field 'completion' must be a string"),
    ([{"conversations": [{"from": "robot", "value": "x"}]}], "row 1: field 'conversations', message 1 needs 'from'"),
    ([{"title": "x"}], "cannot tell the data format"),
])
def test_bad_rows_are_named(tokenizer, rows, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        normalised(tokenizer, rows)


def test_a_template_that_renders_a_conversation_differently_as_it_grows_is_refused(tokenizer):
    """A template that marks the last message cannot be split into turns by rendering prefixes."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for message in messages %}{% if loop.last %}[LAST]{% endif %}"
                               "{{ message['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="row 1: the chat template renders the conversation up to its message 2 "
                                         "differently"):
        normalised(tokenizer, [{"messages": SKY + SKY}])
    assert normalised(tokenizer, [{"messages": SKY + SKY}], assistant_only_loss=False)  # whole conversation: fine


# ------------------------------------------------------------------ tokens and labels


def test_prompt_tokens_are_masked_and_the_completion_with_its_eos_trained(tokenizer):
    data, stats = tokenized(tokenizer, [{"prompt": "What color is the sky?", "completion": " The sky is blue."}])
    row = data[0]
    assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, row) == " The sky is blue.</s>"
    assert stats.trained_tokens == sum(label != IGNORE for label in row["labels"])


def test_chat_renderings_get_no_second_bos(tokenizer):
    data, _ = tokenized(tokenizer, [{"messages": SKY}])
    ids = data[0]["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert trained_text(tokenizer, data[0]) == "The sky is blue.</s>\n"


def test_truncation_keeps_the_start_and_drops_rows_left_without_a_trained_token(tokenizer):
    rows = [{"prompt": "Question: how do I sort a list in Python?", "completion": " Answer: use sorted(items)."},
            {"prompt": "Hi", "completion": " The sky is blue."}]
    long_prompt = len(tokenizer(rows[0]["prompt"])["input_ids"])
    data, stats = tokenized(tokenizer, rows, max_length=long_prompt)
    assert (stats.rows_in, stats.rows_kept, stats.dropped_no_trained_token) == (2, 1, 1)
    assert trained_text(tokenizer, data[0]).startswith(" The sky")
    with pytest.raises(ValueError, match="all 1 rows were dropped"):
        tokenized(tokenizer, rows[:1], max_length=long_prompt)


# ------------------------------------------------------------------ packing and batches


def test_best_fit_decreasing_by_hand():
    # Longest first: 7 opens bin 0 (room 3), 6 opens bin 1 (room 4), 4 fits bin 1 best (room 0),
    # 3 fits bin 0 best (room 0), 2 opens bin 2.
    assert best_fit_decreasing([3, 7, 2, 6, 4], capacity=10) == [[1, 0], [3, 4], [2]]
    with pytest.raises(ValueError, match=r"every length must lie in \[1, 10\], got 11"):
        best_fit_decreasing([11], capacity=10)


def test_packed_rows_hold_whole_sequences_and_mask_each_first_label():
    sequences = Dataset.from_dict({"input_ids": [[1, 5, 6], [1, 7], [1, 8, 9, 10]],
                                   "labels": [[1, 5, 6], [IGNORE, 7], [1, 8, 9, 10]]})
    packed = pack_sequences(sequences, max_length=7)
    assert packed["seq_lengths"] == [[4, 3], [2]]
    assert packed[0]["input_ids"] == [1, 8, 9, 10, 1, 5, 6]
    assert packed[0]["labels"] == [IGNORE, 8, 9, 10, IGNORE, 5, 6]  # 1 would be predicted from 10
    assert packed[1]["labels"] == [IGNORE, 7]


def test_packed_batch_restarts_positions_at_each_sequence_and_at_the_padding():
    rows = [{"input_ids": [1, 8, 9, 1, 5], "labels": [IGNORE, 8, 9, IGNORE, 5], "seq_lengths": [3, 2]},
            {"input_ids": [1, 7], "labels": [IGNORE, 7], "seq_lengths": [2]}]
    batch = SequenceCollator(pad_token_id=0)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE, 7, IGNORE, IGNORE, IGNORE]
    plain = SequenceCollator(pad_token_id=0)([{"input_ids": [1, 7], "labels": [IGNORE, 7]}])
    assert "position_ids" not in plain and plain["input_ids"].dtype == torch.long
