#!/usr/bin/env bash
# Rebuild constraints.txt (the pinned test environment) on purpose: install torch and the open
# requirements of `pip install -e ".[test]"` (pyproject.toml, no constraints) into a fresh virtual
# environment, then pin everything that landed there, at the versions pip chose today.
#
#   scripts/refresh_constraints.sh [OUTPUT]     OUTPUT defaults to constraints.txt at the repo root
#
# TORCH (default 2.13.0) is the torch version to pin; PYTHON (default python3) makes the venv. A new
# TORCH goes into README.md's and .ci/run's `pip install torch==...` (and this file's header) too:
# tests/test_packaging.py checks that they agree.
# Then run the suite in an environment built from the new file, as .ci/run does, and commit the
# file only if it is green: a refresh is a change of the test environment like any other.
set -euo pipefail
cd "$(dirname "$0")/.."

output="${1:-constraints.txt}"
torch_version="${TORCH:-2.13.0}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install --quiet "torch==$torch_version"
"$venv/bin/pip" install --quiet -e ".[test]"

pins="$("$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/')"
grep -qx "torch==$torch_version" <<<"$pins" || { echo "torch==$torch_version did not land in the venv" >&2; exit 1; }
# The header (every comment line at the top of the current file) is kept as it is.
header="$(sed -n '/^#/!q;p' constraints.txt 2>/dev/null || true)"
{
    if [ -n "$header" ]; then printf '%s\n\n' "$header"; fi
    printf '%s\n' "$pins"
} > "$output.tmp"
mv "$output.tmp" "$output"
echo "wrote $output: $(grep -c '^[^#].*==' "$output") pins ($("${PYTHON:-python3}" --version), $(uname -sm))"
