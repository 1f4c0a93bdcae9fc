"""Fuzzing the data pipeline: load_preference_dataset -> tokenize_preference_dataset -> PreferenceCollator.

Random rows (odd unicode: combining marks, right-to-left text, emoji sequences, NUL, BOM, line
separators, the tokenizer's own special-token strings; empty and whitespace-only strings; prompts
far longer than max_length), random max_length / max_prompt_length (valid and not), an optional
margin column (finite or not), read from a JSON Lines file written to disk or from an in-memory
Dataset. The only errors allowed are the documented ValueErrors, each exactly where it is due;
everything that comes out keeps the pipeline's invariants:

- the text comes back unchanged from the file (nothing lost in the JSON reader);
- every kept sequence fits max_length, its prompt fits max_prompt_length, prompt tokens are -100 in
  the labels, the rest of the labels equal the input ids, each response has at least one label token
  and, when nothing is cut, ends with EOS;
- TokenizeStats adds up: pairs_in = kept + dropped, identical_pairs = pairs with equal token ids,
  and no pair is dropped when max_prompt_length leaves room (responses end with EOS);
- the collator's batch holds each row unchanged, right-padded, chosen rows before rejected ones;
- check_token_ids accepts the ids for the tokenizer's own vocabulary and refuses a smaller one.

Examples per run: the hypothesis profile of tests/conftest.py ("ci": 40).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset
from helpers.tiny_tokenizer import tiny_tokenizer
from hypothesis import example, given
from hypothesis import strategies as st

from alignlib.data import (
    PreferenceCollator,
    check_token_ids,
    load_preference_dataset,
    pad_token_id_for,
    tokenize_preference_dataset,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*do not end on a token boundary")

IGNORE = -100
TOKENIZERS = {add_bos: tiny_tokenizer(add_bos=add_bos) for add_bos in (True, False)}

ODD_PIECES = [
    "", " ", "\t", "\n", "\r\n", "\r", "\x00", "\x7f", "\u0301", "e\u0301\u0323", "\u202e", "\u200f", "\u200d",
    "مرحبا بالعالم", "שלום", "👩\u200d👩\u200d👧", "🇫🇷", "🏳️\u200d🌈", "\ufeff", "\u2028", "\u2029", "\x85",
    "\uffff", "\U0010ffff", "</s>", "<s>", "<pad>", "<|user|>", "\\", '"', "{}", "[]", "null", "𝔘𝔫𝔦", "ǅ", "ﷺ",
]
piece = st.one_of(st.sampled_from(ODD_PIECES), st.text(alphabet=st.characters(codec="utf-8"), max_size=10))
short_text = st.lists(piece, max_size=5).map("".join)
whitespace = st.text(alphabet=" \t\n\r\u00a0\u2003\u3000", max_size=6)
long_text = st.tuples(piece.filter(bool), st.integers(40, 160)).map(lambda repeat: repeat[0] * repeat[1])
any_text = st.one_of(short_text, whitespace, long_text)
margins = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def preference_rows(draw) -> list[dict]:
    """1-5 rows; long prompts half the time; some with chosen == rejected; all with a margin or none."""
    with_margin = draw(st.booleans())
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        row = {"prompt": draw(st.one_of(any_text, long_text)), "chosen": draw(any_text)}
        row["rejected"] = row["chosen"] if draw(st.booleans()) else draw(any_text)
        if with_margin:
            row["margin"] = draw(margins)
        rows.append(row)
    return rows


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    """datasets' cache in a temporary folder (module-scoped: hypothesis reruns the test in one call)."""
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets")
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_DATASETS_CACHE = saved
    datasets.enable_progress_bars()


def load(rows: list[dict], source: str, ensure_ascii: bool) -> Dataset:
    if source == "memory":
        return load_preference_dataset(Dataset.from_list(rows))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=ensure_ascii) + "\n")
        return load_preference_dataset(str(path))


def check_kept_rows(tokenized: Dataset, max_length: int | None, max_prompt_length: int | None) -> None:
    for row in tokenized:
        n = row["prompt_length"]
        assert max_prompt_length is None or n <= max_prompt_length
        assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert len(labels) == len(ids)
            assert max_length is None or len(ids) <= max_length
            assert labels[:n] == [IGNORE] * n  # the prompt never reaches the loss
            assert labels[n:] == ids[n:] and len(ids) - n >= 1  # at least one response token is learned
            assert IGNORE not in ids


def check_batches(tokenized: Dataset, tokenizer, for_reward_model: bool, multiple: int | None, size: int) -> None:
    pad = pad_token_id_for(tokenizer)
    collate = PreferenceCollator(pad, for_reward_model=for_reward_model, pad_to_multiple_of=multiple)
    rows = list(tokenized)
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        batch = collate(chunk)
        sequences = [row["chosen_input_ids"] for row in chunk] + [row["rejected_input_ids"] for row in chunk]
        longest = max(map(len, sequences))
        width = batch["input_ids"].shape[1]
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (2 * len(chunk), width)
        assert width >= longest and (width == longest if multiple is None else width % multiple == 0)
        for i, ids in enumerate(sequences):
            assert batch["input_ids"][i, : len(ids)].tolist() == ids
            assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (width - len(ids))
            assert (batch["input_ids"][i, len(ids) :] == pad).all()
        if for_reward_model:
            assert "labels" not in batch
            assert batch["last_token_index"].tolist() == [len(ids) - 1 for ids in sequences]
        else:
            labels = [row["chosen_labels"] for row in chunk] + [row["rejected_labels"] for row in chunk]
            for i, row_labels in enumerate(labels):
                assert batch["labels"][i].tolist() == row_labels + [IGNORE] * (width - len(row_labels))
            assert ((batch["labels"] != IGNORE).sum(dim=1) >= 1).all()
        if "margin" in chunk[0]:
            assert batch["margin"].dtype == torch.float32
            assert batch["margin"].tolist() == [float(torch.tensor(row["margin"], dtype=torch.float32))
                                                for row in chunk]


# A prompt many times longer than max_length with no prompt limit: every pair is dropped.
@example(
    rows=[{"prompt": "sky " * 100, "chosen": "", "rejected": ""}],
    source="jsonl", ensure_ascii=False, add_bos=True, max_length=16, max_prompt_length=None,
    for_reward_model=False, multiple=None, batch_size=1,
)
# Everything empty, through a file: the responses are EOS only, the prompt BOS only.
@example(
    rows=[{"prompt": "", "chosen": "", "rejected": ""}, {"prompt": " ", "chosen": "\x00", "rejected": "\u2028"}],
    source="jsonl", ensure_ascii=False, add_bos=True, max_length=2, max_prompt_length=1,
    for_reward_model=False, multiple=8, batch_size=2,
)
@given(
    rows=preference_rows(),
    source=st.sampled_from(["jsonl", "memory"]),
    ensure_ascii=st.booleans(),
    add_bos=st.booleans(),
    max_length=st.one_of(st.none(), st.integers(1, 64)),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 70)),
    for_reward_model=st.booleans(),
    multiple=st.sampled_from([None, 8]),
    batch_size=st.integers(1, 3),
)
def test_the_pipeline_never_breaks_its_invariants(
    rows, source, ensure_ascii, add_bos, max_length, max_prompt_length, for_reward_model, multiple, batch_size
):
    tokenizer = TOKENIZERS[add_bos]
    bad_margin = next((i for i, row in enumerate(rows) if "margin" in row and not math.isfinite(row["margin"])), None)
    if bad_margin is not None:
        with pytest.raises(ValueError, match=rf"^row {bad_margin + 1}: field 'margin' must be a finite number"):
            load(rows, source, ensure_ascii)
        return
    pairs = load(rows, source, ensure_ascii)
    assert pairs.column_names == ["prompt", "chosen", "rejected"] + (["margin"] if "margin" in rows[0] else [])
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (row["prompt"], row["chosen"], row["rejected"]) for row in rows
    ]

    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        with pytest.raises(ValueError, match=r"max_prompt_length \(\d+\) must be smaller than max_length"):
            tokenize_preference_dataset(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        return
    try:
        tokenized, stats = tokenize_preference_dataset(
            pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
        )
    except ValueError as err:
        # Only a prompt left uncut can leave no room for a response.
        assert max_length is not None and max_prompt_length is None, err
        assert str(err).startswith(f"all {len(rows)} pairs were dropped"), err
        return

    assert stats.pairs_in == len(rows) == stats.pairs_kept + stats.dropped_empty_response
    assert stats.pairs_kept == len(tokenized) >= 1
    if max_length is None or max_prompt_length is not None:  # room is left for each response's EOS
        assert stats.dropped_empty_response == 0
    if max_prompt_length is None:
        assert stats.prompts_truncated == 0
    if max_length is None:
        assert stats.responses_truncated == 0
    assert stats.identical_pairs == sum(row["chosen_input_ids"] == row["rejected_input_ids"] for row in tokenized)
    assert stats.prompts_truncated <= stats.pairs_kept and stats.responses_truncated <= stats.pairs_kept
    check_kept_rows(tokenized, max_length, max_prompt_length)
    if max_length is None:  # nothing cut or dropped: each response ends with EOS, unless its text has one
        for row, source_row in zip(tokenized, rows, strict=True):
            for side in ("chosen", "rejected"):
                assert row[f"{side}_input_ids"][-1] == tokenizer.eos_token_id or "</s>" in source_row[side]
    check_batches(tokenized, tokenizer, for_reward_model, multiple, batch_size)

    check_token_ids(tokenized, len(tokenizer))
    highest = max(max(row["chosen_input_ids"] + row["rejected_input_ids"]) for row in tokenized)
    with pytest.raises(ValueError, match=rf"token id {highest} in \w+, outside the model's vocabulary of {highest}"):
        check_token_ids(tokenized, highest)
