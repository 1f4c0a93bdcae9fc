"""Torch references of the kernels' math, importable without triton.

Each function computes what its Triton kernel computes, in plain torch ops; the tests
check the kernels against these (and these against the textbook formulas).
"""

from __future__ import annotations

import torch


def token_logprobs_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The torch reference of the same math: x_y - logsumexp(x), 0 on ignored positions.

    Computes in float32 (float64 for float64 logits), upcasting a block of rows at a time.
    """
    vocab = logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, 0)
    label_logits = flat_logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).to(out_dtype)
    if flat_logits.shape[0] == 0:
        lse = flat_logits.new_zeros(0, dtype=out_dtype)
    elif flat_logits.dtype == out_dtype:
        lse = torch.logsumexp(flat_logits, dim=-1)
    else:
        lse = torch.cat([torch.logsumexp(rows.to(out_dtype), dim=-1) for rows in flat_logits.split(1024)])
    return torch.where(valid, label_logits - lse, 0.0).reshape(labels.shape)
