"""alignlib.rl: the PPO-with-KL loop.

- The update math of the loop (compute_targets + ppo_minibatch_loss) on the fixed tensors of
  the classic TRL 0.11.4 golden file matches TRL's rewards, advantages, returns, losses, stats
  and gradients.
- On the demo model: PPO raises the helpful rate on held-out prompts; the KL penalty keeps the
  policy near the reference; an interrupted and resumed run ends with the same weights.
- Bad input: an empty prompt set, prompts longer than the context, reward functions returning
  the wrong shape, non-numbers or NaN.

The demo base model is built once for the module with a shorter warm start than the embedded
default's (100 steps instead of 300, to keep the file fast); it answers helpfully about as often.
"""

import dataclasses
import json
import math

import pytest
import torch
from helpers.ppo_golden import CLASSIC, CLASSIC_INPUTS

from alignlib import demo
from alignlib.demo import (
    HELDOUT_FILE,
    TRAIN_FILE,
    demo_reward,
    ppo_embedded_default,
    prepare_base_model,
)
from alignlib.demo import ppo_demo_config as demo_config
from alignlib.losses import whiten
from alignlib.metrics import read_metrics
from alignlib.models import ModelConfig
from alignlib.rewards import RewardModelScorer, call_reward_function, load_reward_function
from alignlib.rl import PPOConfig, compute_targets, ppo_minibatch_loss, train_ppo
from alignlib.rollout import entropy_from_logits

TRL_STEP_METRICS = (
    "objective/kl", "objective/kl_coef", "objective/entropy", "env/reward_mean", "env/reward_std",
    "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/val/clipfrac",
    "ppo/returns/mean", "tokens_per_second",
)


@pytest.fixture(scope="module", autouse=True)
def _tiny_runs_on_one_thread(one_thread):
    """The runs here are tiny (see conftest's one_thread)."""


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return str(prepare_base_model(tmp_path_factory.mktemp("rl") / "base", steps=100))


@pytest.fixture(scope="module")
def demo_prompts():
    return demo.demo_prompts(TRAIN_FILE), demo.demo_prompts(HELDOUT_FILE)


# ----------------------------------------------------------------------------------------------
# One PPO step on fixed tensors: the loop's update math against classic TRL
# ----------------------------------------------------------------------------------------------


def _on_mask(ours, golden, mask):
    golden = torch.as_tensor(golden, dtype=torch.float64)
    torch.testing.assert_close(ours[mask], golden[mask], rtol=1e-9, atol=1e-12)
    assert bool((ours[~mask] == 0).all()), "padding must be 0"


@pytest.mark.parametrize("step", CLASSIC["steps"], ids=lambda s: "{kl_penalty}-kl_coef{kl_coef}".format(**s["config"]))
def test_loop_update_math_on_golden_rollout_matches_trl_classic(step):
    cfg = step["config"]
    inputs = CLASSIC_INPUTS[cfg["inputs"]]
    mask = inputs["mask"].bool()
    config = PPOConfig(
        kl_estimator=cfg.get("kl_penalty", "kl"), gamma=cfg.get("gamma", 1.0), lam=cfg.get("lam", 0.95),
        whiten_rewards=cfg.get("whiten_rewards", False), cliprange=cfg.get("cliprange", 0.2),
        cliprange_value=cfg.get("cliprange_value", 0.2), vf_coef=cfg.get("vf_coef", 0.1),
    )
    targets = compute_targets(inputs["scores"], inputs["logprobs"], inputs["ref_logprobs"], inputs["values"], mask,
                              kl_coef=cfg["kl_coef"], config=config)
    _on_mask(targets.kl, step["kls"], mask)
    _on_mask(targets.non_score_rewards, step["non_score_rewards"], mask)
    _on_mask(targets.advantages, step["advantages"], mask)
    _on_mask(targets.returns, step["returns"], mask)
    golden_rewards = torch.tensor(step["rewards"], dtype=torch.float64)  # TRL's, before whiten_rewards
    if cfg.get("whiten_rewards"):
        golden_rewards = whiten(golden_rewards, mask, shift_mean=False)
    _on_mask(targets.rewards, golden_rewards, mask)

    new_logprobs = inputs["new_logprobs"].clone().requires_grad_(True)
    vpreds = (targets.values + inputs["vpreds_offset"]).requires_grad_(True)
    out, stats = ppo_minibatch_loss(new_logprobs, vpreds, inputs["logprobs"], targets, mask, config=config,
                                    entropy=entropy_from_logits(inputs["logits"]))
    assert set(step["stats"]) <= set(stats), f"missing stats: {set(step['stats']) - set(stats)}"
    for name, expected in step["stats"].items():
        torch.testing.assert_close(stats[name], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12,
                                   msg=name)
    grad_logprobs, grad_vpreds = torch.autograd.grad(out.loss, [new_logprobs, vpreds])
    _on_mask(grad_logprobs, step["grad_new_logprobs"], mask)
    _on_mask(grad_vpreds, step["grad_vpreds"], mask)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def short_reward(prompts, responses):
    return [0.0] * (len(responses) - 1)


def nan_reward(prompts, responses):
    return [math.nan] * len(responses)


def text_reward(prompts, responses):
    return ["good"] * len(responses)


@pytest.mark.parametrize(("fn", "message"), [
    (short_reward, r"test_rl\.short_reward returned 2 scores for 3 completions"),
    (nan_reward, r"test_rl\.nan_reward returned a non-finite score, nan, at completion 0 of 3"),
    (text_reward, r"test_rl\.text_reward returned a non-number, 'good', at completion 0 of 3"),
    (lambda p, r: 1.0, r"<lambda> must return one number per completion"),
])
def test_reward_function_errors_name_the_function(fn, message):
    with pytest.raises(ValueError, match=message):
        call_reward_function(fn, ["a", "b", "c"], ["x", "y", "z"])


def test_reward_function_accepts_lists_arrays_and_tensors():
    import numpy as np

    for fn in (lambda p, r: [1, 2.5], lambda p, r: np.array([1.0, 2.5]), lambda p, r: torch.tensor([1.0, 2.5])):
        assert call_reward_function(fn, ["a", "b"], ["x", "y"]).tolist() == [1.0, 2.5]


def test_reward_spec_loading(tmp_path):
    assert load_reward_function("alignlib.demo:demo_reward") is demo_reward
    path = tmp_path / "my_reward.py"
    path.write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    assert load_reward_function(f"{path}:length")(["p"], ["abc"]) == [3]
    with pytest.raises(ValueError, match="module:function"):
        load_reward_function("alignlib.demo.demo_reward")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_reward_function("alignlib.demo:nope")
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_reward_function(f"{tmp_path}/missing.py:fn")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mini_batch_size": 65}, "mini_batch_size"),
    ({"kl_estimator": "k9"}, "kl_estimator"),
    ({"temperature": 0.0}, "temperature"),
    ({"missing_eos_penalty": -1.0}, "missing_eos_penalty"),
    ({"min_response_length": 99}, "min_response_length"),
    ({"reward": "a:b", "reward_model": "x"}, "not both"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def _tiny_config(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
              "mini_batch_size": 4, "ppo_epochs": 1, "num_eval_prompts": 4, "disable_tqdm": True}
    return demo_config(**{**values, **overrides})


def test_train_ppo_rejects_bad_input(base_model, tmp_path, demo_prompts):
    model_config = ModelConfig(model_name_or_path=base_model)
    with pytest.raises(ValueError, match="the prompt set is empty"):
        train_ppo(_tiny_config(tmp_path), model_config, reward_fn=demo_reward, prompts=[])
    too_long = "how do i " + "fix a door " * 40 + "?"
    with pytest.raises(ValueError, match=r"prompt 1 has 12\d tokens, but max_position_embeddings \(128\) - "
                                         r"response_length \(24\) leaves 104"):
        train_ppo(_tiny_config(tmp_path), model_config, reward_fn=demo_reward, prompts=["how do i fix a door ?",
                                                                                         too_long])
    with pytest.raises(ValueError, match=r"test_rl\.nan_reward returned a non-finite score, nan, at evaluation prompt "
                                         r"#0 \('how do i"):
        train_ppo(_tiny_config(tmp_path / "nan"), model_config, reward_fn=nan_reward, prompts=demo_prompts[0])
    with pytest.raises(ValueError, match=r"test_rl\.short_reward returned 3 scores for 4 completions for evaluation "
                                         r"prompt #0 .*\.\. evaluation prompt #3"):
        train_ppo(_tiny_config(tmp_path / "short"), model_config, reward_fn=short_reward, prompts=demo_prompts[0])
    with pytest.raises(ValueError, match="no reward"):
        train_ppo(_tiny_config(tmp_path), model_config, prompts=demo_prompts[0])


# ----------------------------------------------------------------------------------------------
# Learning, the KL term, resume
# ----------------------------------------------------------------------------------------------


def test_ppo_raises_the_helpful_rate_on_held_out_prompts(base_model, tmp_path, demo_prompts):
    """A shortened embedded default (the full one is measured in docs/rlhf.md)."""
    train, heldout = demo_prompts
    config = demo_config(output_dir=str(tmp_path / "out"), max_steps=14, disable_tqdm=True)
    result = train_ppo(config, ModelConfig(model_name_or_path=base_model), reward_fn=demo_reward, prompts=train,
                       eval_prompts=heldout)
    print(f"helpful rate on {result['eval/num_prompts']} held-out prompts: {result['eval/reward_before']:.3f} -> "
          f"{result['eval/reward_after']:.3f}, KL to the reference {result['eval/kl_after']:.2f} nats")
    assert result["eval/reward_before"] < 0.4
    assert result["eval/reward_after"] > result["eval/reward_before"] + 0.3
    assert result["eval/kl_after"] < 2 * config.target
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records if "objective/kl" in r] == list(range(1, 15))
    for name in TRL_STEP_METRICS:
        assert all(math.isfinite(r[name]) for r in records if "objective/kl" in r), name
    assert (tmp_path / "out" / "final" / "config.json").is_file()


def test_kl_penalty_keeps_the_policy_near_the_reference(base_model, tmp_path, demo_prompts):
    train, heldout = demo_prompts
    kls = {}
    for kl_coef in (0.0, 2.0):
        config = demo_config(output_dir=str(tmp_path / f"kl{kl_coef}"), max_steps=8, per_device_train_batch_size=32,
                             mini_batch_size=8, init_kl_coef=kl_coef, adap_kl_ctrl=False, disable_tqdm=True,
                             num_eval_prompts=64)
        result = train_ppo(config, ModelConfig(model_name_or_path=base_model), reward_fn=demo_reward,
                           prompts=train, eval_prompts=heldout)
        kls[kl_coef] = result["eval/kl_after"]
    print(f"KL to the reference after 8 steps: kl_coef 0 -> {kls[0.0]:.3f}, kl_coef 2 -> {kls[2.0]:.3f}")
    # Measured spread (this scenario, pinned constraints.txt, CPU): 16 runs, base-model seed 0 with run
    # seeds 0-9, and base seed = run seed 1-6. kl_coef 2: 0.119-0.377 (seed 0: 0.350); kl_coef 0:
    # 2.69-10.9; their ratio 8.6-75. Newer dependencies once gave 0.573 at kl_coef 2. The bounds sit
    # between the two populations: 1.0 is 1.75x the worst penalised KL seen and 2.7x below the
    # smallest unpenalised one; a ratio of 3 is 2.9x below the smallest measured. A penalty that does
    # nothing (the kl_coef 0 run's KL, ratio ~1) fails both.
    assert kls[2.0] < 1.0
    assert kls[0.0] > 3 * kls[2.0]


def _nan_logits_on_update_forwards(model_config, monkeypatch, bad_forwards):
    """Make the policy's lm_head emit NaN on the minibatch forwards (the ones with grad) numbered in
    bad_forwards (1-based); rollouts and the evaluation run without grad and stay clean."""
    import alignlib.rl

    real_load = alignlib.rl.load_causal_lm
    calls = {"update": 0}

    def load_causal_lm(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return output
            calls["update"] += 1
            return output + math.nan if calls["update"] in bad_forwards else output

        model.get_output_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(alignlib.rl, "load_causal_lm", load_causal_lm)


def test_nonfinite_minibatch_stops_or_is_skipped_as_in_the_offline_trainer(base_model, tmp_path, demo_prompts,
                                                                            monkeypatch):
    """on_nonfinite means the same in PPO as in alignlib.trainer: stop before the weights are touched,
    or drop that update (logged) and go on."""
    model_config = ModelConfig(model_name_or_path=base_model)
    _nan_logits_on_update_forwards(model_config, monkeypatch, bad_forwards={2})
    with pytest.raises(FloatingPointError, match=r"ppo step 2, pass 1, optimizer step 1: the loss is nan"):
        train_ppo(_tiny_config(tmp_path / "stop", max_steps=3), model_config, reward_fn=demo_reward,
                  prompts=demo_prompts[0])

    _nan_logits_on_update_forwards(model_config, monkeypatch, bad_forwards={2})
    result = train_ppo(_tiny_config(tmp_path / "skip", max_steps=3, on_nonfinite="skip"), model_config,
                       reward_fn=demo_reward, prompts=demo_prompts[0])
    records = read_metrics(tmp_path / "skip" / "out" / "metrics.jsonl")
    assert {"step": 2, "epoch": None, "skipped_nonfinite_step": 2} in records
    by_step = {r["step"]: r for r in records if "ppo/minibatch_updates" in r}
    assert by_step[2]["ppo/minibatch_updates"] == 0 and by_step[3]["ppo/minibatch_updates"] == 1
    assert math.isfinite(result["ppo/loss/policy"])


class SimulatedCrash(Exception):
    pass


def _crash_on_training_call(n):
    """demo_reward that raises on its n-th call with a training batch (8 prompts)."""
    calls = {"train": 0}

    def reward(prompts, responses):
        if len(prompts) == 8:
            calls["train"] += 1
            if calls["train"] == n:
                raise SimulatedCrash(f"crash in training call {n}")
        return demo_reward(prompts, responses)

    return reward


def test_resume_after_interruption_gives_the_same_weights(base_model, tmp_path, demo_prompts):
    train, heldout = demo_prompts
    model_config = ModelConfig(model_name_or_path=base_model)

    def config(name, **kw):
        return demo_config(output_dir=str(tmp_path / name), max_steps=4, save_steps=2, per_device_train_batch_size=8,
                           mini_batch_size=4, num_eval_prompts=4, disable_tqdm=True, lr_scheduler_type="linear", **kw)

    train_ppo(config("straight"), model_config, reward_fn=demo_reward, prompts=train, eval_prompts=heldout)
    with pytest.raises(ValueError, match="raised SimulatedCrash: crash in training call 3"):
        train_ppo(config("resumed"), model_config, reward_fn=_crash_on_training_call(3), prompts=train,
                  eval_prompts=heldout)
    assert not (tmp_path / "resumed" / "checkpoint-4").exists()
    result = train_ppo(config("resumed", resume_from_checkpoint="true"), model_config, reward_fn=demo_reward,
                       prompts=train, eval_prompts=heldout)
    assert result["resumed_from_step"] == 2

    straight = torch.load(tmp_path / "straight" / "checkpoint-4" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint-4" / "model.pt", weights_only=True)
    assert straight.keys() == resumed.keys() and "value_head.weight" in straight
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(straight["value_head.weight"], torch.zeros_like(straight["value_head.weight"]))

    def trajectory(name):
        return [(r["step"], r["env/reward_mean"], r["objective/kl"], r["ppo/loss/policy"])
                for r in read_metrics(tmp_path / name / "metrics.jsonl") if "objective/kl" in r]

    assert trajectory("resumed") == trajectory("straight")


# ----------------------------------------------------------------------------------------------
# The embedded default and the reward-model path
# ----------------------------------------------------------------------------------------------


def test_embedded_default_fills_only_unset_fields(base_model, tmp_path, monkeypatch):
    import alignlib.demo

    monkeypatch.setattr(alignlib.demo, "prepare_base_model", lambda path, **kwargs: base_model)
    config, model_config = ppo_embedded_default(PPOConfig(output_dir=str(tmp_path), learning_rate=3e-4), ModelConfig())
    assert model_config.model_name_or_path == base_model and not model_config.use_peft
    assert config.learning_rate == 3e-4  # set by the user: kept
    assert config.max_steps == demo.PPO_SETTINGS["max_steps"] != PPOConfig.max_steps
    config, model_config = ppo_embedded_default(PPOConfig(output_dir=str(tmp_path)), ModelConfig(use_peft=True))
    assert model_config.use_peft and config.learning_rate == demo.PPO_LORA_LEARNING_RATE
    kept = demo_config(output_dir=str(tmp_path), init_kl_coef=PPOConfig.init_kl_coef)
    assert ppo_embedded_default(kept, ModelConfig())[0] == kept


def test_train_ppo_without_a_model_runs_the_embedded_default(base_model, tmp_path, monkeypatch):
    import alignlib.demo

    monkeypatch.setattr(alignlib.demo, "prepare_base_model", lambda path, **kwargs: base_model)
    config = PPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8,
                       mini_batch_size=8, num_eval_prompts=8, disable_tqdm=True)
    result = train_ppo(config, ModelConfig())
    assert result["model_name_or_path"] == base_model and result["eval/num_prompts"] == 8
    assert 0.0 <= result["eval/reward_before"] <= 1.0


def test_reward_model_scores_each_response_at_its_last_token(base_model, tmp_path):
    """A sequence classifier as the reward: batched, padded scores equal one-at-a-time scores."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from alignlib.models import load_tokenizer

    config = AutoConfig.from_pretrained(base_model, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    load_tokenizer(base_model).save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"), torch.device("cpu"))
    prompts = ["how do i fix a door ?", "can you tell me how to wash the car ?"]
    responses = [" no .", " first , wash the car slowly . hope this helps !"]
    batched = scorer(prompts, responses, torch.tensor([True, False]))
    singles = [scorer([p], [r], torch.tensor([e])) for p, r, e in zip(prompts, responses, (True, False), strict=True)]
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)
    assert batched[0] != batched[1]

    out = train_ppo(_tiny_config(tmp_path, reward_model=str(tmp_path / "rm")),
                    ModelConfig(model_name_or_path=base_model), prompts=prompts * 2)
    assert math.isfinite(out["env/reward_mean"])


def test_config_round_trips_through_hf_argument_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((PPOConfig, ModelConfig))
    config, model_config = parser.parse_args_into_dataclasses(
        ["--reward", "alignlib.demo:demo_reward", "--init_kl_coef", "0.05", "--kl_estimator", "k3",
         "--target_kl", "0.1", "--missing_eos_penalty", "1.0", "--use_peft", "true"])
    assert config.reward == "alignlib.demo:demo_reward" and config.init_kl_coef == 0.05
    assert config.kl_estimator == "k3" and config.target_kl == 0.1 and model_config.use_peft
    assert json.loads(json.dumps(dataclasses.asdict(config)))["kl_estimator"] == "k3"
