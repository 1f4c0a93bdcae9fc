"""Where the online loop's rewards come from: Python functions, reward models, or several of them.

- A reward function is `fn(prompts, completions) -> one number per completion` (a list, numpy
  array or tensor). TRL's reward functions, `fn(completions, **kwargs)` or `fn(prompts,
  completions, **kwargs)`, are called with keywords and work unchanged, and, as in TRL, None
  means "this function does not apply to this completion". Functions are named by
  'package.module:function' or 'path/to/file.py:function' (`load_reward_function`).
- `RewardModelScorer`: a sequence classifier with one label (e.g. from `alignlib train reward`,
  a full model or a SEQ_CLS LoRA adapter) that scores prompt + completion at its last token.
- `Rewards`: a run's reward functions and reward models, weighted (`reward_weights`) and summed
  as TRL sums them (functions returning None left out; a completion no function applies to
  is unscorable, NaN). A function that raises, returns the wrong length, NaN/inf or a
  non-number fails on a row: with on_reward_error="stop" that is a ValueError of one line
  naming the function and the row; with "unscorable" the row is marked unscorable (NaN, so it
  carries no learning signal) and the same line is printed. A call that fails as a whole (an
  exception, a wrong length) is retried row by row to find the rows that fail.
- `make_reward`: the `Rewards` a config asks for.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from alignlib.models import load_tokenizer

if TYPE_CHECKING:
    from alignlib.configs import OnlineConfig

__all__ = ["RewardFunction", "RewardModelScorer", "RewardResult", "Rewards", "call_reward_function",
           "load_reward_function", "make_reward", "reward_function_name", "score_rows"]

RewardFunction = Callable[..., Sequence[float | None]]
"""`reward(prompts, completions) -> one number (or None) per completion`."""


# ----------------------------------------------------------------------------------------------
# One reward function
# ----------------------------------------------------------------------------------------------


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


def reward_function_name(fn: Any) -> str:
    """'module.qualname' of a function (the name errors use)."""
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}" if module else name


def _metric_name(fn: Any) -> str:
    """The short name TRL logs a reward function under (rewards/NAME/mean)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _invoke(fn: RewardFunction, prompts: list[str], completions: list[str]) -> Any:
    """fn called as alignlib's (prompts, completions) or, when it names `completions`, TRL's keywords."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: positional
        return fn(prompts, completions)
    if "completions" not in parameters:
        return fn(prompts, completions)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return fn(prompts=prompts, completions=completions) if takes_any or "prompts" in parameters \
        else fn(completions=completions)


class _Raised(ValueError):
    """A reward function raised."""


class _Malformed(ValueError):
    """A reward function's result is not one value per completion."""


def _call_once(fn: RewardFunction, prompts: list[str], completions: list[str]) -> list[Any]:
    """fn's scores as a plain list of len(completions); _Raised or _Malformed otherwise."""
    try:
        raw = _invoke(fn, prompts, completions)
    except Exception as exc:  # noqa: BLE001 - any error in user code is reported with the row it failed on
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise _Raised(f"raised {type(exc).__name__}{': ' + message if message else ''}") from exc
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().tolist()
    elif isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise _Malformed(f"must return one number per completion (a list of {len(completions)}), got "
                         f"{type(raw).__name__}")
    if len(raw) != len(completions):
        raise _Malformed(f"returned {len(raw)} scores for {len(completions)} completions")
    return list(raw)


def _value_problem(value: Any) -> str | None:
    """Why one returned value is not a score (None is allowed: the function does not apply)."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return f"returned a non-number, {value!r},"
    if not math.isfinite(float(value)):
        return f"returned a non-finite score, {value},"
    return None


class RowScores(NamedTuple):
    scores: list[float]
    """One score per completion; NaN where the function returned None or failed."""
    failed: dict[int, str]
    """Row -> what went wrong there."""
    batch_problem: str | None
    """What went wrong with the call as a whole, when no single row is to blame (a wrong length)."""


def score_rows(fn: RewardFunction, prompts: list[str], completions: list[str]) -> RowScores:
    """fn's score of every completion. A call that raises is retried one completion at a time,
    so that the rows it fails on are found; a result of the wrong length fails every row."""
    n = len(completions)
    try:
        raw = _call_once(fn, prompts, completions)
    except _Malformed as problem:
        return RowScores([math.nan] * n, dict.fromkeys(range(n), str(problem)), str(problem))
    except _Raised as raised:
        if n == 1:
            return RowScores([math.nan], {0: str(raised)}, None)
        scores, failed = [], {}
        for row in range(n):
            one = score_rows(fn, prompts[row: row + 1], completions[row: row + 1])
            scores += one.scores
            if one.failed:
                failed[row] = one.failed[0]
        if not failed:  # every completion scores alone: only the batch call fails
            return RowScores([math.nan] * n, dict.fromkeys(range(n), str(raised)),
                             f"{raised} on the batch of {n} (each completion alone scores)")
        return RowScores(scores, failed, None)
    scores, failed = [], {}
    for row, value in enumerate(raw):
        problem = _value_problem(value)
        if problem is not None:
            failed[row] = problem
        scores.append(math.nan if value is None or problem is not None else float(value))
    return RowScores(scores, failed, None)


def call_reward_function(fn: RewardFunction, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """fn(prompts, responses) as a (B,) float32 tensor (NaN where fn returned None); anything else
    that is not one finite number per response is a ValueError naming fn and the first bad row."""
    scores, failed, batch_problem = score_rows(fn, prompts, responses)
    if batch_problem is not None:
        raise ValueError(f"reward function {reward_function_name(fn)} {batch_problem}")
    if failed:
        row = min(failed)
        raise ValueError(f"reward function {reward_function_name(fn)} {failed[row]} at completion {row} of "
                         f"{len(responses)}")
    return torch.tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# A reward model
# ----------------------------------------------------------------------------------------------


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
        self.__name__ = Path(path).name or str(path)

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


# ----------------------------------------------------------------------------------------------
# A run's rewards
# ----------------------------------------------------------------------------------------------


class RewardResult(NamedTuple):
    total: torch.Tensor
    """(B,) float32: the weighted sum over reward functions; NaN for an unscorable completion."""
    per_function: torch.Tensor
    """(B, F) float32: each function's score, NaN where it returned None or failed."""
    failures: list[str]
    """One line per failed (function, row), as printed."""


class Rewards:
    """The reward functions and reward models of a run, weighted and summed (see the module docstring).

    Calling it scores one batch of completions: `rewards(prompts, completions, contains_eos,
    where)`, `where(row)` naming a row for messages (e.g. "completion 5 of step 3").
    """

    def __init__(self, sources: list[Any], weights: Sequence[float] | None = None, on_error: str = "stop") -> None:
        if not sources:
            raise ValueError("no reward: give a reward function or a reward model")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"reward_weights has {len(weights)} weight(s) for {len(sources)} reward function(s)")
        self.sources, self.weights, self.on_error = list(sources), torch.tensor(weights), on_error
        self.names = [_metric_name(source) for source in self.sources]

    def __call__(self, prompts: list[str], completions: list[str], contains_eos: torch.Tensor,
                 where: Callable[[int], str] = lambda row: f"completion {row}") -> RewardResult:
        columns, failures, failed_rows = [], [], set()
        for source in self.sources:
            if isinstance(source, RewardModelScorer):
                columns.append(source(prompts, completions, contains_eos).float())
                continue
            scores, failed, batch_problem = score_rows(source, prompts, completions)
            name = reward_function_name(source)
            lines = ({row: f"{name} {why} at {where(row)}" for row, why in failed.items()} if batch_problem is None
                     else {0: f"{name} {batch_problem} for {where(0)} .. {where(len(completions) - 1)}"})
            for _, line in sorted(lines.items()):
                if self.on_error == "stop":
                    raise ValueError(f"reward function {line}; stopped (on_reward_error='unscorable' marks such "
                                     "completions unscorable instead)")
                failures.append(f"reward function {line}: marked unscorable")
            failed_rows.update(failed)
            columns.append(torch.tensor(scores, dtype=torch.float32))
        per_function = torch.stack(columns, dim=1)
        total = (per_function * self.weights).nansum(dim=1)
        unscorable = per_function.isnan().all(dim=1)
        unscorable[sorted(failed_rows)] = True
        total[unscorable] = math.nan
        return RewardResult(total, per_function, failures)


def make_reward(config: OnlineConfig, reward_fn: RewardFunction | Sequence[RewardFunction] | None,
                device: torch.device, default: RewardFunction | None = None) -> Rewards:
    """The rewards of a run: `reward_fn` (one callable or a list, given in Python) or what the config
    names (reward_model, PPO's reward, reward_funcs: functions or reward-model directories);
    `default` when none is given (the embedded demo's), else a ValueError."""
    named = ([config.reward_model] if config.reward_model else []) + (
        [config.reward] if getattr(config, "reward", None) else []) + list(config.reward_funcs or [])
    if reward_fn is not None and named:
        raise ValueError("a reward_fn was passed and config names a reward too: give one")
    if reward_fn is not None:
        sources = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
    else:
        sources = [RewardModelScorer(spec, device) if Path(spec).is_dir() else load_reward_function(spec)
                   for spec in named]
    if not sources:
        if default is None:
            raise ValueError("no reward: give reward_funcs ('module:function' or a reward-model directory) or "
                             "reward_model")
        sources = [default]
    for source in sources:
        if not callable(source):
            raise ValueError(f"reward_fn must be callable, got {type(source).__name__}")
    return Rewards(sources, config.reward_weights, config.on_reward_error)
