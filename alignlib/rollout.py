"""The online loop's rollouts: sample responses to prompts, then score their tokens.

- `generate_rollout`: prompts left-padded, one sampled response each, masked after its first EOS
  (the EOS itself belongs to the response): a `Rollout`.
- `PolicyWithValueHead`: the policy and a value head V(s) on its last hidden state, as one module.
- `policy_forward`, `reference_logprobs`: log pi(response tokens) (with V(s_t) and the entropy)
  and log pi_ref of a rollout's rows, lined up with the response tokens.
- Prompts: `as_prompt_list`, `check_prompt_lengths`, `load_prompts`, and `prompt_batch`, the
  prompts of step s (depends only on the seed and s).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from alignlib.logprobs import IGNORE_INDEX, token_logprobs
from alignlib.training import SeededSampler

__all__ = [
    "PolicyWithValueHead",
    "Rollout",
    "as_prompt_list",
    "check_prompt_lengths",
    "chunks",
    "entropy_from_logits",
    "generate_rollout",
    "load_prompts",
    "policy_forward",
    "prompt_batch",
    "reference_logprobs",
]


class Rollout(NamedTuple):
    """One rollout batch. Queries are left-padded (B, P), responses right-padded (B, T)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    """(B, T) sampled tokens; the pad id after the first EOS."""
    response_mask: torch.Tensor
    """(B, T) bool, True up to and including the first EOS."""
    contains_eos: torch.Tensor
    """(B,) bool, whether the response ended with EOS (False: cut off at max_new_tokens)."""


@torch.no_grad()
def generate_rollout(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, temperature: float,
                     top_k: int, top_p: float, device: torch.device) -> Rollout:
    """Sample one response per prompt (global torch RNG); mask everything after the first EOS."""
    from transformers import GenerationConfig

    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    query_ids, query_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    generation_config = GenerationConfig(
        do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    output = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config)
    response_ids = output[:, query_ids.shape[1]:]
    is_eos = response_ids == tokenizer.eos_token_id
    contains_eos = is_eos.any(dim=1)
    positions = torch.arange(response_ids.shape[1], device=device)
    first_eos = torch.where(is_eos, positions, response_ids.shape[1]).min(dim=1).values
    response_mask = positions[None, :] <= first_eos[:, None]
    response_ids = torch.where(response_mask, response_ids, tokenizer.pad_token_id)
    return Rollout(query_ids, query_mask, response_ids, response_mask, contains_eos)


# ----------------------------------------------------------------------------------------------
# Scoring a rollout's tokens: policy (with values), reference
# ----------------------------------------------------------------------------------------------


class PolicyWithValueHead(torch.nn.Module):
    """A causal LM (or its peft wrapper) and a value head V(s) = w^T h + b on its last hidden state.

    One module, so that checkpoints (alignlib.checkpoint) hold the adapter (or all weights) and the
    value head together. The head is float32 and starts at zero (V = 0 everywhere).
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits (B, L, V) and values (B, L), float32."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, use_cache=False)
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits, values


def _full_sequence(rollout: Rollout, rows: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask and position_ids (positions count real tokens only) of query + response."""
    input_ids = torch.cat([rollout.query_ids[rows], rollout.response_ids[rows]], dim=1)
    attention_mask = torch.cat([rollout.query_mask[rows], rollout.response_mask[rows].long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _response_labels(rollout: Rollout, rows: torch.Tensor | slice) -> torch.Tensor:
    return torch.where(rollout.response_mask[rows], rollout.response_ids[rows], IGNORE_INDEX)


def _response_slice(tensor: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Positions P-1 .. P+T-2 of a (B, P+T, ...) output: the ones that predict the response tokens."""
    start = rollout.query_ids.shape[1] - 1
    return tensor[:, start: start + rollout.response_ids.shape[1]]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...) entropy of softmax(logits)."""
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


def policy_forward(model: PolicyWithValueHead, rollout: Rollout, rows: torch.Tensor | slice, temperature: float,
                   *, entropy: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log pi(response tokens) (b, T), V(s_t) (b, T) and the entropy (b, T) for `rows` of the rollout.

    entropy: None (not computed), "detached" (for the stats) or "grad" (for an entropy bonus).
    """
    input_ids, attention_mask, position_ids = _full_sequence(rollout, rows)
    logits, values = model(input_ids, attention_mask, position_ids)
    logits = _response_slice(logits, rollout).float() / temperature
    logprobs = token_logprobs(logits, _response_labels(rollout, rows))
    per_token_entropy = None
    if entropy is not None:
        per_token_entropy = entropy_from_logits(logits if entropy == "grad" else logits.detach())
    return logprobs, _response_slice(values, rollout), per_token_entropy


@torch.no_grad()
def reference_logprobs(reference: Callable, rollout: Rollout, rows: torch.Tensor | slice,
                       temperature: float) -> torch.Tensor:
    """log pi_ref(response tokens) (b, T) for `rows` of the rollout (`reference`: a ReferenceForward)."""
    input_ids, attention_mask, position_ids = _full_sequence(rollout, rows)
    logits = reference(input_ids, attention_mask, position_ids=position_ids)
    logits = _response_slice(logits, rollout).float() / temperature
    return token_logprobs(logits, _response_labels(rollout, rows))


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(n)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def prompt_batch(sampler: SeededSampler, step: int, batch_size: int) -> list[int]:
    """Prompt indices of step `step`: positions [step*B, (step+1)*B) of the stream of
    per-epoch permutations; depends only on (seed, step), so a resumed run draws the same."""
    n = sampler.num_samples
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch = position // n
        if epoch not in orders:
            sampler.set_epoch(epoch)
            orders[epoch] = sampler.order()
        indices.append(orders[epoch][position % n])
    return indices


def as_prompt_list(prompts: Any, what: str) -> list[str]:
    """A list of non-empty strings from a list or a Dataset with a 'prompt' column; else a ValueError."""
    if prompts is None:
        raise ValueError(f"no {what} given")
    if hasattr(prompts, "column_names"):  # a datasets.Dataset
        if "prompt" not in prompts.column_names:
            raise ValueError(f"{what}: the dataset has no 'prompt' column (columns {prompts.column_names})")
        prompts = prompts["prompt"]
    if isinstance(prompts, str):
        raise ValueError(f"{what} must be a list of strings, not one string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what} is empty: PPO needs at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"{what}: entries {bad[:5]} are not non-empty strings (e.g. {prompts[bad[0]]!r})")
    return prompts


def check_prompt_lengths(tokenizer: Any, prompts: list[str], model: Any, response_length: int, what: str) -> None:
    """Refuse prompts that leave no room for response_length tokens in the model's context."""
    limit_total = getattr(model.config, "max_position_embeddings", None)
    if limit_total is None:
        return
    limit = limit_total - response_length
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > limit]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"{what}: {len(too_long)} prompt(s) are too long for the context: prompt {i} has {lengths[i]} tokens, "
            f"but max_position_embeddings ({limit_total}) - response_length ({response_length}) leaves {limit}"
        )


def load_prompts(source: str, split: str, tokenizer: Any) -> list[str]:
    """The prompts of a dataset file, directory or Hub name (alignlib.data.load_prompt_dataset)."""
    from alignlib.data import load_prompt_dataset

    return list(load_prompt_dataset(source, split=split, tokenizer=tokenizer)["prompt"])
