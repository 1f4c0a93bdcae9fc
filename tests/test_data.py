"""alignlib.data: loading every format from every kind of source, tokenization with masking and
truncation (expected ids built from the tokenizer directly), drop/identical counting, the
collator, bad input, random text (hypothesis), and token-level parity with TRL 1.16's own
DPOTrainer / RewardTrainer dataset preparation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers.tiny_tokenizer import tiny_tokenizer
from hypothesis import example, given
from hypothesis import strategies as st
from trl import DPOTrainer, RewardTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference as TRLDPOCollator
from trl.trainer.reward_trainer import DataCollatorForPreference as TRLRewardCollator

from alignlib.data import (
    PreferenceCollator,
    TokenizeStats,
    load_preference_dataset,
    load_prompt_dataset,
    pad_token_id_for,
    tokenize_preference_dataset,
)

# Rows like "Hello wor" + "ld" are there on purpose; the warning is checked once, where it is the subject.
pytestmark = pytest.mark.filterwarnings("ignore:.*do not end on a token boundary")

IGNORE = -100
BOS, EOS, PAD = 1, 2, 0  # the tiny tokenizer's special ids


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path_factory, monkeypatch):
    """Keep datasets' cache out of the home directory, and its progress bars out of the log."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# The chat template of the tiny tokenizer renders "<s>" once, then "<|role|>\n{content}</s>\n" per turn.
SKY_PROMPT = "<s><|user|>\nWhat color is the sky?</s>\n<|assistant|>\n"
SUN_PROMPT = "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nSun?</s>\n<|assistant|>\n"

# format name -> (rows, needs the tokenizer, expected normalised rows)
CASES = {
    "standard": (
        [
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "extra": 1},
            {"prompt": "Where is the sun?", "chosen": " In the sky.", "rejected": " In the sea.", "extra": 2},
        ],
        False,
        [("The sky is", " blue.", " green."), ("Where is the sun?", " In the sky.", " In the sea.")],
    ),
    "conversational_implicit_prompt": (
        [
            {
                "chosen": [user("What color is the sky?"), assistant("Blue.")],
                "rejected": [user("What color is the sky?"), assistant("Green.")],
            },
            {
                "chosen": [
                    system("Be brief."),
                    user("Hi"),
                    assistant("Hello"),
                    user("Sun?"),
                    assistant("Sky."),
                ],
                "rejected": [
                    system("Be brief."),
                    user("Hi"),
                    assistant("Hello"),
                    user("Sun?"),
                    assistant("Sea."),
                ],
            },
        ],
        True,
        [(SKY_PROMPT, "Blue.</s>\n", "Green.</s>\n"), (SUN_PROMPT, "Sky.</s>\n", "Sea.</s>\n")],
    ),
    "conversational_explicit_prompt": (
        [
            {
                "prompt": [user("What color is the sky?")],
                "chosen": [assistant("Blue.")],
                "rejected": [assistant("Green.")],
            },
            {
                "prompt": [system("Be brief."), user("Hi"), assistant("Hello"), user("Sun?")],
                "chosen": [assistant("Sky.")],
                "rejected": [assistant("Sea.")],
            },
        ],
        True,
        [(SKY_PROMPT, "Blue.</s>\n", "Green.</s>\n"), (SUN_PROMPT, "Sky.</s>\n", "Sea.</s>\n")],
    ),
    "orca_dpo_pairs": (
        [
            {"system": "", "question": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."},
            {"system": "Be brief.", "question": "Sun?", "chosen": "Sky.", "rejected": "Sea."},
        ],
        False,
        [
            ("Question: What color is the sky?\n\nAnswer: ", "Blue.", "Green."),
            ("Be brief.\n\nQuestion: Sun?\n\nAnswer: ", "Sky.", "Sea."),
        ],
    ),
    "stack_exchange_paired": (
        [
            {"qid": 7, "question": "Sun?", "date": "2020/01/01", "response_j": "Sky.", "response_k": "Sea."},
            {"qid": 8, "question": "Sky?", "date": "2020/01/02", "response_j": "Blue.", "response_k": "Red."},
        ],
        False,
        [("Question: Sun?\n\nAnswer: ", "Sky.", "Sea."), ("Question: Sky?\n\nAnswer: ", "Blue.", "Red.")],
    ),
}
SOURCE_KINDS = ["json", "jsonl", "parquet", "save_to_disk", "save_to_disk_dict", "data_files_dir"]


def write_source(rows, kind, tmp_path):
    """Write rows as one kind of source and return the path to load."""
    if kind == "json":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "parquet":
        path = tmp_path / "pairs.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "save_to_disk_dict":
        path = tmp_path / "saved_dict"
        DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
            str(path)
        )
    else:  # a folder of data files: the same datasets.load_dataset(name, split=...) call as a Hub name
        path = tmp_path / "repo"
        path.mkdir()
        (path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return str(path)


def as_tuples(dataset):
    return list(zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True))


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", SOURCE_KINDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format_from_every_source(case, kind, tmp_path):
    rows, needs_tokenizer, expected = CASES[case]
    tokenizer = tiny_tokenizer() if needs_tokenizer else None
    source = write_source(rows, kind, tmp_path)
    loaded = load_preference_dataset(source, tokenizer=tokenizer)
    assert loaded.column_names == ["prompt", "chosen", "rejected"]
    assert as_tuples(loaded) == expected
    named = case.replace("_implicit_prompt", "").replace("_explicit_prompt", "")
    assert as_tuples(load_preference_dataset(source, format=named, tokenizer=tokenizer)) == expected


@pytest.mark.parametrize("kind", ["save_to_disk_dict", "data_files_dir"])
def test_split_picks_the_split(kind, tmp_path):
    rows, _, expected = CASES["standard"]
    source = write_source(rows, kind, tmp_path)
    assert as_tuples(load_preference_dataset(source, split="test")) == expected[:1]


def test_question_answer_formats_use_the_chat_template_when_given_one():
    tokenizer = tiny_tokenizer()
    orca = load_preference_dataset(Dataset.from_list(CASES["orca_dpo_pairs"][0]), tokenizer=tokenizer)
    assert as_tuples(orca) == [
        (SKY_PROMPT, "Blue.</s>\n", "Green.</s>\n"),
        ("<s><|system|>\nBe brief.</s>\n<|user|>\nSun?</s>\n<|assistant|>\n", "Sky.</s>\n", "Sea.</s>\n"),
    ]
    stack = load_preference_dataset(Dataset.from_list(CASES["stack_exchange_paired"][0]), tokenizer=tokenizer)
    assert (
        stack[0]["prompt"] == "<s><|user|>\nSun?</s>\n<|assistant|>\n" and stack[0]["chosen"] == "Sky.</s>\n"
    )


def test_margin_column_is_kept_as_float(tmp_path):
    rows = [dict(row, margin=m) for row, m in zip(CASES["standard"][0], [1, 0.25], strict=True)]
    loaded = load_preference_dataset(write_source(rows, "jsonl", tmp_path))
    assert loaded.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert loaded["margin"] == [1.0, 0.25]
    tokenized, _ = tokenize_preference_dataset(loaded, tiny_tokenizer(), max_length=None)
    assert tokenized["margin"] == [1.0, 0.25]
    assert PreferenceCollator(PAD)(list(tokenized))["margin"].tolist() == [1.0, 0.25]


def test_identical_chosen_and_rejected_messages_keep_their_last_message_as_the_response():
    conversation = [user("Hi"), assistant("Hello")]
    loaded = load_preference_dataset(
        Dataset.from_list([{"chosen": conversation, "rejected": conversation}]), tokenizer=tiny_tokenizer()
    )
    assert as_tuples(loaded) == [("<s><|user|>\nHi</s>\n<|assistant|>\n", "Hello</s>\n", "Hello</s>\n")]


def test_a_template_that_renders_the_prompt_differently_warns_and_keeps_the_chat_exact():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (  # the generation prompt opens a thought block the full chat does not show
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}"
    )
    row = CASES["conversational_explicit_prompt"][0][0]
    with pytest.warns(UserWarning, match="renders the prompt alone"):
        loaded = load_preference_dataset(Dataset.from_list([row]), tokenizer=tokenizer)
    chat = "<|user|>\nWhat color is the sky?</s>\n<|assistant|>\nBlue.</s>\n"
    assert loaded[0]["prompt"] == "<|user|>\nWhat color is the sky?</s>\n<|assistant|>\n"
    assert loaded[0]["prompt"] + loaded[0]["chosen"] == chat


def test_hub_names_go_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return Dataset.from_list(CASES["standard"][0])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_preference_dataset("someone/some-prefs", split="train_prefs")
    assert calls == [("someone/some-prefs", "train_prefs")]
    assert as_tuples(loaded) == CASES["standard"][2]

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="someone/some-prefs"):
        load_preference_dataset("someone/some-prefs")


def test_load_prompt_dataset_from_prompts_and_from_pairs():
    tokenizer = tiny_tokenizer()
    strings = load_prompt_dataset(Dataset.from_list([{"prompt": "The sky is", "id": 3}]))
    assert strings.column_names == ["prompt"] and strings["prompt"] == ["The sky is"]
    messages = load_prompt_dataset(
        Dataset.from_list([{"prompt": [user("What color is the sky?")]}]), tokenizer=tokenizer
    )
    assert messages["prompt"] == [SKY_PROMPT]
    for case in CASES:
        rows, needs_tokenizer, expected = CASES[case]
        prompts = load_prompt_dataset(
            Dataset.from_list(rows), tokenizer=tokenizer if needs_tokenizer else None
        )
        assert prompts.column_names == ["prompt"]
        assert prompts["prompt"] == [prompt for prompt, _, _ in expected]
    with pytest.raises(ValueError, match=r"row 1: field 'prompt'"):
        load_prompt_dataset(Dataset.from_list([{"prompt": None}, {"prompt": "x"}]))
    with pytest.raises(ValueError, match="chat template"):
        load_prompt_dataset(Dataset.from_list([{"prompt": [user("Hi")]}]))


# ------------------------------------------------------------------------- bad input

STANDARD_ROW = {"prompt": "p", "chosen": " c", "rejected": " r"}


def _with_row(index, **fields):
    rows = [dict(STANDARD_ROW) for _ in range(3)]
    rows[index].update(fields)
    return rows


@pytest.mark.parametrize(
    ("rows", "format", "tokenizer", "message"),
    [
        (
            [{"text": "a", "label": 1}],
            "auto",
            None,
            r"columns found \['text', 'label'\].*standard.*stack_exchange",
        ),
        ([{"chosen": "a", "rejected": "b"}], "auto", None, r"columns found \['chosen', 'rejected'\]"),
        (
            [STANDARD_ROW],
            "stack_exchange_paired",
            None,
            r"needs columns \['question', 'response_j', 'response_k'\]",
        ),
        ([STANDARD_ROW], "hh_rlhf", None, r"unknown format 'hh_rlhf'"),
        (_with_row(2, prompt=None), "auto", None, r"row 3: field 'prompt' must be a string, got None"),
        (_with_row(1, rejected=None), "standard", None, r"row 2: field 'rejected'"),
        (
            [dict(STANDARD_ROW, margin=1.0), dict(STANDARD_ROW, margin=None)],
            "auto",
            None,
            r"row 2: field 'margin'",
        ),
        (
            [dict(STANDARD_ROW, margin=float("nan"))],
            "auto",
            None,
            r"row 1: field 'margin' must be a finite number",
        ),
        (
            [{"chosen": [user("a"), assistant("b")], "rejected": [user("a"), {"role": "assistant"}]}],
            "auto",
            "tiny",
            r"row 1: field 'rejected', message 2 needs string 'role' and 'content'",
        ),
        (
            [{"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}],
            "auto",
            None,
            "chat template",
        ),
        (
            [{"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}],
            "auto",
            "tiny_without_template",
            "chat template",
        ),
        (
            [
                {"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
                {"prompt": None, "chosen": [assistant("b")], "rejected": [assistant("c")]},
            ],
            "auto",
            "tiny",
            r"row 2: field 'prompt' must be a non-empty list of messages, got None",
        ),
        (
            [{"system": 3, "question": "q", "chosen": "a", "rejected": "b"}],
            "auto",
            None,
            r"row 1: field 'system'",
        ),
        (
            [{"question": "q", "response_j": "a", "response_k": None}],
            "auto",
            None,
            r"row 1: field 'response_k'",
        ),
    ],
)
def test_bad_input_names_what_is_wrong(rows, format, tokenizer, message):
    tokenizer = {
        None: None,
        "tiny": tiny_tokenizer(),
        "tiny_without_template": tiny_tokenizer(chat_template=False),
    }[tokenizer]
    with pytest.raises(ValueError, match=message):
        load_preference_dataset(Dataset.from_list(rows), format=format, tokenizer=tokenizer)


def test_a_non_string_field_in_a_file_names_row_and_field(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(STANDARD_ROW) + "\n" + json.dumps(dict(STANDARD_ROW, chosen=5)) + "\n")
    with pytest.raises(ValueError, match=r"row 2: field 'chosen' must be a string, got int '5'"):
        load_preference_dataset(str(path))


def test_missing_files_unknown_types_empty_data_and_missing_splits(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preference_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_preference_dataset(str(tmp_path / "no_such_folder"))
    (tmp_path / "pairs.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unknown data file type '\.txt'"):
        load_preference_dataset(str(tmp_path / "pairs.txt"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_preference_dataset(str(tmp_path / "empty.jsonl"))
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(
        str(tmp_path / "empty.parquet")
    )
    with pytest.raises(ValueError, match="empty"):
        load_preference_dataset(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="empty"):
        load_preference_dataset(Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}))
    source = write_source(CASES["standard"][0], "save_to_disk_dict", tmp_path)
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_preference_dataset(source, split="validation")


def test_tokenize_rejects_bad_arguments():
    tokenizer = tiny_tokenizer()
    pairs = Dataset.from_list([STANDARD_ROW])
    with pytest.raises(ValueError, match=r"lacks columns \['prompt'\]"):
        tokenize_preference_dataset(pairs.remove_columns("prompt"), tokenizer, max_length=8)
    with pytest.raises(ValueError, match="empty"):
        tokenize_preference_dataset(pairs.select([]), tokenizer, max_length=8)
    with pytest.raises(ValueError, match=r"max_prompt_length \(8\) must be smaller than max_length \(8\)"):
        tokenize_preference_dataset(pairs, tokenizer, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tokenize_preference_dataset(pairs, tokenizer, max_length=0)
    with pytest.raises(ValueError, match="max_prompt_length must be a positive int"):
        tokenize_preference_dataset(pairs, tokenizer, max_length=8, max_prompt_length=-1)
    no_eos = tiny_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        tokenize_preference_dataset(pairs, no_eos, max_length=8)


# ------------------------------------------------------------------------ tokenization

PROMPT = "Where is the sun? What color is the sky?"
CHOSEN, REJECTED = " It is in the sky.", " In the sea."


def _pieces(tokenizer, prompt, *responses):
    """Prompt ids and response ids, straight from the tokenizer; checks no token spans the boundary."""
    prompt_ids = tokenizer(prompt).input_ids
    response_ids = [tokenizer(response, add_special_tokens=False).input_ids for response in responses]
    for response, ids in zip(responses, response_ids, strict=True):
        assert tokenizer(prompt + response).input_ids == prompt_ids + ids  # a clean boundary
    return prompt_ids, response_ids


@pytest.mark.parametrize("add_bos", [True, False])
def test_prompt_cut_from_the_left_and_responses_from_the_right(add_bos):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    prompt_ids, (chosen_ids, rejected_ids) = _pieces(tokenizer, PROMPT, CHOSEN, REJECTED)
    assert len(prompt_ids) > 8 and len(chosen_ids) > 4 and (prompt_ids[0] == BOS) == add_bos
    pairs = Dataset.from_list([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
    tokenized, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=9, max_prompt_length=5)

    # Left cut keeps the last 5 prompt tokens, except that a leading BOS stays in front.
    kept_prompt = [BOS] + prompt_ids[-4:] if add_bos else prompt_ids[-5:]
    kept_chosen = (chosen_ids + [EOS])[:4]  # 9 - 5 tokens of room, cut from the right
    kept_rejected = (rejected_ids + [EOS])[:4]
    row = tokenized[0]
    assert row["chosen_input_ids"] == kept_prompt + kept_chosen
    assert row["rejected_input_ids"] == kept_prompt + kept_rejected
    assert row["chosen_labels"] == [IGNORE] * 5 + kept_chosen
    assert row["rejected_labels"] == [IGNORE] * 5 + kept_rejected
    assert row["prompt_length"] == 5
    assert stats == TokenizeStats(
        pairs_in=1,
        pairs_kept=1,
        dropped_empty_response=0,
        identical_pairs=0,
        prompts_truncated=1,
        responses_truncated=1,
        boundary_merges=0,
    )


def test_no_truncation_and_response_only_truncation():
    tokenizer = tiny_tokenizer()
    prompt_ids, (chosen_ids, rejected_ids) = _pieces(tokenizer, PROMPT, CHOSEN, REJECTED)
    pairs = Dataset.from_list([{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}])
    full, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    assert full[0]["chosen_input_ids"] == prompt_ids + chosen_ids + [EOS]
    assert full[0]["rejected_labels"] == [IGNORE] * len(prompt_ids) + rejected_ids + [EOS]
    assert stats.prompts_truncated == stats.responses_truncated == 0
    limit = len(prompt_ids) + 2
    cut, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=limit)
    assert cut[0]["chosen_input_ids"] == prompt_ids + chosen_ids[:2]
    assert cut[0]["rejected_labels"] == [IGNORE] * len(prompt_ids) + rejected_ids[:2]
    assert (stats.prompts_truncated, stats.responses_truncated) == (0, 1)


def test_a_token_merging_across_the_boundary_belongs_to_the_response():
    tokenizer = tiny_tokenizer()
    whole = tokenizer("Hello world").input_ids
    assert tokenizer("Hello wor").input_ids != whole[:3]  # "wor" + "ld" tokenize as one "world"
    pairs = Dataset.from_list([{"prompt": "Hello wor", "chosen": "ld", "rejected": "ld!"}])
    with pytest.warns(UserWarning, match="1 of 1 prompts do not end on a token boundary"):
        tokenized, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    assert stats.boundary_merges == 1
    prompt_length = tokenized[0]["prompt_length"]
    assert tokenized[0]["chosen_input_ids"] == whole + [EOS]
    assert tokenized[0]["chosen_input_ids"][:prompt_length] == tokenizer("Hello").input_ids
    assert tokenized[0]["chosen_labels"] == [IGNORE] * prompt_length + whole[prompt_length:] + [EOS]


@pytest.mark.parametrize("add_bos", [True, False])
def test_bos_is_never_doubled(add_bos):
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    pairs = Dataset.from_list(
        [
            {"prompt": "<s>The sky is", "chosen": " blue.", "rejected": " green."},
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        ]
    )
    tokenized, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    bos_in_text, plain = tokenized[0]["chosen_input_ids"], tokenized[1]["chosen_input_ids"]
    assert bos_in_text.count(BOS) == 1 and bos_in_text[0] == BOS
    assert bos_in_text[1:] == tokenizer("The sky is blue.", add_special_tokens=False).input_ids + [EOS]
    assert plain.count(BOS) == (1 if add_bos else 0)


def test_eos_appended_once():
    tokenizer = tiny_tokenizer()
    pairs = Dataset.from_list([{"prompt": "The sky is", "chosen": " blue.</s>", "rejected": ""}])
    tokenized, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    prompt_ids = tokenizer("The sky is").input_ids
    assert tokenized[0]["chosen_input_ids"] == prompt_ids + tokenizer(
        " blue.", add_special_tokens=False
    ).input_ids + [EOS]
    assert tokenized[0]["rejected_input_ids"] == prompt_ids + [EOS]  # an empty response is just EOS
    pairs = Dataset.from_list([{"prompt": "The sky is", "chosen": " blue.</s>", "rejected": " green."}])
    bare, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=None, add_eos=False)
    assert bare[0]["chosen_input_ids"] == tokenized[0]["chosen_input_ids"]  # its EOS was in the text
    assert bare[0]["rejected_input_ids"] == tokenizer("The sky is green.").input_ids  # none added


def test_drop_and_identical_counts():
    tokenizer = tiny_tokenizer()
    prompt_ids = tokenizer("Q:").input_ids
    max_length = len(prompt_ids) + 1  # room for one response token after "Q:"
    assert len(tokenizer("Q: sky sky").input_ids) == max_length + 1
    long_response = " sky is blue and the sun"
    rows = [
        # cut to " a" and " a": identical after truncation, kept and counted
        {"prompt": "Q:", "chosen": " a b", "rejected": " a c"},
        # the prompt alone fills max_length: dropped
        {"prompt": " ".join(["The sky is blue."] * 10), "chosen": " x", "rejected": " y"},
        # the prompt is one token over max_length, the responses are long: dropped, never sliced from the end
        {"prompt": "Q: sky sky", "chosen": long_response, "rejected": long_response + "!"},
        # identical texts: kept and counted
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},
        # an empty chosen response is just EOS: kept
        {"prompt": "Q:", "chosen": "", "rejected": " y"},
    ]
    tokenized, stats = tokenize_preference_dataset(Dataset.from_list(rows), tokenizer, max_length=max_length)
    assert stats == TokenizeStats(
        pairs_in=5,
        pairs_kept=3,
        dropped_empty_response=2,
        identical_pairs=2,
        prompts_truncated=0,
        responses_truncated=3,
        boundary_merges=0,
    )
    a_token = tokenizer(" a", add_special_tokens=False).input_ids[0]
    same_token = tokenizer(" same", add_special_tokens=False).input_ids[0]
    assert tokenized["chosen_input_ids"] == [
        prompt_ids + [a_token],
        prompt_ids + [same_token],
        prompt_ids + [EOS],
    ]
    # Without EOS an empty response has no token at all: that pair is dropped too.
    _, stats = tokenize_preference_dataset(Dataset.from_list(rows), tokenizer, max_length=None, add_eos=False)
    assert (stats.pairs_kept, stats.dropped_empty_response) == (4, 1)
    with pytest.raises(ValueError, match="all 1 pairs were dropped"):
        tokenize_preference_dataset(Dataset.from_list(rows[1:2]), tokenizer, max_length=8)


def test_results_are_cached_and_the_cache_follows_the_code(tmp_path, monkeypatch):
    import alignlib.data.tokenize

    tokenizer = tiny_tokenizer()
    pairs = load_preference_dataset(write_source(CASES["standard"][0], "jsonl", tmp_path))
    first, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=16)
    again, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=16)
    assert first.cache_files and again.cache_files == first.cache_files  # read back from datasets' cache
    # datasets hashes a module's function by its name only; the file's hash in the arguments keys the cache
    monkeypatch.setattr(alignlib.data.tokenize, "_CODE_VERSION", "a-changed-alignlib")
    changed, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=16)
    assert changed.cache_files != first.cache_files
    assert changed["chosen_input_ids"] == first["chosen_input_ids"]


def test_a_tokenizer_without_pad_token_pads_with_eos_and_is_not_modified():
    tokenizer = tiny_tokenizer(with_pad=False)
    assert tokenizer.pad_token is None
    pairs = Dataset.from_list([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green and blue."}])
    tokenized, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    pad_id = pad_token_id_for(tokenizer)
    assert pad_id == EOS
    batch = PreferenceCollator(pad_id)(list(tokenized))
    chosen, rejected = tokenized[0]["chosen_input_ids"], tokenized[0]["rejected_input_ids"]
    assert len(chosen) < len(rejected)
    assert batch["input_ids"][0].tolist() == chosen + [EOS] * (len(rejected) - len(chosen))
    assert batch["attention_mask"][0].tolist() == [1] * len(chosen) + [0] * (len(rejected) - len(chosen))
    assert batch["labels"][0, len(chosen) :].eq(IGNORE).all()
    assert pad_token_id_for(tiny_tokenizer()) == PAD
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        pad_token_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=None))


# --------------------------------------------------------------------------- collation

ROWS = [
    {
        "chosen_input_ids": [1, 5, 6],
        "chosen_labels": [IGNORE, 5, 6],
        "rejected_input_ids": [1, 7],
        "rejected_labels": [IGNORE, 7],
        "prompt_length": 1,
        "margin": 0.5,
    },
    {
        "chosen_input_ids": [1, 8, 9, 10, 11],
        "chosen_labels": [IGNORE, IGNORE, 9, 10, 11],
        "rejected_input_ids": [1, 8, 12],
        "rejected_labels": [IGNORE, IGNORE, 12],
        "prompt_length": 2,
        "margin": -1.0,
    },
]


def test_collator_stacks_chosen_then_rejected_right_padded():
    batch = PreferenceCollator(pad_token_id=3)(ROWS)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "margin"}
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 3, 3],
        [1, 8, 9, 10, 11],
        [1, 7, 3, 3, 3],
        [1, 8, 12, 3, 3],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [IGNORE, 5, 6, IGNORE, IGNORE],
        [IGNORE, IGNORE, 9, 10, 11],
        [IGNORE, 7, IGNORE, IGNORE, IGNORE],
        [IGNORE, IGNORE, 12, IGNORE, IGNORE],
    ]
    assert batch["margin"].tolist() == [0.5, -1.0] and batch["margin"].dtype == torch.float32
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    padded = PreferenceCollator(pad_token_id=3, pad_to_multiple_of=8)(ROWS)
    assert padded["input_ids"].shape == padded["labels"].shape == (4, 8)
    assert padded["input_ids"][:, 5:].eq(3).all() and padded["labels"][:, 5:].eq(IGNORE).all()


def test_collator_for_a_reward_model_has_no_labels_and_gives_the_last_token():
    batch = PreferenceCollator(pad_token_id=3, for_reward_model=True)(ROWS)
    assert set(batch) == {"input_ids", "attention_mask", "last_token_index", "margin"}
    assert batch["last_token_index"].tolist() == [2, 4, 1, 2]
    with pytest.raises(ValueError, match="empty list"):
        PreferenceCollator(3)([])
    with pytest.raises(ValueError, match="chosen_input_ids"):
        PreferenceCollator(3)([{"prompt": "x"}])


def test_where_a_sequence_classifier_reads_its_score():
    """The documented pad-id caveat, checked on a real (tiny) LlamaForSequenceClassification."""
    from helpers.tiny_llama import tiny_llama
    from transformers import LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    pairs = Dataset.from_list(
        [
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " a deep green colour."},
            {"prompt": "Hi", "chosen": " there", "rejected": " you"},
        ]
    )
    tokenized, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=None)
    torch.manual_seed(0)
    for pad_id, offset in ((PAD, 0), (EOS, 1)):  # pad == EOS: the score sits one token before the final EOS
        model = tiny_llama(
            model_class=LlamaForSequenceClassification,
            seed=None,  # seeded once above, for both models
            hidden=16,
            vocab_size=len(tokenizer),
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            num_labels=1,
            pad_token_id=pad_id,
        ).eval()
        batch = PreferenceCollator(pad_id, for_reward_model=True)(list(tokenized))
        with torch.no_grad():
            pooled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            per_token = model.score(hidden.last_hidden_state)[..., 0]
        rows = torch.arange(per_token.shape[0])
        torch.testing.assert_close(pooled, per_token[rows, batch["last_token_index"] - offset])


def test_dataloader_over_a_tokenized_dataset():
    tokenizer = tiny_tokenizer()
    pairs = load_preference_dataset(Dataset.from_list(CASES["standard"][0]))
    tokenized, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=16, max_prompt_length=8)
    loader = torch.utils.data.DataLoader(tokenized, batch_size=2, collate_fn=PreferenceCollator(PAD))
    (batch,) = list(loader)
    assert batch["input_ids"].shape[0] == 4
    assert (
        batch["input_ids"][0].tolist()[: len(tokenized[0]["chosen_input_ids"])]
        == tokenized[0]["chosen_input_ids"]
    )
    assert (
        batch["input_ids"][2].tolist()[: len(tokenized[0]["rejected_input_ids"])]
        == tokenized[0]["rejected_input_ids"]
    )


# ----------------------------------------------------------------- random text (hypothesis)

TOKENIZERS = {True: tiny_tokenizer(add_bos=True), False: tiny_tokenizer(add_bos=False)}
short_text = st.text(max_size=30)
any_text = st.one_of(
    short_text, st.text(min_size=100, max_size=400), st.sampled_from(["", "</s>", "<s>", " "])
)


# A prompt one token over max_length with a long response (a bug once sliced the response from its end).
@example(
    rows=[{"prompt": "Q: sky sky", "chosen": " sky is blue", "rejected": " sky"}],
    max_length=4,
    max_prompt_length=None,
    add_bos=True,
)
@given(
    rows=st.lists(
        st.fixed_dictionaries({"prompt": any_text, "chosen": any_text, "rejected": short_text}),
        min_size=1,
        max_size=4,
    ),
    max_length=st.integers(2, 48),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 47)),
    add_bos=st.booleans(),
)
def test_random_text_keeps_the_invariants(rows, max_length, max_prompt_length, add_bos):
    tokenizer = TOKENIZERS[add_bos]
    if max_prompt_length is not None:
        max_prompt_length = min(max_prompt_length, max_length - 1)
    pairs = load_preference_dataset(Dataset.from_list(rows))
    assert as_tuples(pairs) == [(row["prompt"], row["chosen"], row["rejected"]) for row in rows]
    try:
        tokenized, stats = tokenize_preference_dataset(
            pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
        )
    except ValueError as err:  # the one documented failure: nothing left
        assert f"all {len(rows)} pairs were dropped" in str(err)
        return
    assert stats.pairs_kept == len(tokenized) == len(rows) - stats.dropped_empty_response
    for row in tokenized:
        n = row["prompt_length"]
        assert max_prompt_length is None or n <= max_prompt_length
        assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]
        for side in ("chosen", "rejected"):
            ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
            assert n < len(ids) <= max_length and len(labels) == len(ids)
            assert labels[:n] == [IGNORE] * n  # the prompt never reaches the loss
            assert labels[n:] == ids[n:]
            if n >= 2:  # no prompt text here starts with "<s><s>": the prompt has at most one BOS in front
                assert ids[:2] != [BOS, BOS]


# --------------------------------------------------------------- parity with TRL 1.16


# Rows chosen to exercise each tokenization rule: a clean boundary; a token merging across the
# boundary ("wor" + "ld"); EOS already in the text; an empty prompt (BOS only); identical responses
# (kept by both); a prompt that fills max_length=9 by itself (dropped by both).
PARITY_ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Hello wor", "chosen": "ld", "rejected": "ld!"},
    {"prompt": "Where is the sun?", "chosen": " It is in the sky.</s>", "rejected": " In the sea."},
    {"prompt": "", "chosen": "x", "rejected": "y"},
    {"prompt": "Q:", "chosen": " same", "rejected": " same"},
    {"prompt": " ".join(["The sky is blue."] * 4), "chosen": " x", "rejected": " y"},
]


def trl_dpo_prepare(rows, tokenizer, max_length):
    """TRL 1.16's own DPOTrainer._prepare_dataset (add EOS, tokenize, drop) on a stub trainer."""
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    stub = SimpleNamespace(_tokenizer=tokenizer)  # the one attribute the method reads from self
    return DPOTrainer._prepare_dataset(stub, Dataset.from_list(rows), tokenizer, args, "train")


def trl_reward_prepare(rows, tokenizer, max_length):
    """TRL 1.16's own RewardTrainer._prepare_dataset (add EOS, tokenize, drop long pairs) on a stub trainer."""
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length)
    return RewardTrainer._prepare_dataset(
        SimpleNamespace(), Dataset.from_list(rows), tokenizer, args, "train"
    )


def trl_dpo_batch(prepared, max_length):
    examples = [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in prepared]
    return TRLDPOCollator(pad_token_id=PAD, max_length=max_length)(examples)


def alignlib_batch(rows, tokenizer, max_length, **kwargs):
    pairs = load_preference_dataset(Dataset.from_list(rows), tokenizer=tokenizer)
    tokenized, stats = tokenize_preference_dataset(pairs, tokenizer, max_length=max_length, **kwargs)
    return PreferenceCollator(PAD)(list(tokenized)), stats


def assert_same_batch(ours, theirs):
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert (ours["labels"] != IGNORE).long().tolist() == theirs["completion_mask"].tolist()
    masked = torch.where(theirs["completion_mask"].bool(), theirs["input_ids"], IGNORE)
    assert ours["labels"].tolist() == masked.tolist()


@pytest.mark.parametrize("max_length", [None, 16, 9])
def test_dpo_tokenization_matches_trl(max_length):
    tokenizer = tiny_tokenizer()
    prepared = trl_dpo_prepare(PARITY_ROWS, tokenizer, max_length)
    ours, stats = alignlib_batch(PARITY_ROWS, tokenizer, max_length)
    assert_same_batch(ours, trl_dpo_batch(prepared, max_length))
    assert stats.pairs_kept == len(prepared)  # the same pairs dropped (a prompt that fills max_length)
    assert stats.identical_pairs == 1


def test_conversational_dpo_tokenization_matches_trl():
    tokenizer = tiny_tokenizer()
    rows = CASES["conversational_implicit_prompt"][0]
    assert_same_batch(
        alignlib_batch(rows, tokenizer, None)[0], trl_dpo_batch(trl_dpo_prepare(rows, tokenizer, None), None)
    )
    rows = CASES["conversational_explicit_prompt"][0]
    assert_same_batch(
        alignlib_batch(rows, tokenizer, 24)[0], trl_dpo_batch(trl_dpo_prepare(rows, tokenizer, 24), 24)
    )


def test_reward_tokenization_matches_trl():
    tokenizer = tiny_tokenizer()
    prepared = trl_reward_prepare(PARITY_ROWS, tokenizer, None)
    tokenized, _ = tokenize_preference_dataset(
        load_preference_dataset(Dataset.from_list(PARITY_ROWS)), tokenizer, max_length=None
    )
    assert tokenized["chosen_input_ids"] == prepared["chosen_ids"]
    assert tokenized["rejected_input_ids"] == prepared["rejected_ids"]
    theirs = TRLRewardCollator(pad_token_id=PAD)(
        [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in prepared]
    )
    ours = PreferenceCollator(PAD, for_reward_model=True)(list(tokenized))
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()


def test_documented_differences_from_trl():
    """Each place where alignlib chooses differently from TRL 1.16, shown on TRL's own output."""
    tokenizer = tiny_tokenizer()

    # 1. max_prompt_length: TRL 1.16 has no prompt limit; it drops a pair whose prompt alone fills
    #    max_length (and otherwise cuts the end of prompt + response in its collator). alignlib cuts the
    #    prompt from the left first, keeping BOS, so the pair stays with room for its responses.
    row = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}]
    assert len(tokenizer(PROMPT).input_ids) >= 9
    assert len(trl_dpo_prepare(row, tokenizer, 9)) == 0
    ours, _ = tokenize_preference_dataset(
        Dataset.from_list(row), tokenizer, max_length=9, max_prompt_length=5
    )
    assert ours[0]["prompt_length"] == 5 and ours[0]["chosen_input_ids"][0] == BOS

    # 2. A response whose text ends with EOS then whitespace: TRL appends a second EOS, alignlib does not.
    row = [{"prompt": "Q:", "chosen": " yes</s>\n", "rejected": " no"}]
    theirs = trl_dpo_prepare(row, tokenizer, None)[0]["chosen_ids"]
    ours, _ = tokenize_preference_dataset(Dataset.from_list(row), tokenizer, max_length=None)
    response = tokenizer(" yes</s>\n", add_special_tokens=False).input_ids
    assert (
        theirs == response + [EOS] and ours[0]["chosen_labels"][-len(response) - 1 :] == [IGNORE] + response
    )

    # 3. A prompt text that starts with the BOS string: TRL's plain-text path gives two BOS, alignlib one.
    row = [{"prompt": "<s>Q:", "chosen": " yes", "rejected": " no"}]
    theirs = trl_dpo_prepare(row, tokenizer, None)[0]["prompt_ids"]
    ours, _ = tokenize_preference_dataset(Dataset.from_list(row), tokenizer, max_length=None)
    assert theirs[:2] == [BOS, BOS] and ours[0]["chosen_input_ids"][:2] == [BOS] + theirs[2:3]

    # 4. A chat template that writes neither BOS nor EOS: TRL tokenizes conversations without the
    #    tokenizer's special tokens and adds no EOS; alignlib's rendered text goes through the tokenizer
    #    like any text (BOS added as the tokenizer does) and every response ends with EOS.
    bare = tiny_tokenizer()
    bare.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    rows = CASES["conversational_explicit_prompt"][0][:1]
    theirs = trl_dpo_prepare(rows, bare, None)[0]
    pairs = load_preference_dataset(Dataset.from_list(rows), tokenizer=bare)
    ours, _ = tokenize_preference_dataset(pairs, bare, max_length=None)
    assert ours[0]["chosen_input_ids"] == [BOS] + theirs["prompt_ids"] + theirs["chosen_ids"] + [EOS]

    # 5. Reward data longer than max_length: TRL's RewardTrainer drops the pair, alignlib truncates it.
    row = [{"prompt": "Q:", "chosen": CHOSEN, "rejected": REJECTED}]
    assert len(tokenizer("Q:" + CHOSEN).input_ids) > 6
    assert len(trl_reward_prepare(row, tokenizer, 6)) == 0
    ours, stats = tokenize_preference_dataset(Dataset.from_list(row), tokenizer, max_length=6)
    assert stats.pairs_kept == 1 and len(ours[0]["chosen_input_ids"]) == 6
