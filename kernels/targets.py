r"""Every kernel launch alignlib makes, compiled for the GPUs its users have, on a machine without one.

    python -m alignlib.kernels.targets                  # the CI set; exit status 1 on a problem
    python -m alignlib.kernels.targets --full --write-docs   # every shape; rewrites docs/kernels.md's table

1. Record. The library's own launch code runs on meta tensors inside `launch.recording(cc)`,
   at the shapes it is used at (log-probs V in {32000, 50257, 128256, 151936}; LoRA M in
   {2048, 8192}, K, N in {4096, 14336}, r in {8, 16, 64}; bf16, fp16, fp32 with TF32 on and off;
   dense, NF4 and nested NF4 base weights; with and without bias; forward and every
   backward kernel), planned for each target as it would be on that GPU (tiles, splits,
   routing). Nothing is written by hand: each launch's signature and specialisation
   (pointer alignment, integer divisibility) come from Triton's own binder.
2. Compile each distinct specialisation with `triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cc, 32))`; the nvidia backend ships its own ptxas, whose `-v`
   log gives registers and spill bytes; the metadata gives shared memory; the PTX shows
   tensor-core instructions (`mma.sync`, `wgmma`) and vector loads; the TTIR shows which
   products of an index and a runtime stride are 32-bit.
3. Check, per target:
   - it compiles;
   - shared memory within the target's per-block limit (TARGETS);
   - no spill stores at all (SPILL_BOUND_BYTES = 0): every launched kernel compiles without
     spilling today, and a spill in a GEMM's K loop or a log-prob row loop means local-memory
     traffic per iteration, which is a regression to look at, not a tolerance to keep;
   - a GEMM with bf16/fp16 inputs (or fp32 with TF32) uses the tensor cores (`mma`, or
     `wgmma` on sm_90) on sm_80 and later;
   - 64-bit address arithmetic: no 32-bit product of an index and a runtime integer argument
     (a stride, a size) feeds an address. Integer arguments are 32-bit below 2^31 and
     64-bit above (Triton specialises them), and every index that meets one is widened
     first, so no offset wraps for any tensor whose individual sizes and strides stay
     below 2^31 (e.g. LoRA's token reduction over M x in_features = 149,797 x 14,336);
   - the log-prob kernels' row loads are vectorised (`ld.global.v2`/`.v4`) at every V.
   On sm_7x the LoRA GEMMs are routed to torch (`lora.lora_kernel_serves`); their sm_80
   specialisations are still compiled for sm_75 and reported, so the reason for the
   routing (no tensor-core instructions, spills) stays visible.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

SPILL_BOUND_BYTES = 0
DOCS_START = "<!-- kernel-targets:start (python -m alignlib.kernels.targets --full --write-docs) -->"
DOCS_END = "<!-- kernel-targets:end -->"


class Target(NamedTuple):
    name: str
    capability: tuple[int, int]
    gpus: str
    sm_count: int  # of the first GPU named: sets the split-K programs the launch code plans
    smem_per_block: int  # the opt-in maximum a block may use, bytes
    smem_per_sm: int
    regs_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int


# CUDA C Programming Guide, "Technical Specifications per Compute Capability".
TARGETS = {
    "sm_90": Target("sm_90", (9, 0), "H100, H200", 132, 232448, 233472, 65536, 64, 32),
    "sm_80": Target("sm_80", (8, 0), "A100", 108, 166912, 167936, 65536, 64, 32),
    "sm_86": Target("sm_86", (8, 6), "A10, A40, RTX 30xx", 72, 101376, 102400, 65536, 48, 16),
    "sm_75": Target("sm_75", (7, 5), "T4, RTX 20xx", 40, 65536, 65536, 65536, 32, 16),
}

LOGPROB_VOCABS = (32000, 50257, 128256, 151936)
LORA_TOKENS = (2048, 8192)
LORA_FEATURES = (4096, 14336)
LORA_RANKS = (8, 16, 64)
DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-ieee")
WEIGHTS = ("dense", "nf4", "nf4-nested")


class Workload(NamedTuple):
    family: str  # "logprobs", "linear_logprobs", "lora"
    dtype: str
    shape: dict
    weight: str = "dense"
    bias: bool = False

    def label(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        extra = f" {self.weight}" + (" bias" if self.bias else "") if self.family == "lora" else ""
        return f"{self.family} {self.dtype} {shape}{extra}"


def workloads(full: bool) -> list[Workload]:
    """The shapes recorded: all of them (`full`), or the CI set. The CI set reaches every kernel
    and every tile class the launch code picks (wide and thin GEMMs, rank widths 16 and 64,
    split-K, aligned and unaligned vocabularies, each operand kind) with one token count, one
    feature size, bias on (the bias load is the only extra), and bf16 standing for fp16 in the
    GEMMs (the same code with another element type); the full sweep adds the rest."""
    found = []
    for dtype in ("bf16", "fp16", "fp32-ieee"):
        for vocab in LOGPROB_VOCABS if full else (32000, 50257):
            found.append(Workload("logprobs", dtype, {"N": 8192, "V": vocab}))
            found.append(Workload("linear_logprobs", dtype, {"N": 8192, "H": 4096, "V": vocab}))
    if full:
        cases = [(m, k, n, r, dtype, weight, bias) for m in LORA_TOKENS for k in LORA_FEATURES
                 for n in LORA_FEATURES for r in LORA_RANKS for dtype in DTYPES for weight in WEIGHTS
                 for bias in (False, True)]
    else:
        cases = [(2048, 4096, 4096, 64, dtype, weight, True) for dtype in ("bf16", "fp32-tf32", "fp32-ieee")
                 for weight in WEIGHTS]
        cases.append((2048, 4096, 4096, 16, "bf16", "dense", True))  # the 16-wide rank tiles
    for m, k, n, r, dtype, weight, bias in cases:
        found.append(Workload("lora", dtype, {"M": m, "K": k, "N": n, "r": r}, weight, bias))
    return found


# --- 1. record -----------------------------------------------------------------------------


def _torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


@contextlib.contextmanager
def _tf32(dtype: str) -> Iterator[None]:
    """TF32 on or off for fp32 workloads, set through torch's new API (as transformers' tf32=True does)."""
    matmul = torch.backends.cuda.matmul
    if not dtype.startswith("fp32") or not hasattr(matmul, "fp32_precision"):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if dtype == "fp32-tf32" else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def fake_4bit_weight(out_features: int, in_features: int, compute_dtype: torch.dtype, nested: bool,
                     device: str = "meta") -> torch.Tensor:
    """A bitsandbytes Params4bit look-alike (packed bytes with a quant_state), NF4, blocksize 64,
    on `device`: what lora_linear reads of one, without quantising anything."""
    blocks = math.ceil(out_features * in_features / 64)
    packed = torch.empty(math.ceil(out_features * in_features / 2), 1, dtype=torch.uint8, device=device)
    f32 = {"dtype": torch.float32, "device": device}
    state2 = SimpleNamespace(absmax=torch.empty(math.ceil(blocks / 256), **f32), code=torch.empty(256, **f32),
                             blocksize=256) if nested else None
    packed.quant_state = SimpleNamespace(
        quant_type="nf4", shape=torch.Size([out_features, in_features]), nested=nested, blocksize=64,
        dtype=compute_dtype, absmax=torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32, device=device),
        code=torch.empty(16, **f32), state2=state2, offset=torch.empty((), **f32) if nested else None,
    )
    return packed


def run_workload(kernels: Any, work: Workload) -> None:
    """One workload through the library's entry points, forward and backward, on meta tensors."""
    dtype = _torch_dtype(work.dtype)

    def meta(*shape, grad=False, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta", requires_grad=grad)

    s = work.shape
    with _tf32(work.dtype):
        if work.family == "logprobs":
            logits, labels = meta(s["N"], s["V"], grad=True), meta(s["N"], dt=torch.int64)
            logp = kernels.logprobs._TokenLogprobs.apply(logits, labels, -100)
            logp.backward(torch.empty_like(logp))
        elif work.family == "linear_logprobs":
            for trainable in (False, True):  # frozen lm_head (LoRA): grad in forward; trainable: in backward
                hidden, labels = meta(s["N"], s["H"], grad=True), meta(s["N"], dt=torch.int64)
                weight = meta(s["V"], s["H"], grad=trainable)
                chunk = kernels.reference.default_chunk_size(s["N"], s["H"], s["V"])
                logp = kernels.reference.LinearTokenLogprobs.apply(hidden, weight, labels, chunk,
                                                                   kernels.logprobs.TritonRowOps)
                logp.backward(torch.empty_like(logp))
        else:
            m, k, n, r = s["M"], s["K"], s["N"], s["r"]
            x = meta(m, k, grad=True)
            if work.weight == "dense":
                weight = meta(n, k)
            else:
                weight = fake_4bit_weight(n, k, dtype, nested=work.weight == "nf4-nested")
            lora_A, lora_B = meta(r, k, grad=True), meta(n, r, grad=True)
            bias = meta(n, grad=True) if work.bias else None
            y = kernels.lora.lora_linear(x, weight, lora_A, lora_B, 2.0, bias)
            y.backward(torch.empty_like(y))


@dataclass
class Spec:
    """One distinct specialisation to compile: what Triton's JIT would hand `triton.compile`."""

    name: str  # the launch code's name for it, e.g. "lora.dx"
    kernel: str  # module:qualname of the JIT function
    dtype: str
    weight: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    workloads: list = field(default_factory=list)
    grids: list = field(default_factory=list)

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items())), sorted(map(str, self.options.items()))])


def specialise(launch: Any, capability: tuple[int, int], dtype: str, weight: str) -> Spec:
    """Triton's own binder on a recorded launch: the signature, constexprs, attributes and options
    `JITFunction.run` would compile it with, for `capability`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", capability[0] * 10 + capability[1], 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    keep = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
    return Spec(name=launch.name, kernel=f"{fn.fn.__module__}:{fn.fn.__qualname__}", dtype=dtype, weight=weight,
                signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs),
                options={k: v for k, v in options.__dict__.items() if k in keep})


def record(kernels: Any, target: Target, works: list[Workload]) -> tuple[dict[str, Spec], list[str]]:
    """Every distinct specialisation the workloads launch on `target`, and the workloads that raised."""
    from .launch import recording

    specs: dict[str, Spec] = {}
    errors = []
    for work in works:
        with recording(target.capability, target.sm_count) as launches:
            try:
                run_workload(kernels, work)
            except Exception as error:  # a workload the launch code cannot even plan
                errors.append(f"{work.label()}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                continue
        for launch in launches:
            weight = work.weight if work.family == "lora" and launch.name in ("lora.y", "lora.dx") else "-"
            spec = specialise(launch, target.capability, work.dtype, weight)
            spec = specs.setdefault(spec.key(), spec)
            spec.workloads.append(work.label())
            spec.grids.append(list(launch.grid))
    return specs, errors


# --- 2. compile ----------------------------------------------------------------------------

_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                    r"[\s\S]*?Used (\d+) registers")


def _kernel_function(qualified: str) -> Any:
    module_name, _, qualname = qualified.partition(":")
    return getattr(sys.modules[module_name], qualname)


@dataclass
class Result:
    target: str
    kernel: str
    name: str
    dtype: str
    weight: str
    num_warps: int = 0
    num_stages: int = 0
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    tensor_cores: str = ""  # "wgmma", "mma" or "none"
    vector_loads: int = 0
    narrow_products: list = field(default_factory=list)
    blocks: str = ""
    error: str = ""
    compile_s: float = 0.0
    routed: bool = False  # compiled for the record only: the library routes this away from the target
    launches: int = 0


def compile_spec(spec: Spec, target: Target, routed: bool = False) -> Result:
    """Compile one specialisation for `target` (ptxas -v log captured) and read what it needs."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_function(spec.kernel)

    def constant(name):
        return spec.constexprs.get((fn.arg_names.index(name),)) if name in fn.arg_names else None

    if constant("BLOCK_V") is not None:
        blocks = f"V{constant('BLOCK_V')}"
    else:
        blocks = "x".join(str(constant(name)) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    result = Result(target.name, spec.kernel, spec.name, spec.dtype, spec.weight, spec.options.get("num_warps", 4),
                    spec.options.get("num_stages", 3), blocks=blocks, routed=routed, launches=len(spec.workloads))
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                target=GPUTarget("cuda", target.capability[0] * 10 + target.capability[1], 32),
                options=spec.options,
            )
    except Exception as error:
        result.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
        return result
    finally:
        result.compile_s = round(time.perf_counter() - start, 2)
    match = _PTXAS.search(log.getvalue())
    if match:
        result.spill_stores, result.spill_loads, result.regs = int(match[2]), int(match[3]), int(match[4])
    result.smem = int(compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    result.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
    result.vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx))
    result.narrow_products = narrow_address_products(compiled.asm["ttir"])
    return result


_DEF = re.compile(r"^\s*(%[\w.#-]+)(?::\d+)? = ([\w.]+) (.*)$")


def narrow_address_products(ttir: str) -> list[str]:
    """The 32-bit products of a value with a runtime integer argument that feed an address.

    Reads the TTIR: a `arith.muli` of i32 type (scalar or tensor) one of whose operands is an
    integer kernel argument (directly or through splat/broadcast/expand_dims) is narrow; an
    `tt.addptr` whose offset is computed from a narrow product, through integer arithmetic,
    can wrap past 2^31. Returns the source variable names of such products (from the TTIR's
    value names), one entry per product.
    """
    signature = re.search(r"tt\.func public @\w+\((.*?)\) attributes", ttir, re.S)
    int_args = set(re.findall(r"(%\w+): i(?:32|64)\b", signature[1])) if signature else set()
    defs: dict[str, tuple[str, list[str], str]] = {}
    arg_like = set(int_args)
    narrow: set[str] = set()
    found: list[str] = []
    passthrough = ("tt.splat", "tt.broadcast", "tt.expand_dims", "arith.extsi", "tt.reshape", "arith.extui")
    arithmetic = passthrough + ("arith.muli", "arith.addi", "arith.subi", "arith.divsi", "arith.remsi",
                                "arith.shrsi", "arith.andi", "arith.select", "arith.trunci")

    def tainted(value: str, seen: set[str]) -> str | None:
        if value in narrow:
            return value
        if value in seen or value not in defs:
            return None
        seen.add(value)
        op, operands, _ = defs[value]
        if op not in arithmetic:
            return None
        for operand in operands:
            hit = tainted(operand, seen)
            if hit:
                return hit
        return None

    for line in ttir.splitlines():
        match = _DEF.match(line)
        if not match:
            continue
        name, op, rest = match[1], match[2], match[3]
        body, _, types = rest.partition(" : ")
        operands = re.findall(r"%[\w.#-]+", body.split(" loc(")[0])
        defs[name] = (op, operands, types)
        if op in passthrough and operands and operands[0] in arg_like:
            arg_like.add(name)
        result_type = types.split(" loc(")[0].strip()
        if op == "arith.muli" and any(o in arg_like for o in operands) and re.fullmatch(r"i32|tensor<.*xi32>", result_type):
            narrow.add(name)
        if op == "tt.addptr" and len(operands) >= 2:
            hit = tainted(operands[1], set())
            if hit:
                label = re.sub(r"_\d+$", "", hit.lstrip("%"))
                if label not in found:
                    found.append(label)
    return found


# --- 3. check and report -------------------------------------------------------------------


def _is_gemm(result: Result) -> bool:
    return result.kernel.endswith("_extended_k_matmul")


def _is_row_kernel(result: Result) -> bool:
    return "_token_logprobs" in result.kernel


def problems(result: Result, target: Target) -> list[str]:
    """What is wrong with one compiled specialisation on `target` (empty: nothing)."""
    where = f"{target.name} {result.name} {result.dtype} {result.weight} {result.blocks}"
    if result.error:
        return [f"{where}: does not compile: {result.error}"]
    found = []
    if result.routed:
        return found
    if result.smem > target.smem_per_block:
        found.append(f"{where}: {result.smem} bytes of shared memory, over the {target.smem_per_block} a block may use")
    if result.spill_stores is None:
        found.append(f"{where}: no ptxas register report")
    elif result.spill_stores > SPILL_BOUND_BYTES:
        found.append(f"{where}: {result.spill_stores} bytes of spill stores ({result.regs} registers)")
    if _is_gemm(result) and result.dtype in ("bf16", "fp16", "fp32-tf32") and result.tensor_cores == "none":
        found.append(f"{where}: no mma/wgmma instruction in a {result.dtype} GEMM launched on {target.name}")
    if result.narrow_products:
        found.append(f"{where}: 32-bit index x stride products feed addresses: {', '.join(result.narrow_products)}")
    if _is_row_kernel(result) and result.vector_loads == 0:
        found.append(f"{where}: the row loads are not vectorised")
    return found


def occupancy(result: Result, target: Target) -> int | None:
    """Warps resident per SM, from registers (allocated per warp in units of 256) and shared memory."""
    if result.regs is None or result.smem is None:
        return None
    regs_per_warp = math.ceil(max(result.regs, 1) * 32 / 256) * 256
    by_regs = target.regs_per_sm // (regs_per_warp * result.num_warps)
    by_smem = target.smem_per_sm // (result.smem + 1024) if result.smem else target.max_blocks_per_sm
    blocks = min(by_regs, by_smem, target.max_blocks_per_sm, target.max_warps_per_sm // result.num_warps)
    return blocks * result.num_warps


def _compile_job(job: tuple[Spec, Target, bool]) -> Result:
    return compile_spec(*job)


def run(full: bool, jobs: int, kernels: Any, targets: list[Target], log: Callable[[str], None],
        only: str | None = None) -> dict:
    """Record, compile and check (the workloads whose label matches `only`, if given); returns the
    report (results, problems, timings)."""
    works = [work for work in workloads(full) if only is None or re.search(only, work.label())]
    all_jobs: list[tuple[Spec, Target, bool]] = []
    problems_found: list[str] = []
    recorded: dict[str, int] = {}
    start = time.perf_counter()
    by_target: dict[str, dict[str, Spec]] = {}
    for target in targets:
        specs, errors = record(kernels, target, works)
        by_target[target.name] = specs
        problems_found += [f"{target.name} {error}" for error in errors]
        recorded[target.name] = len(specs)
        all_jobs += [(spec, target, False) for spec in specs.values()]
    for target in targets:  # what a routed-away GEMM would be on this target, for the record
        if target.capability >= (8, 0) or "sm_80" not in by_target:
            continue
        launched = {spec.key() for spec in by_target[target.name].values()}
        all_jobs += [(spec, target, True) for spec in by_target["sm_80"].values()
                     if spec.name.startswith("lora.") and spec.key() not in launched
                     and (full or (spec.name == "lora.y" and spec.weight == "dense" and spec.dtype == "bf16"))]
    record_s = time.perf_counter() - start
    log(f"recorded {len(works)} workloads: {recorded} distinct specialisations ({record_s:.1f} s); "
        f"compiling {len(all_jobs)} on {jobs} process(es)")
    all_jobs.sort(key=lambda job: (job[1].capability >= (8, 0), job[0].name != "lora.dx"))  # slow ones first
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, all_jobs, chunksize=1))
    else:
        results = [_compile_job(job) for job in all_jobs]
    for result, (_, target, _) in zip(results, all_jobs, strict=True):
        problems_found += problems(result, target)
    return {
        "full": full,
        "targets": [t._asdict() for t in targets],
        "workloads": len(works),
        "specialisations": recorded,
        "record_s": round(record_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
        "results": [asdict(r) for r in results],
        "problems": problems_found,
    }


def table(report: dict) -> str:
    """The markdown table: kernel x target x dtype -> registers, spills, shared memory, tensor cores."""
    targets = {t["name"]: Target(**{**t, "capability": tuple(t["capability"])}) for t in report["targets"]}
    groups: dict[tuple, list[Result]] = {}
    for row in report["results"]:
        result = Result(**row)
        key = (result.name, result.weight, result.dtype, result.target)
        groups.setdefault(key, []).append(result)
    order = {name: i for i, name in enumerate(TARGETS)}
    lines = [
        "| kernel | weight | dtype | target | tiles (warps, stages) | registers | spill stores (B) | shared memory (KiB) "
        "| tensor cores | warps/SM | specs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.get(k[3], 9))):
        rows = groups[key]
        target = targets[key[3]]
        if any(r.error for r in rows):
            cells = ["does not compile", "", "", "", ""]
        else:
            occ = [occupancy(r, target) for r in rows]
            cells = [
                f"{min(r.regs for r in rows)}-{max(r.regs for r in rows)}" if len({r.regs for r in rows}) > 1
                else str(rows[0].regs),
                str(max(r.spill_stores or 0 for r in rows)),
                f"{max(r.smem for r in rows) / 1024:.0f} / {target.smem_per_block // 1024}",
                "/".join(sorted({r.tensor_cores for r in rows})),
                str(min(o for o in occ if o is not None)) if any(o is not None for o in occ) else "",
            ]
        tiles = ", ".join(sorted({f"{r.blocks} ({r.num_warps}, {r.num_stages})" for r in rows}))
        name = key[0] + (" (routed to torch)" if rows[0].routed else "")
        lines.append(f"| {name} | {key[1]} | {key[2]} | {key[3]} | {tiles} | " + " | ".join(cells) + f" | {len(rows)} |")
    return "\n".join(lines)


def write_docs(report: dict, path: Path) -> None:
    text = path.read_text()
    head, start, rest = text.partition(DOCS_START)
    if not start:
        raise SystemExit(f"{path} has no {DOCS_START!r} marker")
    _, end, tail = rest.partition(DOCS_END)
    summary = (f"{sum(report['specialisations'].values())} specialisations recorded from {report['workloads']} "
               f"workloads, {len(report['results'])} compiled; problems: {len(report['problems'])}.")
    path.write_text(f"{head}{DOCS_START}\n{summary}\n\n{table(report)}\n{DOCS_END}{tail}")


def load_kernels(directory: str | None) -> Any:
    """alignlib.kernels, or a copy of the kernels in `directory` (e.g. an older commit's), as a package."""
    if directory is None:
        import alignlib.kernels.logprobs
        import alignlib.kernels.lora
        import alignlib.kernels.reference  # noqa: F401

        return sys.modules["alignlib.kernels"]
    import importlib.util

    name = "_kernels_under_test"
    spec = importlib.util.spec_from_file_location(name, Path(directory) / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    for sub in ("logprobs", "lora", "reference"):
        __import__(f"{name}.{sub}")
    # Launch code from before `launch.recording` existed refuses meta tensors: let it plan.
    for sub in ("logprobs", "lora"):
        module = sys.modules[f"{name}.{sub}"]
        if not hasattr(module, "is_recording"):
            module.triton_available_for = lambda tensor: True
    return package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignlib.kernels.targets", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every shape (default: the CI set)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, e.g. sm_90,sm_80")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the whole report here")
    parser.add_argument("--write-docs", nargs="?", const="docs/kernels.md", help="rewrite the table in this file")
    parser.add_argument("--kernels-from", help="check the kernels in this directory instead (an older copy)")
    parser.add_argument("--only", help="only the workloads whose label matches this regular expression")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be JIT functions, not interpreted ones
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "alignlib.kernels.targets", *sys.argv[1:]], env)
    # A fresh cache, so that ptxas runs (and logs registers and spills) for every kernel.
    cache = tempfile.mkdtemp(prefix="alignlib-targets-")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernels = load_kernels(args.kernels_from)
    targets = [TARGETS[name] for name in args.targets.split(",")]
    try:
        report = run(args.full, args.jobs, kernels, targets, lambda line: print(line, file=sys.stderr), args.only)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.write_docs:
        write_docs(report, Path(args.write_docs))
    print(table(report))
    for problem in report["problems"]:
        print("PROBLEM:", problem)
    print(f"{len(report['problems'])} problem(s); {len(report['results'])} compiled in {report['total_s']} s",
          file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
