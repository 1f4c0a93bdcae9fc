r"""Per-token log-probs, log softmax(x)[y], as a Triton kernel beside its torch reference.

For a row of logits x (V,) and its label y:

    lse    = log sum_v exp(x_v)            (online: one pass, running max m and sum s)
    logp   = x_y - lse
    dlogp/dx_v = [v == y] - exp(x_v - lse) = onehot - softmax

Forward reads each row once in blocks of BLOCK_V, keeping only the running max m and
the rescaled sum s in registers: s <- s * exp(m_old - m_new) + sum exp(x - m_new). Nothing
V-sized is written but the (N,) outputs and the (N,) logsumexp saved for backward.
Backward recomputes softmax block by block from the saved logsumexp and writes
g * (onehot - softmax) straight into the gradient buffer (the only V-sized allocation).
Rows whose label is ignore_index skip the vocabulary pass entirely (prompt tokens
are often half of a preference batch): their log-prob and gradient are 0.

Accumulation is float32 for fp32, bf16 and fp16 logits. float64 logits take the torch
reference (`reference.token_logprobs_torch`, the same math in torch), which is also what
alignlib.logprobs runs on a CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import is_recording, try_launch
from .reference import IGNORE_INDEX, RowOps, check_labels, chunked_linear_token_logprobs, token_logprobs_torch

# Widest block of the vocabulary one program loads at a time.
MAX_BLOCK_V = 4096


@triton.jit
def _load_row_block(row_ptr, cols, lo, hi, other, MASKED: tl.constexpr):
    """row_ptr[cols] in float32; MASKED keeps lo <= cols < hi (`other` elsewhere), else all are in range."""
    if MASKED:
        return tl.load(row_ptr + cols, mask=(cols >= lo) & (cols < hi), other=other).to(tl.float32)
    else:
        return tl.load(row_ptr + cols).to(tl.float32)


@triton.jit
def _lse_step(x, m, s):
    """The online logsumexp: running max m and sum s of exp(x - m), one block of x further."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _aligned_row(base_ptr, row, row_stride, VEC: tl.constexpr):
    """A row's start, moved back to a 16-byte boundary: (pointer, lead), the row's entries being
    pointer[lead : lead + V]. Blocks of the row then start on a boundary, so the loads in the
    middle of the row are full vector loads whatever V and the row stride are (V = 50257 too)."""
    offset = row * row_stride
    lead = offset % VEC
    return base_ptr + tl.multiple_of(offset - lead, VEC), lead.to(tl.int32)


@triton.jit
def _token_logprobs_fwd(
    logits_ptr, labels_ptr, out_ptr, lse_ptr,
    row_stride, V, ignore_index,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    logp = 0.0
    lse = float("inf")  # ignored rows: backward's softmax exp(x - lse) is then 0 for any finite logit
    if label != ignore_index:
        row_ptr, lead = _aligned_row(logits_ptr, row, row_stride, VEC)
        end = lead + V
        cols = tl.arange(0, BLOCK_V)
        # The first block (masked: it holds the lead), full blocks unmasked, a masked tail.
        m, s = _lse_step(_load_row_block(row_ptr, cols, lead, end, float("-inf"), True), float("-inf"), 0.0)
        full_end = end // BLOCK_V * BLOCK_V
        for start in range(BLOCK_V, full_end, BLOCK_V):
            m, s = _lse_step(_load_row_block(row_ptr, start + cols, lead, end, float("-inf"), False), m, s)
        tail = tl.maximum(full_end, BLOCK_V)
        if tail < end:
            m, s = _lse_step(_load_row_block(row_ptr, tail + cols, lead, end, float("-inf"), True), m, s)
        lse = m + tl.log(s)
        logp = tl.load(logits_ptr + row * row_stride + label).to(tl.float32) - lse
    tl.store(out_ptr + row, logp)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _grad_row_block(row_ptr, grad_row_ptr, cols, lo, hi, label_col, lse, g, MASKED: tl.constexpr):
    """grad[cols] = g * (onehot - softmax) for one block of a row; cols count from the aligned start,
    so the label's column is label_col = label + lead (int32: V < 2^31)."""
    x = _load_row_block(row_ptr, cols, lo, hi, 0.0, MASKED)
    grad = g * (tl.where(cols == label_col, 1.0, 0.0) - tl.exp(x - lse))
    grad = grad.to(grad_row_ptr.dtype.element_ty)
    if MASKED:
        tl.store(grad_row_ptr + cols, grad, mask=(cols >= lo) & (cols < hi))
    else:
        tl.store(grad_row_ptr + cols, grad)


@triton.jit
def _token_logprobs_bwd(
    grad_out_ptr, logits_ptr, labels_ptr, lse_ptr, grad_logits_ptr,
    row_stride, grad_row_stride, V, ignore_index,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr, SAME_STRIDE: tl.constexpr,
):
    """SAME_STRIDE: the gradient rows are laid out as the logits' (row_stride), so its stores
    share the loads' alignment; otherwise they are placed from grad_row_stride, unaligned."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    g = tl.load(grad_out_ptr + row).to(tl.float32)
    g = tl.where(label != ignore_index, g, 0.0)
    lse = tl.load(lse_ptr + row)
    row_ptr, lead = _aligned_row(logits_ptr, row, row_stride, VEC)
    if SAME_STRIDE:
        grad_row_ptr, _ = _aligned_row(grad_logits_ptr, row, row_stride, VEC)
    else:
        grad_row_ptr = grad_logits_ptr + row * grad_row_stride - lead
    end = lead + V
    label_col = (label + lead).to(tl.int32)  # ignored rows: g = 0, whatever column this names
    cols = tl.arange(0, BLOCK_V)
    _grad_row_block(row_ptr, grad_row_ptr, cols, lead, end, label_col, lse, g, True)
    full_end = end // BLOCK_V * BLOCK_V
    for start in range(BLOCK_V, full_end, BLOCK_V):
        _grad_row_block(row_ptr, grad_row_ptr, start + cols, lead, end, label_col, lse, g, False)
    tail = tl.maximum(full_end, BLOCK_V)
    if tail < end:
        _grad_row_block(row_ptr, grad_row_ptr, tail + cols, lead, end, label_col, lse, g, True)


def _block_size(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)


def _row_blocks(logits: torch.Tensor) -> dict:
    """The row kernels' block constants: BLOCK_V, and VEC, the entries in 16 bytes (at most BLOCK_V)."""
    block = _block_size(logits.shape[-1])
    return {"BLOCK_V": block, "VEC": min(16 // logits.element_size(), block)}


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        rows, vocab = logits.shape
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows and not try_launch("logprobs.fwd", _token_logprobs_fwd, (rows,), logits, labels, out, lse,
                                   logits.stride(0), vocab, ignore_index, **_row_blocks(logits)):
            valid = labels != ignore_index  # refused by the GPU: the torch reference, one warning
            out, lse = RowOps.forward(logits, torch.where(valid, labels, 0))
            out = torch.where(valid, out, 0.0)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad_logits = torch.empty_like(logits)
        if rows and not try_launch("logprobs.bwd", _token_logprobs_bwd, (rows,),
                                   grad_out.contiguous(), logits, labels, lse, grad_logits,
                                   logits.stride(0), grad_logits.stride(0), vocab, ctx.ignore_index,
                                   **_row_blocks(logits), SAME_STRIDE=grad_logits.stride(0) == logits.stride(0)):
            valid = labels != ctx.ignore_index  # refused by the GPU: the torch reference, one warning
            grad_logits.copy_(logits)
            RowOps.grad_into(grad_logits, torch.where(valid, labels, 0), lse, torch.where(valid, grad_out, 0.0))
        return grad_logits, None, None


class TritonRowOps:
    """RowOps (see reference.py) through the kernels above, for the chunked linear loop.

    grad_into passes the chunk's logits as both input and output of the backward kernel:
    each program reads a block of logits before it writes that block's gradient, so the
    gradient overwrites the logits in place and the chunk needs no second buffer.
    """

    @staticmethod
    def forward(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = logits.shape
        logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows and not try_launch("linear_logprobs.fwd", _token_logprobs_fwd, (rows,), logits, labels, logp, lse,
                                   logits.stride(0), vocab, IGNORE_INDEX, **_row_blocks(logits)):
            return RowOps.forward(logits, labels)  # refused by the GPU: the torch reference, one warning
        return logp, lse

    @staticmethod
    def grad_into(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> None:
        rows, vocab = logits.shape
        if rows and not try_launch("linear_logprobs.grad", _token_logprobs_bwd, (rows,),
                                   g.contiguous(), logits, labels, lse, logits, logits.stride(0), logits.stride(0),
                                   vocab, IGNORE_INDEX, **_row_blocks(logits), SAME_STRIDE=True):
            RowOps.grad_into(logits, labels, lse, g)  # refused by the GPU: the torch reference, one warning


def triton_available_for(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels can run on this tensor's device: CUDA, or CPU under TRITON_INTERPRET=1
    (or the meta device while launches are recorded, see launch.recording)."""
    if tensor.device.type == "meta":
        return is_recording()
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                   labels_checked: bool = False) -> torch.Tensor:
    """log softmax(logits)[labels] through the Triton kernel; 0 where labels == ignore_index.

    Args:
        logits: (..., V) fp32, bf16 or fp16 (float64 goes to the torch reference).
        labels: (...) integer ids in [0, V) or ignore_index. No shift.
        labels_checked: True skips the label range check (for a caller that has run
            `reference.check_labels`; it costs a device sync).
    Returns:
        (...) float32 log-probs, differentiable with respect to logits.
    Raises:
        RuntimeError on a CPU tensor unless TRITON_INTERPRET=1 was set before triton was imported.
        ValueError on shapes that disagree or labels outside [0, V).
    """
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits (..., V) and labels (...) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    if not labels_checked:
        check_labels(labels, vocab, ignore_index, vocab_from="logits.shape[-1]")
    if logits.dtype == torch.float64:
        return token_logprobs_torch(logits, labels, ignore_index)
    if not triton_available_for(logits):
        raise RuntimeError(
            "alignlib.kernels.token_logprobs runs Triton kernels: give it CUDA tensors, or set TRITON_INTERPRET=1 "
            "before triton is imported to run them on the CPU (slowly); alignlib.logprobs picks the torch reference "
            "on CPU for you"
        )
    flat_logits = logits.reshape(-1, vocab)
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_labels = labels.reshape(-1).contiguous()
    return _TokenLogprobs.apply(flat_logits, flat_labels, ignore_index).reshape(labels.shape)


def linear_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    labels_checked: bool = False,
) -> torch.Tensor:
    """log softmax(hidden @ lm_head_weight^T)[labels], chunked over tokens, through the Triton kernels.

    The (tokens x V) logits never exist in full: at most `chunk_size` tokens' logits at a
    time (default: `reference.default_chunk_size`, about the size of `hidden`). Tokens whose
    label is ignore_index are dropped before the matmul and get 0.

    Args:
        hidden: (..., H) last hidden states, fp32, bf16 or fp16 (float64 runs the torch reference).
        lm_head_weight: (V, H), same dtype. If it does not require grad (frozen, as with LoRA),
            the forward pass also computes d logp / d hidden and backward is a multiply.
        labels: (...) ids in [0, V) or ignore_index. No shift.
        labels_checked: True skips the label range check (see token_logprobs).
    Returns:
        (...) float32 log-probs, differentiable with respect to hidden and lm_head_weight (the
        weight gradient accumulated in float32 across chunks, returned in the weight's dtype).
    """
    if hidden.dtype == torch.float64:
        row_ops = RowOps
    elif not triton_available_for(hidden):
        raise RuntimeError(
            "alignlib.kernels.linear_token_logprobs runs Triton kernels: give it CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is imported to run them on the CPU (slowly); "
            "alignlib.kernels.linear_token_logprobs_torch is the same chunked algorithm in torch"
        )
    else:
        row_ops = TritonRowOps
    return chunked_linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index, chunk_size, row_ops,
                                         labels_checked=labels_checked)
