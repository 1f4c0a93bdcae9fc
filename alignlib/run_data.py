"""A run's datasets, from the settings to tokenized rows: read, normalise, subset and split, tokenize, pack.

    read + normalise   the train source (dataset_name; dataset_config / data_dir pick a sub-dataset)
                       as rows of the objective's kind: pairs, unpaired rows (KTO) or SFT sequences
    subset             max_train_samples: a seeded shuffle, then the first N rows
    split              eval_split_size: a seeded share of those rows held out for evaluation,
                       or else the eval source (eval_dataset_name, eval_data_dir)
    tokenize           truncated to max_length (pairs: the prompt to max_prompt_length first),
                       rows left empty dropped; what was cut and dropped is printed
    pack               SFT with packing: several sequences per row (alignlib.data.packing)

The subset and the split depend only on the seed, so a resumed run (and every rank) sees the same
rows. The kind of rows comes from the objective (alignlib.objectives.DATA_KINDS).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from alignlib.configs import TrainConfig
from alignlib.data import (
    DataSource,
    load_preference_dataset,
    load_sft_dataset,
    load_unpaired_dataset,
    pack_sequences,
    tokenize_preference_dataset,
    tokenize_sft_dataset,
    tokenize_unpaired_dataset,
)
from alignlib.distributed import Processes, main_process_first

__all__ = ["load_pairs", "load_run_datasets", "load_sequences", "load_unpaired", "normalise", "subset_and_split",
           "tokenize"]


def load_run_datasets(kind: str, cfg: TrainConfig, tokenizer: Any, processes: Processes) -> tuple[Dataset, Dataset | None]:
    """The tokenized train set and eval set (None without an eval source or split) of a run."""
    verbose = processes.is_main
    with main_process_first(processes):  # rank 0 fills the datasets cache, the others read it
        rows = normalise(kind, _source(cfg.dataset_name, cfg.dataset_config, cfg.data_dir),
                         cfg.dataset_train_split, cfg, tokenizer)
        train_rows, eval_rows = subset_and_split(rows, cfg, verbose=verbose)
        if eval_rows is None and cfg.eval_dataset_name:
            eval_rows = normalise(kind, _source(cfg.eval_dataset_name, cfg.dataset_config, cfg.eval_data_dir),
                                  cfg.dataset_test_split, cfg, tokenizer)
        train_set, _ = tokenize(kind, train_rows, cfg, tokenizer, "train", verbose=verbose)
        eval_set = None if eval_rows is None else tokenize(kind, eval_rows, cfg, tokenizer, "eval",
                                                           verbose=verbose)[0]
    return train_set, eval_set


def _source(name: str, config: str | None, data_dir: str | None) -> str | DataSource:
    """The path itself when no sub-dataset is asked for (a broken line of a single file is then named)."""
    return DataSource(name, config, data_dir) if config or data_dir else name


def normalise(kind: str, source: Any, split: str, cfg: TrainConfig, tokenizer: Any) -> Dataset:
    """Read `split` of `source` and normalise its rows to the kind's text columns (alignlib.data)."""
    if kind == "sequences":
        return load_sft_dataset(source, tokenizer, split=split, format=cfg.dataset_format,
                                dataset_text_field=cfg.dataset_text_field,
                                completion_only_loss=cfg.completion_only_loss,
                                assistant_only_loss=cfg.assistant_only_loss)
    load = load_preference_dataset if kind == "pairs" else load_unpaired_dataset
    return load(source, split=split, format=cfg.dataset_format, tokenizer=tokenizer)


def subset_and_split(rows: Dataset, cfg: TrainConfig, *, verbose: bool = True) -> tuple[Dataset, Dataset | None]:
    """max_train_samples (a seeded shuffle, then the first N), then eval_split_size (a seeded share held out)."""
    if cfg.max_train_samples is not None:
        if cfg.max_train_samples < len(rows):
            rows = rows.shuffle(seed=cfg.seed).select(range(cfg.max_train_samples))
        elif verbose:
            print(f"max_train_samples {cfg.max_train_samples}: the dataset has {len(rows)} rows, all used", flush=True)
    if not cfg.eval_split_size:
        return rows, None
    if len(rows) < 2:
        raise ValueError(f"eval_split_size {cfg.eval_split_size}: {len(rows)} row cannot be split into train and eval")
    split = rows.train_test_split(test_size=cfg.eval_split_size, seed=cfg.seed)
    if len(split["train"]) == 0:
        raise ValueError(f"eval_split_size {cfg.eval_split_size} of {len(rows)} rows leaves none to train on")
    if verbose:
        print(f"eval_split_size {cfg.eval_split_size}: {len(split['test'])} of {len(rows)} rows held out for "
              "evaluation", flush=True)
    return split["train"], split["test"]


def tokenize(kind: str, rows: Dataset, cfg: TrainConfig, tokenizer: Any, what: str, *,
             verbose: bool = True) -> tuple[Dataset, Any]:
    """Tokenize normalised rows of the kind (packed, for SFT with packing); print what was cut or dropped."""
    if kind == "pairs":
        tokenized, stats = tokenize_preference_dataset(rows, tokenizer, max_length=cfg.max_length,
                                                       max_prompt_length=cfg.max_prompt_length)
        if verbose and (stats.dropped_empty_response or stats.identical_pairs or stats.prompts_truncated
                        or stats.responses_truncated):
            print(f"[{what}] {stats.pairs_in} pairs: {stats.dropped_empty_response} dropped (no response token left "
                  f"after truncation), {stats.identical_pairs} with chosen identical to rejected (kept), "
                  f"{stats.prompts_truncated} prompts cut to max_prompt_length, {stats.responses_truncated} "
                  f"responses cut to max_length", flush=True)
        return tokenized, stats
    if kind == "unpaired":
        tokenized, stats = tokenize_unpaired_dataset(rows, tokenizer, max_length=cfg.max_length,
                                                     max_prompt_length=cfg.max_prompt_length)
        if verbose and (stats.dropped_empty_response or stats.prompts_truncated or stats.responses_truncated):
            print(f"[{what}] {stats.rows_in} rows: {stats.dropped_empty_response} dropped (no completion token left "
                  f"after truncation), {stats.prompts_truncated} prompts cut to max_prompt_length, "
                  f"{stats.responses_truncated} completions cut to max_length", flush=True)
        if verbose and stats.desirable in (0, stats.rows_kept):
            print(f"[{what}] every row is {'un' if stats.desirable == 0 else ''}desirable: KTO learns from both "
                  "kinds", flush=True)
        return tokenized, stats
    tokenized, stats = tokenize_sft_dataset(rows, tokenizer, max_length=cfg.max_length)
    if verbose and (stats.dropped_no_trained_token or stats.truncated):
        print(f"[{what}] {stats.rows_in} rows: {stats.dropped_no_trained_token} dropped (no trained token within "
              f"max_length), {stats.truncated} cut to max_length", flush=True)
    if cfg.packing:
        packed = pack_sequences(tokenized, cfg.max_length)
        if verbose:
            print(f"[{what}] packing: {stats.rows_kept} sequences in {len(packed)} rows of at most {cfg.max_length} "
                  "tokens", flush=True)
        return packed, stats
    return tokenized, stats


def load_pairs(source: Any, split: str, cfg: TrainConfig, tokenizer: Any, what: str, *, verbose: bool = True):
    """Read, normalise and tokenize preference pairs."""
    return tokenize("pairs", normalise("pairs", source, split, cfg, tokenizer), cfg, tokenizer, what, verbose=verbose)


def load_unpaired(source: Any, split: str, cfg: TrainConfig, tokenizer: Any, what: str, *, verbose: bool = True):
    """Read, normalise and tokenize unpaired rows (KTO; pairs are split into two rows each)."""
    return tokenize("unpaired", normalise("unpaired", source, split, cfg, tokenizer), cfg, tokenizer, what,
                    verbose=verbose)


def load_sequences(source: Any, split: str, cfg: TrainConfig, tokenizer: Any, what: str, *, verbose: bool = True):
    """Read, normalise and tokenize SFT sequences (packed with cfg.packing)."""
    return tokenize("sequences", normalise("sequences", source, split, cfg, tokenizer), cfg, tokenizer, what,
                    verbose=verbose)
