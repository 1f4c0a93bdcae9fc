"""Unpaired rows (KTO) through alignlib.data: formats, pairs split as TRL splits them, tokens, the
mismatched prompt/completion pairs of the reference point."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from helpers.tiny_tokenizer import tiny_tokenizer
from trl.data_utils import unpair_preference_dataset

from alignlib.data import (
    UnpairedCollator,
    load_preference_dataset,
    load_unpaired_dataset,
    pad_token_id_for,
    tokenize_unpaired_dataset,
)
from alignlib.logprobs import IGNORE_INDEX

PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Hello", "chosen": " world!", "rejected": " there, friend."},
    {"prompt": "Two and two make", "chosen": " four.", "rejected": " five."},
]


def test_pairs_are_split_into_rows_as_trl_splits_them():
    """TRL's own unpair_preference_dataset on the same pairs: the same rows (alignlib keeps each pair's
    two rows together, chosen first; TRL puts a batch's chosen rows first; the set is the same)."""
    ours = load_unpaired_dataset(Dataset.from_list(PAIRS)).to_list()
    theirs = unpair_preference_dataset(load_preference_dataset(Dataset.from_list(PAIRS))).to_list()
    as_set = lambda rows: sorted((r["prompt"], r["completion"], r["label"]) for r in rows)  # noqa: E731
    assert as_set(ours) == as_set(theirs) and len(ours) == 6
    assert [(row["completion"], row["label"]) for row in ours[:2]] == [(" blue.", True), (" green.", False)]


def test_unpaired_rows_from_a_file_and_from_messages(tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": "The sky is", "completion": " green.", "label": 0}]  # 0/1 are read as false/true
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_unpaired_dataset(str(path))
    assert loaded.to_list() == [{"prompt": "The sky is", "completion": " blue.", "label": True},
                                {"prompt": "The sky is", "completion": " green.", "label": False}]

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}],
             "label": True}]
    (row,) = load_unpaired_dataset(Dataset.from_list(chat), tokenizer=tokenizer).to_list()
    assert row == {"prompt": "<user>Hi<assistant>", "completion": "Yo", "label": True}


@pytest.mark.parametrize("labels, message", [
    (["yes", "no"], r"row 1: field 'label' must be true or false"),
    ([1, 2], r"row 2: field 'label' must be true or false"),
    ([True, None], r"row 2: field 'label' must be true or false .*, got None \(missing\)"),
])
def test_a_label_that_is_not_true_or_false_is_named_by_row(labels, message, tmp_path):
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a", "completion": "b", "label": label}) + "\n" for label in labels))
    with pytest.raises(ValueError, match=message):
        load_unpaired_dataset(str(path))


def test_tokens_mask_the_prompt_and_mismatched_pairs_take_another_rows_completion():
    tokenizer = tiny_tokenizer()
    rows, stats = tokenize_unpaired_dataset(load_unpaired_dataset(Dataset.from_list(PAIRS)), tokenizer, max_length=64)
    assert stats.rows_kept == 6 and stats.desirable == 3 and stats.dropped_empty_response == 0
    first = rows[0]
    prompt = first["input_ids"][: first["prompt_length"]]
    assert first["labels"][: first["prompt_length"]] == [IGNORE_INDEX] * len(prompt)
    assert first["labels"][first["prompt_length"]:] == first["input_ids"][first["prompt_length"]:]
    assert first["input_ids"][-1] == tokenizer.eos_token_id

    collator = UnpairedCollator(pad_token_id_for(tokenizer), max_length=64)
    batch = collator([rows[0], rows[3]])
    assert batch["desirable"].tolist() == [True, False]
    mismatched = collator.mismatched([rows[0]], [rows[3]])  # row 0's prompt, row 3's completion
    expected = prompt + rows[3]["input_ids"][rows[3]["prompt_length"]:]
    assert mismatched["input_ids"][0].tolist() == expected
    labels = mismatched["labels"][0].tolist()
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt) and labels[len(prompt):] == expected[len(prompt):]
    short = UnpairedCollator(pad_token_id_for(tokenizer), max_length=len(prompt) + 2).mismatched([rows[0]], [rows[3]])
    assert short["input_ids"].shape[1] == len(prompt) + 2  # the completion is cut to fit max_length
