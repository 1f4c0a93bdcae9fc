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

Backends: the Triton kernel (alignlib.kernels.logprobs) runs on CUDA tensors and
the same math in torch elsewhere (`token_logprobs_lean`: torch ops forward, a
hand-written backward that, like the kernel, needs one gradient buffer of the
logits' shape and no logits-sized temporaries). One switch forces either: the
`backend` argument, or the environment variable ALIGNLIB_LOGPROBS_BACKEND
("auto", "triton" or "torch"; default "auto").
"""

from __future__ import annotations

import os

import torch

from alignlib.kernels.reference import IGNORE_INDEX, check_labels
from alignlib.kernels.reference import linear_token_logprobs_torch as _linear_token_logprobs_torch
from alignlib.kernels.reference import token_logprobs_lean as _token_logprobs_torch

try:  # triton is a Linux-only dependency
    from alignlib.kernels.logprobs import linear_token_logprobs as _linear_token_logprobs_triton
    from alignlib.kernels.logprobs import token_logprobs as _token_logprobs_triton
    from alignlib.kernels.logprobs import triton_available_for
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _token_logprobs_triton = _linear_token_logprobs_triton = None

__all__ = ["BACKENDS", "IGNORE_INDEX", "linear_token_logprobs", "sequence_logprobs", "sequence_logprobs_from_hidden",
           "token_logprobs"]

BACKENDS = ("auto", "triton", "torch")


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *, backend: str | None = None
) -> torch.Tensor:
    r"""log softmax(logits)[label] for every position, 0 where label == ignore_index.

    Args:
        logits: (..., V) unnormalised scores, any float dtype.
        labels: (...) token ids in [0, V), or ignore_index. No shift is applied.
        ignore_index: label value that marks a position to skip (gives 0, no gradient).
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"; None
            reads ALIGNLIB_LOGPROBS_BACKEND.

    Returns:
        (...) log-probs in float32 (float64 for float64 logits).

    Raises:
        ValueError for a label outside [0, V) that is not ignore_index, naming the id, its
        position in `labels` and V (a kernel would otherwise read out of bounds).
    """
    _check_logits_and_labels(logits, labels)
    check_labels(labels, logits.shape[-1], ignore_index, vocab_from="logits.shape[-1]")
    return _token_logprobs(logits, labels, ignore_index, backend)


def _token_logprobs(logits, labels, ignore_index, backend):
    """token_logprobs past its checks (labels included, so the kernel does not repeat them): picks the backend."""
    if _use_triton(logits, backend):
        return _token_logprobs_triton(logits, labels, ignore_index, labels_checked=True)
    return _token_logprobs_torch(logits, labels, ignore_index)


def _check_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    _check_label_dtype(labels)
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., V) and labels (...) must agree on the leading dims: got logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )


def _check_label_dtype(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must be integer token ids, got {getattr(labels, 'dtype', type(labels))}")
    if labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")


def _use_triton(logits: torch.Tensor, backend: str | None) -> bool:
    backend = backend or os.environ.get("ALIGNLIB_LOGPROBS_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "triton":
        if _token_logprobs_triton is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        return True  # the kernel raises a clear error where it cannot run
    return _token_logprobs_triton is not None and logits.is_cuda and triton_available_for(logits)


def linear_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""log softmax(hidden @ lm_head_weight^T)[label] per position, without the full logits.

    The lm_head matmul and the log-softmax run together in chunks of tokens, so at most
    (chunk_size x V) logits exist at once (alignlib.kernels.logprobs explains the memory).
    Positions labelled ignore_index give 0 and skip the matmul.

    Args:
        hidden: (..., H) the model's last hidden states (after the final norm).
        lm_head_weight: (V, H) the output embedding, same dtype as hidden; frozen or trainable.
        labels: (...) token ids in [0, V), or ignore_index. No shift is applied.
        chunk_size: tokens per chunk; None picks one whose logits are about the size of hidden.
        backend: as for `token_logprobs`.

    Returns:
        (...) log-probs in float32 (float64 for float64 inputs).

    Raises:
        ValueError for a label outside [0, V) that is not ignore_index (see `token_logprobs`).
    """
    _check_hidden_and_labels(hidden, lm_head_weight, labels)
    check_labels(labels, lm_head_weight.shape[0], ignore_index, vocab_from="lm_head_weight.shape[0]")
    return _linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index, chunk_size, backend)


def _check_hidden_and_labels(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be a (V, H) tensor, got {tuple(getattr(lm_head_weight, 'shape', ()))}")
    _check_label_dtype(labels)


def _linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index, chunk_size, backend):
    """linear_token_logprobs past its checks (labels included): picks the backend."""
    if _use_triton(hidden, backend):
        return _linear_token_logprobs_triton(
            hidden, lm_head_weight, labels, ignore_index=ignore_index, chunk_size=chunk_size, labels_checked=True
        )
    return _linear_token_logprobs_torch(hidden, lm_head_weight, labels, ignore_index=ignore_index,
                                        chunk_size=chunk_size, labels_checked=True)


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    backend: str | None = None,
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

    Raises:
        ValueError for a label in labels[:, 1:] outside [0, V) that is not ignore_index,
        named with its position in `labels` (labels[:, 0] is never scored, so never checked).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    shifted_labels = labels[:, 1:]
    _check_logits_and_labels(logits[:, :-1], shifted_labels)
    check_labels(shifted_labels, logits.shape[-1], ignore_index, vocab_from="logits.shape[-1]", shift=1)
    per_token = _token_logprobs(logits[:, :-1], shifted_labels, ignore_index, backend)
    return _sum_or_mean(per_token, shifted_labels, ignore_index, average)


def sequence_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""`sequence_logprobs` from the last hidden states (B, T, H) and the lm_head weight (V, H).

    Same shift, reduction and label check as `sequence_logprobs`, through `linear_token_logprobs`,
    so the (B, T, V) logits are never built. Returns (B,) float32 (float64 for float64 inputs).
    """
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"expected hidden (B, T, H) and labels (B, T); got hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}"
        )
    shifted_labels = labels[:, 1:]
    _check_hidden_and_labels(hidden, lm_head_weight, shifted_labels)
    check_labels(shifted_labels, lm_head_weight.shape[0], ignore_index, vocab_from="lm_head_weight.shape[0]", shift=1)
    per_token = _linear_token_logprobs(hidden[:, :-1], lm_head_weight, shifted_labels, ignore_index, chunk_size, backend)
    return _sum_or_mean(per_token, shifted_labels, ignore_index, average)


def _sum_or_mean(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, average: bool) -> torch.Tensor:
    """(B, T) per-token log-probs -> (B,) their sum, or their mean over the labelled tokens (0 for none)."""
    total = per_token.sum(dim=-1)
    if not average:
        return total
    counts = (labels != ignore_index).sum(dim=-1)
    return total / counts.clamp(min=1).to(total.dtype)
