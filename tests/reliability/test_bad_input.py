"""Bad input to the data pipeline, the trainer and the command: each gets a clear error, nothing is
written half-way.

- Broken data files: a JSON Lines line that is not JSON, or JSON but not an object (`null` too, which
  the JSON reader would take as a row of missing fields), a broken .json array, text that is not
  UTF-8 (JSON Lines, .json, CSV), a CSV the reader cannot parse, a broken file inside a folder: a
  ValueError naming the file, the 1-based line (or byte offset) and the problem. Good files are
  read once: the line scan runs only after a failed read.
- chosen identical to rejected: kept, counted in TokenizeStats (truncation included) and printed by
  alignlib.run_data.load_pairs.
- Token ids outside the model's vocabulary: `check_token_ids` names the row, the id and the size,
  fast on 100k rows.
- An adapter or a checkpoint made for another model: a ValueError, and the model is left as it was.
- Through `alignlib train dpo`: exit status 1, one line on stderr naming the problem, and no
  checkpoint, final model or metrics in output_dir.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset
from helpers.tiny_llama import save_tiny_llama
from helpers.tiny_tokenizer import tiny_tokenizer

import alignlib.data.files
from alignlib import demo
from alignlib.checkpoint import load_checkpoint, save_checkpoint
from alignlib.cli import main
from alignlib.data import (
    check_token_ids,
    load_preference_dataset,
    load_prompt_dataset,
    tokenize_preference_dataset,
)
from alignlib.models import ModelConfig, load_causal_lm
from alignlib.run_data import load_pairs
from alignlib.saved_models import load_for_generation, save_model
from alignlib.trainer import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*do not end on a token boundary")

LOADERS = {"load_preference_dataset": load_preference_dataset, "load_prompt_dataset": load_prompt_dataset}
ROW = {"prompt": "Where is the sun?", "chosen": " In the sky.", "rejected": " In the sea."}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")
    datasets.disable_progress_bars()


def good_line(i: int = 0) -> bytes:
    return json.dumps({**ROW, "prompt": f"Question {i}: where is the sun?"}).encode() + b"\n"


def write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Broken data files
# ----------------------------------------------------------------------------------------------


def good_lines(count: int) -> bytes:
    return b"".join(good_line(i) for i in range(count))


# name -> (file name, content, regex of the whole message; PATH stands for the file's path)
BROKEN_FILES = {
    "a line that is not JSON": (
        "train.jsonl", good_lines(16) + b'{"prompt": "a" "chosen": "b", "rejected": "c"}\n' + good_lines(5),
        r"PATH line 17 column 16: not valid JSON: Expecting ',' delimiter",
    ),
    # Blank lines count: line numbers are those an editor shows.
    "blank lines before the broken one": (
        "train.jsonl", good_lines(2) + b"\n\n" + good_lines(1) + b'{"prompt": }\n',
        r"PATH line 6 column 12: not valid JSON: Expecting value",
    ),
    "a last line cut short": ("train.jsonl", good_lines(3) + good_line(3)[:25], r"PATH line 4 column \d+: not valid JSON"),
    "a raw tab inside a string": (
        "train.jsonl", good_lines(1) + good_line(1).replace(b"Question", b"Ques\ttion"),
        r"PATH line 2 column 17: not valid JSON: Invalid control character",
    ),
    "an array line": ("train.jsonl", good_lines(3) + b'["a", "b"]\n' + good_lines(2),
                      r"PATH line 4: each line must be a JSON object \{\.\.\.\} \(one row\), got an array"),
    "a number line": ("train.jsonl", good_lines(1) + b"42\n", r"PATH line 2: each line must be a JSON object .* a number"),
    "a string line": ("train.jsonl", good_lines(2) + b'"hello"\n', r"PATH line 3: .* got a string"),
    # The JSON reader itself accepts this one (a row of None values).
    "a null line": ("train.jsonl", good_lines(4) + b"null\n" + good_lines(1), r"PATH line 5: .* got null"),
    "a UTF-8 BOM and a broken second line": (
        "train.jsonl", b"\xef\xbb\xbf" + good_lines(1) + b"{oops}\n", r"PATH line 2 column 2: not valid JSON"
    ),
    "a JSON array with a syntax error": (
        "train.json", b"[\n" + b",\n".join(json.dumps(ROW).encode() for _ in range(3)) + b",\n  {\"prompt\": ]\n",
        r"PATH line 5 column 14: not valid JSON: Expecting value",
    ),
    "a JSON array with a non-object item": (
        "train.json", b"[" + json.dumps(ROW).encode() + b", " + json.dumps(ROW).encode() + b', "text"]',
        r"PATH: item 2 of the JSON array must be an object \{\.\.\.\} \(one row\), got a string",
    ),
    "JSON Lines in a .json file": (
        "train.json", good_lines(3) + b'{"prompt": "a", }\n', r"PATH line 4 column 17: not valid JSON"
    ),
    "a corrupt Parquet file": ("train.parquet", b"PAR1 not really parquet",
                               r"cannot read 'PATH': ArrowInvalid: .*Parquet"),
    "an unparsable CSV": ("train.csv", b'prompt,chosen,rejected\na,b,c\n"a,b\n',
                          r"cannot read 'PATH': ParserError: .*EOF inside string"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", BROKEN_FILES)
def test_a_broken_file_names_the_file_the_line_and_the_problem(case, loader, tmp_path):
    name, content, message = BROKEN_FILES[case]
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match="^" + message.replace("PATH", re.escape(path))) as caught:
        LOADERS[loader](path)
    assert "\n" not in str(caught.value)  # one line, as the command prints it


def latin1_row(i: int) -> bytes:
    """A JSON Lines row whose prompt holds 'é' as the single Latin-1 byte 0xE9 (not UTF-8)."""
    return json.dumps({**ROW, "prompt": f"Caf\u00e9 {i}"}, ensure_ascii=False).encode("latin-1") + b"\n"


@pytest.mark.parametrize(
    "name, head, tail",
    [
        ("train.jsonl", good_lines(2), good_lines(3)),
        ("train.json", b"[" + json.dumps(ROW).encode() + b",\n" + json.dumps(ROW).encode() + b",\n", b"]"),
        ("train.csv", b"prompt,chosen,rejected\nWhere is the sun?,a,b\n", b"a,b,c\n"),
    ],
)
def test_text_that_is_not_utf8_names_the_line_and_the_byte(name, head, tail, tmp_path):
    bad = latin1_row(7) if name != "train.csv" else "Caf\u00e9,b,c\n".encode("latin-1")
    if name == "train.json":
        bad = bad.rstrip(b"\n")
    path = write(tmp_path / name, head + bad + tail)
    line = head.count(b"\n") + 1
    offset = len(head) + bad.index(b"\xe9")
    with pytest.raises(ValueError, match=rf"{re.escape(path)} line {line} \(byte offset {offset}\): not UTF-8 "
                                         r"text \(byte 0xe9.*save the file as UTF-8"):
        load_preference_dataset(path)


def test_a_broken_file_in_a_folder_is_named(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    write(folder / "a.jsonl", good_lines(3))
    bad = write(folder / "b.jsonl", good_lines(2) + b"{nope\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(bad)} line 3 column 2: not valid JSON"):
        load_preference_dataset(str(folder))


def test_good_files_are_read_once_and_a_big_broken_one_is_scanned_quickly(tmp_path, monkeypatch):
    big = good_lines(50) * 1000  # 50,000 lines, ~3 MB
    good = write(tmp_path / "good.jsonl", big)
    scanned = []
    real_scan = alignlib.data.files.file_problem
    monkeypatch.setattr(alignlib.data.files, "file_problem", lambda path: scanned.append(path) or real_scan(path))
    assert len(load_preference_dataset(good)) == 50_000
    assert scanned == []  # a file datasets reads without trouble is never scanned again

    broken = write(tmp_path / "broken.jsonl", big + b'{"prompt": "x", "chosen": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 50001 column 27: not valid JSON: Expecting value"):
        load_preference_dataset(broken)
    assert [Path(p).name for p in scanned] == ["broken.jsonl"]


def test_files_with_a_bom_crlf_and_blank_lines_still_load(tmp_path):
    content = b"\xef\xbb\xbf" + good_line(0).replace(b"\n", b"\r\n") + b"\n\n" + good_line(1)
    pairs = load_preference_dataset(write(tmp_path / "ok.jsonl", content))
    assert pairs["prompt"] == ["Question 0: where is the sun?", "Question 1: where is the sun?"]


# ----------------------------------------------------------------------------------------------
# chosen identical to rejected: kept and counted
# ----------------------------------------------------------------------------------------------

IDENTICAL_ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " blue."},  # identical text
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Where is the sun?", "chosen": "", "rejected": ""},  # both empty: EOS only on each side
    {"prompt": "Hello", "chosen": " world! It is in the sky.", "rejected": " world! It is in the sea."},
    {"prompt": "Question: how?", "chosen": " sorted(items)", "rejected": " items.sort()"},
]


def count_identical_by_hand(tokenizer, max_length):
    """Pairs whose token ids are equal within max_length, from the tokenizer directly."""
    count = 0
    for row in IDENTICAL_ROWS:
        chosen, rejected = (tokenizer(row["prompt"] + row[side])["input_ids"] + [2] for side in ("chosen", "rejected"))
        count += chosen[:max_length] == rejected[:max_length]
    return count


def test_identical_pairs_are_kept_and_counted(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in IDENTICAL_ROWS))
    pairs = load_preference_dataset(str(path))

    tokenized, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    assert (stats.pairs_in, stats.pairs_kept, stats.dropped_empty_response) == (5, 5, 0)
    assert stats.identical_pairs == 2 == count_identical_by_hand(tokenizer, None)  # rows 0 and 2
    assert len(tokenized) == 5

    # Cut before " sky"/" sea" differ: row 3 becomes identical too, and is still kept.
    cut = len(tokenizer("Hello world! It is in the")["input_ids"])
    tokenized, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=cut)
    assert stats.pairs_kept == 5 and stats.identical_pairs == 3 == count_identical_by_hand(tokenizer, cut)
    assert tokenized[3]["chosen_input_ids"] == tokenized[3]["rejected_input_ids"]


def test_the_trainer_prints_the_identical_count(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in IDENTICAL_ROWS))
    cfg = TrainConfig(max_length=64, max_prompt_length=32)
    tokenized, stats = load_pairs(str(path), "train", cfg, tokenizer, "train")
    out = capsys.readouterr().out
    assert stats.identical_pairs == 2 and len(tokenized) == 5
    assert re.search(r"\[train\] 5 pairs: 0 dropped.*\b2 with chosen identical to rejected \(kept\)", out), out


# ----------------------------------------------------------------------------------------------
# Token ids outside the model's vocabulary
# ----------------------------------------------------------------------------------------------


def first_id_at_or_above(tokenized: Dataset, limit: int) -> tuple[int, str, int]:
    """(row, column, id) of the first id >= limit, in the order rows, then columns, then positions."""
    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    for index, row in enumerate(tokenized):
        for column in columns:
            for token in row[column]:
                if token >= limit:
                    return index, column, token
    raise AssertionError(f"no id >= {limit}: pick rows with rarer text")


def test_check_token_ids_names_the_first_row_outside_the_vocabulary():
    tokenizer = tiny_tokenizer()
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Hello", "chosen": " world!", "rejected": " print(add(1, 2))"},
        {"prompt": "ab", "chosen": " \u00e9\u00e8\u00ea", "rejected": " zq"},  # rare bytes: high ids
    ]
    tokenized, _ = tokenize_preference_dataset(load_preference_dataset(Dataset.from_list(rows)), tokenizer,
                                               max_length=64)
    check_token_ids(tokenized, len(tokenizer))  # its own vocabulary: fine

    limit = 258
    row, column, token = first_id_at_or_above(tokenized, limit)
    with pytest.raises(ValueError, match=rf"^train dataset: row {row + 1} has token id {token} in {column}, outside the "
                                         rf"model's vocabulary of {limit} ids \(0\.\.{limit - 1}\); the tokenizer does "
                                         "not seem to belong to this model"):
        check_token_ids(tokenized, limit, what="train dataset")


def test_check_token_ids_skips_ignored_labels_and_catches_negative_ids():
    ids = [[1, 5, 6, 2]]
    pairs = Dataset.from_dict({"chosen_input_ids": ids, "chosen_labels": [[-100, -100, 6, 2]],
                               "rejected_input_ids": ids, "rejected_labels": [[-100, -100, 6, 2]]})
    check_token_ids(pairs, 7)
    with pytest.raises(ValueError, match="row 1 has token id 6 in chosen_input_ids"):
        check_token_ids(pairs, 6)
    negative = pairs.map(lambda row: {"rejected_labels": [-100, -1, 6, 2]})
    with pytest.raises(ValueError, match="row 1 has token id -1 in rejected_labels"):
        check_token_ids(negative, 7)
    reward_rows = pairs.remove_columns(["chosen_labels", "rejected_labels"])  # no labels: ids are checked
    with pytest.raises(ValueError, match="token id 5 in chosen_input_ids"):
        check_token_ids(reward_rows, 5)


def test_check_token_ids_reports_rows_of_a_filtered_dataset_and_bad_arguments():
    ids = [[1, 3, 2], [1, 4, 2], [1, 9, 2], [1, 3, 2], [1, 9, 2]]
    pairs = Dataset.from_dict({"chosen_input_ids": ids, "rejected_input_ids": ids})
    kept = pairs.filter(lambda row, i: i != 1, with_indices=True)  # an indices mapping over the table
    with pytest.raises(ValueError, match="row 2 has token id 9"):  # kept[1] is the original row 3
        check_token_ids(kept, 9)
    check_token_ids(kept.select([0, 2]), 9)  # only [1, 3, 2] rows
    for bad in (0, -3, True, 5.0, None):
        with pytest.raises(ValueError, match="vocab_size must be a positive int"):
            check_token_ids(pairs, bad)
    with pytest.raises(ValueError, match="has no input_ids columns"):
        check_token_ids(Dataset.from_dict({"prompt": ["a"]}), 9)


def test_check_token_ids_finds_the_last_bad_id_of_100k_rows():
    rows, tokens = 100_000, 100  # 4 columns x 10M ids
    rng = np.random.default_rng(0)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * tokens)

    def column(values):
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    ids = rng.integers(0, 32_000, rows * tokens, dtype=np.int64)
    labels = np.where(np.arange(rows * tokens) % tokens < 30, -100, ids)
    ids[-1] = 32_000  # one bad id: the very last token of the last row
    table = pa.table({"chosen_input_ids": column(ids), "chosen_labels": column(labels),
                      "rejected_input_ids": column(ids), "rejected_labels": column(labels)})
    pairs = Dataset(table)
    check_token_ids(pairs.select(range(rows - 1)), 32_000)
    with pytest.raises(ValueError, match=f"row {rows} has token id 32000 in chosen_input_ids"):
        check_token_ids(pairs, 32_000)


# ----------------------------------------------------------------------------------------------
# An adapter or a checkpoint made for another model
# ----------------------------------------------------------------------------------------------


def save_base(path: Path, hidden: int = 32, layers: int = 2) -> str:
    return save_tiny_llama(path, hidden=hidden, num_hidden_layers=layers, vocab_size=len(demo.load_tokenizer()),
                           max_position_embeddings=64)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"small": save_base(root / "small"), "wide": save_base(root / "wide", hidden=48),
            "deep": save_base(root / "deep", layers=3)}


def save_adapter(base: str, path: Path, **lora) -> str:
    torch.manual_seed(0)
    policy = load_causal_lm(ModelConfig(model_name_or_path=base, use_peft=True, lora_r=4, lora_alpha=8, **lora))
    save_model(policy, None, path)
    return str(path)


def point_adapter_at(adapter: str, base: str) -> None:
    config_path = Path(adapter) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config))


def test_an_adapter_for_a_wider_base_is_refused_by_load_for_generation_and_generate(bases, tmp_path, capfd):
    adapter = save_adapter(bases["small"], tmp_path / "adapter")
    point_adapter_at(adapter, bases["wide"])  # as if the base were replaced after training
    with pytest.raises(ValueError, match=rf"adapter in {re.escape(adapter)} was saved for a different base model "
                                         rf"than {re.escape(bases['wide'])}: .*size mismatch"):
        load_for_generation(adapter)
    capfd.readouterr()
    assert main(["generate", "--model", adapter, "--prompt", "how do i fix a boat ?"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlib: error: the adapter in") and "different base" in err[0]


# peft loads LoRA weights non-strictly: adapter tensors for layers the base lacks are dropped, and
# layers the adapter lacks keep a fresh (zero) adapter; load_for_generation compares the keys.
@pytest.mark.parametrize("trained_on, loaded_on", [("deep", "small"), ("small", "deep")])
def test_an_adapter_for_a_base_with_other_layers_is_refused(bases, tmp_path, trained_on, loaded_on):
    adapter = save_adapter(bases[trained_on], tmp_path / "adapter")
    with pytest.raises(ValueError, match="different base model"):
        load_for_generation(adapter, base_model_name_or_path=bases[loaded_on])


def lora_policy(base: str, **lora):
    torch.manual_seed(0)
    return load_causal_lm(ModelConfig(model_name_or_path=base, use_peft=True, lora_alpha=8, **lora))


@pytest.mark.parametrize(
    "saved, loaded, message",
    [
        ({"lora_r": 4}, {"lora_r": 8}, r"lora_[AB]\.default\.weight has shape \((4, 32|32, 4)\) in the checkpoint "
                                        r"and \((8, 32|32, 8)\) in the model"),
        ({"lora_r": 4}, {"lora_r": 4, "lora_target_modules": ["all-linear"]}, r"does not fit this model: missing \["),
    ],
    ids=["other rank", "other target modules"],
)
def test_a_lora_checkpoint_into_other_lora_shapes_is_refused_and_changes_nothing(bases, tmp_path, saved, loaded,
                                                                                  message):
    checkpoint = save_checkpoint(tmp_path, 1, model=lora_policy(bases["small"], **saved))
    model = lora_policy(bases["small"], **loaded)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(checkpoint))} does not fit this model: ") as err:
        load_checkpoint(checkpoint, model, restore_rng=False)
    assert re.search(message, str(err.value)), err.value
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # nothing loaded half-way


def test_a_lora_checkpoint_into_a_wider_base_is_refused(bases, tmp_path):
    checkpoint = save_checkpoint(tmp_path, 1, model=lora_policy(bases["small"], lora_r=4))
    with pytest.raises(ValueError, match=r"has shape \(4, 32\) in the checkpoint and \(4, 48\) in the model"):
        load_checkpoint(checkpoint, lora_policy(bases["wide"], lora_r=4), restore_rng=False)


# ----------------------------------------------------------------------------------------------
# Through the command: exit 1, one line on stderr, nothing in output_dir
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("cli") / "model", hidden=16, layers=1)


def demo_lines(count: int) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in demo.read_pairs()[:count])


CLI_CASES = {
    "a line that is not JSON": ("pairs.jsonl", demo_lines(4) + b'{"prompt": "how ?" "chosen": 1}\n',
                                r"pairs\.jsonl line 5 column 20: not valid JSON: Expecting ',' delimiter"),
    "a null line": ("pairs.jsonl", demo_lines(2) + b"null\n" + demo_lines(2),
                    r"pairs\.jsonl line 3: each line must be a JSON object"),
    "not UTF-8 (JSON Lines)": ("pairs.jsonl", demo_lines(3) + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
                               r"pairs\.jsonl line 4 \(byte offset \d+\): not UTF-8 text"),
    "not UTF-8 (CSV)": ("pairs.csv", b"prompt,chosen,rejected\nhow do i fix a boat ?,a,b\ncaf\xe9,a,b\n",
                        r"pairs\.csv line 3 \(byte offset \d+\): not UTF-8 text"),
    "an unparsable CSV": ("pairs.csv", b'prompt,chosen,rejected\na,b,c\n"a,b\n', r"cannot read .*pairs\.csv"),
}


@pytest.fixture
def library_logs_on_stderr(capfd, monkeypatch):
    """Point the log handlers of datasets and transformers (made at import, on the stream pytest had
    then) at the current sys.stderr, so that a test sees their log lines where a user would."""
    for name in ("datasets", "transformers"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # not the subclasses pytest adds
                monkeypatch.setattr(handler, "stream", sys.stderr)


def run_and_check_nothing_written(args: list[str], output_dir: Path, capfd, message: str) -> None:
    capfd.readouterr()
    assert main(args) == 1
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no traceback, no log lines from the libraries
    assert re.match(rf"alignlib: error: .*{message}", lines[0]), lines[0]
    written = sorted(p.relative_to(output_dir) for p in output_dir.rglob("*")) if output_dir.exists() else []
    assert written == [], written


def tiny_flags(model: str, output_dir: Path) -> list[str]:
    return ["--model", model, "--output_dir", str(output_dir), "--max_steps", "2", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--max_length", "48", "--max_prompt_length", "24",
            "--disable_tqdm", "true", "--plot", "false"]


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.parametrize("which", ["train", "eval"])
def test_the_command_stops_with_one_line_and_writes_nothing(case, which, model_dir, tmp_path, capfd,
                                                            library_logs_on_stderr):
    name, content, message = CLI_CASES[case]
    bad = write(tmp_path / name, content)
    good = write(tmp_path / "good.jsonl", demo_lines(8))
    datasets_flags = (["--dataset", bad] if which == "train"
                      else ["--dataset", good, "--eval_dataset", bad, "--dataset_test_split", "train"])
    output_dir = tmp_path / "out"
    run_and_check_nothing_written(["train", "dpo", *tiny_flags(model_dir, output_dir), *datasets_flags],
                                  output_dir, capfd, message)


def test_the_command_runs_on_good_data(model_dir, tmp_path, capfd):
    """The control for the cases above: the same flags on good data write the outputs."""
    good = write(tmp_path / "good.jsonl", demo_lines(8))
    output_dir = tmp_path / "out"
    assert main(["train", "dpo", *tiny_flags(model_dir, output_dir), "--dataset", good]) == 0
    assert (output_dir / "final").is_dir() and (output_dir / "metrics.jsonl").is_file()
    assert any(output_dir.glob("checkpoint-*"))


def test_the_command_refuses_a_tokenizer_larger_than_the_model(tmp_path, capfd, library_logs_on_stderr):
    small_vocab = tmp_path / "small-vocab"
    save_tiny_llama(small_vocab, hidden=16, seed=None, num_hidden_layers=1, vocab_size=40, max_position_embeddings=64,
                    pad_token_id=None)  # with the demo tokenizer: 105 ids for a 40-row embedding
    good = write(tmp_path / "good.jsonl", demo_lines(8))
    output_dir = tmp_path / "out"
    run_and_check_nothing_written(["train", "dpo", *tiny_flags(str(small_vocab), output_dir), "--dataset", good],
                                  output_dir, capfd, r"token id \d+ .* vocabulary of 40 ids")
