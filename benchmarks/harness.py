"""What every benchmark suite shares: timing, peak memory, the environment record, and the
JSON / markdown / PNG writers.

Timing: `warmup` untimed calls, then `repeats` timed calls; the median and the 20th/80th
percentiles are reported. On CUDA each call is timed with CUDA events after a synchronize;
on the CPU with time.perf_counter.

Peak memory of one call, above what was allocated before it:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
- CPU (Linux): the process's peak resident memory (VmHWM) is reset through
  /proc/self/clear_refs before the call and read after it, minus the resident memory before.
  This sees every allocation, including temporaries freed inside one fused C++ op (which
  torch's profiler nets out). glibc is told at import to serve allocations above 64 KiB
  with mmap and give freed memory straight back, so a call cannot reuse pages an earlier
  call left resident. tracemalloc cannot see torch's allocator at all. Elsewhere, torch's
  profiler (profile_memory=True) gives a lower bound.

Every row of a suite carries a ratio to a baseline row measured in the same run; absolute
times are only worth quoting from a GPU run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


class NotAvailable(RuntimeError):
    """Raised by an implementation that cannot run here (no GPU, package not installed)."""


@dataclass
class Row:
    """One measured case: which implementation, on what sizes, how fast, how much memory."""

    case: str  # e.g. "N=2048 V=32000"
    impl: str  # e.g. "alignlib linear_token_logprobs"
    mode: str  # e.g. "forward" or "forward+backward"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_mib: float | None = None
    time_ratio: float | None = None  # median_ms / baseline's median_ms
    memory_ratio: float | None = None  # peak_mib / baseline's peak_mib
    note: str = ""
    extra: dict = field(default_factory=dict)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, *, warmup: int = 2, repeats: int = 5) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    times.sort()
    return statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8)


def _percentile(sorted_values: list[float], q: float) -> float:
    index = q * (len(sorted_values) - 1)
    low, high = math.floor(index), math.ceil(index)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (index - low)


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated by one call of fn(), above what was allocated before it, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if _RESIDENT_PEAK_RESETTABLE:
        _reset_resident_peak()
        before = _proc_status_bytes("VmRSS:")
        fn()
        return (_proc_status_bytes("VmHWM:") - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_resident_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one


def _setup_resident_peak() -> bool:
    """Make RSS track torch's CPU allocations (see the module docstring); False where it cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if not (libc.mallopt(m_mmap_threshold, 1 << 16) and libc.mallopt(m_trim_threshold, 1 << 16)):
            return False
        _reset_resident_peak()
        _proc_status_bytes("VmHWM:")
        return True
    except (OSError, KeyError, AttributeError):
        return False


_RESIDENT_PEAK_RESETTABLE = _setup_resident_peak()


def measure(
    case: str, impl: str, mode: str, fn: Callable[[], object], device: str, *, warmup: int, repeats: int, memory: bool = True
) -> Row:
    """Time fn and measure its peak memory; a failure becomes a row with the error as its note."""
    try:
        median, p20, p80 = time_call(fn, device, warmup=warmup, repeats=repeats)
        peak = peak_memory_mib(fn, device) if memory else None
    except NotAvailable as error:
        return Row(case, impl, mode, note=f"not run: {error}")
    except ImportError as error:
        return Row(case, impl, mode, note=f"not run: {error}")
    except Exception as error:  # a peer that breaks here is reported, not fatal
        return Row(case, impl, mode, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return Row(case, impl, mode, median, p20, p80, peak)


def add_ratios(rows: list[Row], baseline_impl: str) -> list[Row]:
    """Fill time_ratio and memory_ratio of each row against the baseline row of the same case and mode."""
    baselines = {(r.case, r.mode): r for r in rows if r.impl == baseline_impl}
    for row in rows:
        base = baselines.get((row.case, row.mode))
        if base is None or row.median_ms is None or base.median_ms is None:
            continue
        row.time_ratio = row.median_ms / base.median_ms
        if row.peak_mib is not None and base.peak_mib:
            row.memory_ratio = row.peak_mib / base.peak_mib
    return rows


OURS_PREFIX = "alignlib"  # rows whose implementation name starts with this are alignlib's
BEHIND_MARGIN = 1.05  # a peer must be more than 5% faster (or smaller) for alignlib to count as behind


def behind(rows: list[Row], floors: frozenset[str] = frozenset()) -> dict[int, str]:
    """For each alignlib row (by index): which peers beat it in the same case and mode, and by how much.

    A peer is ahead in time when alignlib's median is more than BEHIND_MARGIN times the peer's,
    in memory likewise for the peak. Only rows that ran are compared; `floors` are rows that are
    not alternatives a user could pick (e.g. the bare base GEMM under a LoRA layer) and are not
    counted. The text says it plainly, e.g. "behind: TRL 1.16 in time (1.31x its median)".
    """
    notes = {}
    for index, ours in enumerate(rows):
        if not ours.impl.startswith(OURS_PREFIX) or ours.median_ms is None:
            continue
        lost = []
        for peer in rows:
            if (peer.case != ours.case or peer.mode != ours.mode or peer.impl.startswith(OURS_PREFIX)
                    or peer.impl in floors):
                continue
            if peer.median_ms is not None and ours.median_ms > BEHIND_MARGIN * peer.median_ms:
                lost.append(f"{peer.impl} in time ({ours.median_ms / peer.median_ms:.2f}x its median)")
            if peer.peak_mib and ours.peak_mib is not None and ours.peak_mib > BEHIND_MARGIN * peer.peak_mib:
                lost.append(f"{peer.impl} in memory ({ours.peak_mib / peer.peak_mib:.2f}x its peak)")
        if lost:
            notes[index] = "behind: " + "; ".join(lost)
    return notes


def environment(device: str) -> dict:
    """Machine, device, library versions and the command line: recorded beside every result."""
    versions = {}
    for name in ("torch", "triton", "transformers", "peft", "trl", "liger_kernel", "unsloth", "cut_cross_entropy", "bitsandbytes"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[Row], *, absolute_times: bool, floors: frozenset[str] = frozenset()) -> str:
    """A markdown table; absolute times only when asked (GPU runs). Rows where alignlib is behind a
    peer (not one of `floors`) say so in bold."""
    header = ["case", "mode", "implementation"]
    header += ["median ms", "p20-p80 ms"] if absolute_times else []
    header += ["time ratio", "peak MiB", "memory ratio", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    behind_notes = behind(rows, floors)
    for index, r in enumerate(rows):
        cells = [r.case, r.mode, r.impl]
        if absolute_times:
            cells += [_fmt(r.median_ms), f"{_fmt(r.p20_ms)}-{_fmt(r.p80_ms)}" if r.p20_ms is not None else ""]
        note = "; ".join(part for part in (r.note, behind_notes.get(index, "")) if part)
        if index in behind_notes:
            note = f"**{note}**"
        cells += [_fmt(r.time_ratio), _fmt(r.peak_mib, 1), _fmt(r.memory_ratio), note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(suite: str, rows: list[Row], env: dict, out_dir: Path, *, baseline: str, plot: bool = True,
                  floors: frozenset[str] = frozenset()) -> list[Path]:
    """Write SUITE.json, SUITE.md and (matplotlib permitting) SUITE.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = out_dir / f"{suite}.json"
    json_path.write_text(json.dumps({"suite": suite, "baseline": baseline, "environment": env, "rows": [asdict(r) for r in rows]}, indent=1))
    written.append(json_path)
    absolute = not env["device"].startswith("cpu")
    md = [
        f"## {suite} ({env['device']})",
        "",
        f"Command: `{env['command']}` at commit {env['git_commit'] or '?'}, {env['time']}.",
        f"Ratios are to **{baseline}** on the same case and mode, measured in the same run (lower is better).",
        "" if absolute else "CPU run: absolute times are not quoted, only ratios.",
        "",
        markdown_table(rows, absolute_times=absolute, floors=floors),
        "",
    ]
    md_path = out_dir / f"{suite}.md"
    md_path.write_text("\n".join(md))
    written.append(md_path)
    if plot:
        png = _plot(suite, rows, out_dir / f"{suite}.png", baseline)
        if png:
            written.append(png)
    return written


def _plot(suite: str, rows: list[Row], path: Path, baseline: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    measured = [r for r in rows if r.time_ratio is not None]
    if not measured:
        return None
    groups = sorted({(r.case, r.mode) for r in measured}, key=lambda g: [(r.case, r.mode) for r in measured].index(g))
    impls = list(dict.fromkeys(r.impl for r in measured))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(groups) + 4), 4.5))
    width = 0.8 / max(len(impls), 1)
    for metric, ax, label in (("time_ratio", axes[0], "time / baseline"), ("memory_ratio", axes[1], "peak memory / baseline")):
        for i, impl in enumerate(impls):
            values = []
            for group in groups:
                match = [r for r in measured if (r.case, r.mode) == group and r.impl == impl]
                values.append(getattr(match[0], metric) or 0.0 if match else 0.0)
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=impl)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{suite}: ratios to {baseline} (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
