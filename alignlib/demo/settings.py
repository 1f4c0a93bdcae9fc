"""The embedded default's settings: what `alignlib train OBJECTIVE` runs given no model and no data.

Every number here was tuned on 2 CPU cores so that the demo learns visibly within minutes
(docs/trainer.md, docs/rlhf.md). On the command line these values become the flags' defaults,
so any flag given still wins.

- Offline objectives (`alignlib.trainer`): TRAIN_COMMON, then TRAIN_SETTINGS[objective];
  `train_defaults(objective)` merges them with the demo's output folder.
- PPO (`alignlib.rl`): PPO_SETTINGS (PPO_LORA_LEARNING_RATE with LoRA), `demo_reward` and the
  demo's "how do i ..." prompts; `ppo_embedded_default` applies them to a PPOConfig given in Python.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignlib.configs import PPOConfig
    from alignlib.models import ModelConfig

OUTPUT_ROOT = "alignlib-demo"
"""The demo writes into OUTPUT_ROOT/OBJECTIVE/ in the current folder (git-ignored in this repository)."""

# ----------------------------------------------------------------------------------------------
# Offline objectives: dpo, orpo, simpo, cpo, reward
# ----------------------------------------------------------------------------------------------

TRAIN_COMMON: dict[str, Any] = {
    "max_steps": 150, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 50, "learning_rate": 5e-5,
    "logging_steps": 10, "save_steps": 50, "max_length": 64, "max_prompt_length": 32, "seed": 0,
    "lr_scheduler_type": "constant",
}
TRAIN_SETTINGS: dict[str, dict[str, Any]] = {
    "dpo": {"beta": 0.1, "rpo_alpha": 1.0},
    "orpo": {"beta": 0.1, "learning_rate": 1e-4},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.5, "learning_rate": 5e-5},
    "cpo": {"beta": 0.1, "learning_rate": 5e-5},
    "reward": {"learning_rate": 1e-4, "max_steps": 100},
    "kto": {"beta": 0.1, "learning_rate": 5e-5},
}
SAMPLE_PROMPTS = ("how do i fix a boat ?", "which colour does the lemon have ?")
"""Prompts whose answers the demo prints before and after training."""


def train_defaults(objective: str) -> dict[str, Any]:
    """The flags' defaults of `alignlib train OBJECTIVE` in the embedded default."""
    return {**TRAIN_COMMON, **TRAIN_SETTINGS[objective], "output_dir": f"{OUTPUT_ROOT}/{objective}"}


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------

# Measured on 2 CPU cores (docs/rlhf.md): full fine-tuning of the ~1M-parameter demo model with a
# frozen reference copy learns faster and stays more coherent than LoRA on it. With use_peft the
# learning rate is PPO_LORA_LEARNING_RATE instead.
PPO_SETTINGS: dict[str, Any] = {
    "max_steps": 40,
    "per_device_train_batch_size": 64,
    "mini_batch_size": 16,
    "ppo_epochs": 2,
    "learning_rate": 1e-4,
    "response_length": 24,
    "init_kl_coef": 0.1,
    "target": 3.0,
    "horizon": 1000,
    "missing_eos_penalty": 1.0,
}
PPO_LORA_LEARNING_RATE = 5e-4


def ppo_defaults() -> dict[str, Any]:
    """The flags' defaults of `alignlib train ppo` in the embedded default."""
    return {**PPO_SETTINGS, "demo_defaults": False, "output_dir": f"{OUTPUT_ROOT}/ppo"}


def ppo_demo_config(**overrides: Any) -> PPOConfig:
    """A PPOConfig with the embedded default's settings (PPO_SETTINGS), then `overrides`
    (kept as given, even where they equal a class default: demo_defaults is False)."""
    from alignlib.configs import PPOConfig

    return PPOConfig(**{**PPO_SETTINGS, "demo_defaults": False, **overrides})


def demo_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The embedded default's reward: 1.0 for a helpful answer (alignlib.demo.is_helpful), else 0.0."""
    from alignlib.demo import is_helpful

    return [1.0 if is_helpful(response) else 0.0 for response in responses]


def demo_prompts(path: Path) -> list[str]:
    """The "how do i ..." prompts of a demo data file (TRAIN_FILE or HELDOUT_FILE)."""
    from alignlib.demo import read_pairs

    return [row["prompt"] for row in read_pairs(path) if "colour" not in row["prompt"]]


def ppo_embedded_default(config: PPOConfig, model_config: ModelConfig) -> tuple[PPOConfig, ModelConfig]:
    """The embedded default's model and settings, for a PPO run given no model.

    The model becomes the demo base model (alignlib.demo.prepare_base_model, built once into
    output_dir/base-model; full fine-tuning unless model_config.use_peft). With
    config.demo_defaults, every PPOConfig field still at its class default takes the demo's
    value (PPO_SETTINGS; a field set explicitly to its class default is replaced too: build the
    config with ppo_demo_config(), or set demo_defaults False, to keep it). Prompts and reward
    are filled in by alignlib.rl.train_ppo.
    """
    import alignlib.demo
    from alignlib.configs import PPOConfig

    demo_values = dict(PPO_SETTINGS)
    if model_config.use_peft:
        demo_values["learning_rate"] = PPO_LORA_LEARNING_RATE
    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    overrides = {k: v for k, v in demo_values.items() if config.demo_defaults and getattr(config, k) == defaults[k]}
    config = dataclasses.replace(config, **overrides)
    base = alignlib.demo.prepare_base_model(Path(config.output_dir) / "base-model")
    model_config = dataclasses.replace(model_config, model_name_or_path=str(base))
    shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"alignlib ppo: embedded default: model {base} ({'LoRA' if model_config.use_peft else 'full fine-tuning'})"
          f"{', settings ' + shown if shown else ''}")
    return config, model_config
