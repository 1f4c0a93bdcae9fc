"""Every kernel launch alignlib makes, compiled for sm_90, sm_80, sm_86 and sm_75 without a GPU.

`python -m alignlib.kernels.targets` records the launches the library's own launch code makes
on meta tensors (per target, as it would plan them on that GPU), compiles each distinct
specialisation with `triton.compile(..., target=GPUTarget("cuda", cc, 32))` and checks shared
memory, spills, tensor-core instructions, 64-bit address arithmetic and vector loads. The CI
set runs here (about a minute on two cores); `--full --write-docs` is the whole sweep and
rewrites the table in docs/kernels.md. The other tests pin the checker and the planning the
compiled kernels depend on: routing on sm_7x, split-K for the thin GEMMs, fp32 with a 4-bit
weight.
"""

import json
import os
import subprocess
import sys

import alignlib.kernels.lora as lora
import alignlib.kernels.lora_tiles as lora_tiles
import pytest
import torch
from alignlib.kernels import targets
from alignlib.kernels.launch import recording
from alignlib.kernels.targets import TARGETS, Result, fake_4bit_weight, narrow_address_products, problems


def test_every_launch_compiles_within_every_targets_limits(tmp_path):
    report_path = tmp_path / "report.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "alignlib.kernels.targets", "--jobs", str(min(os.cpu_count() or 1, 4)),
         "--json", str(report_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert report_path.exists(), result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["problems"] == [], "\n".join(report["problems"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [Result(**row) for row in report["results"]]
    launched = {(r.target, r.name) for r in rows if not r.routed}
    for target in ("sm_90", "sm_80", "sm_86"):  # every kernel, on every tensor-core target
        for name in ("lora.xs", "lora.y", "lora.gs", "lora.dx", "lora.dA", "lora.dB", "logprobs.fwd", "logprobs.bwd"):
            assert (target, name) in launched, (target, name)
    # sm_75 launches the log-prob kernels only; the LoRA GEMM compiled there for the record has no
    # tensor-core instruction, which is why it is routed to torch (if Triton ever emits mma there,
    # this fails and the routing deserves another look).
    assert {name for target, name in launched if target == "sm_75"} == {"logprobs.fwd", "logprobs.bwd"}
    routed = [r for r in rows if r.routed]
    assert routed and all(r.target == "sm_75" and r.tensor_cores == "none" for r in routed)
    # The 4-bit GEMMs fit with room to spare, and use the tensor cores.
    for r in rows:
        if r.weight.startswith("nf4") and r.dtype == "bf16":
            assert r.smem <= TARGETS[r.target].smem_per_block // 2 and r.tensor_cores != "none", r
    assert all(r.tensor_cores == "wgmma" for r in rows if r.target == "sm_90" and r.name == "lora.y"
               and r.dtype in ("bf16", "fp16", "fp32-tf32"))


def test_the_checker_flags_what_the_old_kernels_did():
    sm90, sm75 = TARGETS["sm_90"], TARGETS["sm_75"]
    base = dict(target="sm_90", kernel="alignlib.kernels.lora:_extended_k_matmul", name="lora.y", dtype="bf16",
                weight="nf4", num_warps=8, num_stages=3, regs=128, spill_stores=0, spill_loads=0, smem=65536,
                tensor_cores="wgmma", vector_loads=4, blocks="128x128x64")
    assert problems(Result(**base), sm90) == []
    assert "shared memory" in problems(Result(**{**base, "smem": 262144}), sm90)[0]  # finding 1
    assert "spill" in problems(Result(**{**base, "regs": 32, "spill_stores": 15688}), sm90)[0]  # finding 2
    assert "mma" in problems(Result(**{**base, "target": "sm_75", "tensor_cores": "none"}), sm75)[0]  # finding 3
    assert "32-bit" in problems(Result(**{**base, "narrow_products": ["b"]}), sm90)[0]  # finding 4
    row = {**base, "kernel": "alignlib.kernels.logprobs:_token_logprobs_fwd", "name": "logprobs.fwd"}
    assert "vectorised" in problems(Result(**{**row, "vector_loads": 0}), sm90)[0]  # finding 6
    assert problems(Result(**{**base, "error": "OutOfResources"}), sm90)[0].endswith("OutOfResources")
    # fp32 with TF32 off runs on FMA: no tensor cores expected, none missing
    assert problems(Result(**{**base, "dtype": "fp32-ieee", "tensor_cores": "none"}), sm90) == []


NARROW_TTIR = """
  tt.func public @k(%a_ptr: !tt.ptr<bf16> {tt.divisibility = 16 : i32}, %stride: i32, %n: i32) attributes {noinline = false} {
    %ks = tt.make_range {end = 64 : i32, start = 0 : i32} : tensor<64xi32> loc(#loc1)
    %s = tt.splat %stride : i32 -> tensor<64xi32> loc(#loc2)
    %b_61 = arith.muli %ks, %s : tensor<64xi32> loc(#loc3)
    %p = tt.splat %a_ptr : !tt.ptr<bf16> -> tensor<64x!tt.ptr<bf16>> loc(#loc4)
    %q = tt.addptr %p, %b_61 : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc5)
    %w = arith.extsi %stride : i32 to i64 loc(#loc6)
    %w2 = tt.splat %w : i64 -> tensor<64xi64> loc(#loc6)
    %k64 = arith.extsi %ks : tensor<64xi32> to tensor<64xi64> loc(#loc6)
    %c_1 = arith.muli %k64, %w2 : tensor<64xi64> loc(#loc7)
    %r = tt.addptr %p, %c_1 : tensor<64x!tt.ptr<bf16>>, tensor<64xi64> loc(#loc8)
    %m = arith.muli %ks, %ks : tensor<64xi32> loc(#loc9)
    %t = tt.addptr %p, %m : tensor<64x!tt.ptr<bf16>>, tensor<64xi32> loc(#loc10)
"""


def test_narrow_address_products_reads_the_ttir():
    # ks * stride in 32 bits feeds an address: flagged; the 64-bit product and a product of two
    # indices (no runtime stride) are not.
    assert narrow_address_products(NARROW_TTIR) == ["b"]


def record_lora(capability, dtype=torch.bfloat16, weight="dense", m=2048, k=4096, n=4096, r=16):
    with recording(capability, sm_count=132) as launches:
        x = torch.empty(m, k, dtype=dtype, device="meta", requires_grad=True)
        w = torch.empty(n, k, dtype=dtype, device="meta") if weight == "dense" else \
            fake_4bit_weight(n, k, dtype, nested=weight == "nf4-nested")
        a = torch.empty(r, k, dtype=dtype, device="meta", requires_grad=True)
        b = torch.empty(n, r, dtype=dtype, device="meta", requires_grad=True)
        y = lora.lora_linear(x, w, a, b, 2.0)
        y.backward(torch.empty_like(y))
    return {launch.name: launch for launch in launches}


def test_sm7x_routes_lora_to_torch_and_sm80_up_to_the_kernel():
    assert record_lora((7, 5)) == {}  # finding 3: no Triton GEMM on a T4
    assert record_lora((7, 0), weight="nf4") == {}
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0)):
        assert set(record_lora(capability)) == {f"lora.{n}" for n in ("xs", "y", "gs", "dx", "dA", "dB")}


def test_thin_gemms_split_k_to_fill_the_gpu():
    # finding 6: x A^T and g B over K = 4096 at M = 2048 used to get ceil(M/128) = 16 programs
    launches = record_lora((9, 0))
    for name in ("lora.xs", "lora.gs", "lora.dA", "lora.dB"):
        tiles, splits = launches[name].grid
        assert tiles * splits >= 132, (name, launches[name].grid)


def test_per_architecture_tiles_and_4bit_tiles_within_a_quantisation_block():
    for capability, row in (((9, 0), "sm90"), ((8, 0), "sm80"), ((8, 6), "sm86"), ((8, 9), "sm86")):
        y = record_lora(capability, weight="nf4")["lora.y"].kwargs
        expected = lora_tiles.TILES[row]["4bit"]
        assert (y["BLOCK_M"], y["BLOCK_N"], y["num_warps"], y["num_stages"]) == expected[:2] + expected[3:]
        assert y["BLOCK_K"] == min(expected.block_k, 64) and y["B1_4BIT"] and y["QUANT_AXIS"] == 0
        dense = record_lora(capability)["lora.y"].kwargs
        assert (dense["BLOCK_M"], dense["BLOCK_N"], dense["BLOCK_K"]) == lora_tiles.TILES[row]["16bit"][:3]
    dx = record_lora((8, 0), weight="nf4-nested")["lora.dx"].kwargs
    assert dx["BLOCK_N"] <= 64 and dx["QUANT_AXIS"] == 1 and dx["NESTED"]


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
def test_fp32_with_a_4bit_weight(monkeypatch):
    # finding 2: with TF32 on, the 4-bit kernel runs on the tensor cores (small tiles, no spills:
    # the compile test); with TF32 off the dot would be an FMA loop out of registers, so W is
    # dequantised first and the dense fp32 kernel runs.
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        tf32 = record_lora((9, 0), dtype=torch.float32, weight="nf4")
        matmul.fp32_precision = "ieee"
        ieee = record_lora((9, 0), dtype=torch.float32, weight="nf4")
    finally:
        matmul.fp32_precision = before
    assert tf32["lora.y"].kwargs["B1_4BIT"] and tf32["lora.y"].kwargs["INPUT_PRECISION"] == "tf32"
    assert not ieee["lora.y"].kwargs["B1_4BIT"] and ieee["lora.y"].kwargs["INPUT_PRECISION"] == "ieee"
    assert not ieee["lora.dx"].kwargs["B1_4BIT"]


def test_the_ci_set_reaches_every_kind_of_workload():
    ci = targets.workloads(full=False)
    full = targets.workloads(full=True)
    assert {w.weight for w in ci if w.family == "lora"} == set(targets.WEIGHTS)
    assert {w.dtype for w in full if w.family == "lora"} == set(targets.DTYPES)
    assert {w.shape["V"] for w in full if "V" in w.shape} == set(targets.LOGPROB_VOCABS)
    assert len(full) > 3 * len(ci)


def test_autotune_keeps_the_fastest_config_that_runs():
    configs = [lora_tiles.TileConfig(128, 128, 64, 8, 3), lora_tiles.TileConfig(64, 64, 64, 4, 3), lora_tiles.TileConfig(128, 64, 64, 4, 3)]
    cost = {configs[0]: 3.0, configs[1]: 1.0, configs[2]: 2.0}
    clock = []

    def run(config):
        clock.append(cost[config])
        return None if config == configs[1] else "out"  # the quickest is refused: skipped

    assert lora_tiles.fastest(configs, run, lambda fn: (fn(), clock[-1])[1]) == configs[2]
    assert lora_tiles.fastest(configs[1:2], run, lambda fn: 0.0) is None
