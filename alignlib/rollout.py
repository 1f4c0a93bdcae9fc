"""The online loop's rollouts: sample completions to prompts, then score their tokens.

- `generate_rollout`: prompts left-padded, one sampled completion per row, masked after its
  first EOS (the EOS itself belongs to the response): a `Rollout`. Each row's randomness comes
  from its own seed (`completion_seed(seed, step, index)`), drawn by `SeededSampling`: a row
  samples the same tokens whichever batch, process or step it runs in, so a run on several
  ranks samples what one process samples, and a resumed run what the uninterrupted one did.
- `concat_rollouts`, `gather_rollout`, `Rollout.rows`: rollouts of consecutive rows (of every
  rank's rows) padded alike and concatenated; a subset of rows.
- `PolicyWithValueHead`: the policy and, for PPO, a value head V(s) on its last hidden state.
- `policy_forward`, `reference_logprobs`: log pi(response tokens) (with V(s_t) and the entropy)
  and log pi_ref of a rollout's rows, lined up with the response tokens; `use_kernels` fuses
  the lm_head with the log-softmax (alignlib.logprobs.linear_token_logprobs).
- Prompts: `as_prompt_list`, `check_prompt_lengths`, `load_prompts`, and `prompt_batch`, the
  prompts of step s (depends only on the seed and s).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from alignlib.distributed import Processes, gather_rows
from alignlib.logprobs import IGNORE_INDEX, linear_token_logprobs, token_logprobs
from alignlib.models import decoder_of, lm_head_fusable
from alignlib.training import SeededSampler

__all__ = [
    "PolicyWithValueHead",
    "Rollout",
    "SeededSampling",
    "as_prompt_list",
    "check_prompt_lengths",
    "chunks",
    "completion_seed",
    "concat_rollouts",
    "entropy_from_logits",
    "gather_rollout",
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

    def rows(self, index: torch.Tensor | list[int] | slice) -> Rollout:
        """The rollout of rows `index` only."""
        return Rollout(*(tensor[index] for tensor in self))


# ----------------------------------------------------------------------------------------------
# Sampling, one seed per completion
# ----------------------------------------------------------------------------------------------


def completion_seed(*key: int | str) -> int:
    """A 63-bit seed from a key such as (seed, "train", step, index): distinct keys, unrelated seeds."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededSampling:
    """A transformers logits processor that samples each row with its own random numbers.

    Each row draws one uniform number u per new token from a torch.Generator seeded with the
    row's seed; the token is the first whose cumulative probability reaches u (inverse-CDF
    sampling of softmax(logits / temperature) after the top-k and top-p cut), and the
    processor hands generate() scores that make it the argmax. generate() runs greedily, so
    the global RNG is never touched and a row's tokens do not depend on the rest of the batch.
    """

    def __init__(self, seeds: list[int], prompt_width: int, max_new_tokens: int, *, temperature: float,
                 top_k: int, top_p: float, device: torch.device) -> None:
        # u in (0, 1]: u = 0 could pick a token of probability 0 at the front of the vocabulary
        uniforms = [1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                    for s in seeds]
        self.uniforms = torch.stack(uniforms).to(device) if uniforms else torch.empty(0, max_new_tokens)
        self.prompt_width, self.temperature, self.top_k, self.top_p = prompt_width, temperature, top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        position = input_ids.shape[1] - self.prompt_width
        logits = scores.float() / self.temperature
        if self.top_k > 0 and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        probs = logits.softmax(dim=-1)
        if self.top_p < 1.0:  # keep the most likely tokens whose mass reaches top_p (at least one)
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        cdf = probs.double().cumsum(dim=-1)
        u = self.uniforms[:, position: position + 1] * cdf[:, -1:]
        token = torch.searchsorted(cdf, u).clamp(max=probs.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(-1, token, 0.0)


@torch.no_grad()
def generate_rollout(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, temperature: float,
                     top_k: int, top_p: float, device: torch.device, seeds: list[int]) -> Rollout:
    """Sample one completion per prompt, row i with seeds[i] (`SeededSampling`); mask everything
    after the first EOS."""
    from transformers import GenerationConfig, LogitsProcessorList

    if len(seeds) != len(prompts):
        raise ValueError(f"generate_rollout: {len(seeds)} seeds for {len(prompts)} prompts")
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    query_ids, query_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    sampling = SeededSampling(seeds, query_ids.shape[1], max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, device=device)
    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    output = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config,
                            logits_processor=LogitsProcessorList([sampling]))
    response_ids = output[:, query_ids.shape[1]:]
    is_eos = response_ids == tokenizer.eos_token_id
    contains_eos = is_eos.any(dim=1)
    positions = torch.arange(response_ids.shape[1], device=device)
    first_eos = torch.where(is_eos, positions, response_ids.shape[1]).min(dim=1).values
    response_mask = positions[None, :] <= first_eos[:, None]
    response_ids = torch.where(response_mask, response_ids, tokenizer.pad_token_id)
    return Rollout(query_ids, query_mask, response_ids, response_mask, contains_eos)


def concat_rollouts(parts: list[Rollout], pad_token_id: int, device: torch.device) -> Rollout:
    """Rollouts of consecutive rows as one: queries left-padded and responses right-padded to the widest."""
    if not parts:
        empty = torch.zeros(0, 0, dtype=torch.long, device=device)
        return Rollout(empty, empty, empty, empty.bool(), torch.zeros(0, dtype=torch.bool, device=device))
    if len(parts) == 1:
        return parts[0]
    query, response = max(p.query_ids.shape[1] for p in parts), max(p.response_ids.shape[1] for p in parts)

    def pad(tensor: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), value)
        return torch.cat([extra, tensor] if left else [tensor, extra], dim=1)

    return Rollout(torch.cat([pad(p.query_ids, query, pad_token_id, True) for p in parts]),
                   torch.cat([pad(p.query_mask, query, 0, True) for p in parts]),
                   torch.cat([pad(p.response_ids, response, pad_token_id, False) for p in parts]),
                   torch.cat([pad(p.response_mask, response, False, False) for p in parts]),
                   torch.cat([p.contains_eos for p in parts]))


def gather_rollout(rollout: Rollout, processes: Processes, pad_token_id: int) -> Rollout:
    """Every rank's rollout rows, in rank order, on every rank: queries left-padded and responses
    right-padded to the widest of any rank (as one process would have padded the whole batch)."""
    if not processes.distributed:
        return rollout

    def left(tensor: torch.Tensor, pad: int) -> torch.Tensor:  # left padding is right padding, flipped
        return gather_rows(tensor.flip(1), processes, pad).flip(1)

    return Rollout(left(rollout.query_ids, pad_token_id), left(rollout.query_mask, 0),
                   gather_rows(rollout.response_ids, processes, pad_token_id),
                   gather_rows(rollout.response_mask, processes, False),
                   gather_rows(rollout.contains_eos, processes, False))


# ----------------------------------------------------------------------------------------------
# Scoring a rollout's tokens: policy (with values), reference
# ----------------------------------------------------------------------------------------------


class PolicyWithValueHead(torch.nn.Module):
    """A causal LM (or its peft wrapper) and, with `value_head`, V(s) = w^T h + b on its last hidden state.

    One module, so that checkpoints (alignlib.checkpoint) hold the adapter (or all weights) and the
    value head together. The head is float32 (float64 on a float64 model) and starts at zero (V = 0
    everywhere). GRPO and RLOO
    have no value head (`value_head=False`).
    """

    def __init__(self, policy: torch.nn.Module, value_head: bool = True) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = None
        if value_head:
            wide = next(policy.parameters()).dtype == torch.float64  # float32 at least, float64 for a float64 model
            self.value_head = torch.nn.Linear(policy.config.hidden_size, 1, dtype=torch.float64 if wide else torch.float32)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns logits (B, L, V) and values (B, L) float32 (None without a value head)."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=self.value_head is not None, use_cache=False)
        return out.logits, self.values(out.hidden_states[-1]) if self.value_head is not None else None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, L, H), without the lm_head (the fused log-prob path)."""
        return decoder_of(self.policy)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False).last_hidden_state

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


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


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits from bf16/fp16 ones; float32 and float64 kept as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...) entropy of softmax(logits)."""
    return torch.logsumexp(logits, dim=-1) - (logits.softmax(dim=-1) * logits).sum(dim=-1)


def policy_forward(model: PolicyWithValueHead, rollout: Rollout, rows: torch.Tensor | slice, temperature: float,
                   *, entropy: str | None = None,
                   use_kernels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log pi(response tokens) (b, T), V(s_t) (b, T) (None without a value head) and the entropy
    (b, T) for `rows` of the rollout.

    entropy: None (not computed), "detached" (for the stats) or "grad" (for an entropy bonus).
    use_kernels: the lm_head and the log-softmax fused and chunked (the (b, T, V) logits never
    exist), where the model's head allows it (`models.lm_head_fusable`); no entropy then.
    """
    input_ids, attention_mask, position_ids = _full_sequence(rollout, rows)
    labels = _response_labels(rollout, rows)
    if use_kernels and entropy != "grad" and lm_head_fusable(model.policy):
        hidden = _response_slice(model.hidden_states(input_ids, attention_mask, position_ids), rollout)
        weight = model.policy.get_output_embeddings().weight
        logprobs = linear_token_logprobs(hidden.to(weight.dtype) / temperature, weight, labels)
        values = model.values(hidden) if model.value_head is not None else None
        return logprobs, values, None
    logits, values = model(input_ids, attention_mask, position_ids)
    logits = _upcast(_response_slice(logits, rollout)) / temperature
    logprobs = token_logprobs(logits, labels)
    per_token_entropy = None
    if entropy is not None:
        per_token_entropy = entropy_from_logits(logits if entropy == "grad" else logits.detach())
    return logprobs, None if values is None else _response_slice(values, rollout), per_token_entropy


@torch.no_grad()
def reference_logprobs(reference: Callable, rollout: Rollout, rows: torch.Tensor | slice,
                       temperature: float) -> torch.Tensor:
    """log pi_ref(response tokens) (b, T) for `rows` of the rollout (`reference`: a ReferenceForward)."""
    input_ids, attention_mask, position_ids = _full_sequence(rollout, rows)
    logits = reference(input_ids, attention_mask, position_ids=position_ids)
    logits = _upcast(_response_slice(logits, rollout)) / temperature
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
        raise ValueError(f"{what} is empty: the online loop needs at least one prompt")
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
