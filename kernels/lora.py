r"""A LoRA linear layer, y = x W^T + s (x A^T) B^T (+ bias), as one Triton GEMM over an extended K.

Shapes as peft stores them: x (M, K) (leading dims flattened), the frozen base weight
W (N, K), lora_A (r, K), lora_B (N, r), the scaling s = lora_alpha / r, bias (N,).

The extended-K trick. Write the LoRA update as one more slice of the reduction:

    y = [x | s x A^T] @ [W | B]^T  =  x W^T  +  (s x A^T) B^T

so one accumulator tile of y first takes x @ W^T over K, then (s x A^T) @ B^T over the r
extra "columns" of the extended K. Forward is two launches of one kernel:

    xs = s (x A^T)                        (M, r)   a thin GEMM; kept for backward
    y  = x W^T + xs B^T (+ bias)          (M, N)   one accumulator, K then r

Backward, with g = dL/dy (M, N) and W (and the bias, unless it asks for a gradient) frozen:

    gs = s (g B)                          (M, r)   thin GEMM
    dx = g W + gs A                       (M, K)   one accumulator, N then r
    dB = s g^T (x A^T) = g^T xs           (N, r)   reduction over the M tokens (split-K)
    dA = s (g B)^T x   = gs^T x           (r, K)   reduction over the M tokens (split-K)

Folding s into the thin (M, r) factors means the big GEMMs carry no scalar at all. dB and
dA reduce over all M tokens into a small output, so their programs also split M and sum
the float32 partials. Accumulation is float32 for fp32, bf16 and fp16 inputs; outputs
and gradients come back in the inputs' dtype (fp32 inputs use TF32 on the tensor cores
only when torch.backends.cuda.matmul.allow_tf32 says so, as torch's own matmul does).
float64 inputs take the torch reference (`reference.lora_linear_torch`).

Memory. Saved for backward: x (M x K, which any LoRA backward needs for dA) and xs
(M x r, e.g. 16 columns), plus references to W, A and B. Never a merged W + s B A (an
N x K copy of the weight), and none of the (M x N) and (M x K) temporaries an unfused
LoRA forward and backward write and read back: the separate x W^T, (x A^T) B^T, its
scaled copy and their sum in forward, and g W, gs A and their sum in backward.
For scale: a 4096 x 4096 projection, r = 16, M = 8192 tokens in bf16 saves x (64 MiB,
shared with whatever else needs it) and xs (0.25 MiB); a merged weight would be 32 MiB
per layer, and each unfused (M x N) temporary is another 64 MiB of traffic.

4-bit base weights (QLoRA). W may be a bitsandbytes Params4bit (NF4 or FP4, blocksize
from its quant_state, plain or nested "double-quantised" absmax). The K loop then reads
the packed bytes and dequantises each W tile in registers, code[nibble] * absmax[block]
(nested: absmax = code2[q] * absmax2[q_block] + offset), cast to x's dtype as
bitsandbytes does; the dense (N x K) weight never exists, in forward or in backward.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .logprobs import triton_available_for
from .reference import lora_linear_torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dequantize_4bit(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, index, mask,
    NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
):
    """Entries W.flat[index] of a bitsandbytes 4-bit weight, in float32 (0 where not mask).

    Two 4-bit codes per byte, the even index in the high nibble; entry = code[nibble] *
    absmax[index // QBLOCK]. Nested (double) quantisation stores absmax itself as 8-bit
    codes: absmax = code2[q] * absmax2[block // QBLOCK2] + offset.
    """
    byte = tl.load(packed_ptr + index // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(index % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble)
    block = index // QBLOCK
    if NESTED:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0)
        scale = tl.load(code2_ptr + absmax_code) * absmax2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _extended_k_matmul(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, c_ptr,
    q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
    M, N, K1, K2, k1_per_split,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_cs, stride_cm, stride_cn,
    alpha,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr,
    GROUP_M: tl.constexpr,
    B1_4BIT: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
):
    """c[split] = alpha * (a1 @ b1 + a2 @ b2) (+ bias): a1 (M, K1), b1 (K1, N), a2 (M, K2), b2 (K2, N).

    Program axis 0 walks the (M, N) output tiles, grouped GROUP_M row-tiles at a time so
    neighbouring programs share b1 tiles in L2. Axis 1 splits K1 into slices of
    k1_per_split (a multiple of BLOCK_K); with more than one slice K2 is 0 and each slice
    writes its own float32 partial c[split], summed by the caller. DOT_IN_FP32 upcasts the
    tiles before tl.dot: the interpreter multiplies bf16 tiles' raw bit patterns otherwise
    (triton-lang/triton#11584); bf16 products are exact in fp32, so the result is the same.
    B1_4BIT: b1 is a bitsandbytes 4-bit weight (b1_ptr its packed bytes, the q_* pointers
    its quantisation state), dequantised tile by tile; b1[k, n] = W.flat[k * stride_b1k +
    n * stride_b1n].
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # x @ W^T (or g @ W): the base weight's K.
    k_start = split * k1_per_split
    k_end = tl.minimum(k_start + k1_per_split, K1)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K1
        a = tl.load(a1_ptr + rows[:, None] * stride_a1m + ks[None, :] * stride_a1k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if B1_4BIT:
            b = _dequantize_4bit(b1_ptr, q_absmax_ptr, q_code_ptr, q_absmax2_ptr, q_code2_ptr, q_offset_ptr,
                                 ks[:, None] * stride_b1k + cols[None, :] * stride_b1n,
                                 k_ok[:, None] & col_ok[None, :], NESTED, QBLOCK, QBLOCK2)
            if not DOT_IN_FP32:
                b = b.to(a.dtype)  # as bitsandbytes dequantises to the compute dtype
        else:
            b = tl.load(b1_ptr + ks[:, None] * stride_b1k + cols[None, :] * stride_b1n,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # The extended K: (s x A^T) @ B^T (or (s g B) @ A) into the same accumulator.
    for k0 in range(0, K2, BLOCK_K2):
        ks = k0 + tl.arange(0, BLOCK_K2)
        k_ok = ks < K2
        a = tl.load(a2_ptr + rows[:, None] * stride_a2m + ks[None, :] * stride_a2k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b2_ptr + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + split * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


class Weight4bit(NamedTuple):
    """A bitsandbytes 4-bit weight W (out, in), seen as a 2-D operand of shape `shape`:
    operand[i, j] = W.flat[i * strides[0] + j * strides[1]] (W itself: strides (in, 1))."""

    packed: torch.Tensor  # uint8, two 4-bit codes per byte
    absmax: torch.Tensor  # (blocks,) float32, or uint8 codes when nested
    code: torch.Tensor  # (16,) float32: the NF4 (or FP4) values
    blocksize: int
    absmax2: torch.Tensor | None  # nested only: float32 scales of the absmax codes
    code2: torch.Tensor | None  # nested only: (256,) float32
    blocksize2: int
    offset: torch.Tensor | None  # nested only: float32, added back to the absmax
    shape: tuple[int, int]
    strides: tuple[int, int]

    def t(self) -> Weight4bit:
        return self._replace(shape=self.shape[::-1], strides=self.strides[::-1])


def as_weight_4bit(weight: torch.Tensor) -> Weight4bit:
    """The quantisation state of a bitsandbytes Params4bit (its .quant_state), read by duck typing."""
    state = weight.quant_state
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"weight: 4-bit quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "weight: this 4-bit weight is repacked for bitsandbytes' CPU kernel; that layout is not supported"
        )
    if len(state.shape) != 2:
        raise ValueError(f"weight: 4-bit weight must be 2-D (out, in), got shape {tuple(state.shape)}")
    out_features, in_features = state.shape
    nested = state.nested
    return Weight4bit(
        packed=weight.data.view(torch.uint8).reshape(-1),
        absmax=state.absmax,
        code=state.code.float(),
        blocksize=state.blocksize,
        absmax2=state.state2.absmax.float() if nested else None,
        code2=state.state2.code.float() if nested else None,
        blocksize2=state.state2.blocksize if nested else 1,
        offset=state.offset.float().reshape(1) if nested else None,
        shape=(out_features, in_features),
        strides=(in_features, 1),
    )


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Under the interpreter every program is numpy work, so small fixed tiles keep the
# tests quick and still cross several tiles at small sizes (tests may patch this).
INTERPRETER_CONFIG = TileConfig(16, 16, 16, 1, 1)
# Programs to aim for when splitting a token reduction (dA, dB) over K: enough to fill
# an H100's 132 SMs about twice; each slice keeps at least MIN_K_PER_SPLIT of K.
TARGET_PROGRAMS = 264
MIN_K_PER_SPLIT = 512


def _interpreting(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _pick_config(a: torch.Tensor, m: int, n: int) -> TileConfig:
    """Fixed tiles per shape, no autotuning: 128 x 128 x 64 (fp32: K 32, to fit shared memory)
    for big outputs, narrower where M or N is small (the thin (M, r) and (N, r) outputs)."""
    if _interpreting(a):
        return INTERPRETER_CONFIG
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = 32 if a.dtype == torch.float32 else 64
    big = block_m * block_n >= 128 * 64
    return TileConfig(block_m, block_n, block_k, 8 if big else 4, 3)


def _matmul(
    a1: torch.Tensor,
    b1: torch.Tensor | Weight4bit,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    bias: torch.Tensor | None = None,
    split_k: bool = False,
) -> torch.Tensor:
    """alpha * (a1 @ b1 + a2 @ b2) (+ bias) in a1's dtype; operands may be any strided 2-D views.

    a1 (M, K1), b1 (K1, N) (or a 4-bit weight), a2 (M, K2), b2 (K2, N), bias (N,). split_k
    (only without a2 and bias) splits K1 across programs and sums their float32 partials.
    """
    m, k1 = a1.shape
    n = b1.shape[1]
    quant = b1 if isinstance(b1, Weight4bit) else None
    b1_strides = quant.strides if quant is not None else b1.stride()
    b1_ptr = quant.packed if quant is not None else b1
    k2 = 0 if a2 is None else a2.shape[1]
    if a2 is None:
        a2, b2 = a1, a1  # never read: K2 = 0
    config = _pick_config(a1, m, n)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    splits = 1
    if split_k and k1 > 0:
        min_k = config.block_k * 2 if _interpreting(a1) else MIN_K_PER_SPLIT
        splits = max(1, min(triton.cdiv(k1, min_k), TARGET_PROGRAMS // max(tiles, 1)))
    k1_per_split = triton.cdiv(triton.cdiv(max(k1, 1), splits), config.block_k) * config.block_k
    splits = max(1, triton.cdiv(k1, k1_per_split))
    # The interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest, so there
    # the kernel writes float32 and torch rounds, as the GPU would.
    interpreted_bf16 = _interpreting(a1) and a1.dtype == torch.bfloat16
    float32_out = splits > 1 or interpreted_bf16
    out = torch.empty(splits, m, n, dtype=torch.float32 if float32_out else a1.dtype, device=a1.device)
    if m == 0 or n == 0:
        return out.sum(0).to(a1.dtype)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    nested = quant is not None and quant.absmax2 is not None
    _extended_k_matmul[(tiles, splits)](
        a1, b1_ptr, a2, b2, bias if bias is not None else a1, out,
        *((quant.absmax, quant.code) if quant is not None else (a1, a1)),
        *((quant.absmax2, quant.code2, quant.offset) if nested else (a1, a1, a1)),
        m, n, k1, k2, k1_per_split,
        a1.stride(0), a1.stride(1), b1_strides[0], b1_strides[1],
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        float(alpha),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION="tf32" if (a1.dtype == torch.float32 and allow_tf32) else "ieee",
        DOT_IN_FP32=interpreted_bf16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_K2=min(config.block_k, max(16, triton.next_power_of_2(max(k2, 1)))),
        GROUP_M=8, num_warps=config.num_warps, num_stages=config.num_stages,
        B1_4BIT=quant is not None, NESTED=nested,
        QBLOCK=quant.blocksize if quant is not None else 1, QBLOCK2=quant.blocksize2 if nested else 1,
    )
    if splits > 1:
        return out.sum(0).to(a1.dtype)
    return out[0].to(a1.dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling):
        # x (M, K), weight (N, K), lora_A (r, K), lora_B (N, r), bias (N,) or None.
        # weight may be a Weight4bit (frozen constants, kept on ctx rather than saved).
        xs = _matmul(x, lora_A.t(), alpha=scaling)  # s x A^T   (M, r)
        y = _matmul(x, weight.t(), xs, lora_B.t(), bias=bias)  # x W^T + xs B^T (+ bias)
        quantized = isinstance(weight, Weight4bit)
        ctx.save_for_backward(x, xs, None if quantized else weight, lora_A, lora_B)
        ctx.weight_4bit = weight if quantized else None
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xs, weight, lora_A, lora_B = ctx.saved_tensors
        weight = ctx.weight_4bit if weight is None else weight
        needs_x, _, needs_A, needs_B, needs_bias, _ = ctx.needs_input_grad
        grad_x = grad_A = grad_B = grad_bias = None
        if needs_x or needs_A:
            grad_s = _matmul(grad_y, lora_B, alpha=ctx.scaling)  # s g B   (M, r)
            if needs_x:
                grad_x = _matmul(grad_y, weight, grad_s, lora_A)  # g W + gs A   (M, K)
            if needs_A:
                grad_A = _matmul(grad_s.t(), x, split_k=True)  # gs^T x   (r, K)
        if needs_B:
            grad_B = _matmul(grad_y.t(), xs, split_k=True)  # g^T xs   (N, r)
        if needs_bias:
            grad_bias = grad_y.sum(0, dtype=torch.float32).to(grad_y.dtype)
        return grad_x, None, grad_A, grad_B, grad_bias, None


def _check_inputs(x, weight, lora_A, lora_B, scaling, bias) -> tuple[int, int]:
    """Validates the arguments; returns (out_features, in_features)."""
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    quantized = _is_4bit(weight)
    if quantized:
        del tensors["weight"]  # packed bytes: its dtype is not the compute dtype
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a 0-dim tensor")
    for name in ("weight", "lora_A", "lora_B"):
        if name in tensors and tensors[name].dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(tensors[name].shape)}")
    out_features, in_features = tuple(weight.quant_state.shape) if quantized else weight.shape
    rank = lora_A.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x (..., in) and weight (out, in) disagree: {tuple(x.shape)} vs {(out_features, in_features)}"
        )
    if lora_A.shape[1] != in_features or rank < 1:
        raise ValueError(f"lora_A must have shape (r >= 1, in={in_features}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out={out_features}, r={rank}), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape (out={out_features},), got {tuple(bias.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite python float, got {scaling!r}")
    allowed = SUPPORTED_DTYPES if quantized else SUPPORTED_DTYPES + (torch.float64,)
    if x.dtype not in allowed:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in allowed)
        context = " with a 4-bit weight" if quantized else ""
        raise ValueError(f"x must be one of {names}{context}, got {x.dtype}")
    for name, tensor in tensors.items():
        if tensor.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but x has {x.dtype}: cast them to one dtype")
    for name, tensor in {**tensors, "weight": weight}.items():
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight requires grad, but lora_linear keeps the base weight frozen and would silently give "
            "it none: freeze it (weight.requires_grad_(False)) or pass weight.detach()"
        )
    return out_features, in_features


def _is_4bit(weight: torch.Tensor) -> bool:
    """A bitsandbytes Params4bit (or anything carrying its quant_state), quantised."""
    return getattr(weight, "quant_state", None) is not None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x W^T + scaling (x A^T) B^T (+ bias) through the fused Triton GEMMs; W is frozen.

    Args:
        x: (..., in) float32, bfloat16 or float16 (float64 goes to the torch reference).
        weight: (out, in) the frozen base weight (a ValueError if it requires grad), or a
            bitsandbytes 4-bit Params4bit (NF4 or FP4, plain or nested absmax), which the
            kernel dequantises tile by tile in its K loop: never a dense copy of W.
        lora_A: (r, in) and lora_B: (out, r), as peft's lora_A/lora_B Linear weights.
        scaling: the LoRA scale s (peft's lora_alpha / r), a python float.
        bias: (out,) or None; it gets a gradient only if it requires one.
    All tensors share x's dtype (a 4-bit weight: its compute dtype) and device.
    Returns:
        (..., out) in x's dtype, differentiable with respect to x, lora_A, lora_B (and bias).
    Raises:
        ValueError on shapes, dtypes or devices that disagree, or a non-finite scaling.
        RuntimeError on a CPU tensor unless TRITON_INTERPRET=1 was set before triton was imported.
    """
    out_features, in_features = _check_inputs(x, weight, lora_A, lora_B, scaling, bias)
    if x.dtype == torch.float64:
        return lora_linear_torch(x, weight.detach(), lora_A, lora_B, scaling, bias)
    if not triton_available_for(x):
        raise RuntimeError(
            "alignlib.kernels.lora_linear runs Triton kernels: give it CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is imported to run them on the CPU (slowly); "
            "lora_linear_torch is the same math in torch"
        )
    base_weight = as_weight_4bit(weight) if _is_4bit(weight) else weight.detach()
    flat_x = x.reshape(-1, in_features)
    y = _LoraLinear.apply(flat_x, base_weight, lora_A, lora_B, bias, float(scaling))
    return y.reshape(*x.shape[:-1], out_features)
