#!/usr/bin/env bash
# The one GPU check of alignlib's kernels: tests on the device, then the benchmarks against the peers,
# in under 8 minutes on one H100/H200. Results go to docs/benchmarks/gpu/.
#
#   scripts/gpu_check.sh wheels   HERE, where PyPI answers: the packages the GPU image lacks (trl,
#                                 datasets, bitsandbytes, liger-kernel, cut-cross-entropy, unsloth and
#                                 their missing needs), for Python 3.12 / manylinux x86_64, unpacked into
#                                 .whl/site (ignored through .git/info/exclude) and pruned to fit the
#                                 64 MiB a device call carries (bitsandbytes: its CUDA 13 library only;
#                                 unsloth: without its web UI).
#   scripts/gpu_check.sh          ON THE GPU MACHINE, from the repository root (.whl carried along):
#     1. installs alignlib (no dependencies, offline) into /tmp/gpu-check/site and records the GPU,
#        the driver and the versions;
#     2. pytest tests/kernels tests/test_fused_lora.py tests/test_kernel_wiring.py on the device:
#        every kernel compiled for this GPU, tests/kernels/test_gpu_sizes.py at real sizes (a launch
#        that falls back to torch fails it), the compile-for-every-target sweep;
#     3. python -m benchmarks: logprobs and lora at the `gpu-check` preset, dpo_step, orpo_step,
#        kto_step and grpo_step at `gpu`, against eager torch, TRL 1.16, Liger-Kernel, cut-cross-entropy, torch's
#        linear_cross_entropy, peft and Unsloth (rows for a peer that does not import say why);
#        each stage under its own time limit, so one slow stage cannot sink the rest;
#     4. docs/benchmarks/gpu/: each suite's JSON, markdown and PNG, and README.md with the device, the
#        command, the versions, the test summary and the LoRA tiles autotuned on this GPU.
#        With $OUT set (the device tool), also $OUT/gpu.tar.gz and $OUT/gpu_check.log.
#
# Through the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=560).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "wheels" ]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
    rm -rf .whl && mkdir -p .whl/download .whl/site
    platforms=""
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
               manylinux2014_x86_64 manylinux1_x86_64; do platforms="$platforms --platform $tag"; done
    # Missing from the device image (/work/.library/device/KINDS.md lists what it has); versions as the
    # tests pin them (constraints.txt) where pinned.
    packages="trl==1.16.0 datasets==5.2.0 dill multiprocess bitsandbytes==0.50.2 liger-kernel cut-cross-entropy
              unsloth unsloth_zoo tyro docstring-parser typeguard shtab json5 nest-asyncio structlog"
    for package in $packages; do
        $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            $platforms -d .whl/download "$package"
    done
    for wheel in .whl/download/*.whl; do unzip -q -o "$wheel" -d .whl/site; done
    # Prune what the device cannot use or does not need: bitsandbytes' other CUDA/ROCm builds (the
    # image's torch is built for CUDA 13), unsloth's web UI.
    find .whl/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
    rm -rf .whl/site/studio .whl/download
    du -sh .whl
    echo "carry .whl with the device tool; on the GPU machine run: bash scripts/gpu_check.sh"
    exit 0
fi

DOCS=docs/benchmarks/gpu
WORK=/tmp/gpu-check
mkdir -p "$DOCS" "$WORK"
LOG=$WORK/gpu_check.log
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
started=$(date +%s)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

# 1. alignlib itself (offline, no dependencies) and the carried packages.
$PYTHON -m pip install -q --no-deps --no-build-isolation --no-index --target "$WORK/site" . >>"$LOG" 2>&1 \
    || say "pip install of alignlib failed (see the log)"
export PYTHONPATH="$WORK/site:$ROOT/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
versions=$($PYTHON -P - <<'EOF' 2>/dev/null
import importlib
names = ("torch", "triton", "transformers", "peft", "trl", "bitsandbytes", "liger_kernel", "cut_cross_entropy", "unsloth")
found = []
for name in names:
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as error:
        found.append(f"{name} missing ({type(error).__name__})")
import torch
if torch.cuda.is_available():
    found.append(f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} "
                 f"sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}")
else:
    found.append("no CUDA device seen by torch")
print("; ".join(found))
EOF
)
say "device: $device"
say "versions: $versions"

# 2. the kernel tests on the device (xdist: compiling dominates, and each worker compiles in parallel).
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log it, note the outcome
    local name=$1 limit=$2 t0
    shift 2
    t0=$(date +%s)
    say "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    local outcome="ok"
    [ $status -eq 124 ] || [ $status -eq 137 ] && outcome="timed out after ${limit}s"
    [ $status -ne 0 ] && [ "$outcome" = "ok" ] && outcome="failed (exit $status)"
    say "   $name: $outcome in $(( $(date +%s) - t0 ))s"
    echo "| $name | $outcome | $(( $(date +%s) - t0 )) s |" >> "$WORK/stages.md"
}
: > "$WORK/stages.md"
workers=$(( $(nproc) > 8 ? 8 : $(nproc) ))
stage "kernel tests on the device" 150 $PYTHON -m pytest -q -p no:cacheprovider -n "$workers" \
    tests/kernels tests/test_fused_lora.py tests/test_kernel_wiring.py
tests_summary=$(grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$LOG" | tail -15)

# 3. the benchmarks (LoRA tiles autotuned on this GPU; the fixed table is what no GPU has measured).
bench() { stage "benchmark $1 ($2)" "$3" $PYTHON -m benchmarks "$1" --device cuda --sizes "$2" --out "$DOCS" \
              --warmup 2 --repeats 5; }
bench logprobs gpu-check 80
export ALIGNLIB_LORA_AUTOTUNE=1
bench lora gpu-check 50
unset ALIGNLIB_LORA_AUTOTUNE
bench dpo_step gpu 50
bench orpo_step gpu 40
bench kto_step gpu 40
bench grpo_step gpu 45
tiles=$(ALIGNLIB_LORA_AUTOTUNE=1 timeout 30 $PYTHON -P - <<'EOF' 2>&1
import torch
from alignlib.kernels import lora_linear
from alignlib.kernels.lora_tiles import tuned_configs
for n in (4096, 14336):
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16) / 64
    a = (torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) / 64).requires_grad_(True)
    b = torch.randn(n, 16, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    lora_linear(x, w, a, b, 2.0).sum().backward()
for key, config in tuned_configs().items():
    print(f"| {key} | {tuple(config)} |")
EOF
)

# 4. the record.
{
    echo "# GPU check: $device"
    echo
    echo "Written by \`bash scripts/gpu_check.sh\` ($(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - started )) s in all)."
    echo
    echo "- device: $device"
    echo "- versions: $versions"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo
    echo "| stage | outcome | time |"
    echo "|---|---|---|"
    cat "$WORK/stages.md"
    echo
    echo "Kernel tests:"
    echo
    echo '```'
    echo "$tests_summary"
    echo '```'
    echo
    echo "LoRA tiles picked by ALIGNLIB_LORA_AUTOTUNE=1 on this GPU (block_m, block_n, block_k, warps, stages):"
    echo
    echo "| GEMM (device, name, operands, weight, M, N, K, r) | tiles |"
    echo "|---|---|"
    echo "$tiles" | grep '^|' || echo "| (none recorded) | |"
    echo
    echo "Suites: $(ls "$DOCS"/*.md 2>/dev/null | grep -v README | xargs -n1 basename 2>/dev/null | tr '\n' ' ')"
} > "$DOCS/README.md"
cp "$LOG" "$DOCS/gpu_check.log"
if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/gpu.tar.gz" "$DOCS"
    cp "$LOG" "$OUT/gpu_check.log"
fi
say "done in $(( $(date +%s) - started ))s; results in $DOCS"
