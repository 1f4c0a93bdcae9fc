"""The benchmark harness measures what it claims, and each suite runs end to end at tiny sizes.

These are smoke runs: they check that a suite runs and writes its JSON, markdown and plot,
not how fast anything is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def load_harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_harness", REPO / "benchmarks" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_peak_memory_sees_a_temporary_of_known_size():
    harness = load_harness()
    x = torch.randn(1024, 1024)  # 4 MiB

    def two_temporaries():
        y = x @ x  # 4 MiB
        z = y.exp()  # 4 MiB more while y is alive
        del y
        return z.sum()

    def nothing():
        return x.sum()

    for _ in range(2):  # warm up, as the suites do
        harness.peak_memory_mib(two_temporaries, "cpu")
    assert 7.5 <= harness.peak_memory_mib(two_temporaries, "cpu") <= 9.5
    assert harness.peak_memory_mib(nothing, "cpu") < 1.0


def test_ratios_are_taken_against_the_baseline_of_the_same_case_and_mode():
    harness = load_harness()
    rows = [
        harness.Row("a", "base", "fwd", median_ms=2.0, peak_mib=10.0),
        harness.Row("a", "fast", "fwd", median_ms=1.0, peak_mib=2.5),
        harness.Row("b", "base", "fwd", median_ms=4.0, peak_mib=8.0),
        harness.Row("b", "fast", "fwd", median_ms=6.0, peak_mib=8.0),
        harness.Row("b", "broken", "fwd", note="failed: RuntimeError"),
    ]
    harness.add_ratios(rows, "base")
    assert [r.time_ratio for r in rows] == [1.0, 0.5, 1.0, 1.5, None]
    assert [r.memory_ratio for r in rows] == [1.0, 0.25, 1.0, 1.0, None]


def test_tables_say_where_alignlib_is_behind_a_peer():
    harness = load_harness()
    rows = [
        harness.Row("a", "TRL", "fwd", median_ms=2.0, peak_mib=10.0),
        harness.Row("a", "alignlib x", "fwd", median_ms=3.0, peak_mib=10.4),  # slower; memory within 5%
        harness.Row("a", "Liger", "fwd", median_ms=4.0, peak_mib=5.0),  # smaller
        harness.Row("a", "Unsloth", "fwd", note="not run: needs CUDA"),
        harness.Row("b", "alignlib x", "fwd", median_ms=1.0, peak_mib=1.0),
        harness.Row("b", "TRL", "fwd", median_ms=2.0, peak_mib=10.0),
    ]
    notes = harness.behind(rows)
    assert notes == {1: "behind: TRL in time (1.50x its median); Liger in memory (2.08x its peak)"}
    table = harness.markdown_table(rows, absolute_times=False)
    assert "**behind: TRL in time (1.50x its median); Liger in memory (2.08x its peak)**" in table.splitlines()[3]
    assert "behind" not in table.splitlines()[6]
    assert harness.behind(rows, floors=frozenset({"TRL", "Liger"})) == {}  # floors are not peers


@pytest.mark.parametrize("suite", ["losses", "logprobs", "lora", "dpo_step", "orpo_step", "kto_step", "grpo_step"])
def test_suite_runs_at_tiny_sizes_and_writes_its_files(suite, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks", suite, "--sizes", "tiny", "--device", "cpu",
               "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / f"{suite}.json").read_text())
    assert report["environment"]["command"].startswith(f"python -m benchmarks {suite}")
    measured = [row for row in report["rows"] if row["median_ms"] is not None]
    assert measured and all(row["time_ratio"] is not None for row in measured)
    assert any(row["impl"] == report["baseline"] for row in measured)
    table = (tmp_path / f"{suite}.md").read_text()
    assert "| case | mode | implementation |" in table and "ms |" not in table.splitlines()[6]
    assert (tmp_path / f"{suite}.png").stat().st_size > 1000
