"""Preference (and prompt) formats, normalised to string columns prompt, chosen, rejected.

`load_preference_dataset` reads rows in one of PREFERENCE_FORMATS (detected from the columns,
or named) and renders each to the text the model reads: chat templates applied to message
lists, "Question: ...\n\nAnswer: " for question/answer data without one. `load_prompt_dataset`
does the same for the prompts of the online loop. A row whose field is missing or of the wrong
type is a ValueError naming the row and the field; bad rows are never dropped silently.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from alignlib.data.files import blame_the_file, read_source

__all__ = ["PREFERENCE_FORMATS", "PROMPT_FORMATS", "UNPAIRED_FORMATS", "common_prefix_length",
           "load_preference_dataset", "load_prompt_dataset", "load_unpaired_dataset", "require_rows"]

# Each preference format and the columns it needs. Message lists are [{"role", "content"}, ...].
PREFERENCE_FORMATS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),  # strings; chosen/rejected are responses only
    "conversational": ("chosen", "rejected"),  # message lists (+ optional `prompt`: messages, or plain text)
    "orca_dpo_pairs": ("question", "chosen", "rejected"),  # Intel/orca_dpo_pairs (+ optional `system`)
    "stack_exchange_paired": ("question", "response_j", "response_k"),  # response_j preferred
}
PROMPT_FORMATS: dict[str, tuple[str, ...]] = {"prompt": ("prompt",), **PREFERENCE_FORMATS}
# Unpaired feedback (KTO): one response, marked desirable (True) or not. `prompt` and `completion`
# are strings, or message lists rendered with the chat template. Preference pairs are accepted
# too, each split into its chosen row (True) and its rejected row (False).
UNPAIRED_FORMATS: dict[str, tuple[str, ...]] = {"unpaired": ("prompt", "completion", "label"), **PREFERENCE_FORMATS}

# datasets caches map() results under a hash of the function and its arguments, but hashes a function
# defined in a module by its name only: a changed alignlib would reuse results cached by an older one.
# Every mapped function here takes this hash of the file as an (unused) `code_version` argument.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _holds_lists(dataset: Dataset, column: str) -> bool:
    """Whether a column holds (message) lists rather than strings: by its type, else by its first values."""
    feature = dataset.features[column]
    if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence, list)):
        return True
    if isinstance(feature, datasets.Value):
        return False
    head = dataset.select(range(min(len(dataset), 100)))[column]  # e.g. a Json column of mixed values
    # The first value decides; a row of the other kind then gets its own error, naming that row.
    first = next((value for value in head if value is not None), None)
    return isinstance(first, list)


def _detect_format(dataset: Dataset, known: dict[str, tuple[str, ...]]) -> str:
    columns = set(dataset.column_names)
    if "unpaired" in known and {"prompt", "completion", "label"} <= columns:
        return "unpaired"
    if {"question", "response_j", "response_k"} <= columns:
        return "stack_exchange_paired"
    # Message lists first: orpo-dpo-mix-40k's rows hold conversations in chosen/rejected beside
    # plain-text `prompt` and `question` columns.
    if {"chosen", "rejected"} <= columns and _holds_lists(dataset, "chosen"):
        return "conversational"
    if {"question", "chosen", "rejected"} <= columns:
        return "orca_dpo_pairs"
    if {"chosen", "rejected"} <= columns:
        if "prompt" in columns:
            return "standard"
    elif "prompt" in known and "prompt" in columns:
        return "prompt"
    raise ValueError(_format_help(dataset.column_names, known, "cannot tell the data format"))


def _format_help(columns: list[str], known: dict[str, tuple[str, ...]], problem: str) -> str:
    formats = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in known.items())
    return f"{problem}: columns found {columns}; formats known (name: required columns): {formats}"


def _resolve_format(dataset: Dataset, format: str, known: dict[str, tuple[str, ...]]) -> str:
    if format == "auto":
        return _detect_format(dataset, known)
    if format not in known:
        raise ValueError(
            f"unknown format {format!r}; known: 'auto', {', '.join(repr(name) for name in known)}"
        )
    missing = [column for column in known[format] if column not in dataset.column_names]
    if missing:
        raise ValueError(
            _format_help(dataset.column_names, known, f"format {format!r} needs columns {missing}")
        )
    return format


# ------------------------------------------------------------------ row normalisation


def _describe(value: Any) -> str:
    return "None (missing)" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _text(row: dict, field: str, number: int) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise ValueError(f"row {number}: field {field!r} must be a string, got {_describe(value)}")
    return value


def _messages(row: dict, field: str, number: int) -> list[dict[str, str]]:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"row {number}: field {field!r} must be a non-empty list of messages, got {_describe(value)}"
        )
    for position, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"row {number}: field {field!r}, message {position + 1} needs string 'role' and 'content', "
                f"got {str(message)[:80]!r}"
            )
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _margin(row: dict, number: int) -> float:
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"row {number}: field 'margin' must be a finite number, got {_describe(value)}")
    return float(value)


def common_prefix_length(a: list | str, b: list | str) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _require_same_prompt(chosen: list[dict], rejected: list[dict], number: int) -> None:
    """What follows the shared prompt must be the responses: assistant messages only. A user (or
    system) message there means the two conversations differ before their answers."""
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        other = [m["role"] for m in messages if m["role"] != "assistant"]
        if other:
            raise ValueError(
                f"row {number}: chosen and rejected differ before their answers ({side} has a {other[0]!r} message "
                "after the messages both share), so they do not answer the same prompt; give both the same prompt "
                "messages, or a separate 'prompt' column")


def _require_chat_template(tokenizer: Any, number: int) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"row {number}: conversational rows need a chat template and the tokenizer has none (set one up "
            "with --chat_template chatml, or give a tokenizer whose chat_template is set)"
        )


def _render_pair(
    tokenizer: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict]
) -> tuple[str, str, str]:
    """Prompt text (with the generation prompt) and the response texts that follow it in the full chats."""
    prompt_text = (
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if prompt else ""
    )
    chosen_text = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
    rejected_text = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
    # Some templates render a prompt differently alone than inside the chat; the prompt is then the
    # longest text all three share, so prompt + response is always exactly the rendered chat.
    cut = min(
        common_prefix_length(prompt_text, chosen_text), common_prefix_length(prompt_text, rejected_text)
    )
    if cut < len(prompt_text):
        warnings.warn(
            "the chat template renders the prompt alone (with its generation prompt) differently from the "
            "start of the full chat; the shared text is used as the prompt, so training sees a context "
            "that differs from the one the model gets when generating",
            stacklevel=2,
        )
    return prompt_text[:cut], chosen_text[cut:], rejected_text[cut:]


def _normalise_row(
    row: dict, index: int, format: str, tokenizer: Any, has_margin: bool, code_version: str = ""
) -> dict:
    number = index + 1  # messages count rows from 1, as files count lines
    if format == "standard":
        out = {
            "prompt": _text(row, "prompt", number),
            "chosen": _text(row, "chosen", number),
            "rejected": _text(row, "rejected", number),
        }
    elif format == "conversational":
        chosen, rejected = _messages(row, "chosen", number), _messages(row, "rejected", number)
        if "prompt" in row and not isinstance(row["prompt"], str):  # messages: chosen/rejected are the responses
            prompt = _messages(row, "prompt", number)
        elif isinstance(row.get("prompt"), str) and chosen[0]["role"] == rejected[0]["role"] == "assistant":
            # responses only, with the prompt as plain text: it is the user's turn
            prompt = [{"role": "user", "content": row["prompt"]}]
        else:  # whole conversations (a plain-text prompt column beside them, as in orpo-dpo-mix-40k, is a
            # copy of the user's turn): the shared leading messages are the prompt, each side keeping at
            # least its last message
            shared = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            _require_same_prompt(chosen, rejected, number)
        _require_chat_template(tokenizer, number)
        out = dict(
            zip(
                ("prompt", "chosen", "rejected"),
                _render_pair(tokenizer, prompt, chosen, rejected),
                strict=True,
            )
        )
    else:  # question/answer formats
        chosen_field, rejected_field = (
            ("chosen", "rejected") if format == "orca_dpo_pairs" else ("response_j", "response_k")
        )
        system = row.get("system") if format == "orca_dpo_pairs" else None
        if system is not None and not isinstance(system, str):
            raise ValueError(
                f"row {number}: field 'system' must be a string or missing, got {_describe(system)}"
            )
        question, chosen, rejected = (
            _text(row, field, number) for field in ("question", chosen_field, rejected_field)
        )
        out = _question_answer_pair(tokenizer, system or "", question, chosen, rejected)
    if has_margin:
        out["margin"] = _margin(row, number)
    return out


def _question_answer_pair(tokenizer: Any, system: str, question: str, chosen: str, rejected: str) -> dict:
    """With a chat template: system/user/assistant messages. Without: "Question: ...\n\nAnswer: " text."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        texts = _render_pair(
            tokenizer,
            prompt,
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
        return dict(zip(("prompt", "chosen", "rejected"), texts, strict=True))
    prompt = (f"{system}\n\n" if system else "") + f"Question: {question}\n\nAnswer: "
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _normalise_prompt_row(row: dict, index: int, tokenizer: Any, code_version: str = "") -> dict:
    number = index + 1  # messages count rows from 1, as files count lines
    value = row.get("prompt")
    if isinstance(value, list):
        messages = _messages(row, "prompt", number)
        _require_chat_template(tokenizer, number)
        return {"prompt": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)}
    return {"prompt": _text(row, "prompt", number)}


def _normalise_unpaired_row(row: dict, index: int, tokenizer: Any, code_version: str = "") -> dict:
    number = index + 1  # messages count rows from 1, as files count lines
    label = row.get("label")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise ValueError(f"row {number}: field 'label' must be true or false (desirable or not), got {_describe(label)}")
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
        prompt, completion = _messages(row, "prompt", number), _messages(row, "completion", number)
        _require_chat_template(tokenizer, number)
        prompt_text, completion_text, _ = _render_pair(tokenizer, prompt, completion, completion)
        return {"prompt": prompt_text, "completion": completion_text, "label": label}
    return {"prompt": _text(row, "prompt", number), "completion": _text(row, "completion", number), "label": label}


def _unpair(batch: dict[str, list], code_version: str = "") -> dict[str, list]:
    """Normalised pairs -> unpaired rows: each pair's chosen (label True), then its rejected (False)."""
    rows = {"prompt": [], "completion": [], "label": []}
    for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True):
        rows["prompt"] += [prompt, prompt]
        rows["completion"] += [chosen, rejected]
        rows["label"] += [True, False]
    return rows


def require_rows(dataset: Dataset, what: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{what} is empty (0 rows; columns {dataset.column_names})")


def load_preference_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str = "train",
    format: str = "auto",
    tokenizer: Any = None,
) -> Dataset:
    """Load preference pairs and normalise them to string columns prompt, chosen, rejected (+ margin).

    Args:
        source: a .json/.jsonl/.parquet/.csv file; a `save_to_disk` directory (Dataset or
            DatasetDict); a directory of data files or a Hub name (`datasets.load_dataset`);
            or a Dataset/DatasetDict. A missing local path raises FileNotFoundError.
        split: the split to take from a DatasetDict, a directory or the Hub (a single file
            is one split and ignores it).
        format: "auto" (detect from the columns) or a key of `PREFERENCE_FORMATS`.
        tokenizer: needed for conversational rows (its chat template renders them). The
            question/answer formats (orca_dpo_pairs, stack_exchange_paired) use its chat
            template when it has one (system/user/assistant messages), and otherwise the
            text "{system}\n\nQuestion: {question}\n\nAnswer: " as the prompt. "standard"
            strings are used as given.

    Returns:
        A Dataset with string columns prompt, chosen, rejected (chosen and rejected are the
        responses only) and, if the data has a `margin` column, float margin. Other columns
        are dropped.

    Raises:
        FileNotFoundError: `source` is a local path that does not exist.
        ValueError: unknown format, missing columns (the message lists the columns found and
            the formats known), an empty dataset, or a row whose field is missing (None) or
            of the wrong type (the message names the row index and the field). Bad rows are
            never dropped silently. A file that cannot be read: text that is not UTF-8, a
            line that is not JSON or not a JSON object (the message names the file, the
            1-based line and the problem), or whatever else the reader reports ("cannot read").
    """
    dataset = read_source(source, split)
    require_rows(dataset, f"dataset {str(source)!r}" if not isinstance(source, Dataset) else "the dataset")
    format = _resolve_format(dataset, format, PREFERENCE_FORMATS)
    has_margin = "margin" in dataset.column_names
    with blame_the_file(source):
        normalised = dataset.map(
            _normalise_row,
            with_indices=True,
            fn_kwargs={
                "format": format,
                "tokenizer": tokenizer,
                "has_margin": has_margin,
                "code_version": _CODE_VERSION,
            },
            remove_columns=dataset.column_names,
            desc=f"Normalising {format} preference data",
        )
    return normalised.select_columns(["prompt", "chosen", "rejected"] + (["margin"] if has_margin else []))


def load_prompt_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str = "train",
    format: str = "auto",
    tokenizer: Any = None,
) -> Dataset:
    """Load prompts only (for PPO): a Dataset with one string column, `prompt`.

    Accepts the "prompt" format (a `prompt` column of strings, or of message lists rendered
    with the tokenizer's chat template and its generation prompt) or any preference format,
    whose normalised prompt is taken (the pairs must then be valid too). Arguments and errors
    as in `load_preference_dataset`.
    """
    dataset = read_source(source, split)
    require_rows(dataset, f"dataset {str(source)!r}" if not isinstance(source, Dataset) else "the dataset")
    format = _resolve_format(dataset, format, PROMPT_FORMATS)
    with blame_the_file(source):
        if format != "prompt":
            pairs = load_preference_dataset(dataset, format=format, tokenizer=tokenizer)
            return pairs.select_columns(["prompt"])
        return dataset.map(
            _normalise_prompt_row,
            with_indices=True,
            fn_kwargs={"tokenizer": tokenizer, "code_version": _CODE_VERSION},
            remove_columns=dataset.column_names,
            desc="Normalising prompts",
        )



def load_unpaired_dataset(
    source: str | os.PathLike | Dataset | DatasetDict,
    *,
    split: str = "train",
    format: str = "auto",
    tokenizer: Any = None,
) -> Dataset:
    """Load unpaired feedback (KTO): string columns prompt, completion and a bool column label
    (True: desirable). Rows in the "unpaired" format (prompt, completion, label: strings or
    message lists; label true/false or 1/0), or preference pairs in any of PREFERENCE_FORMATS,
    each split into its chosen row (label True) followed by its rejected row (False), as TRL's
    `unpair_preference_dataset` does. Arguments and errors as in `load_preference_dataset`.
    """
    dataset = read_source(source, split)
    require_rows(dataset, f"dataset {str(source)!r}" if not isinstance(source, Dataset) else "the dataset")
    format = _resolve_format(dataset, format, UNPAIRED_FORMATS)
    with blame_the_file(source):
        if format != "unpaired":
            pairs = load_preference_dataset(dataset, format=format, tokenizer=tokenizer)
            return pairs.map(_unpair, batched=True, remove_columns=pairs.column_names,
                             fn_kwargs={"code_version": _CODE_VERSION}, desc="Splitting pairs into unpaired rows")
        normalised = dataset.map(
            _normalise_unpaired_row,
            with_indices=True,
            fn_kwargs={"tokenizer": tokenizer, "code_version": _CODE_VERSION},
            remove_columns=dataset.column_names,
            desc="Normalising unpaired rows",
        )
    return normalised.select_columns(["prompt", "completion", "label"])
