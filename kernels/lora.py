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
only when torch says so, as torch's own matmul does: `tf32_enabled`). float64 inputs take the
torch reference (`reference.lora_linear_torch`), and so does every GPU older than sm_80
(`lora_kernel_serves`: Triton emits no tensor-core instructions there). Tiles are per GPU
generation (`TILES`, docs/kernels.md); the thin (M, r), (N, r) and (r, K) GEMMs split K
across programs so that they fill the GPU.

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
bitsandbytes does; the dense (N x K) weight never exists, in forward or in backward. The
16-entry code table is held in registers and each tile spans one quantisation block along
the in-features, so a tile needs one absmax per row or column and no shared memory beyond
the packed bytes' (`_dequantize_4bit_tile`). Where in_features is not a multiple of the
blocksize, or x is fp32 with TF32 off (an FMA dot, out of registers with the dequantisation
inside), W is dequantised once per call instead and the dense kernel runs.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import capability, multiprocessor_count, try_launch
from .logprobs import triton_available_for
from .lora_tiles import (
    AUTOTUNE_CONFIGS,
    AUTOTUNE_ENV,
    MIN_K_PER_SPLIT,
    PROGRAMS_PER_SM,
    TUNED,
    cuda_ms,
    family,
    fastest,
    fit,
    kernel_dequantises,
    lora_kernel_serves,
    operand_kind,
    pick_config,
    tf32_enabled,
)
from .reference import dequantize_4bit_torch, lora_linear_torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _code_entry(code, i: tl.constexpr):
    """code[i] of a (16,) tensor, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, 16) == i, code, 0.0), axis=0)


@triton.jit
def _lookup_16(nibble, codes):
    """codes[nibble] for 4-bit indices: a tree of selects on the index bits, in registers
    (as bitsandbytes' own dequantisation does), so no table and no gather goes through memory."""
    b0 = (nibble & 1) != 0
    b1 = (nibble & 2) != 0
    b2 = (nibble & 4) != 0
    b3 = (nibble & 8) != 0
    v0 = tl.where(b1, tl.where(b0, codes[3], codes[2]), tl.where(b0, codes[1], codes[0]))
    v1 = tl.where(b1, tl.where(b0, codes[7], codes[6]), tl.where(b0, codes[5], codes[4]))
    v2 = tl.where(b1, tl.where(b0, codes[11], codes[10]), tl.where(b0, codes[9], codes[8]))
    v3 = tl.where(b1, tl.where(b0, codes[15], codes[14]), tl.where(b0, codes[13], codes[12]))
    return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))


@triton.jit
def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, ok,
            NESTED: tl.constexpr, QBLOCK2: tl.constexpr):
    """The scale of quantisation blocks `block`: absmax[block], or, nested (double-quantised),
    code2[absmax[block]] * absmax2[block // QBLOCK2] + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // QBLOCK2, mask=ok, other=0.0)
        return tl.load(code2_ptr + q, mask=ok, other=0.0) * scale2 + offset
    else:
        return tl.load(absmax_ptr + block, mask=ok, other=0.0)


@triton.jit
def _dequantize_4bit_tile(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, codes, offset,
    ks, cols, k_ok, col_ok, stride_k, stride_n, k0, n0,
    NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, IN_AXIS: tl.constexpr,
):
    """One (BLOCK_K, BLOCK_N) tile of a bitsandbytes 4-bit weight, in float32 (0 outside the masks).

    tile[i, j] = W.flat[ks[i] * stride_k + cols[j] * stride_n] = code[nibble] * absmax[block]:
    two 4-bit codes per byte, the even index in the high nibble. IN_AXIS says which tile axis
    runs along W's in-features (0: the K axis, stride_k = 1, W^T as in forward; 1: the N axis,
    stride_n = 1, W as in dx). The launch code makes in_features (the other stride) a multiple
    of QBLOCK, and the tile no wider than one quantisation block along the in-features, so:
    the byte of an entry is (in-feature index) // 2 plus half the (even) row offset, its nibble
    depends on the in-feature index's parity alone, each tile row (or column) needs one
    absmax, loaded once, and the code table is the 16 scalars `codes`, looked up in registers.
    """
    mask = k_ok[:, None] & col_ok[None, :]
    byte = tl.load(packed_ptr + (ks * stride_k // 2)[:, None] + (cols * stride_n // 2)[None, :],
                   mask=mask, other=0).to(tl.int32)
    if IN_AXIS == 0:
        nibble = (byte >> tl.where(ks % 2 == 0, 4, 0)[:, None]) & 15
        block = (cols * stride_n + k0) // QBLOCK  # one block per column
        scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, col_ok, NESTED, QBLOCK2)[None, :]
    else:
        nibble = (byte >> tl.where(cols % 2 == 0, 4, 0)[None, :]) & 15
        block = (ks * stride_k + n0) // QBLOCK  # one block per row
        scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset, block, k_ok, NESTED, QBLOCK2)[:, None]
    return tl.where(mask, _lookup_16(nibble, codes) * scale, 0.0)


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
    QUANT_AXIS: tl.constexpr,
):
    """c[split] = alpha * (a1 @ b1 + a2 @ b2) (+ bias): a1 (M, K1), b1 (K1, N), a2 (M, K2), b2 (K2, N).

    Program axis 0 walks the (M, N) output tiles, grouped GROUP_M row-tiles at a time so
    neighbouring programs share b1 tiles in L2. Axis 1 splits K1 into slices of
    k1_per_split (a multiple of BLOCK_K); with more than one slice K2 is 0 and each slice
    writes its own float32 partial c[split], summed by the caller. Every index that is
    multiplied by a stride is 64-bit, so no offset wraps past 2^31 elements (a token
    reduction over M x in_features, say). DOT_IN_FP32 upcasts the tiles before tl.dot: the
    interpreter multiplies bf16 tiles' raw bit patterns otherwise (triton-lang/triton#11584);
    bf16 products are exact in fp32, so the result is the same.
    B1_4BIT: b1 is a bitsandbytes 4-bit weight (b1_ptr its packed bytes, the q_* pointers
    its quantisation state), dequantised tile by tile (`_dequantize_4bit_tile`, QUANT_AXIS
    its IN_AXIS); b1[k, n] = W.flat[k * stride_b1k + n * stride_b1n].
    """
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    n0 = pid_n.to(tl.int64) * BLOCK_N
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if B1_4BIT:  # the code table, 16 scalars held in registers for the whole K loop
        code = tl.load(q_code_ptr + tl.arange(0, 16))
        codes = (_code_entry(code, 0), _code_entry(code, 1), _code_entry(code, 2), _code_entry(code, 3),
                 _code_entry(code, 4), _code_entry(code, 5), _code_entry(code, 6), _code_entry(code, 7),
                 _code_entry(code, 8), _code_entry(code, 9), _code_entry(code, 10), _code_entry(code, 11),
                 _code_entry(code, 12), _code_entry(code, 13), _code_entry(code, 14), _code_entry(code, 15))
        offset = tl.load(q_offset_ptr) if NESTED else 0.0

    # x @ W^T (or g @ W): the base weight's K.
    k_start = split * k1_per_split
    k_end = tl.minimum(k_start + k1_per_split, K1)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K1
        a = tl.load(a1_ptr + rows[:, None] * stride_a1m + ks[None, :] * stride_a1k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if B1_4BIT:
            b = _dequantize_4bit_tile(b1_ptr, q_absmax_ptr, q_absmax2_ptr, q_code2_ptr, codes, offset,
                                      ks, cols, k_ok, col_ok, stride_b1k, stride_b1n, k0, n0,
                                      NESTED, QBLOCK, QBLOCK2, QUANT_AXIS)
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
        a = tl.load(a2_ptr + rows[:, None] * stride_a2m + ks[None, :].to(tl.int64) * stride_a2k,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b2_ptr + ks[:, None].to(tl.int64) * stride_b2k + cols[None, :] * stride_b2n,
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

    @property
    def in_features(self) -> int:
        return max(self.strides)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The operand as a dense tensor of `dtype` (a strided view of the dequantised W)."""
        out_features, in_features = (self.shape if self.strides[1] == 1 else self.shape[::-1])
        weight = dequantize_4bit_torch(self.packed, self.absmax, self.code, self.blocksize, (out_features, in_features),
                                       dtype, absmax2=self.absmax2, code2=self.code2, blocksize2=self.blocksize2,
                                       offset=self.offset)
        return weight if self.strides[1] == 1 else weight.t()


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


def _matmul_torch(a1, b1, a2, b2, alpha, bias):
    """_matmul's math in torch, in a1's dtype (where the GPU refuses a launch)."""
    out = a1 @ b1
    if a2 is not None:
        out = out + a2 @ b2
    out = out * alpha
    return out + bias if bias is not None else out


def _matmul(
    name: str,
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
    `name` names the launch ("lora.<name>", in recordings and in the fallback's warning). A
    launch the GPU refuses for lack of resources is computed by torch instead, with one warning.
    """
    m, k1 = a1.shape
    n = b1.shape[1]
    quant = b1 if isinstance(b1, Weight4bit) else None
    if quant is not None and not kernel_dequantises(quant, a1.dtype):
        quant, b1 = None, b1.dense(a1.dtype)
    if m == 0 or n == 0:
        return a1.new_zeros(m, n)
    config = pick_config(a1, m, n, quant)
    if a1.is_cuda and os.environ.get(AUTOTUNE_ENV) == "1":
        config = _autotuned(name, a1, b1, a2, b2, alpha, bias, split_k, quant, config)
    out = _launch_matmul(name, a1, b1, a2, b2, alpha, bias, split_k, quant, config)
    if out is None:
        return _matmul_torch(a1, b1 if quant is None else quant.dense(a1.dtype), a2, b2, alpha, bias)
    return out


def _autotuned(name, a1, b1, a2, b2, alpha, bias, split_k, quant, default):
    m, k1 = a1.shape
    n = b1.shape[1]
    kind = operand_kind(a1.dtype, quant is not None)
    weight = "dense" if quant is None else "nested" if quant.absmax2 is not None else "4bit"
    key = (torch.cuda.get_device_name(a1.device), name, kind, weight, m, n, k1, 0 if a2 is None else a2.shape[1])
    if key not in TUNED:
        candidates = [default] + [fit(c, kind, m, n, quant) for c in AUTOTUNE_CONFIGS[family(capability(a1))]]
        candidates = list(dict.fromkeys(candidates))
        TUNED[key] = fastest(
            candidates, lambda c: _launch_matmul(name, a1, b1, a2, b2, alpha, bias, split_k, quant, c), cuda_ms
        ) or default
    return TUNED[key]


def _launch_matmul(name, a1, b1, a2, b2, alpha, bias, split_k, quant, config):
    m, k1 = a1.shape
    n = b1.shape[1]
    b1_strides = quant.strides if quant is not None else b1.stride()
    b1_ptr = quant.packed if quant is not None else b1
    k2 = 0 if a2 is None else a2.shape[1]
    if a2 is None:
        a2, b2 = a1, a1  # never read: K2 = 0
    interpreting = capability(a1) is None
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    splits = 1
    if split_k and k1 > 0:
        min_k = config.block_k * 2 if interpreting else MIN_K_PER_SPLIT
        programs = PROGRAMS_PER_SM * multiprocessor_count(a1)
        splits = max(1, min(triton.cdiv(k1, min_k), programs // max(tiles, 1)))
    k1_per_split = triton.cdiv(triton.cdiv(max(k1, 1), splits), config.block_k) * config.block_k
    splits = max(1, triton.cdiv(k1, k1_per_split))
    # The interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest, so there
    # the kernel writes float32 and torch rounds, as the GPU would.
    interpreted_bf16 = interpreting and a1.dtype == torch.bfloat16
    float32_out = splits > 1 or interpreted_bf16
    out = torch.empty(splits, m, n, dtype=torch.float32 if float32_out else a1.dtype, device=a1.device)
    nested = quant is not None and quant.absmax2 is not None
    launched = try_launch(
        f"lora.{name}", _extended_k_matmul, (tiles, splits),
        a1, b1_ptr, a2, b2, bias if bias is not None else a1, out,
        *((quant.absmax, quant.code) if quant is not None else (a1, a1)),
        *((quant.absmax2, quant.code2, quant.offset) if nested else (a1, a1, a1)),
        m, n, k1, k2, k1_per_split,
        a1.stride(0), a1.stride(1), b1_strides[0], b1_strides[1],
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        float(alpha),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION="tf32" if (a1.dtype == torch.float32 and tf32_enabled()) else "ieee",
        DOT_IN_FP32=interpreted_bf16,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_K2=min(config.block_k, max(16, triton.next_power_of_2(max(k2, 1)))),
        GROUP_M=8, num_warps=config.num_warps, num_stages=config.num_stages,
        B1_4BIT=quant is not None, NESTED=nested,
        QBLOCK=quant.blocksize if quant is not None else 1, QBLOCK2=quant.blocksize2 if nested else 1,
        QUANT_AXIS=0 if quant is None or quant.strides[0] == 1 else 1,
    )
    if not launched:
        return None
    if splits > 1:
        return out.sum(0).to(a1.dtype)
    return out[0].to(a1.dtype)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling):
        # x (M, K), weight (N, K), lora_A (r, K), lora_B (N, r), bias (N,) or None.
        # weight may be a Weight4bit (frozen constants, kept on ctx rather than saved).
        xs = _matmul("xs", x, lora_A.t(), alpha=scaling, split_k=True)  # s x A^T   (M, r)
        y = _matmul("y", x, weight.t(), xs, lora_B.t(), bias=bias)  # x W^T + xs B^T (+ bias)
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
            grad_s = _matmul("gs", grad_y, lora_B, alpha=ctx.scaling, split_k=True)  # s g B   (M, r)
            if needs_x:
                grad_x = _matmul("dx", grad_y, weight, grad_s, lora_A)  # g W + gs A   (M, K)
            if needs_A:
                grad_A = _matmul("dA", grad_s.t(), x, split_k=True)  # gs^T x   (r, K)
        if needs_B:
            grad_B = _matmul("dB", grad_y.t(), xs, split_k=True)  # g^T xs   (N, r)
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
    Routing: on a GPU older than sm_80 the torch reference computes it (`lora_kernel_serves`);
    a launch the GPU refuses for lack of resources falls back to torch with one warning.
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
    if not lora_kernel_serves(x):  # sm_7x: cuBLAS through the torch reference (docs/kernels.md)
        dense = base_weight.dense(x.dtype) if isinstance(base_weight, Weight4bit) else base_weight
        return lora_linear_torch(x, dense, lora_A, lora_B, scaling, bias)
    flat_x = x.reshape(-1, in_features)
    y = _LoraLinear.apply(flat_x, base_weight, lora_A, lora_B, bias, float(scaling))
    return y.reshape(*x.shape[:-1], out_features)
