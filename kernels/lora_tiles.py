"""Which LoRA kernel each GPU gets, and with which tiles (alignlib.kernels.lora launches them).

- `lora_kernel_serves`: the Triton kernels serve the interpreter and GPUs of compute capability
  8.0 or later; sm_7x (T4, V100) takes the torch path, since Triton emits no tensor-core
  instructions there (docs/kernels.md).
- `TILES`: tile sizes per GPU generation and operand kind, chosen from what
  `python -m alignlib.kernels.targets` reports for the compiled kernels (registers x warps and
  shared memory against each target's limits), not from timings; `pick_config` cuts the row's
  entry to one GEMM. `AUTOTUNE_CONFIGS`: the candidates ALIGNLIB_LORA_AUTOTUNE=1 times on a GPU.
- `tf32_enabled`: whether fp32 matmuls may use TF32, read from either torch API without raising.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton

from .launch import capability

if TYPE_CHECKING:
    from .lora import Weight4bit


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32, as torch's own matmul decides; never raises.

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none":
    inherit); reading the legacy `allow_tf32` raises a RuntimeError once the new API has been
    used (transformers' `tf32=True` does), so the new setting is read first and the legacy
    flag only when the new one says nothing.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
    except (RuntimeError, AttributeError):
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except (RuntimeError, AttributeError):
        return False


# --- which kernel each GPU gets, and its tiles -------------------------------------------
#
# Tiles per GPU generation, chosen from what `python -m alignlib.kernels.targets` reports for
# the compiled kernels (registers x warps and shared memory against each target's per-SM
# limits; see docs/kernels.md), not from timings: no GPU has measured them yet. Keyed by the
# operand kind: "16bit" (bf16/fp16 x and W), "tf32" (fp32 on the tensor cores), "fp32" (fp32 with
# TF32 off: FMA, not tensor cores), "4bit" and "4bit_tf32" (a 16-bit or TF32 x and a 4-bit W
# dequantised in the K loop; fp32 with TF32 off dequantises W first and takes "fp32"); "thin"
# is the config of the (M, r), (N, r) and (r, K) GEMMs, whose r side is at most 64 wide (its
# r-wide block is set per call).
class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


TILES: dict[str, dict[str, TileConfig]] = {
    "sm90": {  # H100, H200: 227 KiB shared memory per block, 64K registers per SM
        "16bit": TileConfig(128, 128, 64, 8, 4),
        "tf32": TileConfig(128, 128, 32, 8, 3),
        "fp32": TileConfig(128, 64, 32, 8, 3),
        "4bit": TileConfig(128, 128, 64, 8, 3),
        "4bit_tf32": TileConfig(64, 64, 32, 4, 3),
        "thin": TileConfig(64, 128, 64, 4, 4),
    },
    "sm80": {  # A100: 163 KiB per block
        "16bit": TileConfig(128, 128, 64, 8, 3),
        "tf32": TileConfig(128, 128, 32, 8, 3),
        "fp32": TileConfig(128, 64, 32, 8, 3),
        "4bit": TileConfig(128, 128, 64, 8, 3),
        "4bit_tf32": TileConfig(64, 64, 32, 4, 3),
        "thin": TileConfig(64, 128, 64, 4, 3),
    },
    "sm86": {  # A10, A40, RTX 30xx/40xx (and any GPU not listed): 99 KiB per block
        "16bit": TileConfig(128, 128, 32, 8, 3),
        "tf32": TileConfig(128, 64, 32, 4, 3),
        "fp32": TileConfig(128, 64, 32, 8, 3),
        "4bit": TileConfig(128, 64, 64, 4, 3),
        "4bit_tf32": TileConfig(64, 64, 32, 4, 2),
        "thin": TileConfig(64, 64, 64, 4, 3),
    },
}
# What ALIGNLIB_LORA_AUTOTUNE=1 times on a GPU, besides the TILES entry: the first call of each
# GEMM shape times them all and keeps the fastest for the process (`tuned_configs` lists them).
AUTOTUNE_CONFIGS: dict[str, list[TileConfig]] = {
    "sm90": [TileConfig(128, 128, 64, 8, 4), TileConfig(128, 128, 64, 8, 3), TileConfig(128, 256, 64, 8, 3),
             TileConfig(64, 128, 64, 4, 4), TileConfig(128, 64, 64, 4, 4)],
    "sm80": [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 128, 32, 8, 4), TileConfig(128, 64, 64, 4, 3),
             TileConfig(64, 128, 64, 4, 3), TileConfig(64, 64, 64, 4, 4)],
    "sm86": [TileConfig(128, 128, 32, 8, 3), TileConfig(128, 64, 32, 4, 3), TileConfig(64, 128, 32, 4, 3),
             TileConfig(64, 64, 64, 4, 3)],
}
# Under the interpreter every program is numpy work, so small fixed tiles keep the
# tests quick and still cross several tiles at small sizes (tests may patch this).
INTERPRETER_CONFIG = TileConfig(16, 16, 16, 1, 1)
# A token (or feature) reduction is split over K so that the programs fill every SM about
# twice, each slice keeping at least MIN_K_PER_SPLIT of K (float32 partials, summed by torch).
PROGRAMS_PER_SM = 2
MIN_K_PER_SPLIT = 256
# The widest side of an output that counts as thin (the LoRA rank side).
THIN = 64


def family(cap: tuple[int, int]) -> str:
    """The TILES row of a compute capability: sm90 for 9.x, sm80 for 8.0, else the 99 KiB row."""
    if cap[0] == 9:
        return "sm90"
    if cap == (8, 0):
        return "sm80"
    return "sm86"


def lora_kernel_serves(x: torch.Tensor) -> bool:
    """Whether the Triton LoRA kernels serve x's device: the interpreter, or a GPU of compute
    capability 8.0 or later. On sm_7x (T4, V100) Triton emits no tensor-core instructions for
    tl.dot, so the GEMMs become FMA loops that spill (docs/kernels.md): the torch path (cuBLAS)
    serves them instead."""
    cap = capability(x)
    return cap is None or cap >= (8, 0)


def operand_kind(dtype: torch.dtype, quantized: bool) -> str:
    """The TILES key of a GEMM's operands (a 4-bit weight with fp32 and TF32 off never gets here)."""
    if dtype != torch.float32:
        return "4bit" if quantized else "16bit"
    if tf32_enabled():
        return "4bit_tf32" if quantized else "tf32"
    return "fp32"


def fit(config: TileConfig, kind: str, m: int, n: int, quant: Weight4bit | None) -> TileConfig:
    """A config cut to one GEMM: the thin side of a LoRA-rank GEMM to its width (fp32 with a
    shorter K: half the K per byte, and with TF32 off an FMA dot needs shorter still), and a
    4-bit tile no wider than a quantisation block along W's in-features."""
    if min(m, n) <= THIN:
        if kind in ("tf32", "fp32"):
            config = config._replace(block_k=min(config.block_k, 32 if kind == "tf32" else 16))
        if m <= THIN:
            config = config._replace(block_m=max(16, triton.next_power_of_2(m)))
        if n <= THIN:
            config = config._replace(block_n=max(16, triton.next_power_of_2(n)))
    if quant is not None:
        if quant.strides[0] == 1:  # in-features along K (forward, x W^T)
            config = config._replace(block_k=min(config.block_k, quant.blocksize))
        else:  # in-features along N (backward, g W)
            config = config._replace(block_n=min(config.block_n, quant.blocksize))
    return config


def pick_config(a: torch.Tensor, m: int, n: int, quant: Weight4bit | None) -> TileConfig:
    """The tiles of one GEMM: the interpreter's, or the TILES row of the GPU planned for (the
    "thin" entry for a LoRA-rank GEMM), cut to the GEMM by `fit`."""
    cap = capability(a)
    if cap is None:
        return INTERPRETER_CONFIG
    row = TILES[family(cap)]
    kind = operand_kind(a.dtype, quant is not None)
    return fit(row["thin"] if min(m, n) <= THIN else row[kind], kind, m, n, quant)


def kernel_dequantises(quant: Weight4bit, dtype: torch.dtype) -> bool:
    """The kernel reads the packed weight itself when every quantisation block lies in one row
    of W (in_features a multiple of the blocksize, as in every model's projections) and the dot
    runs on the tensor cores: fp32 with TF32 off would dequantise inside an FMA loop that runs
    out of registers (docs/kernels.md), so there W is dequantised first, once per call."""
    fma = dtype == torch.float32 and not tf32_enabled()
    return quant.blocksize >= 16 and quant.in_features % quant.blocksize == 0 and not fma


AUTOTUNE_ENV = "ALIGNLIB_LORA_AUTOTUNE"
TUNED: dict[tuple, TileConfig] = {}
"""The tiles ALIGNLIB_LORA_AUTOTUNE=1 picked in this process, by GEMM."""


def tuned_configs() -> dict[str, TileConfig]:
    """The tiles ALIGNLIB_LORA_AUTOTUNE=1 picked in this process, by GEMM (device, name, operands, shape)."""
    return {" ".join(map(str, key)): config for key, config in TUNED.items()}


def fastest(candidates: list[TileConfig], run: Callable[[TileConfig], object],
            timer: Callable[[Callable[[], object]], float], repeats: int = 5) -> TileConfig | None:
    """The candidate whose run is quickest by `timer` (ms of one call), best of `repeats`; a candidate
    whose first run returns None or raises (refused, does not compile) is skipped."""
    best, best_ms = None, math.inf
    for candidate in candidates:
        try:
            if run(candidate) is None:  # also compiles it, untimed
                continue
        except Exception:
            continue
        ms = min(timer(lambda candidate=candidate: run(candidate)) for _ in range(repeats))
        if ms < best_ms:
            best, best_ms = candidate, ms
    return best


def cuda_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
