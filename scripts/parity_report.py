"""Write docs/parity.md: for every loss variant, the largest difference to TRL's own code.

    python scripts/parity_report.py            # rewrites docs/parity.md
    python scripts/parity_report.py --check    # exits 1 if any row is out of tolerance

Runs the parity tests themselves (tests/losses/test_trl_parity.py, test_ppo_golden.py,
test_kto_parity.py and test_grpo_parity.py, through pytest) and gathers every comparison they make (helpers.parity.Comparison) into one
row per variant, so the document shows exactly what the tests check. Needs the test extra
(TRL 1.16) installed.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the helpers package; never the repo root (see pyproject)

import pytest  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402
from helpers.parity import SECTIONS, Comparison, Variant, recording  # noqa: E402

TESTS = (
    "tests/losses/test_trl_parity.py",
    "tests/losses/test_ppo_golden.py",
    "tests/losses/test_kto_parity.py",
    "tests/losses/test_grpo_parity.py",
)

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
Columns: `cases` the test cases (input sets x betas); `values` numbers compared; `max abs`
and `max rel` the largest differences seen (relative over values with |TRL| > 1e-8);
`TRL inf/NaN` values where TRL overflowed or produced NaN and alignlib gave a finite
number (excluded from the differences); `both inf` values that overflow in both (the true
value exceeds the dtype's range, e.g. IPO's square of a saturated forward-KL score).

KTO: unpaired log-probs with mixed labels (B=16), one label only, B=7 with 3 mismatched
pairs, B=1, a KL estimate below 0 (z0 clamped), and extremes, each with the four betas,
through `KTOTrainer._compute_loss`. GRPO: padded rollouts (B=8, T=12 with lengths 1..12;
on-policy; B=1; per-token advantages; log-ratios up to +-19.5 with advantages up to 1e3)
through `GRPOTrainer._compute_loss`, its per-token log-prob method stubbed; the advantages
through `GRPOTrainer`'s and `RLOOTrainer`'s `_generate_and_score_completions` with generation
and the reward function stubbed (rewards with zero-std groups and NaN for unscorable
completions); RLOO's update through `RLOOTrainer._compute_loss`.

Each row gathers the test cases of one variant in `tests/losses/test_trl_parity.py` (the
DPO, ORPO, CPO and reward rows), `tests/losses/test_ppo_golden.py` (the PPO rows),
`tests/losses/test_kto_parity.py` (KTO) or `tests/losses/test_grpo_parity.py` (GRPO, RLOO
and their advantages), where the inputs, both calls and the comparisons can be read;
`tests/helpers/parity.py` defines the variants, inputs and tolerances. Regenerate with
`python scripts/parity_report.py` (needs `pip install -e ".[test]"`): it runs those tests
and writes what they compared.
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
- **KTO's `max rel`** (~1e-8) is on losses near 1e-8, where TRL's 1 - sig(x) cancels;
  alignlib computes sig(-x). The absolute differences are below 2e-15.
- **KTO's reference point**: TRL estimates z0 on each micro-batch (and averages the
  per-rank means), so its loss depends on how a step is split into micro-batches and ranks.
  alignlib's `kto_kl_sum` returns the sum and the count, which a trainer adds up over the
  step and passes as `kl=`; a test shows TRL's split loss differing and alignlib's not.
  Without KL inputs (or `kl`), alignlib's `kto` uses z0 = 0; TRL always estimates it.
- **GRPO's and RLOO's advantages (float32 tolerance)**: TRL's `nanstd` forms Bessel's
  n/(n-1) from integer counts, which torch divides into a float32 tensor, so TRL's stds
  carry float32 rounding even for float64 rewards. alignlib's are float64; the rows are
  compared at float32 tolerance, and one row with group sizes whose n/(n-1) is exact in
  float32 (2, 3, 5) agrees at float64 round-off.
- **sapo**: TRL builds the temperatures with `torch.where` on Python floats, a float32
  tensor, so 1.05 and 4 / tau carry float32 rounding; with temperatures 1 and 2 (exact)
  the row agrees at float64 round-off.
- **clip fractions**: TRL logs them as float32 means of 0/1 flags; alignlib's float64
  fractions are rounded to float32 before the comparison.
- **GRPO's normalisers under gradient accumulation**: TRL divides each micro-batch's grpo,
  bnpo and dr_grpo loss by the number of accumulation steps, so micro-batches of unequal
  size (or, for bnpo, unequal token counts) give a step loss that depends on the split.
  alignlib divides the batch's sum by a `normalizer`; passed the step's (the micro-batches'
  `grpo_normalizer` summed over micro-batches and ranks), the micro-batch losses add up to
  the whole step's. TRL's dapo and cispo divide by the step's token count and agree.
- **GRPO's and RLOO's ratios**: as for PPO, alignlib takes exp of a log-ratio at most at
  e^20 (and k3's e^{-log r} likewise); TRL does not clamp. The inputs stay within +-19.5.
"""


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


@dataclass
class ParityRow:
    """One variant's test cases, aggregated: the largest differences and the counts."""

    variant: Variant
    cases: int = 0
    compared: int = 0
    trl_only_nonfinite: int = 0
    both_nonfinite: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.cases > 0 and self.compared > 0 and not self.failures

    def add(self, comparison: Comparison, test_failed: bool) -> None:
        self.cases += 1
        self.compared += comparison.compared
        self.trl_only_nonfinite += comparison.trl_only_nonfinite
        self.both_nonfinite += comparison.both_nonfinite
        self.max_abs = max(self.max_abs, comparison.max_abs)
        self.max_rel = max(self.max_rel, comparison.max_rel)
        self.failures += comparison.failures
        if test_failed and not comparison.failures:
            self.failures.append(f"{comparison.test} failed")


class FailedTests:
    """A pytest plugin that notes the id of every test that fails."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.ids.add(report.nodeid)


def run_tests() -> tuple[int, list[Comparison], set[str]]:
    """Run the parity tests; return pytest's exit code, every Comparison made, and the failed tests."""
    failed = FailedTests()
    args = [str(REPO / path) for path in TESTS]
    args += ["-q", "-p", "no:cacheprovider", "-W", "ignore", "--rootdir", str(REPO)]
    with recording() as comparisons:
        status = pytest.main(args, plugins=[failed])
    return int(status), comparisons, failed.ids


def table(rows: list[ParityRow]) -> str:
    lines = [
        "| loss | variant | dtype | rtol / atol | cases | values | max abs | max rel | TRL inf/NaN | both inf | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.variant.family}` | {r.variant.name} | {str(r.variant.dtype).removeprefix('torch.')} | "
            f"{r.variant.rtol:g} / {r.variant.atol:g} | {r.cases} | {r.compared} | "
            f"{fmt(r.max_abs)} | {fmt(r.max_rel)} | {r.trl_only_nonfinite} | {r.both_nonfinite} | "
            f"{'yes' if r.ok else '**NO**'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; do not write docs/parity.md")
    parser.add_argument("--out", default=str(REPO / "docs" / "parity.md"))
    args = parser.parse_args()

    status, comparisons, failed_tests = run_tests()
    rows = {(v.family, v.name): ParityRow(v) for variants in SECTIONS.values() for v in variants}
    for comparison in comparisons:
        key = (comparison.variant.family, comparison.variant.name)
        if key not in rows:
            print(f"a test compared variant {key}, which no section of helpers.parity.SECTIONS lists")
            status = status or 1
            continue
        rows[key].add(comparison, comparison.test in failed_tests)
    sections, all_rows = [], []
    for title, variants in SECTIONS.items():
        section_rows = [rows[(v.family, v.name)] for v in variants]
        all_rows += section_rows
        sections.append(f"## {title}\n\n{table(section_rows)}\n")
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
        why = r.failures[:3] or "no test case ran"
        print(f"OUT OF TOLERANCE: {r.variant.family} / {r.variant.name}: {why}")
    print(header.strip())
    if status != 0:
        print(f"the parity tests exited with status {status}; failed: {sorted(failed_tests)[:10]}")
    return 1 if bad or status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
