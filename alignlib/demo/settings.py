"""The embedded default's settings: what `alignlib train OBJECTIVE` runs given no model and no data.

Every number here was tuned on 2 CPU cores so that the demo learns visibly within minutes
(docs/trainer.md, docs/rlhf.md). On the command line these values become the flags' defaults,
so any flag given still wins.

- Offline objectives (`alignlib.trainer`): TRAIN_COMMON, then TRAIN_SETTINGS[objective];
  `train_defaults(objective)` merges them with the demo's output folder.
- The online objectives (`alignlib.rl`): ONLINE_SETTINGS[objective] (PPO_SETTINGS, GRPO_SETTINGS,
  RLOO_SETTINGS; ONLINE_LORA_LEARNING_RATES with LoRA), `demo_reward` and the demo's "how do i ..."
  prompts; `online_embedded_default` applies them to a config given in Python.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignlib.configs import OnlineConfig, PPOConfig
    from alignlib.models import ModelConfig

OUTPUT_ROOT = "alignlib-demo"
"""The demo writes into OUTPUT_ROOT/OBJECTIVE/ in the current folder (git-ignored in this repository)."""

# ----------------------------------------------------------------------------------------------
# Offline objectives: sft, dpo, orpo, simpo, cpo, kto, reward
# ----------------------------------------------------------------------------------------------

TRAIN_COMMON: dict[str, Any] = {
    "max_steps": 150, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 50, "learning_rate": 5e-5,
    "logging_steps": 10, "save_steps": 50, "max_length": 64, "max_prompt_length": 32, "seed": 0,
    "lr_scheduler_type": "constant",
}
TRAIN_SETTINGS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 3e-3},  # from the untrained model: prompts and their chosen answers
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
    settings = {**TRAIN_COMMON, **TRAIN_SETTINGS[objective], "output_dir": f"{OUTPUT_ROOT}/{objective}"}
    if objective == "sft":  # SFT cuts whole sequences to max_length, never prompts
        del settings["max_prompt_length"]
    return settings


# ----------------------------------------------------------------------------------------------
# The online objectives: ppo, grpo, rloo
# ----------------------------------------------------------------------------------------------

# Measured on 2 CPU cores (docs/rlhf.md): full fine-tuning of the ~1M-parameter demo model with a
# frozen reference copy learns faster and stays more coherent than LoRA on it. With use_peft the
# learning rate is ONLINE_LORA_LEARNING_RATES[objective] instead.
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
# GRPO and RLOO (docs/rlhf.md): 8 prompts x 8 completions per step; a KL term to a frozen copy of
# the base model keeps the answers coherent.
GRPO_SETTINGS: dict[str, Any] = {
    "max_steps": 60,
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "learning_rate": 1e-4,
    "max_completion_length": 24,
    "beta": 0.04,
    "lr_scheduler_type": "constant",
}
RLOO_SETTINGS: dict[str, Any] = {**GRPO_SETTINGS, "beta": 0.05}
ONLINE_SETTINGS: dict[str, dict[str, Any]] = {"ppo": PPO_SETTINGS, "grpo": GRPO_SETTINGS, "rloo": RLOO_SETTINGS}
PPO_LORA_LEARNING_RATE = 5e-4
ONLINE_LORA_LEARNING_RATES = {"ppo": PPO_LORA_LEARNING_RATE, "grpo": 5e-4, "rloo": 5e-4}


def online_defaults(objective: str) -> dict[str, Any]:
    """The flags' defaults of `alignlib train OBJECTIVE` (ppo, grpo, rloo) in the embedded default."""
    return {**ONLINE_SETTINGS[objective], "demo_defaults": False, "output_dir": f"{OUTPUT_ROOT}/{objective}"}


def ppo_defaults() -> dict[str, Any]:
    """The flags' defaults of `alignlib train ppo` in the embedded default."""
    return online_defaults("ppo")


def online_demo_config(objective: str, **overrides: Any) -> OnlineConfig:
    """The objective's config with the embedded default's settings (ONLINE_SETTINGS), then `overrides`
    (kept as given, even where they equal a class default: demo_defaults is False)."""
    from alignlib.configs import ONLINE_CONFIGS

    return ONLINE_CONFIGS[objective](**{**ONLINE_SETTINGS[objective], "demo_defaults": False, **overrides})


def ppo_demo_config(**overrides: Any) -> PPOConfig:
    """online_demo_config("ppo", ...)."""
    return online_demo_config("ppo", **overrides)


def demo_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The embedded default's reward: 1.0 for a helpful answer (alignlib.demo.is_helpful), else 0.0."""
    from alignlib.demo import is_helpful

    return [1.0 if is_helpful(response) else 0.0 for response in responses]


def demo_prompts(path: Path) -> list[str]:
    """The "how do i ..." prompts of a demo data file (TRAIN_FILE or HELDOUT_FILE)."""
    from alignlib.demo import read_pairs

    return [row["prompt"] for row in read_pairs(path) if "colour" not in row["prompt"]]


def online_embedded_default(config: OnlineConfig, model_config: ModelConfig, *,
                            verbose: bool = True) -> tuple[OnlineConfig, ModelConfig]:
    """The embedded default's model and settings, for an online run given no model.

    The model becomes the demo base model (alignlib.demo.prepare_base_model, built once into
    output_dir/base-model; full fine-tuning unless model_config.use_peft). With
    config.demo_defaults, every field still at its class default takes the demo's value
    (ONLINE_SETTINGS[config.objective]; a field set explicitly to its class default is replaced
    too: build the config with online_demo_config(), or set demo_defaults False, to keep it).
    Prompts and reward are filled in by alignlib.rl.train_online.
    """
    import alignlib.demo

    objective = config.objective
    demo_values = dict(ONLINE_SETTINGS[objective])
    if model_config.use_peft:
        demo_values["learning_rate"] = ONLINE_LORA_LEARNING_RATES[objective]
    defaults = {f.name: f.default for f in dataclasses.fields(type(config))}
    overrides = {k: v for k, v in demo_values.items() if config.demo_defaults and getattr(config, k) == defaults[k]}
    config = dataclasses.replace(config, **overrides)
    base = alignlib.demo.prepare_base_model(Path(config.output_dir) / "base-model", show_progress=verbose)
    model_config = dataclasses.replace(model_config, model_name_or_path=str(base))
    shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
    if verbose:
        print(f"alignlib {objective}: embedded default: model {base} "
              f"({'LoRA' if model_config.use_peft else 'full fine-tuning'}){', settings ' + shown if shown else ''}")
    return config, model_config


def ppo_embedded_default(config: PPOConfig, model_config: ModelConfig) -> tuple[PPOConfig, ModelConfig]:
    """online_embedded_default for a PPOConfig."""
    return online_embedded_default(config, model_config)
