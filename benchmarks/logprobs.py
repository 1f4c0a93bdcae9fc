"""Per-token log-probs of the labels from the last hidden states and the lm_head weight.

Every implementation computes the same (N,) log-probs (peers that return cross-entropy give
-log p) from hidden (N, H), W (V, H) and labels (N,):
- eager: logits = hidden @ W^T, log_softmax in float32, gather (the baseline);
- alignlib token_logprobs: the same matmul, then alignlib.logprobs.token_logprobs (Triton on
  CUDA, torch on CPU);
- alignlib linear_token_logprobs: matmul and log-softmax fused, chunked over tokens;
- TRL 1.16 ChunkedLogProbFunction (the path its trainers use for log-probs);
- torch's F.linear_cross_entropy with LinearCrossEntropyOptions (its chunked path);
- Liger's fused linear cross-entropy and the cut-cross-entropy package (CUDA only).

Modes: forward under no_grad (a reference model), forward+backward with W frozen (LoRA),
forward+backward with W trainable (full fine-tuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import NotAvailable, Row, measure

BASELINE = "eager log_softmax+gather"
MODES = ("forward", "fwd+bwd, W frozen", "fwd+bwd, W trainable")

# (tokens, hidden, vocab) per preset; float32 on the CPU, bfloat16 on the GPU.
SIZES = {
    "tiny": [(64, 32, 1000)],
    "cpu": [(1024, 256, 32000), (2048, 256, 32000), (512, 256, 128256)],  # V=128k kept small: the whole CPU run < 10 min
    "gpu": [(2048, 4096, 32000), (8192, 4096, 32000), (8192, 4096, 128256), (16384, 4096, 128256), (32768, 4096, 128256)],
    # scripts/gpu_check.sh: the goals' shape (8k tokens, H 4096, V 128256) and an unaligned V (GPT-2's)
    "gpu-check": [(8192, 4096, 128256), (8192, 4096, 50257)],
}


def eager(hidden, weight, labels):
    logits = hidden @ weight.T
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def alignlib_token_logprobs(hidden, weight, labels):
    from alignlib.logprobs import token_logprobs

    return token_logprobs(hidden @ weight.T, labels)


def alignlib_linear_token_logprobs(hidden, weight, labels):
    from alignlib.logprobs import linear_token_logprobs

    return linear_token_logprobs(hidden, weight, labels)


def trl_chunked(hidden, weight, labels):
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    return _ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]


def torch_linear_cross_entropy(hidden, weight, labels):
    options = torch.nn.LinearCrossEntropyOptions()
    return -F.linear_cross_entropy(hidden, weight, labels, reduction="none", options=options)


def liger_fused_linear(hidden, weight, labels):
    if not hidden.is_cuda:
        raise NotAvailable("Liger's Triton kernels need CUDA")
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, labels, None, None, -100, 0.0, 0.0, "none")
    return -(loss[0] if isinstance(loss, tuple) else loss)


def cut_cross_entropy(hidden, weight, labels):
    if not hidden.is_cuda:
        raise NotAvailable("cut-cross-entropy's kernels need CUDA")
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(hidden, weight, labels, reduction="none")


IMPLEMENTATIONS = {
    BASELINE: eager,
    "alignlib token_logprobs": alignlib_token_logprobs,
    "alignlib linear_token_logprobs": alignlib_linear_token_logprobs,
    "TRL 1.16 chunked log-probs": trl_chunked,
    "torch F.linear_cross_entropy (chunked)": torch_linear_cross_entropy,
    "Liger fused linear CE": liger_fused_linear,
    "cut-cross-entropy": cut_cross_entropy,
}


def make_call(fn, hidden, weight, labels, mode):
    def forward_only():
        with torch.no_grad():
            return fn(hidden, weight, labels)

    def forward_backward():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(mode == "fwd+bwd, W trainable")
        fn(h, w, labels).sum().backward()

    return forward_only if mode == "forward" else forward_backward


def check_agreement(hidden, weight, labels) -> dict[str, float]:
    """Max abs difference of each implementation's log-probs from the eager ones (a sanity check)."""
    with torch.no_grad():
        expected = eager(hidden, weight, labels)
        diffs = {}
        for name, fn in IMPLEMENTATIONS.items():
            try:
                diffs[name] = (fn(hidden, weight, labels).float() - expected).abs().max().item()
            except Exception:
                pass
    return diffs


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for tokens, hidden_size, vocab in sizes:
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(tokens, hidden_size, generator=g).to(device, dtype)
        weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device, dtype)
        labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
        case = f"N={tokens} H={hidden_size} V={vocab}"
        diffs = check_agreement(hidden, weight, labels)
        for mode in MODES:
            for name, fn in IMPLEMENTATIONS.items():
                row = measure(case, name, mode, make_call(fn, hidden, weight, labels, mode), device, warmup=warmup, repeats=repeats)
                if name in diffs and not row.note:
                    row.extra["max_abs_diff_vs_eager"] = diffs[name]
                rows.append(row)
                print(f"  {case} | {mode} | {name}: {row.median_ms and round(row.median_ms, 2)} ms, "
                      f"{row.peak_mib and round(row.peak_mib, 1)} MiB {row.note}", flush=True)
    return rows
