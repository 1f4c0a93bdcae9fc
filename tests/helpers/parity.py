"""The cases on which alignlib's losses are compared with TRL's code, and the comparison itself.

tests/losses/test_trl_parity.py runs one test per case (a variant, an input set, a beta) and
tests/losses/test_ppo_golden.py one per golden PPO record; each test feeds its values to a
`Comparison`. scripts/parity_report.py runs those tests, gathers every Comparison they made
and writes one row of docs/parity.md per `Variant`, so the document shows exactly what the
tests check.

A Variant is a loss with fixed options (e.g. dpo_loss with loss_type="robust",
label_smoothing=0.1), compared at one tolerance, with a note on why when that tolerance is
float32's. The input sets are fixed by their seeds.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from helpers.ppo_golden import CLASSIC, LATER

from alignlib.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES

BETAS = (0.01, 0.1, 1.0, 10.0)
FLOAT64_RTOL, FLOAT64_ATOL = 1e-9, 1e-12
# TRL computes some things in float32 whatever the input dtype; see each variant's note.
FLOAT32_RTOL, FLOAT32_ATOL = 2e-5, 1e-6


@dataclass(frozen=True, eq=False)
class Variant:
    """One row of docs/parity.md: a loss with fixed options, compared at one tolerance."""

    family: str  # the alignlib function, e.g. "dpo_loss"
    name: str  # e.g. "robust, label_smoothing=0"
    options: dict = field(default_factory=dict)  # keyword arguments given to alignlib and to TRL alike
    dtype: torch.dtype = torch.float64  # the inputs' dtype
    rtol: float = FLOAT64_RTOL
    atol: float = FLOAT64_ATOL
    note: str = ""  # why the tolerance is float32's, or where the values come from
    # Where TRL overflows to inf/NaN and alignlib stays finite, the value is counted, not compared
    # (the documented exceptions of docs/parity.md). Golden PPO values are all finite: there, no such value.
    trl_may_overflow: bool = True

    def __str__(self) -> str:
        return self.name


_recorded: list[Comparison] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[Comparison]]:
    """Collect every Comparison made inside the block (scripts/parity_report.py runs the tests in one)."""
    global _recorded
    _recorded = []
    try:
        yield _recorded
    finally:
        _recorded = None


class Comparison:
    """alignlib's values against TRL's for one test case, at its variant's tolerance.

    compare(what, ours, theirs) checks |ours - theirs| <= atol + rtol |theirs| elementwise, and
    that alignlib is finite wherever TRL is. Where TRL is inf or NaN and alignlib finite, or both
    are non-finite, the value is counted instead of compared. `check()` then fails the test,
    listing what was out of tolerance. The largest differences are kept for docs/parity.md.
    """

    def __init__(self, variant: Variant):
        self.variant = variant
        self.test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # the running test's id
        self.compared = 0  # values compared (losses, gradients, outputs, metrics)
        self.trl_only_nonfinite = 0  # values where TRL gave inf/NaN and alignlib a finite number
        self.both_nonfinite = 0  # values non-finite in both (the true value overflows the dtype)
        self.max_abs = 0.0
        self.max_rel = 0.0  # over values with |TRL| > 1e-8
        self.failures: list[str] = []
        if _recorded is not None:
            _recorded.append(self)

    def __call__(self, what: str, ours: torch.Tensor | float, theirs: torch.Tensor | float) -> None:
        a = torch.as_tensor(ours, dtype=torch.float64).detach().flatten()
        b = torch.as_tensor(theirs, dtype=torch.float64).detach().flatten()
        if a.shape != b.shape:
            self.failures.append(f"{what}: shape {tuple(a.shape)} vs TRL {tuple(b.shape)}")
            return
        a_finite, b_finite = torch.isfinite(a), torch.isfinite(b)
        if bool((~a_finite & b_finite).any()):
            self.failures.append(f"{what}: alignlib non-finite where TRL is finite ({a.tolist()[:4]} vs {b.tolist()[:4]})")
            return
        self.trl_only_nonfinite += int((a_finite & ~b_finite).sum())
        self.both_nonfinite += int((~a_finite & ~b_finite).sum())
        keep = a_finite & b_finite
        a, b = a[keep], b[keep]
        if a.numel() == 0:
            return
        self.compared += a.numel()
        diff = (a - b).abs()
        self.max_abs = max(self.max_abs, float(diff.max()))
        significant = b.abs() > 1e-8
        if bool(significant.any()):
            self.max_rel = max(self.max_rel, float((diff[significant] / b.abs()[significant]).max()))
        excess = float((diff / (self.variant.atol + self.variant.rtol * b.abs())).max())
        if excess > 1.0:
            worst = int((diff / (self.variant.atol + self.variant.rtol * b.abs())).argmax())
            tolerance = f"atol {self.variant.atol:g} + rtol {self.variant.rtol:g} |TRL|"
            self.failures.append(
                f"{what}: |alignlib - TRL| = {float(diff[worst]):.3g} at alignlib {float(a[worst])!r}, "
                f"TRL {float(b[worst])!r}: beyond {tolerance}"
            )

    def check(self) -> None:
        """Fail unless something was compared and everything compared was within tolerance."""
        assert self.compared > 0, "nothing was compared"
        if not self.variant.trl_may_overflow:
            assert self.trl_only_nonfinite == self.both_nonfinite == 0, "non-finite values where none may be"
        assert not self.failures, "\n".join(self.failures[:10])


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


class SequenceLogps(NamedTuple):
    """Summed log-probs of a batch of pairs, and the response lengths ipo and sigmoid_norm read."""

    name: str
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    @property
    def logps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l)), dpo_loss's order."""
        return self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected

    def __str__(self) -> str:
        return self.name


class PolicyLogps(NamedTuple):
    """Log-probs of the chosen and rejected responses under the policy alone (no reference)."""

    name: str
    chosen: torch.Tensor
    rejected: torch.Tensor

    def __str__(self) -> str:
        return self.name


class Rewards(NamedTuple):
    """A reward model's scores of the chosen and rejected responses, and a margin (or None)."""

    name: str
    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor | None

    def __str__(self) -> str:
        return self.name


def _log_uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """n values with |x| log-uniform in [low, high], negated (log-probs)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return -torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def _sequence_logps() -> list[SequenceLogps]:
    """Summed log-probs in [-400, -5] with log-ratios of a few nats (B=16 and B=1), and extremes."""
    g = torch.Generator().manual_seed(20261122)
    sets = []
    for name, batch in (("typical", 16), ("batch 1", 1)):
        pi_w = -5 - 395 * torch.rand(batch, generator=g, dtype=torch.float64)
        pi_l = -5 - 395 * torch.rand(batch, generator=g, dtype=torch.float64)
        ref_w = pi_w + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
        ref_l = pi_l + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
        len_w = torch.randint(0, 64, (batch,), generator=g)
        len_l = torch.randint(1, 64, (batch,), generator=g)
        sets.append(SequenceLogps(name, pi_w, pi_l, ref_w, ref_l, len_w, len_l))
    # Magnitudes down to -1e4 and log-ratios of thousands, in both directions.
    batch = 16
    sets.append(SequenceLogps(
        "extreme",
        _log_uniform(g, batch, 1e-3, 1e4),
        _log_uniform(g, batch, 1e-3, 1e4),
        _log_uniform(g, batch, 1e-3, 1e4),
        _log_uniform(g, batch, 1e-3, 1e4),
        torch.randint(1, 4096, (batch,), generator=g),
        torch.randint(1, 4096, (batch,), generator=g),
    ))
    return sets


def _average_logps() -> list[PolicyLogps]:
    """Length-averaged log-probs, as ORPO, SimPO and CPO's ipo take them."""
    g = torch.Generator().manual_seed(7)
    return [
        PolicyLogps("typical", -0.02 - 3 * torch.rand(16, generator=g, dtype=torch.float64),
                    -0.02 - 3 * torch.rand(16, generator=g, dtype=torch.float64)),
        PolicyLogps("batch 1", torch.tensor([-0.7], dtype=torch.float64),
                    torch.tensor([-1.9], dtype=torch.float64)),
        PolicyLogps("extreme", _log_uniform(g, 16, 1e-12, 1e4), _log_uniform(g, 16, 1e-12, 1e4)),
    ]


SEQUENCE_LOGPS = _sequence_logps()
AVERAGE_LOGPS = _average_logps()
# The policy's summed log-probs of SEQUENCE_LOGPS: CPO's sigmoid and hinge take sums in TRL.
SUMMED_LOGPS = [PolicyLogps(f"{s.name}, summed", s.policy_chosen, s.policy_rejected) for s in SEQUENCE_LOGPS]


# ---------------------------------------------------------------------------
# Variants (the rows of docs/parity.md) and the cases of each
# ---------------------------------------------------------------------------

# The loss types built on the score difference h, the only ones with an f-divergence option.
H_BASED = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
_EXO_NOTE = "TRL builds eps as a float32 tensor, so its log(eps), log(1-eps) carry float32 rounding"
_ALPHA_NOTE = ("TRL's alpha-divergence rejects float64 (its clamp table has no float64 key): "
               "compared in float32")


def _dpo_loss_type_variants() -> list[Variant]:
    variants = []
    for loss_type in DPO_LOSS_TYPES:
        options = {"loss_type": loss_type, "label_smoothing": _SMOOTHING.get(loss_type, 0.0)}
        if loss_type == "exo_pair":
            variants.append(Variant("dpo_loss", loss_type, options, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
                                    note=_EXO_NOTE))
        else:
            variants.append(Variant("dpo_loss", loss_type, options))
        if loss_type in ("robust", "aot", "aot_unpaired"):
            variants.append(Variant("dpo_loss", f"{loss_type}, label_smoothing=0", {"loss_type": loss_type}))
    return variants


def _f_divergence_variants() -> list[Variant]:
    variants = []
    for f_div in ("forward_kl", "js_divergence", "alpha_divergence"):
        for loss_type in H_BASED:
            options = {"loss_type": loss_type, "label_smoothing": _SMOOTHING.get(loss_type, 0.0),
                       "f_divergence_type": f_div}
            if f_div == "alpha_divergence":
                for alpha in (0.5, 1.5):
                    variants.append(Variant(
                        "dpo_loss", f"{loss_type}, {f_div} alpha={alpha}",
                        {**options, "f_alpha_divergence_coef": alpha},
                        dtype=torch.float32, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL, note=_ALPHA_NOTE,
                    ))
            elif loss_type == "exo_pair":
                variants.append(Variant("dpo_loss", f"{loss_type}, {f_div}", options, rtol=FLOAT32_RTOL,
                                        atol=FLOAT32_ATOL, note="TRL builds eps as a float32 tensor"))
            else:
                variants.append(Variant("dpo_loss", f"{loss_type}, {f_div}", options))
    return variants


DPO_LOSS_TYPE_VARIANTS = _dpo_loss_type_variants()
F_DIVERGENCE_VARIANTS = _f_divergence_variants()
# Both go through DPOTrainer: test_dpo_loss_matches_trl runs each on SEQUENCE_LOGPS x BETAS.
DPO_VARIANTS = DPO_LOSS_TYPE_VARIANTS + F_DIVERGENCE_VARIANTS
# Conservative DPO, through CPOTrainer (test_cdpo_matches_trl_cpo_on_log_ratios).
CDPO = Variant(
    "dpo_loss", "sigmoid, label_smoothing=0.1 (cDPO)", {"loss_type": "sigmoid", "label_smoothing": 0.1},
    note="TRL 1.16's DPOTrainer ignores label_smoothing for sigmoid; checked against CPOTrainer.cpo_loss's "
    "smoothed sigmoid fed the log-ratios",
)
ORPO = Variant(
    "orpo_loss", "odds-ratio term", dtype=torch.float32, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
    note="TRL's odds_ratio_loss upcasts with .float(), i.e. to float32 even for float64 input: "
    "compared in float32",
)


def _cpo_variants() -> list[Variant]:
    variants = []
    for loss_type in CPO_LOSS_TYPES:
        for alpha in (0.0, 0.25):
            for eps in (0.0, 0.1) if loss_type in ("sigmoid", "simpo") else (0.0,):
                name = loss_type + (f", alpha={alpha} (AlphaPO)" if alpha else "") + (
                    f", label_smoothing={eps}" if eps else "")
                options = {"loss_type": loss_type, "label_smoothing": eps, "alpha": alpha, "simpo_gamma": 0.7}
                variants.append(Variant("cpo_loss", name, options))
    return variants


CPO_VARIANTS = _cpo_variants()
# TRL's CPOTrainer takes summed log-probs for sigmoid and hinge, averaged ones for ipo and simpo.
CPO_CASES = [
    (variant, inputs)
    for variant in CPO_VARIANTS
    for inputs in AVERAGE_LOGPS + (SUMMED_LOGPS if variant.options["loss_type"] in ("sigmoid", "hinge")
                                   else [])
]

def _reward_cases() -> tuple[list[Variant], list[tuple[Variant, Rewards]]]:
    """Bradley-Terry with and without a margin and the centering term, each on three sets of
    rewards; a variant with a margin draws one per set."""
    g = torch.Generator().manual_seed(3)
    sets = [
        ("typical", 3 * torch.randn(16, generator=g, dtype=torch.float64),
         3 * torch.randn(16, generator=g, dtype=torch.float64)),
        ("batch 1", torch.tensor([0.4], dtype=torch.float64), torch.tensor([1.3], dtype=torch.float64)),
        ("extreme", 1e3 * torch.randn(16, generator=g, dtype=torch.float64),
         1e3 * torch.randn(16, generator=g, dtype=torch.float64)),
    ]
    variants, cases = [], []
    for with_margin in (False, True):
        for center in (None, 0.01):
            name = "Bradley-Terry" + (", margin" if with_margin else "") + (
                f", center_rewards_coefficient={center}" if center else "")
            variant = Variant("reward_ranking_loss", name, {"center_rewards_coefficient": center})
            variants.append(variant)
            for set_name, chosen, rejected in sets:
                margin = None
                if with_margin:
                    margin = 2 * torch.rand(chosen.shape, generator=g, dtype=torch.float64)
                cases.append((variant, Rewards(set_name, chosen, rejected, margin)))
    return variants, cases


REWARD_VARIANTS, REWARD_CASES = _reward_cases()

# PPO: golden values, one variant per record (tests/losses/test_ppo_golden.py).
_CLASSIC_NOTE = ("golden values from TRL 0.11.4 (scripts/ppo_golden/generate_trl011.py); "
                 "compared on response tokens")
_LATER_NOTE = ("captured from TRL 0.25.1's PPOTrainer.train() (scripts/ppo_golden/generate_trl025.py), which "
               "computes in float32; GAE over its episode mask, which reaches one token past EOS")


def classic_step_variant(step: dict) -> Variant:
    """The variant of one golden PPO step of TRL 0.11.4."""
    cfg = step["config"]
    name = "full step: kl_penalty={kl_penalty}, kl_coef={kl_coef}".format(**cfg)
    name += ", whiten_rewards" if cfg.get("whiten_rewards") else ""
    return Variant("PPO (classic)", name, note=_CLASSIC_NOTE, trl_may_overflow=False)


def trl025_run_variant(run: dict) -> Variant:
    """The variant of one run captured from TRL 0.25.1's train()."""
    name = f"kl_estimator={run['kl_estimator']}, missing_eos_penalty, GAE, whiten"
    return Variant("PPO (TRL 0.25.1)", name, dtype=torch.float32, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
                   note=_LATER_NOTE, trl_may_overflow=False)


WHITEN = Variant("PPO (classic)", "whiten (shift_mean True / False)", note=_CLASSIC_NOTE,
                 trl_may_overflow=False)
ADAPTIVE_KL = Variant("PPO (classic)", "AdaptiveKLController trajectory", note=_CLASSIC_NOTE,
                      trl_may_overflow=False)

# ---------------------------------------------------------------------------
# KTO: unpaired examples, a desirable label, and the mismatched pairs' log-probs
# ---------------------------------------------------------------------------


class UnpairedLogps(NamedTuple):
    """Summed log-probs of B labelled completions and of m mismatched (KL) pairs."""

    name: str
    policy: torch.Tensor
    ref: torch.Tensor
    desirable: torch.Tensor
    policy_kl: torch.Tensor
    ref_kl: torch.Tensor

    def __str__(self) -> str:
        return self.name


def _unpaired_logps() -> list[UnpairedLogps]:
    """Mixed labels (B=16), one label only, odd sizes, B=1, a KL estimate below 0 (z0 clamped), extremes."""
    g = torch.Generator().manual_seed(15)

    def draw(name, batch, labels, kl_shift=1.0, scale=3.0, kl_batch=None):
        kl_batch = batch if kl_batch is None else kl_batch
        policy = -5 - 395 * torch.rand(batch, generator=g, dtype=torch.float64)
        ref = policy + scale * torch.randn(batch, generator=g, dtype=torch.float64)
        policy_kl = -5 - 395 * torch.rand(kl_batch, generator=g, dtype=torch.float64)
        ref_kl = policy_kl - kl_shift + torch.randn(kl_batch, generator=g, dtype=torch.float64)
        return UnpairedLogps(name, policy, ref, labels, policy_kl, ref_kl)

    mixed = torch.rand(16, generator=g) < 0.5
    mixed[:2] = torch.tensor([True, False])  # both labels present
    sets = [
        draw("typical", 16, mixed),
        draw("desirable only", 5, torch.ones(5, dtype=torch.bool)),
        draw("undesirable only", 5, torch.zeros(5, dtype=torch.bool)),
        draw("odd size, m=3", 7, torch.tensor([True, False, False, True, False, True, False]), kl_batch=3),
        draw("batch 1", 1, torch.tensor([True])),
        draw("z0 below 0, clamped", 16, mixed.roll(3), kl_shift=-2.0),
    ]
    batch = 16
    sets.append(UnpairedLogps(
        "extreme", _log_uniform(g, batch, 1e-3, 1e4), _log_uniform(g, batch, 1e-3, 1e4), mixed.roll(5),
        _log_uniform(g, batch, 1e-3, 1e4), _log_uniform(g, batch, 1e-3, 1e4),
    ))
    return sets


UNPAIRED_LOGPS = _unpaired_logps()
KTO_VARIANTS = [
    Variant("kto_loss", name, options)
    for loss_type in ("kto", "apo_zero_unpaired")
    for name, options in (
        (loss_type, {"loss_type": loss_type}),
        (f"{loss_type}, desirable_weight=1.33, undesirable_weight=0.75",
         {"loss_type": loss_type, "desirable_weight": 1.33, "undesirable_weight": 0.75}),
    )
]


# ---------------------------------------------------------------------------
# GRPO and RLOO: rollouts (B, T) with right padding, and group rewards
# ---------------------------------------------------------------------------


class RolloutLogps(NamedTuple):
    """Per-token log-probs of a batch of responses (policy, rollout policy, reference), advantages, mask."""

    name: str
    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor  # (B,), or (B, T) for the per-token set
    mask: torch.Tensor

    def __str__(self) -> str:
        return self.name


def _rollout_logps() -> list[RolloutLogps]:
    """Typical (B=8, T=12, lengths 1..12), on-policy, B=1, per-token advantages, and extremes
    (log-ratios up to +-19.5 per token, advantages up to 1e3: below alignlib's e^20 clamp)."""
    g = torch.Generator().manual_seed(16)

    def draw(name, batch, length, spread=0.3, low=-5.0, adv_scale=1.0, per_token=False, on_policy=False):
        lengths = torch.randint(1, length + 1, (batch, 1), generator=g)
        lengths[0] = length  # one full row
        mask = torch.arange(length).expand(batch, length) < lengths
        logprobs = low * torch.rand(batch, length, generator=g, dtype=torch.float64)

        def near(scale):  # log-probs within +-19.5 of the policy's, and <= 0
            noise = (scale * torch.randn(batch, length, generator=g, dtype=torch.float64)).clamp(-19.5, 19.5)
            return (logprobs + noise).clamp(max=0)

        old = logprobs.clone() if on_policy else near(spread)
        shape = (batch, length) if per_token else (batch,)
        advantages = adv_scale * torch.randn(shape, generator=g, dtype=torch.float64)
        return RolloutLogps(name, logprobs, old, near(5 * spread / 3), advantages, mask)

    return [
        draw("typical", 8, 12),
        draw("on-policy", 8, 12, on_policy=True),
        draw("batch 1", 1, 7),
        draw("per-token advantages", 6, 10, per_token=True),
        draw("extreme", 8, 16, spread=8.0, low=-30.0, adv_scale=1e3),
    ]


ROLLOUT_LOGPS = _rollout_logps()
_SAPO_NOTE = ("TRL builds sapo's temperatures with torch.where on Python floats, a float32 tensor even for "
              "float64 input, so 1.05 and 4 / tau carry float32 rounding; compared at float32 tolerance")
_CLIP_OPTIONS = {"epsilon_low": 0.2, "epsilon_high": 0.28}


def _grpo_variants() -> list[Variant]:
    variants = []
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo", "cispo", "sapo", "sapo, tau 1 and 2"):
        options = {"loss_type": loss_type.split(",")[0], **_CLIP_OPTIONS}
        tolerance = {}
        if loss_type == "dr_grpo":
            options["max_completion_length"] = 16
        elif loss_type == "cispo":
            options["epsilon_high"] = 1.2  # the cap on rho; ScaleRL uses 5
        elif loss_type == "sapo":
            tolerance = {"rtol": FLOAT32_RTOL, "atol": FLOAT32_ATOL, "note": _SAPO_NOTE}
        elif loss_type == "sapo, tau 1 and 2":  # 4 / tau exact in float32: float64 agreement
            options.update(sapo_temperature_pos=1.0, sapo_temperature_neg=2.0)
        for level in ("token", "sequence"):
            for beta in (0.0, 0.04):
                name = f"{loss_type}, {level}-level" + (f", beta={beta}" if beta else "")
                variants.append(Variant("grpo_loss", name, {**options, "importance_sampling_level": level,
                                                            "beta": beta}, **tolerance))
    variants.append(Variant("grpo_loss", "dapo, token-level, beta=0.04, use_bias_correction_kl=False",
                            {"loss_type": "dapo", **_CLIP_OPTIONS, "beta": 0.04, "use_bias_correction_kl": False}))
    variants.append(Variant(
        "grpo_loss", "dapo, token-level, num_items_in_batch of a 3x larger step",
        {"loss_type": "dapo", **_CLIP_OPTIONS, "step_multiple": 3},
        note="alignlib's normalizer = TRL's num_items_in_batch (one process, one accumulation step)",
    ))
    return variants


GRPO_VARIANTS = _grpo_variants()


class GroupRewards(NamedTuple):
    """Rewards in consecutive groups; NaN marks an unscorable completion."""

    name: str
    rewards: torch.Tensor
    group_size: int

    def __str__(self) -> str:
        return self.name


def _group_rewards() -> list[GroupRewards]:
    g = torch.Generator().manual_seed(161)
    nan = float("nan")
    unscorable = torch.tensor([1.0, nan, 0.0, 0.5, nan, nan, nan, nan, nan, 2.0, nan, nan, 0.3, -1.2, 0.8, 4.0],
                              dtype=torch.float64)
    return [
        GroupRewards("typical, G=4", torch.randn(16, generator=g, dtype=torch.float64), 4),
        GroupRewards("0/1 rewards, zero-std groups, G=4",
                     torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64), 4),
        GroupRewards("NaN: unscorable rows, lone and empty groups, G=4", unscorable, 4),
        GroupRewards("one group, G=8", 10 * torch.rand(8, generator=g, dtype=torch.float64), 8),
        GroupRewards("G=2", torch.randn(12, generator=g, dtype=torch.float64), 2),
        GroupRewards("extreme, G=4", 1e6 * torch.randn(16, generator=g, dtype=torch.float64), 4),
    ]


GROUP_REWARDS = _group_rewards()
_NANSTD_NOTE = ("TRL's nanstd forms Bessel's n/(n-1) from integer counts, a float32 tensor, so its stds "
                "carry float32 rounding (relative ~3e-8); compared at float32 tolerance")
ADVANTAGE_VARIANTS = [
    Variant("group_advantages", "scale='group'", {"scale": "group"}, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
            note=_NANSTD_NOTE),
    Variant("group_advantages", "scale='batch'", {"scale": "batch"}, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
            note=_NANSTD_NOTE),
    Variant("group_advantages", "scale='none' (Dr. GRPO)", {"scale": "none"}),
    Variant("rloo_advantages", "leave-one-out", {"normalize": False}),
    Variant("rloo_advantages", "leave-one-out, normalize_advantages", {"normalize": True},
            rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL, note=_NANSTD_NOTE),
    Variant("rloo_advantages", "leave-one-out, beta=0.05 (k1 KL summed into the rewards)",
            {"normalize": False, "beta": 0.05}),
]
# Group scale with every group complete and n/(n-1) exact in float32 (G = 2, 3, 5): float64 agreement.
GROUP_EXACT = Variant("group_advantages", "scale='group', G in {2, 3, 5}, all scorable", {"scale": "group"},
                      note="n/(n-1) = 2, 1.5, 1.25 are exact in float32, so TRL's std is float64-exact")
RLOO_VARIANTS = [
    Variant("rloo_loss", "sequence-level clip, eps 0.2 / 0.2", {"epsilon_low": 0.2, "epsilon_high": 0.2}),
    Variant("rloo_loss", "sequence-level clip, eps 0.2 / 0.28", _CLIP_OPTIONS),
]
# TRL logs the clip fractions as float32 means of 0/1 flags: alignlib's are rounded to float32 to compare.

# docs/parity.md's sections and their rows, in order.
SECTIONS: dict[str, list[Variant]] = {
    "DPO": [*DPO_LOSS_TYPE_VARIANTS, CDPO, *F_DIVERGENCE_VARIANTS],
    "ORPO": [ORPO],
    "CPO and SimPO": CPO_VARIANTS,
    "Reward model": REWARD_VARIANTS,
    "PPO with a KL penalty (classic TRL 0.11.4)": [
        *map(classic_step_variant, CLASSIC["steps"]), WHITEN, ADAPTIVE_KL
    ],
    "PPO (TRL 0.25.1)": [trl025_run_variant(run) for run in LATER["runs"]],
    "KTO": KTO_VARIANTS,
    "GRPO": GRPO_VARIANTS,
    "GRPO and RLOO advantages": [*ADVANTAGE_VARIANTS[:3], GROUP_EXACT, *ADVANTAGE_VARIANTS[3:]],
    "RLOO": RLOO_VARIANTS,
}
