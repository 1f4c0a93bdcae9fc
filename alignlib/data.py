r"""Preference data: load, normalise to prompt/chosen/rejected, tokenize, collate.

In: a local JSON/JSONL/Parquet/CSV file, a `datasets` directory (`save_to_disk` of a
Dataset or DatasetDict), a directory of data files or a Hub name (`datasets.load_dataset`),
or a Dataset/DatasetDict object; rows in one of `PREFERENCE_FORMATS`.

A broken file fails with a one-line ValueError naming the file and the line: text that is not
UTF-8, a JSON Lines line that is not JSON or not an object (the file is scanned only after the
reader fails, so good files are read once).

Normalised (`load_preference_dataset`): string columns `prompt`, `chosen`, `rejected`
(responses only; chat templates already applied), plus a float `margin` if the data has one.

Tokenized (`tokenize_preference_dataset`): per pair, lists of ints `chosen_input_ids`,
`chosen_labels`, `rejected_input_ids`, `rejected_labels` and the int `prompt_length`
(+ `margin`). Labels equal input_ids with -100 on the prompt (the shift convention of
`alignlib.logprobs`). Each response ends with EOS (appended unless already there).
Truncation: the prompt is cut from the LEFT to `max_prompt_length` tokens (a leading BOS
is kept), then each response from the RIGHT so prompt + response <= `max_length`. A pair
left without a response token on either side is dropped and counted in `TokenizeStats`.

Collated (`PreferenceCollator`): one batch for one forward pass, rows
[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}], right-padded: input_ids,
attention_mask, labels (2B, T) (+ margin (B,)).

Checked against a model (`check_token_ids`): every id below the model's vocabulary size.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict

IGNORE_INDEX = -100  # the label of a position left out of the loss, as in alignlib.logprobs

# Each preference format and the columns it needs. Message lists are [{"role", "content"}, ...].
PREFERENCE_FORMATS: dict[str, tuple[str, ...]] = {
    "standard": ("prompt", "chosen", "rejected"),  # strings; chosen/rejected are responses only
    "conversational": ("chosen", "rejected"),  # message lists (+ optional `prompt` message list)
    "orca_dpo_pairs": ("question", "chosen", "rejected"),  # Intel/orca_dpo_pairs (+ optional `system`)
    "stack_exchange_paired": ("question", "response_j", "response_k"),  # response_j preferred
}
PROMPT_FORMATS: dict[str, tuple[str, ...]] = {"prompt": ("prompt",), **PREFERENCE_FORMATS}
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TOKENIZED_COLUMNS = (
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "prompt_length",
)

_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# datasets caches map() results under a hash of the function and its arguments, but hashes a function
# defined in a module by its name only: a changed alignlib would reuse results cached by an older one.
# Every mapped function here takes this hash of the file as an (unused) `code_version` argument.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def _read_source(source: str | os.PathLike | Dataset | DatasetDict, split: str) -> Dataset:
    """The raw rows of `split` from a file, a directory, a Hub name or a Dataset(Dict)."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        return _pick_split(source, split, "the DatasetDict")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a path, a Hub name or a datasets.Dataset, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{str(path)!r}: unknown data file type {path.suffix!r}; known: {sorted(DATA_FILE_BUILDERS)}"
            )
        # A single file is one split: `split` is not used for it.
        return _load_local(path, builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk output
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, str(path)) if isinstance(loaded, DatasetDict) else loaded
        # A folder of data files, read like a Hub repo.
        return _load_local(path, str(path), split=split)
    name = str(source)
    if path.suffix.lower() in DATA_FILE_BUILDERS or not _HUB_NAME.match(name):
        raise FileNotFoundError(f"dataset file or directory not found: {name!r}")
    try:
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError) as err:
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and loading it from the Hugging Face Hub "
            f"failed: {err}"
        ) from err


def _load_local(path: Path, *args: Any, **kwargs: Any) -> Dataset:
    """datasets.load_dataset on a local file or folder, with a clear error for no rows or a broken file.

    When datasets fails, the file (or the folder's JSON/JSONL/CSV files) is scanned for the first
    line that is not UTF-8 or not a JSON object, and that line is named; the scan runs only then,
    so a good file is read once.
    """
    where = str(path)
    try:
        with _builder_logs_silenced():
            return datasets.load_dataset(*args, **kwargs)
    except StopIteration as err:  # the json reader finding no record at all
        raise ValueError(f"dataset {where!r} is empty (no rows)") from err
    except Exception as err:
        if isinstance(err, ValueError) and "corresponds to no data" in str(err):  # a split with no rows
            raise ValueError(f"dataset {where!r} is empty (no rows)") from err
        files = [path] if path.is_file() else _text_data_files(path)
        problem = next((found for found in map(_file_problem, files) if found), None)
        if problem is not None:
            raise ValueError(problem) from err
        # DatasetGenerationError says nothing of the cause, and Arrow's errors do not name the file.
        if isinstance(err, (datasets.exceptions.DatasetGenerationError, pa.ArrowException)):
            raise ValueError(f"cannot read {where!r}: {_root_cause(err)}") from err
        raise


@contextlib.contextmanager
def _builder_logs_silenced() -> Any:
    """Mute datasets' file readers (packaged_modules), which log an error before raising it: the
    error raised here names the problem instead, in one line (the original stays chained)."""
    readers = logging.getLogger("datasets.packaged_modules")
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        readers.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost exception in the chain of causes."""
    for _ in range(20):  # a chain is short; the bound only guards against a cycle
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ------------------------------------------------------------------ broken data files

_SCANNED_SUFFIXES = (".json", ".jsonl", ".csv")
_JSON_WHITESPACE = " \t\r\n"


def _text_data_files(folder: Path) -> list[Path]:
    """The JSON/JSONL/CSV files under a folder (not hidden ones), in name order."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in _SCANNED_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def _file_problem(path: Path) -> str | None:
    """The first problem of a local JSON/JSONL/CSV file as a message naming the file and line, or None.

    Finds text that is not UTF-8 (any of the three) and, in JSON files, a line that is not valid
    JSON or not an object ("line 17: ..."; 1-based, counting every line, blank ones included).
    A .jsonl file, or a .json file whose first line is a whole object, is read as JSON Lines;
    any other .json file as one JSON document (an array of objects).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SCANNED_SUFFIXES:
        return None
    if suffix == ".csv":
        with path.open("rb") as file:
            return next(filter(None, (_utf8_problem(path, *line) for line in _numbered_lines(file))), None)
    if suffix == ".json" and not _starts_like_json_lines(path):
        return _json_document_problem(path)
    return _json_lines_problem(path)


def _starts_like_json_lines(path: Path) -> bool:
    """Whether a .json file reads as JSON Lines: its first non-blank line is a whole JSON object."""
    with path.open("rb") as file:
        for raw, _, _ in _numbered_lines(file):
            text = raw.decode("utf-8", errors="replace").strip(_JSON_WHITESPACE)
            if text:
                try:
                    return isinstance(json.loads(text), dict)
                except json.JSONDecodeError:
                    return False
    return True


def _numbered_lines(file: Any) -> Any:
    """(raw line without a leading BOM, 1-based line number, byte offset of the line) for a binary file."""
    offset = 0
    for number, raw in enumerate(file, start=1):  # a binary file splits on b"\n" only, as JSON Lines does
        bom = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        yield raw[bom:], number, offset + bom
        offset += len(raw)


def _utf8_problem(path: Path, data: bytes, line: int, offset: int) -> str | None:
    """Where `data` (starting at `line`, byte `offset` of the file) is not UTF-8, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line += data.count(b"\n", 0, err.start)
        return (
            f"{path} line {line} (byte offset {offset + err.start}): not UTF-8 text (byte "
            f"0x{data[err.start]:02x}: {err.reason}); save the file as UTF-8"
        )
    return None


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _json_error(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at")  # "Invalid control character at" is followed by a position in str(err)


def _json_lines_problem(path: Path) -> str | None:
    with path.open("rb") as file:
        for raw, number, offset in _numbered_lines(file):
            problem = _utf8_problem(path, raw, number, offset)
            if problem is not None:
                return problem
            text = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")  # columns count within the line
            if not text.strip(_JSON_WHITESPACE):  # blank lines are skipped by the reader
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                return f"{path} line {number} column {err.colno}: not valid JSON: {_json_error(err)}"
            if not isinstance(value, dict):
                return (
                    f"{path} line {number}: each line must be a JSON object {{...}} (one row), "
                    f"got {_json_kind(value)}"
                )
    return None


def _json_document_problem(path: Path) -> str | None:
    """A .json file holding one array of row objects."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    problem = _utf8_problem(path, data, 1, 0)
    if problem is not None:
        return problem
    try:
        rows = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        return f"{path} line {err.lineno} column {err.colno}: not valid JSON: {_json_error(err)}"
    if isinstance(rows, list):
        for position, row in enumerate(rows):
            if not isinstance(row, dict):
                return (
                    f"{path}: item {position} of the JSON array must be an object {{...}} (one row), "
                    f"got {_json_kind(row)}"
                )
    return None


@contextlib.contextmanager
def _blame_the_file(source: Any) -> Any:
    """On a row error from a local file, name the file's broken line instead when it has one.

    The JSON reader takes a `null` line as a row of missing fields; the scan names the line.
    """
    try:
        yield
    except ValueError as err:
        if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_file():
            problem = _file_problem(Path(source).expanduser())
            if problem is not None:
                raise ValueError(problem) from err
        raise


def _pick_split(dataset_dict: DatasetDict, split: str, where: str) -> Dataset:
    if split not in dataset_dict:
        raise ValueError(f"split {split!r} not found in {where}; splits: {sorted(dataset_dict)}")
    return dataset_dict[split]


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
    if {"question", "response_j", "response_k"} <= columns:
        return "stack_exchange_paired"
    if {"question", "chosen", "rejected"} <= columns:
        return "orca_dpo_pairs"
    if {"chosen", "rejected"} <= columns:
        if _holds_lists(dataset, "chosen"):
            return "conversational"
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


def _text(row: dict, field: str, index: int) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise ValueError(f"row {index}: field {field!r} must be a string, got {_describe(value)}")
    return value


def _messages(row: dict, field: str, index: int) -> list[dict[str, str]]:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"row {index}: field {field!r} must be a non-empty list of messages, got {_describe(value)}"
        )
    for position, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"row {index}: field {field!r}, message {position} needs string 'role' and 'content', "
                f"got {str(message)[:80]!r}"
            )
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _margin(row: dict, index: int) -> float:
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"row {index}: field 'margin' must be a finite number, got {_describe(value)}")
    return float(value)


def _common_prefix_length(a: list | str, b: list | str) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _require_chat_template(tokenizer: Any, index: int) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"row {index}: conversational rows need a tokenizer with a chat template "
            "(pass tokenizer=... whose chat_template is set)"
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
        _common_prefix_length(prompt_text, chosen_text), _common_prefix_length(prompt_text, rejected_text)
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
    if format == "standard":
        out = {
            "prompt": _text(row, "prompt", index),
            "chosen": _text(row, "chosen", index),
            "rejected": _text(row, "rejected", index),
        }
    elif format == "conversational":
        chosen, rejected = _messages(row, "chosen", index), _messages(row, "rejected", index)
        if "prompt" in row:  # the data has a prompt column: chosen/rejected are the responses
            prompt = _messages(row, "prompt", index)
        else:  # the shared leading messages are the prompt; each side keeps at least its last message
            shared = min(_common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        _require_chat_template(tokenizer, index)
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
                f"row {index}: field 'system' must be a string or missing, got {_describe(system)}"
            )
        question, chosen, rejected = (
            _text(row, field, index) for field in ("question", chosen_field, rejected_field)
        )
        out = _question_answer_pair(tokenizer, system or "", question, chosen, rejected)
    if has_margin:
        out["margin"] = _margin(row, index)
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
    value = row.get("prompt")
    if isinstance(value, list):
        messages = _messages(row, "prompt", index)
        _require_chat_template(tokenizer, index)
        return {"prompt": tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)}
    return {"prompt": _text(row, "prompt", index)}


def _require_rows(dataset: Dataset, what: str) -> None:
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
    dataset = _read_source(source, split)
    _require_rows(dataset, f"dataset {str(source)!r}" if not isinstance(source, Dataset) else "the dataset")
    format = _resolve_format(dataset, format, PREFERENCE_FORMATS)
    has_margin = "margin" in dataset.column_names
    with _blame_the_file(source):
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
    dataset = _read_source(source, split)
    _require_rows(dataset, f"dataset {str(source)!r}" if not isinstance(source, Dataset) else "the dataset")
    format = _resolve_format(dataset, format, PROMPT_FORMATS)
    with _blame_the_file(source):
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


# ------------------------------------------------------------------------ tokenization


@dataclass(frozen=True)
class TokenizeStats:
    """What `tokenize_preference_dataset` did, for the trainer to log.

    pairs_in: rows given. pairs_kept: rows returned. dropped_empty_response: pairs dropped
    because chosen or rejected had no token left after truncation. identical_pairs: kept
    pairs whose chosen and rejected token ids are equal (zero DPO signal). prompts_truncated /
    responses_truncated: kept pairs whose prompt / either response was cut. boundary_merges:
    kept pairs whose prompt text does not end on a token boundary (its last tokens change when
    the response follows, e.g. "?" + "first" read as one word); those tokens go to the response.
    """

    pairs_in: int
    pairs_kept: int
    dropped_empty_response: int
    identical_pairs: int
    prompts_truncated: int
    responses_truncated: int
    boundary_merges: int


def pad_token_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token; the tokenizer is not changed.

    Padding is marked by attention_mask 0 and labels -100, so for a causal LM the pad id's
    value does not matter. For a Hugging Face sequence classifier it does: see
    `PreferenceCollator`.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; pass pad_token_id explicitly")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids with the tokenizer's own special tokens, never two BOS in a row at the start.

    A text that already begins with the BOS string (a rendered chat template) would otherwise
    get a second BOS from a tokenizer that adds one.
    """
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [
        ids[1:] if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos else ids for ids in encoded
    ]


def _with_eos(ids: list[int], text: str, eos_id: int, eos_token: str) -> list[int]:
    """Append EOS unless the response already ends with it (in ids, or in text before trailing whitespace)."""
    if (ids and ids[-1] == eos_id) or text.rstrip().endswith(eos_token):
        return ids
    return ids + [eos_id]


def _truncate_prompt(ids: list[int], max_prompt_length: int | None, bos_id: int | None) -> list[int]:
    """Keep the last `max_prompt_length` tokens; a leading BOS stays and counts towards the limit."""
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return ids
    if bos_id is not None and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - max_prompt_length + 1 :]
    return ids[len(ids) - max_prompt_length :]


_FLAGS = ("_keep", "_identical", "_prompt_cut", "_response_cut", "_boundary_merge")  # per-row counters


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: Any,
    max_length: int | None,
    max_prompt_length: int | None,
    add_eos: bool,
    code_version: str = "",
) -> dict[str, list]:
    prompts, chosens, rejecteds = batch["prompt"], batch["chosen"], batch["rejected"]
    prompt_ids = _encode(tokenizer, prompts)
    chosen_full = _encode(tokenizer, [p + c for p, c in zip(prompts, chosens, strict=True)])
    rejected_full = _encode(tokenizer, [p + r for p, r in zip(prompts, rejecteds, strict=True)])
    out: dict[str, list] = {name: [] for name in TOKENIZED_COLUMNS}
    flags: dict[str, list] = {name: [] for name in _FLAGS}
    for prompt, chosen_ids, rejected_ids, chosen_text, rejected_text in zip(
        prompt_ids, chosen_full, rejected_full, chosens, rejecteds, strict=True
    ):
        # Prompt and response tokenized together (as the model reads them); the response starts where
        # the prompt's own tokens stop matching, which differs from len(prompt) when a token merges
        # across the boundary, or when the tokenizer ends every text with EOS.
        start = min(_common_prefix_length(prompt, chosen_ids), _common_prefix_length(prompt, rejected_ids))
        chosen, rejected = chosen_ids[start:], rejected_ids[start:]
        if add_eos:
            chosen = _with_eos(chosen, chosen_text, tokenizer.eos_token_id, tokenizer.eos_token)
            rejected = _with_eos(rejected, rejected_text, tokenizer.eos_token_id, tokenizer.eos_token)
        kept_prompt = _truncate_prompt(prompt[:start], max_prompt_length, tokenizer.bos_token_id)
        room = None if max_length is None else max(0, max_length - len(kept_prompt))
        kept_chosen, kept_rejected = chosen[:room], rejected[:room]
        masked = [IGNORE_INDEX] * len(kept_prompt)
        out["chosen_input_ids"].append(kept_prompt + kept_chosen)
        out["chosen_labels"].append(masked + kept_chosen)
        out["rejected_input_ids"].append(kept_prompt + kept_rejected)
        out["rejected_labels"].append(masked + kept_rejected)
        out["prompt_length"].append(len(kept_prompt))
        flags["_keep"].append(bool(kept_chosen) and bool(kept_rejected))
        flags["_identical"].append(kept_chosen == kept_rejected)
        flags["_prompt_cut"].append(len(kept_prompt) < start)
        flags["_boundary_merge"].append(start < len(prompt))
        flags["_response_cut"].append(len(kept_chosen) < len(chosen) or len(kept_rejected) < len(rejected))
    return {**out, **flags}


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}) "
            "to leave room for a response"
        )


def tokenize_preference_dataset(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_length: int | None,
    max_prompt_length: int | None = None,
    add_eos: bool = True,
) -> tuple[Dataset, TokenizeStats]:
    """Tokenize normalised pairs (see `load_preference_dataset`), mask the prompt, truncate, drop and count.

    Each pair: prompt + response is tokenized as one text with the tokenizer's special tokens
    (its BOS, never doubled); the prompt is the part its own tokens share with both texts.
    EOS is appended to each response unless it already ends with it (`add_eos`). Then the
    prompt is cut from the left to `max_prompt_length` (a leading BOS kept; None: no cut) and
    each response from the right to fit `max_length` (None: no cut). Pairs with an empty
    chosen or rejected side after this are dropped; with max_prompt_length None, that is every
    pair whose prompt alone fills max_length.

    Args:
        dataset: columns prompt, chosen, rejected (strings), optional margin.
        tokenizer: a Hugging Face (fast) tokenizer; it is not modified.
        max_length: the most tokens in prompt + response, or None.
        max_prompt_length: the most prompt tokens, or None; must be < max_length.
        add_eos: append EOS to responses that do not end with it.

    Returns:
        (dataset, stats): columns chosen_input_ids, chosen_labels, rejected_input_ids,
        rejected_labels (lists of int; labels -100 on the prompt), prompt_length (int) and
        margin if given; `TokenizeStats` counts the dropped, identical and truncated pairs.

    Raises:
        ValueError: missing columns, an empty dataset, bad lengths, no EOS token while
            add_eos is set, or every pair dropped.
    """
    missing = [column for column in ("prompt", "chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset lacks columns {missing} (found {dataset.column_names}); normalise it with "
            "load_preference_dataset first"
        )
    _require_rows(dataset, "the dataset")
    _check_lengths(max_length, max_prompt_length)
    if add_eos and (tokenizer.eos_token_id is None or tokenizer.eos_token is None):
        raise ValueError("add_eos=True needs a tokenizer with an EOS token (eos_token is None)")
    tokenized = dataset.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "add_eos": add_eos,
            "code_version": _CODE_VERSION,
        },
        remove_columns=[column for column in dataset.column_names if column != "margin"],
        desc="Tokenizing preference pairs",
    )
    keep = list(tokenized["_keep"])

    def kept_count(flag: str) -> int:
        return sum(1 for kept, value in zip(keep, tokenized[flag], strict=True) if kept and value)

    stats = TokenizeStats(
        pairs_in=len(dataset),
        pairs_kept=sum(keep),
        dropped_empty_response=len(dataset) - sum(keep),
        identical_pairs=kept_count("_identical"),
        prompts_truncated=kept_count("_prompt_cut"),
        boundary_merges=kept_count("_boundary_merge"),
        responses_truncated=kept_count("_response_cut"),
    )
    if stats.pairs_kept == 0:
        raise ValueError(
            f"all {stats.pairs_in} pairs were dropped: no response token fits in max_length={max_length} "
            f"after the prompt (max_prompt_length={max_prompt_length})"
        )
    if stats.dropped_empty_response:
        tokenized = tokenized.filter(
            lambda kept: kept, input_columns="_keep", desc="Dropping empty responses"
        )
    if stats.boundary_merges:
        warnings.warn(
            f"{stats.boundary_merges} of {stats.pairs_kept} prompts do not end on a token boundary: their "
            "last tokens merge with the response's first (e.g. 'wor' + 'ld'). Those tokens count as "
            "response; if that is not meant, end prompts or start responses with a separator (a space)",
            stacklevel=2,
        )
    tokenized = tokenized.remove_columns(list(_FLAGS))
    return tokenized, stats


_TOKEN_ID_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def check_token_ids(dataset: Dataset, vocab_size: int, *, what: str = "dataset") -> None:
    """Raise ValueError if a token id of a tokenized preference dataset is not an id of the model.

    Reads the columns chosen/rejected_input_ids and chosen/rejected_labels (those present) of
    the output of `tokenize_preference_dataset` with Arrow, 8192 rows at a time, so 100k rows
    take well under a second. Every id must lie in [0, vocab_size); labels may also be -100.
    An id outside means the data was tokenized with a tokenizer the model does not match (an
    embedding lookup would fail or, on GPU, read out of bounds).

    Args:
        dataset: a tokenized preference Dataset (any filter or select applied is respected;
            the row reported is its index in `dataset`).
        vocab_size: the number of rows of the model's input embedding, e.g.
            `model.get_input_embeddings().num_embeddings`.
        what: how the message names the dataset, e.g. "train dataset".

    Raises:
        ValueError: vocab_size is not a positive int, the dataset has no input_ids column, or
            an id is out of range (the message names the row, the column, the id and vocab_size).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    columns = [column for column in _TOKEN_ID_COLUMNS if column in dataset.column_names]
    if not any(column.endswith("_input_ids") for column in columns):
        raise ValueError(
            f"{what} has no chosen_input_ids / rejected_input_ids columns (found {dataset.column_names}); "
            "use tokenize_preference_dataset"
        )
    batch_size = 8192
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        batch = arrow[start : start + batch_size]
        for column in columns:
            lists = batch[column].combine_chunks()  # list<int> of one Arrow array
            ids = pc.list_flatten(lists)
            outside = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, vocab_size))
            if column.endswith("_labels"):
                outside = pc.and_(outside, pc.not_equal(ids, IGNORE_INDEX))
            if not pc.any(outside).as_py():
                continue
            position = pc.index(outside, True).as_py()
            row = start + pc.list_parent_indices(lists)[position].as_py()
            raise ValueError(
                f"{what}: row {row} has token id {ids[position].as_py()} in {column}, outside the model's "
                f"vocabulary of {vocab_size} ids (0..{vocab_size - 1}); the tokenizer does not seem to "
                "belong to this model (tokenize with the model's own tokenizer)"
            )


# --------------------------------------------------------------------------- collation


@dataclass
class PreferenceCollator:
    """Stack chosen and rejected into one right-padded batch for a single forward pass.

    Input rows: dicts from `tokenize_preference_dataset`. Output for B rows, T the longest
    sequence (rounded up to `pad_to_multiple_of`):
        input_ids (2B, T) long, pad_token_id on padding
        attention_mask (2B, T) long, 0 on padding
        labels (2B, T) long, -100 on prompt and padding (causal LM only)
        margin (B,) float32, if the rows have one
    Rows 0..B-1 are the chosen sequences and rows B..2B-1 the rejected ones, pair i at rows
    i and B + i.

    for_reward_model=True drops `labels` (a sequence classifier would read them as class
    targets) and adds last_token_index (2B,) long, the position of each row's last real
    token. Why: Hugging Face sequence classifiers (LlamaForSequenceClassification...) score
    the rightmost token that differs from config.pad_token_id. With pad id == EOS id (a
    tokenizer without a pad token) and responses ending in EOS, that is the token before
    the EOS. It is still consistent, but a reward trainer that wants the score at the last
    real token whatever the pad id should pool the per-token scores at last_token_index.
    """

    pad_token_id: int
    for_reward_model: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PreferenceCollator got an empty list of rows")
        missing = [key for key in ("chosen_input_ids", "rejected_input_ids") if key not in rows[0]]
        if missing:
            raise ValueError(
                f"rows lack {missing} (keys: {sorted(rows[0])}); use tokenize_preference_dataset"
            )
        sequences = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        lengths = torch.tensor([len(ids) for ids in sequences])
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(sequences):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask = (torch.arange(width) < lengths[:, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.for_reward_model:
            batch["last_token_index"] = lengths - 1
        else:
            labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
            label_rows = [row["chosen_labels"] for row in rows] + [row["rejected_labels"] for row in rows]
            for i, row_labels in enumerate(label_rows):
                if len(row_labels) != len(sequences[i]):
                    raise ValueError(f"row {i % len(rows)}: labels and input_ids differ in length")
                labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
            batch["labels"] = labels
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([float(row["margin"]) for row in rows], dtype=torch.float32)
        return batch
