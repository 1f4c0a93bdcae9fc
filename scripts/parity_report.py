"""Write docs/parity.md: for every loss variant, the largest difference to TRL's own code.

    python scripts/parity_report.py            # rewrites docs/parity.md
    python scripts/parity_report.py --check    # exits 1 if any row is out of tolerance

Runs the same comparisons as tests/losses/test_trl_parity.py (tests/helpers/parity.py),
so it needs the test extra (TRL 1.16) installed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the helpers package; never the repo root (see pyproject)

import torch  # noqa: E402
import trl  # noqa: E402
from helpers.parity import ROW_BUILDERS, ParityRow  # noqa: E402

INTRO = """# Parity with TRL

Every alignlib loss is run on the same inputs as TRL's own code, and the outputs are
compared: the batch loss, the gradient with respect to every input, and the per-pair
outputs or the metrics TRL logs (`rewards/chosen`, `rewards/margins`, `rewards/accuracies`,
...). TRL's loss code lives inside trainer methods; the tests call those methods on a stub
trainer and a stub model whose outputs are the chosen inputs
(`tests/helpers/trl_reference.py`), so the numbers on the TRL side come from TRL's running
code, not from a restatement of its formulas.

Inputs: summed log-probs in [-400, -5] with log-ratios of a few nats ("typical", B=16),
the same with B=1, and magnitudes log-uniform down to -1e4 ("extreme"), each with beta in
{0.01, 0.1, 1, 10}. Length-normalised types get response lengths from 0 to 4095.

A row passes when every compared value satisfies |alignlib - TRL| <= atol + rtol |TRL|.
Columns: `cases` input sets x betas; `values` numbers compared; `max abs` and
`max rel` the largest differences seen (relative over values with |TRL| > 1e-8);
`TRL inf/NaN` values where TRL overflowed or produced NaN and alignlib gave a finite
number (excluded from the differences); `both inf` values that overflow in both (the true
value exceeds the dtype's range, e.g. IPO's square of a saturated forward-KL score).

Regenerate with `python scripts/parity_report.py` (needs `pip install -e ".[test]"`).
"""

NOTES = """
## Notes on the differences

- **exo_pair**: TRL builds epsilon with `torch.tensor(label_smoothing)`, a float32 scalar,
  so its log(eps) and log(1 - eps) carry float32 rounding (relative ~1e-7) even in float64.
  alignlib keeps them in float64; the row is compared at float32 tolerance.
- **alpha_divergence**: TRL's clamp table has no float64 entry, so TRL raises a KeyError on
  float64 inputs; those rows are compared in float32. Both clamp (alpha - 1) u at 80 in
  float32 before exp.
- **forward_kl / discopop "TRL inf/NaN"**: forward KL's score 1 - e^{-u} overflows for
  u < -709 (float64); alignlib clamps the exponent (at 700 in float64, 80 in float32, the
  same clamp TRL uses for alpha-divergence), so its score saturates instead. DiscoPOP's
  `exp(-x) * sigmoid(x / tau)` is inf * 0 = NaN in TRL for large negative margins;
  alignlib computes `exp(logsigmoid(x / tau) - x)`, the same number, finite.
- **ORPO**: TRL's `odds_ratio_loss` upcasts with `.float()`, i.e. to float32 even for
  float64 input, so the row is compared in float32. TRL's log1mexp is a plain
  `torch.where` over two formulas: near log P = 0 the unused branch's gradient is inf and
  0 * inf gives NaN gradients (the "TRL inf/NaN" count). alignlib feeds each branch only
  inputs where it is finite, so its gradients are finite over [-1e4, -1e-12].
- **AlphaPO (cpo/simpo with alpha != 0)**: TRL computes P^-alpha as exp(log P).pow(-alpha):
  for log P below about -745 P underflows to 0 and the reward becomes inf; near log P = 0,
  1 - P^-alpha cancels. alignlib computes -expm1(-alpha log P) / alpha, which keeps its
  digits at both ends (the `max rel` of ~3e-7 is on rewards of order 1e-6, where TRL's
  cancellation shows; those values are within the absolute tolerance).
- **sigmoid with label_smoothing (cDPO)**: TRL 1.16's DPOTrainer ignores label_smoothing for
  `sigmoid`; alignlib applies conservative DPO (as the original DPO code does) and rejects
  label_smoothing for loss types that do not read it. The row is checked against
  CPOTrainer's smoothed sigmoid loss fed the log-ratios.
- **PPO**: classic TRL leaves arbitrary values on padding (its advantages there are
  non-zero) and, with `whiten_rewards=True`, lets whitened padding rewards flow back into
  the response's advantages through GAE. alignlib zeroes padding everywhere; the golden
  comparisons are on response tokens, and the whiten_rewards step uses inputs without
  right padding, where TRL's result is uncontaminated.
"""


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def table(rows: list[ParityRow]) -> str:
    lines = [
        "| loss | variant | dtype | rtol / atol | cases | values | max abs | max rel | TRL inf/NaN | both inf | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.family}` | {r.variant} | {r.dtype} | {r.rtol:g} / {r.atol:g} | {r.cases} | {r.compared} | "
            f"{fmt(r.max_abs)} | {fmt(r.max_rel)} | {r.trl_only_nonfinite} | {r.both_nonfinite} | "
            f"{'yes' if r.ok else '**NO**'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; do not write docs/parity.md")
    parser.add_argument("--out", default=str(REPO / "docs" / "parity.md"))
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    sections, all_rows = [], []
    titles = {"dpo": "DPO", "orpo": "ORPO", "cpo": "CPO and SimPO", "reward": "Reward model",
              "ppo_classic": "PPO with a KL penalty (classic TRL 0.11.4)", "ppo_trl025": "PPO (TRL 0.25.1)"}
    for key, build in ROW_BUILDERS.items():
        rows = build()
        all_rows += rows
        sections.append(f"## {titles.get(key, key)}\n\n{table(rows)}\n")
    bad = [r for r in all_rows if not r.ok]
    header = (
        f"Generated by `python scripts/parity_report.py` with trl {trl.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()} on {platform.machine()}: {len(all_rows)} rows, "
        f"{sum(r.compared for r in all_rows)} values compared, {len(bad)} out of tolerance.\n"
    )
    text = INTRO + "\n" + header + "\n" + "\n".join(sections) + NOTES
    if not args.check:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    for r in bad:
        print(f"OUT OF TOLERANCE: {r.family} / {r.variant}: {r.failures[:3]}")
    print(header.strip())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
