r"""Supervised fine-tuning (SFT) data: rows -> one text and the parts of it the loss covers -> tokens and labels.

Formats (`SFT_FORMATS`), detected from the columns or named:

    text               `text` (dataset_text_field): a string, all of it trained on
    prompt_completion  `prompt`, `completion`: strings, or message lists rendered with the chat template
    messages           `messages`: a list of {role, content} (or ShareGPT's `conversations`: {from, value})
    any preference format (standard, conversational, orca_dpo_pairs, stack_exchange_paired):
                       its prompt and its chosen response, as prompt_completion (the SFT stage of the
                       stack-exchange and StackLLaMA tutorials trains on question + preferred answer)

Which characters the loss covers (TRL's option names; alignlib's defaults):

    prompt_completion  the completion (completion_only_loss, default True); False: the whole text
    messages           every assistant message as the template renders it, end-of-turn marker
                       included (assistant_only_loss, default True; TRL's default is False); False:
                       the whole conversation
    text               all of it

Normalised (`load_sft_dataset`): per row the string `text`, `spans` (the [start, end) character
ranges the loss covers) and `chat` (rendered by a chat template, which writes its own special
tokens). An assistant turn is located by rendering the conversation up to it (with and without
the generation prompt), so any template that renders a conversation's beginning the same way alone
as inside the whole works, without `{% generation %}` markers.

EOS: appended to a `text` or `completion` string that does not end with it (as TRL does); a chat
rendering ends the way its template ends it.

Tokenized (`tokenize_sft_dataset`): `input_ids` and `labels` (IGNORE_INDEX outside the spans; the
shift convention of `alignlib.logprobs`). Plain text gets the tokenizer's own special tokens (its
BOS, never doubled), a chat rendering none beyond the template's, as TRL tokenizes them. A token
is trained on when its characters overlap a span; a special token the tokenizer adds (it has no
characters) goes with its neighbour (a leading BOS with the token after it, any other with the
token before). Sequences are cut from the right to max_length; a row left with no trained token
is dropped and counted (`SequenceStats`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from alignlib.data.files import blame_the_file, read_source
from alignlib.data.formats import (
    PREFERENCE_FORMATS,
    _describe,
    _messages,
    _require_chat_template,
    _resolve_format,
    _text,
    common_prefix_length,
    load_preference_dataset,
    require_rows,
)
from alignlib.logprobs import IGNORE_INDEX

__all__ = ["SEQUENCE_COLUMNS", "SFT_FORMATS", "SequenceStats", "load_sft_dataset", "tokenize_sft_dataset"]

SFT_FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "conversations": ("conversations",),  # ShareGPT: [{"from": "human"|"gpt"|"system", "value": ...}]
    **PREFERENCE_FORMATS,
}
SEQUENCE_COLUMNS = ("input_ids", "labels")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# See alignlib.data.formats: datasets hashes a module's function by its name only.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _detect_sft_format(dataset: Dataset, text_field: str) -> str:
    columns = set(dataset.column_names)
    if text_field in columns:
        return "text"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "conversations"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    return _resolve_format(dataset, "auto", PREFERENCE_FORMATS)


# ------------------------------------------------------------------ rows -> text and spans


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _assistant_spans(tokenizer: Any, messages: list[dict], text: str, number: int) -> list[list[int]]:
    """Where each assistant message lies in `text` (the rendered conversation): from the end of the
    conversation before it, generation prompt included, to the end of the conversation through it."""
    spans = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: position + 1])
        if not text.startswith(through):
            raise ValueError(
                f"row {number}: the chat template renders the conversation up to its message {position + 1} "
                "differently from the start of the whole conversation, so its assistant turns cannot be located; "
                "set assistant_only_loss false to train on the whole conversation")
        before = _render(tokenizer, messages[:position], generation_prompt=True) if position else ""
        spans.append([common_prefix_length(before, through), len(through)])
    if not spans:
        raise ValueError(f"row {number}: the conversation has no assistant message to train on "
                         "(assistant_only_loss is true; set it false to train on the whole conversation)")
    return spans


def _with_eos(text: str, eos_token: str) -> str:
    return text if text.endswith(eos_token) else text + eos_token


def _sharegpt(row: dict, number: int) -> list[dict[str, str]]:
    value = row.get("conversations")
    if not isinstance(value, list) or not value:
        raise ValueError(f"row {number}: field 'conversations' must be a non-empty list of messages, "
                         f"got {_describe(value)}")
    messages = []
    for position, turn in enumerate(value):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in _SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"row {number}: field 'conversations', message {position + 1} needs 'from' (one of "
                             f"{', '.join(_SHAREGPT_ROLES)}) and a string 'value', got {str(turn)[:80]!r}")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def _normalise_sft_row(row: dict, index: int, format: str, tokenizer: Any, text_field: str,
                       completion_only_loss: bool, assistant_only_loss: bool, code_version: str = "") -> dict:
    number = index + 1  # messages count rows from 1, as files count lines
    if format == "text":
        text = _with_eos(_text(row, text_field, number), tokenizer.eos_token)
        return {"text": text, "spans": [[0, len(text)]], "chat": False}
    if format in ("messages", "conversations"):
        messages = _messages(row, "messages", number) if format == "messages" else _sharegpt(row, number)
        _require_chat_template(tokenizer, number)
        text = _render(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, text, number) if assistant_only_loss else [[0, len(text)]]
        return {"text": text, "spans": spans, "chat": True}
    # prompt_completion (strings or message lists)
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        prompt, completion = _messages(row, "prompt", number), _messages(row, "completion", number)
        _require_chat_template(tokenizer, number)
        prompt_text = _render(tokenizer, prompt, generation_prompt=True)
        text = _render(tokenizer, prompt + completion)
        start = common_prefix_length(prompt_text, text)
        return {"text": text, "spans": [[start if completion_only_loss else 0, len(text)]], "chat": True}
    prompt = _text(row, "prompt", number)
    text = prompt + _with_eos(_text(row, "completion", number), tokenizer.eos_token)
    return {"text": text, "spans": [[len(prompt) if completion_only_loss else 0, len(text)]], "chat": False}


def _pairs_as_completions(batch: dict[str, list], chat: bool, code_version: str = "") -> dict[str, list]:
    return {"prompt": batch["prompt"], "completion": batch["chosen"], "chat": [chat] * len(batch["prompt"])}


def _normalise_pair_completion(row: dict, tokenizer: Any, completion_only_loss: bool, code_version: str = "") -> dict:
    """A normalised preference pair's prompt + chosen response (already rendered when `chat`)."""
    prompt, completion = row["prompt"], row["completion"]
    if not row["chat"]:
        completion = _with_eos(completion, tokenizer.eos_token)
    text = prompt + completion
    return {"text": text, "spans": [[len(prompt) if completion_only_loss else 0, len(text)]], "chat": row["chat"]}


def load_sft_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    tokenizer: Any,
    *,
    split: str = "train",
    format: str = "auto",
    dataset_text_field: str = "text",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = True,
) -> Dataset:
    """Load SFT rows and normalise them to columns text (str), spans (list of [start, end)) and chat (bool).

    Args:
        source: as `load_preference_dataset` takes it.
        tokenizer: renders message lists (its chat template) and gives the EOS appended to text.
        split: the split to take from a DatasetDict, a directory or the Hub.
        format: "auto" (from the columns) or a key of `SFT_FORMATS`.
        dataset_text_field: the column of the "text" format.
        completion_only_loss: prompt-completion rows (and preference pairs): train on the completion
            only (None or True) or on the whole text (False).
        assistant_only_loss: conversations: train on the assistant messages only (True) or on
            the whole conversation (False).

    Raises:
        ValueError: unknown format or missing columns (the message lists the formats), an empty
            dataset, a row whose field is missing or of the wrong type, a conversation without an
            assistant message (with assistant_only_loss), message lists without a chat template,
            a tokenizer without an EOS token; a broken file is named with its line.
    """
    if tokenizer is None or tokenizer.eos_token is None:
        raise ValueError("SFT data needs a tokenizer with an EOS token (it ends each text and completion)")
    completion_only = True if completion_only_loss is None else bool(completion_only_loss)
    dataset = read_source(source, split)
    require_rows(dataset, f"dataset {str(source)!r}" if not isinstance(source, Dataset) else "the dataset")
    known = {**SFT_FORMATS, "text": (dataset_text_field,)}
    format = _detect_sft_format(dataset, dataset_text_field) if format == "auto" else _resolve_format(
        dataset, format, known)
    with blame_the_file(source):
        if format in PREFERENCE_FORMATS:
            pairs = load_preference_dataset(dataset, format=format, tokenizer=tokenizer)
            chat = bool(getattr(tokenizer, "chat_template", None)) and format != "standard"
            rows = pairs.map(_pairs_as_completions, batched=True, remove_columns=pairs.column_names,
                             fn_kwargs={"chat": chat, "code_version": _CODE_VERSION})
            return rows.map(_normalise_pair_completion, remove_columns=rows.column_names,
                            fn_kwargs={"tokenizer": tokenizer, "completion_only_loss": completion_only,
                                       "code_version": _CODE_VERSION},
                            desc="Taking each pair's chosen response as the completion")
        normalised = dataset.map(
            _normalise_sft_row,
            with_indices=True,
            fn_kwargs={"format": format, "tokenizer": tokenizer, "text_field": dataset_text_field,
                       "completion_only_loss": completion_only, "assistant_only_loss": bool(assistant_only_loss),
                       "code_version": _CODE_VERSION},
            remove_columns=dataset.column_names,
            desc=f"Normalising {format} SFT data",
        )
    return normalised.select_columns(["text", "spans", "chat"])


# ------------------------------------------------------------------ text and spans -> tokens


@dataclass(frozen=True)
class SequenceStats:
    """What `tokenize_sft_dataset` did: rows given and kept, rows dropped because no trained token
    was left within max_length, kept rows cut to max_length, and the trained tokens kept."""

    rows_in: int
    rows_kept: int
    dropped_no_trained_token: int
    truncated: int
    trained_tokens: int


def _trained(offsets: list[tuple[int, int]], spans: list[list[int]]) -> list[bool]:
    """Per token: do its characters overlap a span? Tokens without characters (special tokens the
    tokenizer adds) take the answer of their neighbour: the first token the next one's, others the previous."""
    overlaps = [end > start and any(start < stop and end > begin for begin, stop in spans) for start, end in offsets]
    empty = [end <= start for start, end in offsets]
    for i in range(len(offsets)):
        if empty[i] and i > 0:
            overlaps[i] = overlaps[i - 1]
    if offsets and empty[0]:
        following = next((overlaps[i] for i in range(1, len(offsets)) if not empty[i]), False)
        overlaps[0] = following
    return overlaps


def _tokenize_sft_batch(batch: dict[str, list], tokenizer: Any, max_length: int | None,
                        code_version: str = "") -> dict[str, list]:
    out: dict[str, list] = {"input_ids": [], "labels": [], "_keep": [], "_cut": []}
    for text, spans, chat in zip(batch["text"], batch["spans"], batch["chat"], strict=True):
        encoded = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        bos = tokenizer.bos_token_id
        if not chat and bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # text began with BOS
            ids, offsets = ids[1:], offsets[1:]
        labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids, _trained(offsets, spans),
                                                                                 strict=True)]
        cut = max_length is not None and len(ids) > max_length
        if cut:
            ids, labels = ids[:max_length], labels[:max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["_keep"].append(any(label != IGNORE_INDEX for label in labels[1:]))  # position 0 is never predicted
        out["_cut"].append(cut)
    return out


def tokenize_sft_dataset(dataset: Dataset, tokenizer: Any, *, max_length: int | None) -> tuple[Dataset, SequenceStats]:
    """Tokenize normalised SFT rows (see `load_sft_dataset`): columns input_ids and labels.

    Args:
        dataset: columns text, spans, chat.
        tokenizer: a fast Hugging Face tokenizer (its offsets locate the spans); not modified.
        max_length: the most tokens per sequence (cut from the right), or None.

    Raises:
        ValueError: missing columns, an empty dataset, a bad max_length, a slow tokenizer, or every
            row dropped.
    """
    missing = [column for column in ("text", "spans", "chat") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks columns {missing} (found {dataset.column_names}); normalise it with "
                         "load_sft_dataset first")
    require_rows(dataset, "the dataset")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SFT tokenization needs a fast tokenizer (its character offsets locate the trained text)")
    tokenized = dataset.map(_tokenize_sft_batch, batched=True, remove_columns=dataset.column_names,
                            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                       "code_version": _CODE_VERSION},
                            desc="Tokenizing SFT rows")
    keep, cut = list(tokenized["_keep"]), list(tokenized["_cut"])
    kept = sum(keep)
    if kept == 0:
        raise ValueError(f"all {len(dataset)} rows were dropped: none has a trained token within "
                         f"max_length={max_length} (a prompt longer than max_length leaves no completion)")
    if kept < len(dataset):
        tokenized = tokenized.filter(lambda k: k, input_columns="_keep", desc="Dropping rows with no trained token")
    tokenized = tokenized.remove_columns(["_keep", "_cut"])
    trained = sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in tokenized["labels"])
    stats = SequenceStats(len(dataset), kept, len(dataset) - kept,
                          sum(1 for k, c in zip(keep, cut, strict=True) if k and c), trained)
    return tokenized, stats
