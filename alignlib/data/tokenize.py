"""Normalised pairs to token ids: the prompt masked, truncated, counted; checked against a model.

Tokenized (`tokenize_preference_dataset`): per pair, lists of ints `chosen_input_ids`,
`chosen_labels`, `rejected_input_ids`, `rejected_labels` and the int `prompt_length`
(+ `margin`). Labels equal input_ids with IGNORE_INDEX (-100) on the prompt (the shift
convention of `alignlib.logprobs`). Each response ends with EOS (appended unless already
there). Truncation: the prompt is cut from the LEFT to `max_prompt_length` tokens (a leading
BOS is kept), then each response from the RIGHT so prompt + response <= `max_length`. A pair
left without a response token on either side is dropped and counted in `TokenizeStats`.

Checked against a model (`check_token_ids`): every id below the model's vocabulary size.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.compute as pc
from datasets import Dataset

from alignlib.data.formats import common_prefix_length, require_rows
from alignlib.logprobs import IGNORE_INDEX

__all__ = ["TOKENIZED_COLUMNS", "UNPAIRED_COLUMNS", "TokenizeStats", "UnpairedStats", "check_token_ids", "pad_token_id_for",
           "tokenize_preference_dataset", "tokenize_unpaired_dataset"]

TOKENIZED_COLUMNS = (
    "chosen_input_ids",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_labels",
    "prompt_length",
)

# datasets caches map() results under a hash of the function and its arguments, but hashes a function
# defined in a module by its name only: a changed alignlib would reuse results cached by an older one.
# Every mapped function here takes this hash of the file as an (unused) `code_version` argument.
_CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


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
    out: dict[str, list] = {name: [] for name in TOKENIZED_COLUMNS}
    flags: dict[str, list] = {name: [] for name in _FLAGS}
    for prompt, (kept_chosen, kept_rejected), cuts in _prompts_and_responses(
        tokenizer, prompts, [chosens, rejecteds], max_length, max_prompt_length, add_eos
    ):
        masked = [IGNORE_INDEX] * len(prompt)
        out["chosen_input_ids"].append(prompt + kept_chosen)
        out["chosen_labels"].append(masked + kept_chosen)
        out["rejected_input_ids"].append(prompt + kept_rejected)
        out["rejected_labels"].append(masked + kept_rejected)
        out["prompt_length"].append(len(prompt))
        flags["_keep"].append(bool(kept_chosen) and bool(kept_rejected))
        flags["_identical"].append(kept_chosen == kept_rejected)
        flags["_prompt_cut"].append(cuts.prompt_cut)
        flags["_boundary_merge"].append(cuts.boundary_merge)
        flags["_response_cut"].append(cuts.response_cut)
    return {**out, **flags}


class _Cuts(NamedTuple):
    prompt_cut: bool  # the prompt lost tokens to max_prompt_length
    boundary_merge: bool  # the prompt's last tokens merged with the response's first
    response_cut: bool  # a response lost tokens to max_length


def _prompts_and_responses(tokenizer: Any, prompts: list[str], responses: list[list[str]], max_length: int | None,
                           max_prompt_length: int | None, add_eos: bool):
    """Per row: (prompt ids, [each response's ids], _Cuts), prompt and responses cut to fit.

    Each prompt + response is tokenized as one text (as the model reads it); the responses start
    where the prompt's own tokens stop matching all of them, which differs from len(prompt) when a
    token merges across the boundary, or when the tokenizer ends every text with EOS. EOS is
    appended to each response (`add_eos`); the prompt is cut from the left to max_prompt_length
    (a leading BOS kept), then each response from the right so prompt + response fits max_length.
    """
    prompt_ids = _encode(tokenizer, prompts)
    fulls = [_encode(tokenizer, [p + r for p, r in zip(prompts, texts, strict=True)]) for texts in responses]
    for row, prompt in enumerate(prompt_ids):
        row_fulls = [full[row] for full in fulls]
        start = min(common_prefix_length(prompt, full) for full in row_fulls)
        answers = [full[start:] for full in row_fulls]
        if add_eos:
            answers = [_with_eos(ids, texts[row], tokenizer.eos_token_id, tokenizer.eos_token)
                       for ids, texts in zip(answers, responses, strict=True)]
        kept_prompt = _truncate_prompt(prompt[:start], max_prompt_length, tokenizer.bos_token_id)
        room = None if max_length is None else max(0, max_length - len(kept_prompt))
        kept = [ids[:room] for ids in answers]
        cuts = _Cuts(len(kept_prompt) < start, start < len(prompt),
                     any(len(k) < len(a) for k, a in zip(kept, answers, strict=True)))
        yield kept_prompt, kept, cuts


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
    require_rows(dataset, "the dataset")
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


_TOKEN_ID_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "input_ids", "labels")


UNPAIRED_COLUMNS = ("input_ids", "labels", "prompt_length", "label")


def _tokenize_unpaired_batch(batch: dict[str, list], tokenizer: Any, max_length: int | None,
                             max_prompt_length: int | None, add_eos: bool, code_version: str = "") -> dict[str, list]:
    out: dict[str, list] = {name: [] for name in UNPAIRED_COLUMNS}
    flags: dict[str, list] = {name: [] for name in _FLAGS if name != "_identical"}
    for prompt, (completion,), cuts in _prompts_and_responses(
        tokenizer, batch["prompt"], [batch["completion"]], max_length, max_prompt_length, add_eos
    ):
        out["input_ids"].append(prompt + completion)
        out["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
        out["prompt_length"].append(len(prompt))
        flags["_keep"].append(bool(completion))
        flags["_prompt_cut"].append(cuts.prompt_cut)
        flags["_boundary_merge"].append(cuts.boundary_merge)
        flags["_response_cut"].append(cuts.response_cut)
    out["label"] = list(batch["label"])
    return {**out, **flags}


@dataclass(frozen=True)
class UnpairedStats:
    """What `tokenize_unpaired_dataset` did: rows given and kept, rows dropped for an empty
    completion after truncation, prompts and completions cut, and the desirable rows kept."""

    rows_in: int
    rows_kept: int
    dropped_empty_response: int
    prompts_truncated: int
    responses_truncated: int
    desirable: int


def tokenize_unpaired_dataset(dataset: Dataset, tokenizer: Any, *, max_length: int | None,
                              max_prompt_length: int | None = None, add_eos: bool = True) -> tuple[Dataset, UnpairedStats]:
    """Tokenize unpaired rows (see `load_unpaired_dataset`) as `tokenize_preference_dataset` does
    pairs: columns input_ids, labels (IGNORE_INDEX on the prompt), prompt_length and label
    (bool); rows left with no completion token are dropped and counted."""
    missing = [column for column in ("prompt", "completion", "label") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks columns {missing} (found {dataset.column_names}); normalise it with "
                         "load_unpaired_dataset first")
    require_rows(dataset, "the dataset")
    _check_lengths(max_length, max_prompt_length)
    if add_eos and (tokenizer.eos_token_id is None or tokenizer.eos_token is None):
        raise ValueError("add_eos=True needs a tokenizer with an EOS token (eos_token is None)")
    tokenized = dataset.map(
        _tokenize_unpaired_batch, batched=True, remove_columns=dataset.column_names, desc="Tokenizing unpaired rows",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length,
                   "add_eos": add_eos, "code_version": _CODE_VERSION},
    )
    keep = list(tokenized["_keep"])
    labels = list(tokenized["label"])

    def kept_count(values: list) -> int:
        return sum(1 for kept, value in zip(keep, values, strict=True) if kept and value)

    stats = UnpairedStats(len(dataset), sum(keep), len(dataset) - sum(keep), kept_count(tokenized["_prompt_cut"]),
                          kept_count(tokenized["_response_cut"]), kept_count(labels))
    if stats.rows_kept == 0:
        raise ValueError(f"all {stats.rows_in} rows were dropped: no completion token fits in max_length={max_length} "
                         f"after the prompt (max_prompt_length={max_prompt_length})")
    if stats.dropped_empty_response:
        tokenized = tokenized.filter(lambda kept: kept, input_columns="_keep", desc="Dropping empty completions")
    return tokenized.remove_columns([name for name in _FLAGS if name in tokenized.column_names]), stats


def check_token_ids(dataset: Dataset, vocab_size: int, *, what: str = "dataset") -> None:
    """Raise ValueError if a token id of a tokenized preference dataset is not an id of the model.

    Reads the columns chosen/rejected_input_ids and chosen/rejected_labels (those present) of
    the output of `tokenize_preference_dataset` with Arrow, 8192 rows at a time, so 100k rows
    take well under a second. Every id must lie in [0, vocab_size); labels may also be -100.
    An id outside means the data was tokenized with a tokenizer the model does not match (an
    embedding lookup would fail or, on GPU, read out of bounds).

    Args:
        dataset: a tokenized preference Dataset (any filter or select applied is respected;
            the row reported is its position in `dataset`, counted from 1).
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
    if not any(column.endswith("input_ids") for column in columns):
        raise ValueError(
            f"{what} has no input_ids columns (found {dataset.column_names}); "
            "use tokenize_preference_dataset or tokenize_unpaired_dataset"
        )
    batch_size = 8192
    arrow = dataset.with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        batch = arrow[start : start + batch_size]
        for column in columns:
            lists = batch[column].combine_chunks()  # list<int> of one Arrow array
            ids = pc.list_flatten(lists)
            outside = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, vocab_size))
            if column.endswith("labels"):
                outside = pc.and_(outside, pc.not_equal(ids, IGNORE_INDEX))
            if not pc.any(outside).as_py():
                continue
            position = pc.index(outside, True).as_py()
            row = start + pc.list_parent_indices(lists)[position].as_py() + 1  # counted from 1
            raise ValueError(
                f"{what}: row {row} has token id {ids[position].as_py()} in {column}, outside the model's "
                f"vocabulary of {vocab_size} ids (0..{vocab_size - 1}); the tokenizer does not seem to "
                "belong to this model (tokenize with the model's own tokenizer)"
            )


