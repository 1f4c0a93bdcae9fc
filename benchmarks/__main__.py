"""Command line: python -m benchmarks SUITE [SUITE ...] [--device cpu|cuda] [--sizes PRESET] [--out DIR]."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from benchmarks import SUITES
from benchmarks.harness import add_ratios, environment, write_results


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suites", nargs="+", choices=[*SUITES, "all"], help="which suites to run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="size preset: tiny, cpu or gpu (default: the device's)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="where JSON, markdown and PNG go")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 1 cpu, 3 gpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 3 cpu, 10 gpu)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    sizes = args.sizes or ("gpu" if args.device == "cuda" else "cpu")
    warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 1)
    repeats = args.repeats if args.repeats is not None else (10 if args.device == "cuda" else 3)
    written = []
    for name in SUITES if "all" in args.suites else args.suites:
        suite = importlib.import_module(f"benchmarks.{name}")
        if sizes not in suite.SIZES:
            parser.error(f"suite {name} has no size preset {sizes!r}; known: {', '.join(suite.SIZES)}")
        print(f"[{name}] sizes={sizes} device={args.device}", flush=True)
        rows = add_ratios(suite.run(args.device, suite.SIZES[sizes], warmup, repeats), suite.BASELINE)
        env = environment(args.device)
        env["sizes"] = sizes
        written += write_results(name, rows, env, args.out, baseline=suite.BASELINE,
                                 floors=frozenset(getattr(suite, "FLOORS", ())))
        for path in written:
            print(f"  wrote {path}")
    return written


if __name__ == "__main__":
    main()
