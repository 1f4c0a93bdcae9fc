r"""Log-probabilities of given tokens under a causal language model's logits.

The shift convention, written down once: a causal LM's logits at position t
predict the token at position t+1. With `input_ids` (B, T) and `labels` equal to
`input_ids` except -100 (ignore_index) on prompt and padding positions,

    log p(labels[:, t+1] | input_ids[:, :t+1]) = log_softmax(logits[:, t])[labels[:, t+1]]

`token_logprobs` does no shifting: it pairs logits[..., :] with labels[...] as
given. `sequence_logprobs` applies the shift above (labels aligned with
input_ids, as Hugging Face models take them) and reduces over the sequence.

Results are float32 (float64 for float64 logits) whatever the logits' dtype: a
sum of hundreds of bf16 log-probs would lose the digits DPO's log-ratios need.
This module is the torch reference; the fused Triton kernels (alignlib.kernels)
plug in behind the same functions.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Rows of logits upcast to float32 at a time, so bf16 logits are never copied whole.
_ROWS_PER_CHUNK = 1024


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    r"""log softmax(logits)[label] for every position, 0 where label == ignore_index.

    Args:
        logits: (..., V) unnormalised scores, any float dtype.
        labels: (...) token ids in [0, V), or ignore_index. No shift is applied.
        ignore_index: label value that marks a position to skip (gives 0, no gradient).

    Returns:
        (...) log-probs in float32 (float64 for float64 logits).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., V) and labels (...) must agree on the leading dims: got logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    vocab = logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    if bool(((flat_labels[valid] < 0) | (flat_labels[valid] >= vocab)).any()):
        bad = flat_labels[valid & ((flat_labels < 0) | (flat_labels >= vocab))][:4].tolist()
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; got e.g. {bad}")

    safe_labels = torch.where(valid, flat_labels, 0)
    label_logits = flat_logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).to(out_dtype)
    if flat_logits.dtype == out_dtype:
        log_normalizer = torch.logsumexp(flat_logits, dim=-1)
    else:  # upcast a block of rows at a time
        log_normalizer = torch.cat(
            [torch.logsumexp(rows.to(out_dtype), dim=-1) for rows in flat_logits.split(_ROWS_PER_CHUNK)]
        ) if flat_logits.shape[0] else flat_logits.new_zeros(0, dtype=out_dtype)
    logps = torch.where(valid, label_logits - log_normalizer, 0.0)
    return logps.reshape(labels.shape)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r"""Per-sequence log-prob of the labelled tokens: sum (or mean) over t of log p(labels[t+1] | ..t).

    Args:
        logits: (B, T, V) the model's output for input_ids (B, T).
        labels: (B, T) aligned with input_ids, ignore_index on prompt and padding.
            Shifted here: logits[:, t] scores labels[:, t+1].
        average: False for the sum (DPO), True for the per-token mean (ORPO,
            SimPO, IPO). A row with no labelled token gives 0 either way, never NaN.

    Returns:
        (B,) in float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    shifted_labels = labels[:, 1:]
    per_token = token_logprobs(logits[:, :-1], shifted_labels, ignore_index)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    counts = (shifted_labels != ignore_index).sum(dim=-1)
    return total / counts.clamp(min=1).to(total.dtype)
