"""A run's datasets from its settings (alignlib.run_data): a seeded subset, a seeded eval split, a
dataset's sub-folder or named configuration, and orpo-dpo-mix-style rows, as the tutorials use them.
"""

from __future__ import annotations

import json

import pytest
from helpers.tiny_tokenizer import tiny_tokenizer

from alignlib import demo
from alignlib.configs import TrainConfig
from alignlib.data import DataSource, load_preference_dataset, read_source
from alignlib.distributed import SINGLE_PROCESS
from alignlib.run_data import load_run_datasets, normalise, subset_and_split


def write_jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", demo.read_pairs()[:40])


def prompts(dataset) -> list[str]:
    return list(dataset["prompt"])


def test_max_train_samples_draws_the_same_rows_for_the_same_seed(pairs):
    rows = normalise("pairs", pairs, "train", TrainConfig(), None)
    first, _ = subset_and_split(rows, TrainConfig(max_train_samples=10, seed=1))
    again, _ = subset_and_split(rows, TrainConfig(max_train_samples=10, seed=1))
    other, _ = subset_and_split(rows, TrainConfig(max_train_samples=10, seed=2))
    assert len(first) == 10 and prompts(first) == prompts(again) != prompts(other)
    assert set(prompts(first)) <= set(prompts(rows))
    assert prompts(first) != prompts(rows)[:10]  # shuffled, not the head of the file


def test_max_train_samples_above_the_rows_keeps_them_all(pairs, capsys):
    rows = normalise("pairs", pairs, "train", TrainConfig(), None)
    kept, _ = subset_and_split(rows, TrainConfig(max_train_samples=1000))
    assert prompts(kept) == prompts(rows)
    assert "max_train_samples 1000: the dataset has 40 rows, all used" in capsys.readouterr().out


def test_eval_split_holds_out_a_seeded_share_of_the_subset(pairs):
    rows = normalise("pairs", pairs, "train", TrainConfig(), None)
    cfg = TrainConfig(max_train_samples=30, eval_split_size=0.1, seed=3)
    train, held_out = subset_and_split(rows, cfg)
    subset, _ = subset_and_split(rows, TrainConfig(max_train_samples=30, seed=3))
    assert (len(train), len(held_out)) == (27, 3)
    assert sorted(prompts(train) + prompts(held_out)) == sorted(prompts(subset))
    again_train, again_held_out = subset_and_split(rows, cfg)
    assert prompts(again_held_out) == prompts(held_out)


def test_the_run_tokenizes_both_sides_of_the_split(pairs):
    cfg = TrainConfig(dataset_name=pairs, eval_split_size=0.25, max_length=64, max_prompt_length=32)
    train, held_out = load_run_datasets("pairs", cfg, demo.load_tokenizer(), SINGLE_PROCESS)
    assert (len(train), len(held_out)) == (30, 10)
    assert "chosen_input_ids" in held_out.column_names


@pytest.fixture(scope="module")
def stack_exchange_folder(tmp_path_factory):
    """A dataset folder laid out like lvwerra/stack-exchange-paired: data/finetune, data/rl, data/evaluation."""
    root = tmp_path_factory.mktemp("stack-exchange-paired")
    row = {"question": "how do i fix a boat ?", "response_j": " step by step .", "response_k": " no ."}
    for folder, count in (("finetune", 6), ("rl", 4), ("evaluation", 2)):
        write_jsonl(root / "data" / folder / "part-0.jsonl",
                    [dict(row, question=f"{folder} question {i} ?") for i in range(count)])
    return root


def test_data_dir_reads_one_sub_folder_of_a_dataset(stack_exchange_folder):
    cfg = TrainConfig(dataset_name=str(stack_exchange_folder), data_dir="data/rl",
                      eval_dataset_name=str(stack_exchange_folder), eval_data_dir="data/evaluation",
                      dataset_test_split="train", max_length=64, max_prompt_length=32)
    tokenizer = tiny_tokenizer(chat_template=False)
    train, held_out = load_run_datasets("pairs", cfg, tokenizer, SINGLE_PROCESS)
    assert (len(train), len(held_out)) == (4, 2)
    text = tokenizer.decode(train[0]["chosen_input_ids"])
    assert "rl question" in text and "evaluation" not in text


def test_a_missing_sub_folder_or_split_is_named_with_the_ones_there(stack_exchange_folder):
    with pytest.raises(ValueError, match=r"Unknown split \"test\". Should be one of \['train'\]. \(the split is "
                                         "dataset_train_split, or dataset_test_split"):
        read_source(DataSource(stack_exchange_folder, data_dir="data/evaluation"), "test")
    with pytest.raises(FileNotFoundError, match=r"has no sub-folder 'data/train'; its sub-folders: \['data', "):
        read_source(DataSource(stack_exchange_folder, data_dir="data/train"), "train")
    with pytest.raises(ValueError, match="data_dir: .* is a single data file"):
        read_source(DataSource(stack_exchange_folder / "data" / "rl" / "part-0.jsonl", data_dir="x"), "train")


def test_dataset_config_picks_a_named_configuration(tmp_path):
    """A folder whose README declares two configurations, as Hub datasets do."""
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: easy\n  data_files: easy/*.jsonl\n"
                                        "- config_name: hard\n  data_files: hard/*.jsonl\n---\n")
    rows = demo.read_pairs()[:5]
    write_jsonl(tmp_path / "easy" / "rows.jsonl", rows[:2])
    write_jsonl(tmp_path / "hard" / "rows.jsonl", rows[2:])
    assert len(read_source(DataSource(tmp_path, config="hard"), "train")) == 3
    assert prompts(read_source(DataSource(tmp_path, config="easy"), "train")) == [r["prompt"] for r in rows[:2]]


def test_orpo_dpo_mix_rows_are_conversations_beside_a_plain_prompt():
    """mlabonne/orpo-dpo-mix-40k: chosen/rejected hold the whole conversation, with plain-text copies
    of the question in `prompt` and `question` (and a `source`)."""
    from datasets import Dataset

    user = {"role": "user", "content": "What color is the sky?"}
    row = {"source": "test", "prompt": "What color is the sky?", "question": "What color is the sky?",
           "chosen": [user, {"role": "assistant", "content": "Blue."}],
           "rejected": [user, {"role": "assistant", "content": "Green."}]}
    tokenizer = tiny_tokenizer()
    (pair,) = load_preference_dataset(Dataset.from_list([row]), tokenizer=tokenizer).to_list()
    assert pair["prompt"] == tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert pair["chosen"] == "Blue.</s>\n" and pair["rejected"] == "Green.</s>\n"
    # responses only, beside a plain-text prompt: the prompt is the user's turn
    short = dict(row, chosen=row["chosen"][1:], rejected=row["rejected"][1:])
    assert load_preference_dataset(Dataset.from_list([short]), tokenizer=tokenizer).to_list() == [pair]


@pytest.mark.parametrize("settings, message", [
    ({"eval_split_size": 0.0}, "eval_split_size must lie strictly between 0 and 1"),
    ({"eval_split_size": 1.0}, "eval_split_size must lie strictly between 0 and 1"),
    ({"eval_split_size": 0.1, "eval_dataset_name": "x.jsonl"}, "eval_split_size and eval_dataset_name"),
    ({"max_train_samples": 0}, "max_train_samples must be a whole number >= 1, got 0"),
    ({"eval_data_dir": "data/evaluation"}, "eval_data_dir is a sub-folder of eval_dataset_name, which is not given"),
])
def test_settings_are_checked_before_anything_is_read(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).check("dpo")
