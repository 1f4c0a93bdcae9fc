#!/usr/bin/env bash
# Regenerate the PPO golden files in tests/losses/golden/ from TRL's own code.
#
#   bash scripts/ppo_golden/make_golden.sh [VENV_ROOT]
#
# Builds pinned virtual environments under VENV_ROOT (default: ./.venv-golden), one per
# TRL release, and runs each generator in its own. Nothing of alignlib is installed there.
#   trl 0.11.4: the last release with the classic PPOTrainer (needs tyro, rich; NumPy 2 for pyarrow)
#   trl 0.25.1: the later PPOTrainer, for its k1/k3 KL estimators and missing_eos_penalty
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${1:-$repo/.venv-golden}"
out="$repo/tests/losses/golden"
mkdir -p "$root" "$out"

make_venv() {  # name, packages...
    local dir="$root/$1"; shift
    if [ ! -x "$dir/bin/python" ]; then
        python3 -m venv "$dir"
        "$dir/bin/pip" install -q torch==2.13.0
        "$dir/bin/pip" install -q "$@"
    fi
}

make_venv trl-0.11.4 "trl==0.11.4" tyro rich "transformers<4.47" "numpy>=2"
(cd "$here" && "$root/trl-0.11.4/bin/python" generate_trl011.py "$out/ppo_trl_0_11_4.json")

if [ -f "$here/generate_trl025.py" ]; then
    make_venv trl-0.25.1 "trl==0.25.1"
    (cd "$here" && "$root/trl-0.25.1/bin/python" generate_trl025.py "$out/ppo_trl_0_25_1.json")
fi
