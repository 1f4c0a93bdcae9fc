"""Where the online loop's rewards come from: a Python function, or a reward model.

- `RewardFunction`: `reward(prompts, responses) -> one number per response`, loaded from
  'package.module:function' or 'path/to/file.py:function' (`load_reward_function`) and called
  through `call_reward_function`, which turns a wrong length, a non-number or a NaN into a
  ValueError naming the function.
- `RewardModelScorer`: a sequence classifier with one label (e.g. from `alignlib train reward`,
  a full model or a SEQ_CLS LoRA adapter) that scores prompt + response at its last token.
- `make_reward`: the reward a PPOConfig asks for, as one callable
  `(prompts, responses, contains_eos) -> scores (B,)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignlib.models import load_tokenizer

if TYPE_CHECKING:
    from alignlib.configs import PPOConfig

__all__ = ["Reward", "RewardFunction", "RewardModelScorer", "call_reward_function", "load_reward_function",
           "make_reward"]

RewardFunction = Callable[[list[str], list[str]], Sequence[float]]
"""`reward(prompts, responses) -> one number per response` (a list, numpy array or tensor)."""

Reward = Callable[[list[str], list[str], torch.Tensor], torch.Tensor]
"""What the loop calls: `(prompts, responses, contains_eos (B,) bool) -> scores (B,) float32`."""


def make_reward(config: PPOConfig, reward_fn: RewardFunction | None, device: torch.device,
                default: RewardFunction | None = None) -> Reward:
    """The reward of a run: `reward_fn` (a callable given in Python), config.reward_model, or
    config.reward ('module:function'); `default` when none is given (the embedded demo's),
    else a ValueError."""
    if reward_fn is not None and (config.reward or config.reward_model):
        raise ValueError("a reward_fn was passed and config names a reward too: give one")
    if config.reward_model is not None:
        return RewardModelScorer(config.reward_model, device)
    if reward_fn is None and config.reward is not None:
        reward_fn = load_reward_function(config.reward)
    if reward_fn is None:
        if default is None:
            raise ValueError("no reward: give reward_model (a sequence classifier) or reward ('module:function')")
        reward_fn = default
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
    return lambda prompts, responses, contains_eos: call_reward_function(reward_fn, prompts, responses)


def load_reward_function(spec: str) -> RewardFunction:
    """The callable named by 'package.module:function' or 'path/to/file.py:function'."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward must look like 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {function_name!r}")
    return function


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def call_reward_function(fn: RewardFunction, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """fn(prompts, responses) as a (B,) float32 tensor; a wrong length, a non-number or a NaN is
    a ValueError naming fn."""
    name = _function_name(fn)
    raw = fn(prompts, responses)
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().tolist()
    elif isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"reward function {name} must return one number per response (a list of "
                         f"{len(responses)}), got {type(raw).__name__}")
    if len(raw) != len(responses):
        raise ValueError(f"reward function {name} returned {len(raw)} scores for {len(responses)} responses")
    bad = [(i, v) for i, v in enumerate(raw) if not isinstance(v, numbers.Real) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"reward function {name} returned non-numbers, e.g. at {bad[0][0]}: {bad[0][1]!r}")
    scores = torch.tensor([float(v) for v in raw], dtype=torch.float32)
    if not bool(torch.isfinite(scores).all()):
        where = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"reward function {name} returned non-finite scores (NaN or inf) at {where}")
    return scores


class RewardModelScorer:
    """A sequence-classification reward model as a reward: prompt + response (+ EOS when the
    policy emitted it) tokenized with the reward model's tokenizer, right-padded, scored by the
    classifier at its last non-pad token (the pooling it was trained with)."""

    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification

        adapter_config = Path(path) / "adapter_config.json"
        if adapter_config.is_file():
            from peft import PeftConfig, PeftModel

            base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
            tokenizer_path = path if (Path(path) / "tokenizer.json").is_file() else base_path
        else:
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"reward_model {path} is not a model or adapter directory")
            model = AutoModelForSequenceClassification.from_pretrained(path)
            tokenizer_path = path
        self.tokenizer = load_tokenizer(tokenizer_path, padding_side="right")
        if model.config.num_labels != 1:
            raise ValueError(f"reward_model {path} has {model.config.num_labels} labels; a reward model has 1")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], contains_eos: torch.Tensor) -> torch.Tensor:
        tok = self.tokenizer
        rows = []
        for prompt, response, eos in zip(prompts, responses, contains_eos.tolist(), strict=True):
            ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
            rows.append(ids + ([tok.eos_token_id] if eos and tok.eos_token_id is not None else []))
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        return logits[:, 0].float().cpu()
