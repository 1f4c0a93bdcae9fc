"""A LoRA linear layer, y = x W^T + s (x A^T) B^T, with W frozen.

Implementations, all on the same x (M, K), W (N, K), A (r, K), B (N, r):
- frozen base GEMM alone: x W^T, and dX = g W in backward (the baseline: what LoRA adds
  on top of it is the overhead);
- peft LoRA Linear: peft's module (lora_dropout 0), what users run today;
- alignlib lora_linear: the Triton kernel (CUDA; on the CPU it would run in the
  interpreter, so it is not timed there);
- alignlib torch reference: kernels.reference.lora_linear_torch, the same math in torch;
- Unsloth's LoRA matmul (`unsloth.kernels.utils.matmul_lora`) where unsloth imports (GPU).

Modes: forward under no_grad, and forward+backward (gradients for x, A and B).
"""

from __future__ import annotations

import torch

from benchmarks.harness import NotAvailable, Row, measure

BASELINE = "frozen base GEMM alone"
FLOORS = (BASELINE,)  # the cost floor a LoRA layer adds to, not an alternative: no "behind" against it
MODES = ("forward", "fwd+bwd")

# (tokens M, in K, out N, rank r) per preset; float32 on the CPU, bfloat16 on the GPU.
SIZES = {
    "tiny": [(64, 64, 64, 8)],
    "cpu": [(1024, 1024, 1024, 8), (1024, 1024, 1024, 64)],
    "gpu": [(8192, 4096, 4096, 8), (8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 4096, 128)],
    # scripts/gpu_check.sh: a square projection and an MLP up-projection (Llama-3 8B's 4096 -> 14336)
    "gpu-check": [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16)],
}
SCALING = 2.0


def base_gemm(x, weight, lora_A, lora_B, layer):
    return x @ weight.T


def peft_lora(x, weight, lora_A, lora_B, layer):
    return layer(x)


def alignlib_lora_linear(x, weight, lora_A, lora_B, layer):
    if not x.is_cuda:
        raise NotAvailable("the Triton kernel needs CUDA (the CPU interpreter is for tests, not timing)")
    from alignlib.kernels import lora_linear

    return lora_linear(x, weight, lora_A, lora_B, SCALING)


def alignlib_reference(x, weight, lora_A, lora_B, layer):
    from alignlib.kernels import lora_linear_torch

    return lora_linear_torch(x, weight, lora_A, lora_B, SCALING)


def unsloth_matmul_lora(x, weight, lora_A, lora_B, layer):
    if not x.is_cuda:
        raise NotAvailable("unsloth needs CUDA")
    from unsloth.kernels.utils import matmul_lora

    return matmul_lora(x, weight, None, lora_A, lora_B, SCALING)


IMPLEMENTATIONS = {
    BASELINE: base_gemm,
    "peft LoRA Linear": peft_lora,
    "alignlib lora_linear (Triton)": alignlib_lora_linear,
    "alignlib torch reference": alignlib_reference,
    "Unsloth matmul_lora": unsloth_matmul_lora,
}


def peft_layer(weight, lora_A, lora_B, rank):
    """A peft LoRA Linear holding the same W, A, B (alpha chosen so that alpha / r = SCALING)."""
    from peft import LoraConfig, get_peft_model

    out_features, in_features = weight.shape
    holder = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=SCALING * rank, target_modules=["0"], lora_dropout=0.0))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return model.to(weight.device, weight.dtype), layer


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for tokens, in_features, out_features, rank in sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, in_features, generator=g).to(device, dtype)
        weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(device, dtype)
        lora_A = (torch.randn(rank, in_features, generator=g) / in_features**0.5).to(device, dtype)
        lora_B = (torch.randn(out_features, rank, generator=g) / rank**0.5).to(device, dtype)
        _, layer = peft_layer(weight, lora_A, lora_B, rank)
        case = f"M={tokens} K={in_features} N={out_features} r={rank}"
        expected = alignlib_reference(x, weight, lora_A, lora_B, layer)
        for mode in MODES:
            for name, fn in IMPLEMENTATIONS.items():
                call = _call(fn, x, weight, lora_A, lora_B, layer, mode)
                row = measure(case, name, mode, call, device, warmup=warmup, repeats=repeats)
                if not row.note and name != BASELINE:
                    with torch.no_grad():
                        out = fn(x, weight, lora_A, lora_B, layer)
                    row.extra["max_abs_diff_vs_reference"] = (out.float() - expected.float()).abs().max().item()
                rows.append(row)
                print(f"  {case} | {mode} | {name}: {row.median_ms and round(row.median_ms, 3)} ms {row.note}", flush=True)
    return rows


def _call(fn, x, weight, lora_A, lora_B, layer, mode):
    def forward_only():
        with torch.no_grad():
            return fn(x, weight, lora_A, lora_B, layer)

    def forward_backward():
        xg = x.detach().requires_grad_(True)
        a = lora_A.detach().requires_grad_(True)
        b = lora_B.detach().requires_grad_(True)
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.grad = None
        fn(xg, weight, a, b, layer).sum().backward()

    return forward_only if mode == "forward" else forward_backward
