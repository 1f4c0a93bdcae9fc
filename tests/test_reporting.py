"""The keys of TRL/transformers configs that say where metrics go and when a run logs, evaluates
and saves: report_to (TensorBoard, wandb), logging_dir, run_name, eval_strategy, fractional
logging/eval/save steps, logging_first_step; push_to_hub and the Hub keys, refused in one line.

Runs go through `train()` on a tiny Llama (hidden 32, 2 layers, the demo tokenizer): 8 demo pairs,
2 per step, so an epoch is 4 steps. TensorBoard is the real package, its event files read back
with tensorboard's own EventAccumulator; wandb is a stand-in module (see `fake_wandb`).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
from helpers.tiny_llama import save_tiny_llama, write_pairs

from alignlib import demo
from alignlib.configs import GRPOConfig, PPOConfig, TrainConfig, report_integrations
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig
from alignlib.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs8.jsonl", demo.read_pairs()[:8])


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("heldout") / "heldout.jsonl", demo.read_pairs(demo.HELDOUT_FILE)[:2])


def config(output_dir, dataset: str, heldout: str | None = None, **overrides) -> TrainConfig:
    """DPO on `dataset`, 2 pairs a step, full fine-tuning (the reference a frozen copy)."""
    settings = dict(output_dir=str(output_dir), dataset_name=dataset, max_steps=4, logging_steps=1, save_steps=0,
                    per_device_train_batch_size=2, per_device_eval_batch_size=2, max_length=48, max_prompt_length=24,
                    learning_rate=1e-3, seed=0, plot=False, disable_tqdm=True, lr_scheduler_type="constant")
    if heldout is not None:
        settings.update(eval_dataset_name=heldout, dataset_test_split="train")
    settings.update(overrides)
    return TrainConfig(**settings)


def run(cfg: TrainConfig, model: str):
    return train("dpo", cfg, ModelConfig(model_name_or_path=model))


def eval_steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "eval_loss" in r]


def train_steps_of(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def numbers(record: dict) -> dict[str, float]:
    """What a writer receives of a metrics.jsonl record: its numbers but the step."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for log_dir: tag -> [(step, value)], read by tensorboard itself
    (EventAccumulator, which drops events a later restart purged, as the TensorBoard app does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard should show it: each number at its step, `epoch` once per step."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in numbers(record).items():
            points = expected.setdefault(key, [])
            if key == "epoch" and points and points[-1][0] == record["step"]:
                continue
            points.append((record["step"], value))
    return expected


def assert_same_scalars(shown: dict, expected: dict) -> None:
    assert shown.keys() == expected.keys()
    for tag, points in expected.items():
        assert [step for step, _ in shown[tag]] == [step for step, _ in points], tag
        for (_, got), (_, want) in zip(shown[tag], points, strict=True):  # TensorBoard keeps float32
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(got) and math.isnan(want)), tag


def test_tensorboard_shows_every_number_of_metrics_jsonl(model, pairs, heldout, tmp_path):
    out = tmp_path / "run"
    run(config(out, pairs, heldout, report_to="tensorboard", eval_steps=2), model)
    records = read_metrics(out / "metrics.jsonl")
    assert eval_steps_of(records) == [0, 2, 4] and train_steps_of(records) == [1, 2, 3, 4]
    shown = tensorboard_scalars(out / "runs")
    assert {"loss", "rewards/accuracies", "eval_loss", "learning_rate", "epoch"} <= shown.keys()
    assert_same_scalars(shown, expected_scalars(records))


def test_a_resumed_run_shows_each_step_once_in_tensorboard(model, pairs, tmp_path):
    """The first run logs steps 1-4 and saves checkpoint-2; resuming from it logs 3 and 4 again (as a
    run killed after step 4 would). metrics.jsonl keeps each step once; so must TensorBoard, whose
    new event file marks step 3 as a restart. logging_dir puts the event files outside output_dir."""
    out, events = tmp_path / "run", tmp_path / "tensorboard"
    settings = dict(report_to=["tensorboard"], logging_dir=str(events), save_steps=2)
    run(config(out, pairs, **settings), model)
    run(config(out, pairs, **settings, resume_from_checkpoint=str(out / "checkpoint-2")), model)
    records = read_metrics(out / "metrics.jsonl")
    assert train_steps_of(records) == [1, 2, 3, 4]
    assert len(list(events.glob("events.out.tfevents.*"))) == 2
    assert not (out / "runs").exists()
    assert_same_scalars(tensorboard_scalars(events), expected_scalars(records))


def test_only_the_main_process_writes(tmp_path, monkeypatch, fake_wandb):
    import alignlib.metrics as metrics

    monkeypatch.setattr(metrics, "is_main_process", lambda: False)
    assert metrics.report_writers(["tensorboard", "wandb"], tmp_path / "run") == []
    assert not (tmp_path / "run").exists() and fake_wandb["init"] == []


def test_missing_tensorboard_is_refused_before_anything_is_written(model, pairs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails, as if not installed
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^report_to tensorboard needs the tensorboard package: "
                                         r"pip install tensorboard$"):
        run(config(out, pairs, report_to="tensorboard"), model)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# wandb (a stand-in)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_wandb(monkeypatch) -> dict:
    """A STAND-IN for the wandb package, not wandb: a module put in sys.modules whose `init` records
    its arguments and returns a run recording each `log(data, step=)` and `finish()`. It checks the
    wiring (what alignlib calls, with what), not wandb itself, which is not installed here."""
    calls: dict = {"init": [], "log": [], "finish": 0, "fail_at_log": None}

    class Run:
        def log(self, data, step=None):
            if calls["fail_at_log"] is not None and len(calls["log"]) == calls["fail_at_log"]:
                raise RuntimeError("stand-in wandb: log failed")
            calls["log"].append((dict(data), step))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    module = types.ModuleType("wandb")
    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_every_record_in_an_offline_run(model, pairs, heldout, tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "tiny-dpo")
    out = tmp_path / "run"
    run(config(out, pairs, heldout, report_to=["wandb"], run_name="first-try", max_steps=3, eval_steps=2), model)
    [init] = fake_wandb["init"]
    assert (init["mode"], init["dir"], init["project"], init["name"]) == ("offline", str(out), "tiny-dpo", "first-try")
    assert init["config"]["train"]["beta"] == 0.1 and init["config"]["objective"] == "dpo"
    records = read_metrics(out / "metrics.jsonl")
    assert fake_wandb["log"] == [(numbers(record), record["step"]) for record in records]
    assert [step for _, step in fake_wandb["log"]] == [0, 1, 2, 2, 3, 3]  # eval at 0, 2 and the end
    assert fake_wandb["finish"] == 1


def test_wandb_run_is_finished_when_training_fails(model, pairs, tmp_path, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    fake_wandb["fail_at_log"] = 1  # the second record
    with pytest.raises(RuntimeError, match="stand-in wandb"):
        run(config(tmp_path / "run", pairs, report_to="wandb"), model)
    assert fake_wandb["init"][0]["project"] == "alignlib" and fake_wandb["init"][0]["name"] is None
    assert len(fake_wandb["log"]) == 1 and fake_wandb["finish"] == 1


def test_report_to_all_is_every_installed_integration(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert report_integrations("all") == ("tensorboard",)
    assert report_integrations(["all", "tensorboard"]) == ("tensorboard",)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert report_integrations("all") == ()
    assert report_integrations(None) == report_integrations("none") == report_integrations([]) == ()


# ----------------------------------------------------------------------------------------------
# When a run logs, evaluates and saves
# ----------------------------------------------------------------------------------------------

# settings -> (steps with eval_* records, steps with training records, checkpoints); 8 pairs, 2 a step:
# an epoch is 4 steps.
SCHEDULES = {
    "default: before, every eval_steps, end": (dict(max_steps=6, eval_steps=4), [0, 4, 6], None, None),
    "default without eval_steps: before and end": (dict(max_steps=6), [0, 6], None, None),
    "no": (dict(max_steps=6, eval_strategy="no"), [], None, None),
    "steps": (dict(max_steps=6, eval_strategy="steps", eval_steps=4), [0, 4, 6], None, None),
    "steps without eval_steps: every logging_steps": (dict(max_steps=6, eval_strategy="steps", logging_steps=2),
                                                      [0, 2, 4, 6], [2, 4, 6], None),
    "epoch": (dict(max_steps=6, eval_strategy="epoch"), [0, 4, 6], None, None),
    "fractional eval_steps": (dict(max_steps=8, eval_steps=0.25), [0, 2, 4, 6, 8], None, None),
    "fractional logging and save steps": (dict(max_steps=6, logging_steps=0.5, save_steps=0.34), [], [3, 6], [3]),
    "logging_first_step": (dict(max_steps=6, logging_steps=4, logging_first_step=True), [], [1, 4, 6], None),
    "without logging_first_step": (dict(max_steps=6, logging_steps=4), [], [4, 6], None),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_evaluations_metrics_lines_and_checkpoints_come_when_the_settings_say(name, model, pairs, heldout, tmp_path):
    settings, evaluations, lines, checkpoints = SCHEDULES[name]
    with_eval = bool(evaluations) or settings.get("eval_strategy") == "no"
    out = tmp_path / "run"
    result = run(config(out, pairs, heldout if with_eval else None, **settings), model)
    records = read_metrics(out / "metrics.jsonl")
    assert eval_steps_of(records) == evaluations
    assert train_steps_of(records) == (lines or list(range(1, settings["max_steps"] + 1)))
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == (checkpoints or [])
    assert (result.eval_before == {}) == (not evaluations)


# ----------------------------------------------------------------------------------------------
# Settings refused in one line, before anything is written
# ----------------------------------------------------------------------------------------------

REFUSED = {
    "push_to_hub": (dict(push_to_hub=True), ("push_to_hub", "needs a network", "hf upload REPO_ID out/final")),
    "hub_model_id": (dict(hub_model_id="me/tiny"), ("hub_model_id me/tiny", "hf upload me/tiny out/final")),
    "hub_token": (dict(hub_token="hf_SECRET"), ("hub_token (not shown)", "hf auth login")),
    "an integration alignlib has not": (dict(report_to="mlflow"), ("report_to 'mlflow'", "tensorboard, wandb")),
    "none with another": (dict(report_to=["none", "tensorboard"]), ("'none' cannot be combined",)),
    "logging_dir without tensorboard": (dict(logging_dir="tb"), ("logging_dir tb", "add tensorboard")),
    "unknown eval_strategy": (dict(eval_strategy="sometimes", eval_dataset_name="x"), ("eval_strategy", "'sometimes'")),
    "eval_strategy without an eval set": (dict(eval_strategy="epoch"), ("eval_strategy epoch", "no eval set")),
    "eval_steps without an eval set": (dict(eval_steps=5), ("eval_steps 5", "no eval set")),
    "eval_steps with eval_strategy no": (dict(eval_strategy="no", eval_steps=5, eval_dataset_name="x"),
                                         ("eval_steps 5", "eval_strategy no")),
    "eval_split_size with eval_strategy no": (dict(eval_strategy="no", eval_split_size=0.2),
                                              ("eval_split_size 0.2", "eval_strategy no")),
    "logging_steps neither whole nor a fraction": (dict(logging_steps=2.5), ("logging_steps", "2.5")),
    "eval_steps 0": (dict(eval_steps=0, eval_dataset_name="x"), ("eval_steps", "got 0")),
    "save_steps below 0": (dict(save_steps=-0.5), ("save_steps", "-0.5")),
}


@pytest.mark.parametrize("name", REFUSED)
def test_settings_that_cannot_work_are_refused_by_name(name):
    settings, fragments = REFUSED[name]
    with pytest.raises(ValueError) as refused:
        TrainConfig(output_dir="out", **settings).check("dpo")
    message = str(refused.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    assert "SECRET" not in message


def test_whole_steps_from_the_command_line_become_ints():
    cfg = TrainConfig(logging_steps=10.0, save_steps=0.0, eval_steps=0.5, report_to="tensorboard")
    assert (cfg.logging_steps, cfg.save_steps, cfg.eval_steps, cfg.report_to) == (10, 0, 0.5, ["tensorboard"])
    assert type(cfg.logging_steps) is int and type(cfg.save_steps) is int
    assert cfg.interval("eval_steps", 8) == 4 and cfg.interval("save_steps", 8) == 0
    assert TrainConfig(logging_steps=0.1).interval("logging_steps", 30) == 3  # not ceil(3.0000000000000004)


@pytest.mark.parametrize("config_class", [PPOConfig, GRPOConfig])
def test_the_online_loop_takes_report_to_none_and_refuses_the_rest(config_class):
    assert config_class(report_to="none").report_to == ["none"]
    with pytest.raises(ValueError, match="report_to wandb: the online loop .* writes output_dir/metrics.jsonl only"):
        config_class(report_to="wandb")
    with pytest.raises(ValueError, match="push_to_hub: .*needs a network.*hf upload REPO_ID"):
        config_class(push_to_hub=True)


def test_a_trl_yaml_with_these_keys_sets_the_same_fields(tmp_path):
    """`--config FILE.yaml` maps TRL's keys onto TrainConfig, a YAML string or list for report_to alike."""
    from alignlib.cli import parse_config
    from alignlib.models import ModelConfig

    yaml = tmp_path / "run.yaml"
    yaml.write_text("report_to: tensorboard\nlogging_dir: tb\nrun_name: dpo-1\neval_strategy: steps\n"
                    "eval_steps: 0.25\nlogging_steps: 5\nlogging_first_step: true\nsave_steps: 0.5\n")
    cfg, _ = parse_config((TrainConfig, ModelConfig), ["--config", str(yaml)], prog="alignlib train dpo")
    assert (cfg.report_to, cfg.logging_dir, cfg.run_name, cfg.eval_strategy) == (["tensorboard"], "tb", "dpo-1", "steps")
    assert (cfg.eval_steps, cfg.logging_steps, cfg.logging_first_step, cfg.save_steps) == (0.25, 5, True, 0.5)
    yaml.write_text("eval_strategy: no\n")  # YAML's false
    assert parse_config((TrainConfig, ModelConfig), ["--config", str(yaml)], prog="x")[0].eval_strategy == "no"
    yaml.write_text("report_to: [tensorboard, wandb]\n")
    flags = ["--config", str(yaml), "--report_to", "none"]  # a flag overrides the YAML
    assert parse_config((TrainConfig, ModelConfig), flags, prog="alignlib train dpo")[0].report_to == ["none"]
    assert parse_config((TrainConfig, ModelConfig), flags[:2], prog="x")[0].report_to == ["tensorboard", "wandb"]
