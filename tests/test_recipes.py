"""The shipped recipes (alignlib/recipes): every stage of every tutorial, run as the tutorial orders
them, on CPU at toy size.

Each tutorial runs in its own folder, which holds tiny stand-ins at the Hub names the recipes use
(`microsoft/phi-2` is a 2-layer Llama over the demo vocabulary, `lvwerra/stack-exchange-paired` a
folder with data/finetune, data/rl, ... in the Hub's columns), so `--config NAME` runs with the
recipe's own model, dataset, data_dir, split and output folder; a later stage finds the earlier
one's output at the path the recipe names. What the command line overrides is listed in SMALL
(size, steps, how often to log, evaluate and save) and CPU (the T4's fp16 and Ampere's bf16 need a
GPU); everything else (LoRA ranks and targets, 4-bit and 8-bit loading, optimizers, reference
strategies, packing, chat templates, learning rates, betas) is the recipe's.
"""

from __future__ import annotations

import json
import random
import shlex
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from alignlib import demo
from alignlib.cli import complete, main, parse_config
from alignlib.configs import OBJECTIVES, ONLINE_CONFIGS, ONLINE_OBJECTIVES
from alignlib.models import ModelConfig
from alignlib.recipes import INDEX_FILE, RECIPES_DIR, load_recipes
from alignlib.run_folder import MODEL_PATH_SETTINGS
from alignlib.trainer import TrainConfig
from tests.helpers.tiny_llama import save_tiny_llama

SMALL = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
         "--gradient_accumulation_steps", "1", "--max_length", "64", "--logging_steps", "1", "--save_steps", "1",
         "--disable_tqdm", "true", "--plot", "false"]
"""Toy size: two steps of two rows, 64 tokens (the sequences are the demo's, of at most ~40); a recipe that
evaluates every eval_steps evaluates after step 1, and one that warms up for warmup_steps warms up for 1
(train_stage adds --eval_steps 1 and --warmup_steps 1: warm-up may not outlast the run)."""
CPU = ["--fp16", "false", "--bf16", "false"]
"""The recipes' mixed precision needs a CUDA GPU (T4: fp16; Ampere and newer: bf16)."""
PROMPT_LENGTH = ["--max_prompt_length", "40"]
ONLINE_SMALL = ["--max_steps", "1", "--per_device_train_batch_size", "4", "--mini_batch_size", "2",
                "--ppo_epochs", "1", "--response_length", "6", "--min_response_length", "3", "--save_steps", "1",
                "--disable_tqdm", "true"]


def recipe_text(name: str) -> dict:
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())


# ----------------------------------------------------------------------------------------------
# The index and the files
# ----------------------------------------------------------------------------------------------


def test_the_index_names_every_recipe_file_and_only_those():
    files = {path.stem for path in RECIPES_DIR.glob("*.yaml")} - {INDEX_FILE.stem}
    assert set(load_recipes()) == files
    assert len(files) == 11


def test_each_stage_starts_from_an_earlier_stage_of_its_own_tutorial():
    recipes = load_recipes()
    for recipe in recipes.values():
        assert recipe.objective in OBJECTIVES
        if recipe.after is not None:
            earlier = recipes[recipe.after]
            assert (earlier.tutorial, earlier.stage < recipe.stage) == (recipe.tutorial, True), recipe.name
        else:
            assert recipe.stage == 1, recipe.name


@pytest.mark.parametrize("name", list(load_recipes()))
def test_every_recipe_is_valid_settings_for_its_objective(name):
    """Each key is a field of the objective's config or ModelConfig (the parser refuses others), the values
    pass the config's own checks, and the recipe's values reach the config unchanged."""
    recipe = load_recipes()[name]
    online = recipe.objective in ONLINE_OBJECTIVES
    config_class = ONLINE_CONFIGS[recipe.objective] if online else TrainConfig
    cfg, model_cfg = parse_config((config_class, ModelConfig), ["--config", name], prog="test")
    if not online:
        cfg.check(recipe.objective)
    model_cfg.check() if hasattr(model_cfg, "check") else None
    for key, value in recipe_text(name).items():
        held = getattr(cfg, key) if hasattr(cfg, key) else getattr(model_cfg, key)
        assert held == value, (name, key)
    assert f"alignlib train {recipe.objective} --config {name}" in recipe.path.read_text()


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def test_recipes_lists_every_stage_with_its_command_and_show_prints_the_file(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for recipe in load_recipes().values():
        assert f"alignlib train {recipe.objective:<6} --config {recipe.name}" in listing
        assert recipe.tutorial in listing
    assert main(["recipes", "--show", "phi2-t4-dpo"]) == 0
    assert capsys.readouterr().out.endswith((RECIPES_DIR / "phi2-t4-dpo.yaml").read_text())


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_mistakes_with_recipes_are_one_line_errors_and_write_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, ["train", "dpo", "--config", "phi2-t4-dpo-mergd"])
    assert "--config phi2-t4-dpo-mergd: no such file, and no recipe of that name" in line
    assert "phi2-t4-dpo-merged" in line
    line = error_line(capsys, ["train", "sft", "--config", "phi2-t4-dpo"])
    assert "--config phi2-t4-dpo is a recipe for `alignlib train dpo`, not sft" in line
    assert "no recipe of that name" in error_line(capsys, ["recipes", "--show", "nope"])
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_the_recipes_name_wins_over_the_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phi2-t4-sft").write_text("not_a_setting: 1\n")
    with pytest.raises(SystemExit) as exit_status:  # the flag parser's own exit, as for an unknown flag
        main(["train", "sft", "--config", "phi2-t4-sft"])
    assert exit_status.value.code == 2
    assert "unknown keys in phi2-t4-sft: not_a_setting" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The tutorials, stage after stage
# ----------------------------------------------------------------------------------------------


@contextmanager
def working_in(folder: Path):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield folder


def hub_model(folder: Path, name: str) -> None:
    """A tiny Llama with the demo tokenizer at `name` (a Hub name) under folder."""
    save_tiny_llama(folder / name, hidden=32)


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))


def demo_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` of the demo's pairs (with repeats when it has fewer), in a seeded order."""
    pairs = demo.read_pairs()
    rng = random.Random(seed)
    return [pairs[rng.randrange(len(pairs))] for _ in range(count)]


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def stack_exchange_paired(folder: Path) -> None:
    """lvwerra/stack-exchange-paired's layout: data/{finetune,reward,rl,evaluation}/ of qid, question,
    date, metadata, response_j (the better answer), response_k."""
    sizes = {"finetune": 200, "reward": 24, "rl": 24, "evaluation": 8}  # finetune: eval_split_size 0.005 -> 1 row
    for seed, (subset, size) in enumerate(sizes.items()):
        rows = [{"qid": i, "question": pair["prompt"], "date": "2023/01/01", "metadata": [],
                 "response_j": pair["chosen"], "response_k": pair["rejected"]}
                for i, pair in enumerate(demo_rows(size, seed))]
        write_parquet(folder / "lvwerra/stack-exchange-paired/data" / subset / "train-00000-of-00001.parquet", rows)


def run(argv: list[str]) -> None:
    assert main(argv) == 0, argv


def train_stage(name: str, *extra: str) -> None:
    """`alignlib train OBJECTIVE --config NAME` at toy size on CPU (SMALL, CPU, and `extra`), then the
    check that every value of the recipe that the command line did not override is the run's own, as
    its config.json records it (a local model path recorded absolute)."""
    recipe = load_recipes()[name]
    if recipe.objective in ONLINE_OBJECTIVES:
        flags = [*ONLINE_SMALL, *extra]
    else:
        evaluates = ["--eval_steps", "1"] if "eval_steps" in recipe_text(name) else []
        prompt = PROMPT_LENGTH if recipe.objective != "sft" else []  # the default 512 would not fit in 64
        warmup = ["--warmup_steps", "1"] if "warmup_steps" in recipe_text(name) else []  # at most max_steps
        flags = [*SMALL, *evaluates, *prompt, *warmup, *CPU, *extra]
    run(["train", recipe.objective, "--config", name, *flags])
    record = json.loads(Path(recipe_text(name)["output_dir"], "config.json").read_text())
    settings = {**record["model"], **record["train" if "train" in record else recipe.objective]}
    overridden = {flag[2:] for flag in flags if flag.startswith("--")}
    for key, value in recipe_text(name).items():
        if key in overridden:
            continue
        if key in MODEL_PATH_SETTINGS and Path(value).exists():
            value = str(Path(value).resolve())
        assert settings[key] == value, (name, key, settings[key], value)


def trained(output_dir: str) -> dict:
    """The last metrics line of a run, after checking the run left its final model."""
    folder = Path(output_dir)
    assert (folder / "final").is_dir()
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def answers(model_dir: str) -> str:
    text = complete(model_dir, "how do i fix a door ?", max_new_tokens=4)
    assert isinstance(text, str)
    return text


def test_llama3_dpo_qlora(tmp_path):
    """One stage: DPO with QLoRA r=64 and adamw_8bit on orca_dpo_pairs (system/question/chosen/rejected)."""
    with working_in(tmp_path):
        hub_model(tmp_path, "unsloth/llama-3-8b-bnb-4bit")
        rows = [{"system": "", "question": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                for p in demo_rows(12)]
        path = tmp_path / "Intel/orca_dpo_pairs/orca_rlhf.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        train_stage("llama3-dpo-qlora")
        assert trained("llama3-dpo-qlora")["step"] == 2
        config = json.loads(Path("llama3-dpo-qlora/config.json").read_text())
        assert config["model"]["lora_r"] == 64 and config["model"]["load_in_4bit"] is True
        assert config["train"]["optim"] == "adamw_8bit"
        answers("llama3-dpo-qlora/final")


def test_stack_exchange_sft_then_dpo(tmp_path):
    """SFT with QLoRA, packed, on data/finetune; then DPO from that adapter (merged under a new one) on
    data/rl, evaluated on data/evaluation."""
    with working_in(tmp_path):
        hub_model(tmp_path, "meta-llama/Llama-2-7b-hf")
        stack_exchange_paired(tmp_path)
        train_stage("stack-exchange-sft")
        sft = json.loads(Path("stack-exchange-sft/config.json").read_text())
        assert sft["train"]["packing"] is True and sft["train"]["completion_only_loss"] is False
        train_stage("stack-exchange-dpo")
        last = trained("stack-exchange-dpo")
        assert last["step"] == 2
        dpo = json.loads(Path("stack-exchange-dpo/config.json").read_text())
        assert dpo["model"]["start_adapter"] == "merge"
        assert any(key.startswith("eval_") or key.startswith("eval/") for line in
                   Path("stack-exchange-dpo/metrics.jsonl").read_text().splitlines() for key in json.loads(line))
        answers("stack-exchange-dpo/final")


def test_stackllama_sft_merge_reward_then_ppo(tmp_path):
    """SFT with 8-bit LoRA, the adapter merged into the base (stackllama-se), a reward model on
    data/reward from it, then PPO on data/rl's questions scored by that reward model."""
    with working_in(tmp_path):
        hub_model(tmp_path, "llama-7b")
        stack_exchange_paired(tmp_path)
        train_stage("stackllama-sft")
        trained("stackllama-sft")
        first = load_recipes()["stackllama-reward"].first  # the merge the index says to run before stage 2
        assert first.startswith("alignlib merge ")
        run(shlex.split(first)[1:])
        train_stage("stackllama-reward")
        trained("stackllama-reward")
        train_stage("stackllama-ppo")
        assert (Path("stackllama-ppo") / "final").is_dir()
        answers("stackllama-ppo/final")


@pytest.mark.parametrize(("dpo_recipe", "reference"), [("phi2-t4-dpo", []), ("phi2-t4-dpo-merged", []),
                                                      ("phi2-t4-dpo-two-models", []),
                                                      ("phi2-t4-dpo-merged", ["--reference_strategy", "precomputed"])])
def test_phi2_t4_sft_then_dpo(tmp_path, dpo_recipe, reference):
    """SFT with QLoRA on ultrachat messages (ChatML set up), then DPO on ultrafeedback from the SFT
    adapter, with each of the three references of TRL's PEFT docs, and the fourth (precomputed)."""
    with working_in(tmp_path):
        hub_model(tmp_path, "microsoft/phi-2")
        chat = [{"prompt": p["prompt"], "prompt_id": str(i), "messages": conversation(p["prompt"], p["chosen"])}
                for i, p in enumerate(demo_rows(16))]
        write_parquet(tmp_path / "HuggingFaceH4/ultrachat_200k/data/train_sft-00000-of-00001.parquet", chat)
        for split, size in (("train_prefs", 12), ("test_prefs", 4)):
            rows = [{"prompt": p["prompt"], "prompt_id": str(i), "chosen": conversation(p["prompt"], p["chosen"]),
                     "rejected": conversation(p["prompt"], p["rejected"]), "score_chosen": 8.0,
                     "score_rejected": 2.0} for i, p in enumerate(demo_rows(size, seed=len(split)))]
            write_parquet(tmp_path / f"HuggingFaceH4/ultrafeedback_binarized/data/{split}-00000-of-00001.parquet",
                          rows)
        train_stage("phi2-t4-sft")
        trained("phi2-t4-sft")
        train_stage(dpo_recipe, *reference)
        assert trained(dpo_recipe)["step"] == 2
        config = json.loads(Path(dpo_recipe, "config.json").read_text())
        strategy = reference[1] if reference else recipe_text(dpo_recipe)["reference_strategy"]
        assert config["train"]["reference_strategy"] == strategy
        answers(f"{dpo_recipe}/final")


def test_llama3_orpo_chatml(tmp_path):
    """One stage: ORPO with QLoRA on orpo-dpo-mix's conversations (split "all"), ChatML set up on the
    base tokenizer, 1% held out."""
    with working_in(tmp_path):
        hub_model(tmp_path, "meta-llama/Meta-Llama-3-8B")
        rows = [{"source": "demo", "prompt": p["prompt"], "question": p["prompt"],
                 "chosen": conversation(p["prompt"], p["chosen"]), "rejected": conversation(p["prompt"], p["rejected"])}
                for p in demo_rows(100)]
        write_parquet(tmp_path / "mlabonne/orpo-dpo-mix-40k/data/train-00000-of-00001.parquet", rows)
        train_stage("llama3-orpo-chatml")
        assert trained("llama3-orpo-chatml")["step"] == 2
        answers("llama3-orpo-chatml/final")
