"""alignlib's benchmark suites: `python -m benchmarks SUITE [--device cpu|cuda] [--sizes ...] [--out DIR]`.

Each suite is a module here with SIZES (named presets), BASELINE (the implementation every
ratio is taken against) and run(device, sizes, warmup, repeats) -> list[harness.Row].
"""

import os
import sys

# `python -m benchmarks` puts the working directory first on sys.path. From the repository
# root that would make the top-level kernels/ folder importable as `kernels`, a name that
# transformers and bitsandbytes probe for an unrelated PyPI package. This package is already
# imported by now, so its submodules still resolve; alignlib comes from the installed package.
if sys.path and os.path.isdir(os.path.join(os.path.abspath(sys.path[0] or "."), "kernels")):
    sys.path.pop(0)

SUITES = ("losses", "logprobs", "lora", "dpo_step", "orpo_step", "kto_step", "grpo_step")
