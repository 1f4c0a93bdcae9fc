"""Torch references of the kernels' math, importable without triton.

Each function computes what its Triton kernel computes, in plain torch ops; the tests
check the kernels against these (and these against the textbook formulas).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""The label of a position left out of the log-probs (prompt, padding), as Hugging Face models use it."""


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = IGNORE_INDEX, *,
                 vocab_from: str = "the vocabulary size", shift: int = 0) -> None:
    """Raise a ValueError if a label other than ignore_index lies outside [0, vocab_size).

    The message names the first such id, its position and V. The test is one elementwise
    pass and one reduction; `bool()` of it waits for the device once (one CUDA sync), the
    price of a clear error instead of an out-of-bounds read in a kernel. Every public entry
    point runs it once (a caller that has already checked passes `labels_checked=True` to the
    kernels). Positions are reported in the caller's coordinates: `shift` is added to the last
    index (sequence_logprobs checks labels[:, 1:] and reports the column in labels).
    `vocab_from` says where V came from, for the message.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if not bool(bad.any()):
        return
    where = bad.nonzero()
    position = where[0].tolist()
    value = labels[tuple(position)].item()
    if position:
        position[-1] += shift
    raise ValueError(
        f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; got {value} at position "
        f"{tuple(position)} ({where.shape[0]} such label{'s' if where.shape[0] > 1 else ''}); V = {vocab_size} "
        f"is {vocab_from}: do the tokenizer and the model agree?"
    )


def token_logprobs_torch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The torch reference of the same math: x_y - logsumexp(x), 0 on ignored positions.

    Computes in float32 (float64 for float64 logits), upcasting a block of rows at a time.
    Differentiable through autograd (the tests' reference for every backward).
    """
    logp, _, _, _ = _flat_logprobs(logits, labels, ignore_index)
    return logp.reshape(labels.shape)


def _flat_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                   block_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, safe_labels, valid), each (N,) over the N = labels.numel() rows of logits."""
    vocab = logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    safe_labels = torch.where(valid, flat_labels, 0)
    label_logits = flat_logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1).to(out_dtype)
    if flat_logits.shape[0] == 0:
        lse = flat_logits.new_zeros(0, dtype=out_dtype)
    else:  # a block of rows at a time: logsumexp's (rows, V) temporaries stay block-sized
        lse = torch.cat([torch.logsumexp(rows.to(out_dtype), dim=-1) for rows in flat_logits.split(block_rows)])
    return torch.where(valid, label_logits - lse, 0.0), lse, safe_labels, valid


class TokenLogprobsFunction(torch.autograd.Function):
    """`token_logprobs_torch` with a hand-written backward that needs one gradient buffer.

    Autograd through logsumexp and gather keeps several (N, V) temporaries alive in backward
    (exp(x - lse), its product with g, the scattered one-hot, their sum). Here backward writes
    g * (onehot - softmax) into the gradient itself, a block of rows at a time, so the peak is the
    logits plus one buffer of their shape: what the Triton kernel does, in torch, for the CPU.
    The forward is token_logprobs_torch's (without building a graph).
    """

    BLOCK_ELEMENTS = 1 << 22  # a block of rows holds about this many logits (16 MiB in float32)

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        block = max(1, TokenLogprobsFunction.BLOCK_ELEMENTS // logits.shape[-1])
        logp, lse, safe_labels, valid = _flat_logprobs(logits, labels, ignore_index, block)
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        return logp.reshape(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe_labels, valid, lse = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat_logits = logits.reshape(-1, vocab)
        g = torch.where(valid, grad_out.reshape(-1).to(lse.dtype), 0.0)
        grad = torch.empty_like(flat_logits)
        block = max(1, TokenLogprobsFunction.BLOCK_ELEMENTS // vocab)
        for start in range(0, flat_logits.shape[0], block):
            rows = slice(start, start + block)
            # g * (onehot - softmax) in lse's dtype; straight into the gradient when the dtypes agree
            same_dtype = grad.dtype == lse.dtype
            target = grad[rows] if same_dtype else None
            block_grad = torch.sub(flat_logits[rows].to(lse.dtype), lse[rows].unsqueeze(-1), out=target).exp_()
            block_grad.mul_(-g[rows].unsqueeze(-1))
            block_grad.scatter_add_(-1, safe_labels[rows].unsqueeze(-1), g[rows].unsqueeze(-1))
            if not same_dtype:
                grad[rows] = block_grad
        return grad.reshape(logits.shape), None, None


def token_logprobs_lean(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """token_logprobs_torch's values and gradients, with backward's memory held to one (N, V) buffer."""
    return TokenLogprobsFunction.apply(logits, labels, ignore_index)


# --- log-probs straight from hidden states: lm_head and log-softmax, chunked over tokens ---
#
# For hidden states h (N, H), the lm_head weight W (V, H) and labels y (N,):
#
#     z_i    = W h_i                              (V,)  the logits of token i
#     logp_i = z_{i, y_i} - logsumexp(z_i)
#     d logp_i / d h_i = (e_{y_i} - softmax(z_i))^T W          (H,)
#     d sum_i g_i logp_i / d W = sum_i g_i (e_{y_i} - softmax(z_i)) h_i^T   (V, H)
#
# Tokens are processed `chunk_size` at a time, so at most a (chunk, V) block of logits
# exists at once: memory O(chunk x V) instead of O(N x V). Only the per-token logsumexp
# (N,) is kept for backward, which recomputes each chunk's logits. When W is frozen (the
# LoRA case), the forward pass already knows d logp_i / d h_i up to the factor g_i, so it
# stores that (N, H) direction instead and backward is one multiply: two matmuls in total,
# as many as the unfused path. The weight gradient is accumulated in float32 across chunks.
#
# The loop is shared by the torch reference and the Triton kernel; they differ only in
# the two row operations below (`RowOps`), which see one chunk of logits at a time.


class RowOps:
    """Row operations on a (C, V) chunk of logits, here in plain torch.

    forward(logits, labels) -> (logp, lse): both (C,) float32.
    grad_into(logits, labels, lse, g): overwrite logits with g * (onehot - softmax).
    """

    @staticmethod
    def forward(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.logsumexp(logits.to(acc_dtype), dim=-1)
        logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).to(acc_dtype) - lse
        return logp, lse

    @staticmethod
    def grad_into(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> None:
        grad = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(-1)).mul_(-g.unsqueeze(-1))
        grad.scatter_add_(-1, labels.unsqueeze(-1), g.to(grad.dtype).unsqueeze(-1))
        logits.copy_(grad)


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk such that a chunk of logits is about as large as the hidden states.

    chunk x V ~ N x H, rounded up to a power of two and kept in [256, 4096] so the matmuls
    stay large enough to run efficiently.
    """
    tokens = max(1, -(-num_tokens * hidden_size // max(vocab_size, 1)))
    return min(4096, max(256, 1 << (tokens - 1).bit_length()))


def add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc float32 (or float64), never rounding a @ b to a's dtype first.

    Summing bf16-rounded products chunk after chunk biases the weight gradient (peers saw
    training drift from it); on CUDA the matmul writes float32 directly, elsewhere the
    operands are upcast (a chunk-sized copy).
    """
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class LinearTokenLogprobs(torch.autograd.Function):
    """The chunked loop above as an autograd Function; `row_ops` picks torch or Triton."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, row_ops):
        # hidden (N, H), weight (V, H), labels (N,) all valid (ignored tokens removed by the caller).
        num_tokens = hidden.shape[0]
        acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp = hidden.new_empty(num_tokens, dtype=acc_dtype)
        lse = hidden.new_empty(num_tokens, dtype=acc_dtype)
        hidden_grad_only = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        direction = torch.empty_like(hidden) if hidden_grad_only else None
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = hidden[rows] @ weight.T  # (C, V)
            logp[rows], lse[rows] = row_ops.forward(logits, labels[rows])
            if hidden_grad_only:  # d logp / d h with g = 1, while the logits are at hand
                row_ops.grad_into(logits, labels[rows], lse[rows], torch.ones_like(lse[rows]))
                direction[rows] = logits @ weight
        ctx.chunk_size, ctx.row_ops = chunk_size, row_ops
        if hidden_grad_only:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, labels, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if need_hidden and not need_weight:
            (direction,) = ctx.saved_tensors
            return (grad_logp.unsqueeze(-1) * direction).to(direction.dtype), None, None, None, None
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        grad_logp = grad_logp.to(lse.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = hidden[rows] @ weight.T  # recomputed, then overwritten by its gradient
            ctx.row_ops.grad_into(logits, labels[rows], lse[rows], grad_logp[rows])
            if need_hidden:
                grad_hidden[rows] = logits @ weight
            if need_weight:
                add_matmul_fp32(grad_weight, logits.T, hidden[rows])
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_token_logprobs_torch(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    labels_checked: bool = False,
) -> torch.Tensor:
    """log softmax(hidden @ W^T)[labels] in chunks of tokens, in torch: 0 where labels == ignore_index.

    hidden (..., H), lm_head_weight (V, H), labels (...) -> (...) float32 (float64 for float64 inputs).
    labels_checked=True skips the label range check (for a caller that has run `check_labels`).
    """
    return chunked_linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index, chunk_size, RowOps,
                                         labels_checked=labels_checked)


def chunked_linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index, chunk_size, row_ops, *,
                                  labels_checked: bool = False):
    """Shared entry point: checks, drops ignored tokens, runs LinearTokenLogprobs, scatters back."""
    if hidden.dim() < 1 or lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) and lm_head_weight (V, H) disagree: {tuple(hidden.shape)} vs {tuple(lm_head_weight.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden (..., H) and labels (...) disagree: {tuple(hidden.shape)} vs {tuple(labels.shape)}")
    if hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {lm_head_weight.dtype}; cast one of them")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    vocab, hidden_size = lm_head_weight.shape
    flat_hidden = hidden.reshape(-1, hidden_size)
    flat_labels = labels.reshape(-1)
    if not labels_checked:
        check_labels(labels, vocab, ignore_index, vocab_from="lm_head_weight.shape[0]")
    valid = flat_labels != ignore_index
    keep = valid.nonzero().squeeze(-1)  # prompt and padding tokens never reach the lm_head
    chunk = chunk_size or default_chunk_size(keep.numel(), hidden_size, vocab)
    kept_logp = LinearTokenLogprobs.apply(flat_hidden[keep], lm_head_weight, flat_labels[keep], chunk, row_ops)
    out_dtype = kept_logp.dtype
    out = flat_hidden.new_zeros(flat_labels.shape[0], dtype=out_dtype).index_put((keep,), kept_logp)
    return out.reshape(labels.shape)


def lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch reference of the fused LoRA linear: x W^T + scaling (x A^T) B^T (+ bias).

    x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r), bias (out,) or None;
    returns (..., out). Computes in the inputs' dtype, op for op as peft's LoRA Linear
    does, and differentiates whatever requires grad (the kernel keeps weight frozen).
    """
    return torch.nn.functional.linear(x, weight, bias) + torch.nn.functional.linear(
        torch.nn.functional.linear(x, lora_A), lora_B
    ) * scaling


def dequantize_4bit_torch(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    blocksize2: int = 256,
    offset: torch.Tensor | None = None,
    chunk: int = 1 << 24,
) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (NF4/FP4, plain or nested absmax) as a dense `shape` tensor of `dtype`.

    W.flat[i] = code[nibble_i] * absmax[i // blocksize], two codes per byte with the even index
    in the high nibble; nested absmax = code2[absmax_code] * absmax2[block // blocksize2] + offset.
    Computed in float32 and rounded once to `dtype`, as bitsandbytes does; `chunk` entries at a
    time, so the temporaries stay small. The LoRA kernel's dequantisation, in torch.
    """
    numel = shape[0] * shape[1]
    if absmax2 is not None:
        scales = code2[absmax.long()] * absmax2.repeat_interleave(blocksize2)[: absmax.numel()] + offset
    else:
        scales = absmax.float()
    packed = packed.reshape(-1)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    chunk -= chunk % (2 * blocksize)
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        bytes_ = packed[start // 2: (stop + 1) // 2].long()
        nibbles = torch.stack((bytes_ >> 4, bytes_ & 15), dim=-1).reshape(-1)[: stop - start]
        scale = scales[start // blocksize: (stop + blocksize - 1) // blocksize].repeat_interleave(blocksize)
        out[start:stop] = (code.float()[nibbles] * scale[: stop - start]).to(dtype)
    return out.reshape(shape)
