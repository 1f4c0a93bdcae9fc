"""The grid of inputs on which alignlib's losses are compared with TRL's code.

Used by the tests (tests/losses/test_*_parity.py assert every row is within its
tolerance) and by scripts/parity_report.py, which writes docs/parity.md from the
same rows, so the document shows exactly what the tests check.

Each row is one loss variant over every input set and beta: the largest
difference seen between alignlib and TRL in the batch loss, in the gradients
with respect to every input, and in the per-pair outputs or logged metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from helpers import trl_reference as trl

from alignlib.losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    reward_ranking_loss,
)

BETAS = (0.01, 0.1, 1.0, 10.0)
FLOAT64_RTOL, FLOAT64_ATOL = 1e-9, 1e-12
# TRL computes some things in float32 whatever the input dtype; see each row's note.
FLOAT32_RTOL, FLOAT32_ATOL = 2e-5, 1e-6


@dataclass
class ParityRow:
    family: str
    variant: str
    dtype: str
    rtol: float
    atol: float
    note: str = ""
    cases: int = 0
    compared: int = 0  # values compared (losses, gradients, outputs, metrics)
    trl_only_nonfinite: int = 0  # values where TRL gave inf/NaN and alignlib a finite number
    both_nonfinite: int = 0  # values non-finite in both (the true value overflows the dtype)
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_excess: float = 0.0  # max |a - b| / (atol + rtol |b|); <= 1 passes
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.worst_excess <= 1.0 and self.compared > 0

    def compare(self, what: str, ours: torch.Tensor | float, theirs: torch.Tensor | float) -> None:
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
        excess = float((diff / (self.atol + self.rtol * b.abs())).max())
        self.worst_excess = max(self.worst_excess, excess)
        if excess > 1.0:
            self.failures.append(f"{what}: |diff| {float(diff.max()):.3g} beyond tolerance")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def _log_uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    """n values with |x| log-uniform in [low, high], negated (log-probs)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return -torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def sequence_logp_sets() -> dict[str, tuple[torch.Tensor, ...]]:
    """Summed log-probs (policy chosen, policy rejected, ref chosen, ref rejected) and response lengths."""
    g = torch.Generator().manual_seed(20261122)
    sets = {}
    for name, batch in (("typical", 16), ("batch 1", 1)):
        pi_w = -5 - 395 * torch.rand(batch, generator=g, dtype=torch.float64)
        pi_l = -5 - 395 * torch.rand(batch, generator=g, dtype=torch.float64)
        ref_w = pi_w + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
        ref_l = pi_l + 3 * torch.randn(batch, generator=g, dtype=torch.float64)
        len_w = torch.randint(0, 64, (batch,), generator=g)
        len_l = torch.randint(1, 64, (batch,), generator=g)
        sets[name] = (pi_w, pi_l, ref_w, ref_l, len_w, len_l)
    # Magnitudes down to -1e4 and log-ratios of thousands, in both directions.
    batch = 16
    sets["extreme"] = (
        _log_uniform(g, batch, 1e-3, 1e4),
        _log_uniform(g, batch, 1e-3, 1e4),
        _log_uniform(g, batch, 1e-3, 1e4),
        _log_uniform(g, batch, 1e-3, 1e4),
        torch.randint(1, 4096, (batch,), generator=g),
        torch.randint(1, 4096, (batch,), generator=g),
    )
    return sets


def average_logp_sets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Length-averaged log-probs (chosen, rejected), as ORPO, SimPO and CPO's ipo take them."""
    g = torch.Generator().manual_seed(7)
    return {
        "typical": (-0.02 - 3 * torch.rand(16, generator=g, dtype=torch.float64),
                    -0.02 - 3 * torch.rand(16, generator=g, dtype=torch.float64)),
        "batch 1": (torch.tensor([-0.7], dtype=torch.float64), torch.tensor([-1.9], dtype=torch.float64)),
        "extreme": (_log_uniform(g, 16, 1e-12, 1e4), _log_uniform(g, 16, 1e-12, 1e4)),
    }


# ---------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------


def _dpo_variants() -> Iterator[tuple[str, dict, str, torch.dtype, str]]:
    """(variant name, dpo kwargs, TRL checker, dtype, note)."""
    smoothing = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
    for loss_type in DPO_LOSS_TYPES:
        kwargs = {"loss_type": loss_type, "label_smoothing": smoothing.get(loss_type, 0.0)}
        note = ""
        if loss_type == "exo_pair":
            note = "TRL builds eps as a float32 tensor, so its log(eps), log(1-eps) carry float32 rounding"
        yield loss_type, kwargs, "dpo", torch.float64, note
        if loss_type in ("robust", "aot", "aot_unpaired"):
            yield f"{loss_type}, label_smoothing=0", {"loss_type": loss_type}, "dpo", torch.float64, ""
    yield (
        "sigmoid, label_smoothing=0.1 (cDPO)",
        {"loss_type": "sigmoid", "label_smoothing": 0.1},
        "cpo-on-logratios",
        torch.float64,
        "TRL 1.16's DPOTrainer ignores label_smoothing for sigmoid; checked against CPOTrainer.cpo_loss's "
        "smoothed sigmoid fed the log-ratios",
    )
    for f_div in ("forward_kl", "js_divergence", "alpha_divergence"):
        for loss_type in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"):
            kwargs = {"loss_type": loss_type, "label_smoothing": smoothing.get(loss_type, 0.0), "f_divergence_type": f_div}
            if f_div == "alpha_divergence":
                for alpha in (0.5, 1.5):
                    note = "TRL's alpha-divergence rejects float64 (its clamp table has no float64 key): compared in float32"
                    yield f"{loss_type}, {f_div} alpha={alpha}", {**kwargs, "f_alpha_divergence_coef": alpha}, "dpo", torch.float32, note
            else:
                note = "TRL builds eps as a float32 tensor" if loss_type == "exo_pair" else ""
                yield f"{loss_type}, {f_div}", kwargs, "dpo", torch.float64, note


def dpo_rows() -> list[ParityRow]:
    rows = []
    for variant, kwargs, checker, dtype, note in _dpo_variants():
        f32 = dtype == torch.float32 or kwargs.get("loss_type") == "exo_pair"
        row = ParityRow(
            "dpo_loss",
            variant,
            "float32" if dtype == torch.float32 else "float64",
            FLOAT32_RTOL if f32 else FLOAT64_RTOL,
            FLOAT32_ATOL if f32 else FLOAT64_ATOL,
            note,
        )
        for inputs in sequence_logp_sets().values():
            pi_w, pi_l, ref_w, ref_l, len_w, len_l = inputs
            logps = [t.to(dtype) for t in (pi_w, pi_l, ref_w, ref_l)]
            for beta in BETAS:
                _compare_dpo_case(row, logps, len_w, len_l, beta, kwargs, checker)
        rows.append(row)
    return rows


def _compare_dpo_case(row, logps, len_w, len_l, beta, kwargs, checker) -> None:
    row.cases += 1
    leaves = [t.clone().requires_grad_(True) for t in logps]
    out = dpo_loss(*leaves, beta=beta, chosen_lengths=len_w, rejected_lengths=len_l, **kwargs)
    loss = out.losses.mean()
    grads = torch.autograd.grad(loss, leaves)
    if checker == "dpo":
        trl_loss, metrics, trl_grads = trl.trl_dpo(*logps, beta=beta, chosen_lengths=len_w, rejected_lengths=len_l, **kwargs)
    else:  # cDPO: CPOTrainer's smoothed sigmoid on the log-ratios u_w, u_l
        u_w, u_l = logps[0] - logps[2], logps[1] - logps[3]
        trl_loss, _, (g_w, g_l) = trl.trl_cpo(u_w, u_l, beta=beta, loss_type="sigmoid", label_smoothing=kwargs["label_smoothing"])
        trl_grads = [g_w, g_l, -g_w, -g_l]
        metrics = None
    row.compare("loss", loss, trl_loss)
    for name, ours, theirs in zip(("d/pi_w", "d/pi_l", "d/ref_w", "d/ref_l"), grads, trl_grads, strict=True):
        row.compare(name, ours, theirs)
    if metrics is not None:
        margins = out.chosen_rewards - out.rejected_rewards
        row.compare("rewards/chosen", out.chosen_rewards.mean(), metrics["rewards/chosen"])
        row.compare("rewards/rejected", out.rejected_rewards.mean(), metrics["rewards/rejected"])
        row.compare("rewards/margins", margins.mean(), metrics["rewards/margins"])
        row.compare("rewards/accuracies", (margins > 0).double().mean(), metrics["rewards/accuracies"])


def orpo_rows() -> list[ParityRow]:
    note = "TRL's odds_ratio_loss upcasts with .float(), i.e. to float32 even for float64 input: compared in float32"
    row = ParityRow("orpo_loss", "odds-ratio term", "float32", FLOAT32_RTOL, FLOAT32_ATOL, note)
    for chosen, rejected in average_logp_sets().values():
        chosen, rejected = chosen.float(), rejected.float()
        for beta in BETAS:
            row.cases += 1
            leaves = [chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)]
            out = orpo_loss(*leaves, beta=beta)
            grads = torch.autograd.grad(out.losses.mean(), leaves)
            trl_loss, trl_out, trl_grads = trl.trl_orpo(chosen, rejected, beta=beta)
            row.compare("loss", out.losses.mean(), trl_loss)
            for name in ("losses", "chosen_rewards", "rejected_rewards"):
                row.compare(name, getattr(out, name), trl_out[name])
            row.compare("log_odds_ratio (mean)", out.log_odds_ratio.mean(), trl_out["log_odds_ratio"])
            row.compare("log_odds_chosen (mean)", out.log_odds_chosen.mean(), trl_out["log_odds_chosen"])
            for name, ours, theirs in zip(("d/chosen", "d/rejected"), grads, trl_grads, strict=True):
                row.compare(name, ours, theirs)
    return [row]


def cpo_rows() -> list[ParityRow]:
    rows = []
    for loss_type in CPO_LOSS_TYPES:
        for alpha in (0.0, 0.25):
            smoothing_options = (0.0, 0.1) if loss_type in ("sigmoid", "simpo") else (0.0,)
            for eps in smoothing_options:
                variant = f"{loss_type}" + (f", alpha={alpha} (AlphaPO)" if alpha else "") + (f", label_smoothing={eps}" if eps else "")
                row = ParityRow("cpo_loss", variant, "float64", FLOAT64_RTOL, FLOAT64_ATOL)
                sets = average_logp_sets()
                summed = sequence_logp_sets()
                # sigmoid/hinge take summed log-probs in TRL; ipo/simpo averaged ones.
                inputs = list(sets.values()) + ([s[:2] for s in summed.values()] if loss_type in ("sigmoid", "hinge") else [])
                for chosen, rejected in inputs:
                    for beta in BETAS:
                        _compare_cpo_case(row, chosen, rejected, beta, loss_type, eps, alpha)
                rows.append(row)
    return rows


def _compare_cpo_case(row, chosen, rejected, beta, loss_type, eps, alpha) -> None:
    row.cases += 1
    kwargs = {"beta": beta, "loss_type": loss_type, "label_smoothing": eps, "alpha": alpha, "simpo_gamma": 0.7}
    leaves = [chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)]
    out = cpo_loss(*leaves, **kwargs)
    grads = torch.autograd.grad(out.losses.mean(), leaves)
    trl_loss, trl_out, trl_grads = trl.trl_cpo(chosen, rejected, **kwargs)
    row.compare("loss", out.losses.mean(), trl_loss)
    for name in ("losses", "chosen_rewards", "rejected_rewards"):
        row.compare(name, getattr(out, name), trl_out[name])
    for name, ours, theirs in zip(("d/chosen", "d/rejected"), grads, trl_grads, strict=True):
        row.compare(name, ours, theirs)


def reward_rows() -> list[ParityRow]:
    g = torch.Generator().manual_seed(3)
    reward_sets = [
        (3 * torch.randn(16, generator=g, dtype=torch.float64), 3 * torch.randn(16, generator=g, dtype=torch.float64)),
        (torch.tensor([0.4], dtype=torch.float64), torch.tensor([1.3], dtype=torch.float64)),
        (1e3 * torch.randn(16, generator=g, dtype=torch.float64), 1e3 * torch.randn(16, generator=g, dtype=torch.float64)),
    ]
    rows = []
    for use_margin in (False, True):
        for center in (None, 0.01):
            variant = "Bradley-Terry" + (", margin" if use_margin else "") + (f", center_rewards_coefficient={center}" if center else "")
            row = ParityRow("reward_ranking_loss", variant, "float64", FLOAT64_RTOL, FLOAT64_ATOL)
            for chosen, rejected in reward_sets:
                row.cases += 1
                margin = torch.rand(chosen.shape, generator=g, dtype=torch.float64) * 2 if use_margin else None
                leaves = [chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)]
                out = reward_ranking_loss(*leaves, margin=margin, center_rewards_coefficient=center)
                loss = out.losses.mean()
                grads = torch.autograd.grad(loss, leaves)
                trl_loss, metrics, trl_grads = trl.trl_reward(chosen, rejected, margin=margin, center_rewards_coefficient=center)
                row.compare("loss", loss, trl_loss)
                row.compare("accuracy", (out.chosen_rewards > out.rejected_rewards).double().mean(), metrics["accuracy"])
                row.compare("margin", (out.chosen_rewards - out.rejected_rewards).mean(), metrics["margin"])
                for name, ours, theirs in zip(("d/chosen", "d/rejected"), grads, trl_grads, strict=True):
                    row.compare(name, ours, theirs)
            rows.append(row)
    return rows


def ppo_classic_rows() -> list[ParityRow]:
    """Against the golden values of TRL 0.11.4's classic PPOTrainer (compared on response tokens)."""
    from helpers.ppo_golden import CLASSIC, CLASSIC_INPUTS, classic_step

    from alignlib.losses import AdaptiveKLController, whiten

    note = "golden values from TRL 0.11.4 (scripts/ppo_golden/generate_trl011.py); compared on response tokens"
    rows = []
    for step in CLASSIC["steps"]:
        cfg = step["config"]
        variant = "full step: kl_penalty={kl_penalty}, kl_coef={kl_coef}".format(**cfg)
        variant += ", whiten_rewards" if cfg.get("whiten_rewards") else ""
        row = ParityRow("PPO (classic)", variant, "float64", FLOAT64_RTOL, FLOAT64_ATOL, note, cases=1)
        ours = classic_step(cfg)
        m = ours.mask
        for name, key in (("kl", "kls"), ("non_score_rewards", "non_score_rewards"), ("rewards", "rewards"),
                          ("advantages", "advantages"), ("returns", "returns"),
                          ("grad_new_logprobs", "grad_new_logprobs"), ("grad_vpreds", "grad_vpreds")):
            row.compare(name, getattr(ours, name)[m], torch.tensor(step[key], dtype=torch.float64)[m])
        for name, value in ours.stats.items():
            row.compare(name, value, step["stats"][name])
        rows.append(row)

    row = ParityRow("PPO (classic)", "whiten (shift_mean True / False)", "float64", FLOAT64_RTOL, FLOAT64_ATOL, note, cases=2)
    inputs = CLASSIC_INPUTS["padded"]
    m = inputs["mask"].bool()
    for shift, key in ((True, "shift_mean_true"), (False, "shift_mean_false")):
        golden = torch.tensor(CLASSIC["masked_whiten"][key], dtype=torch.float64)
        row.compare(key, whiten(inputs["values"], m, shift_mean=shift)[m], golden[m])
    rows.append(row)

    spec = CLASSIC["kl_controllers"]["adaptive"]
    row = ParityRow("PPO (classic)", "AdaptiveKLController trajectory", "float64", FLOAT64_RTOL, FLOAT64_ATOL, note)
    controller = AdaptiveKLController(spec["init_kl_coef"], spec["target"], spec["horizon"])
    for kl, expected in zip(spec["kl_sequence"], spec["values"], strict=True):
        row.cases += 1
        controller.update(kl, spec["n_steps"])
        row.compare("kl_coef", controller.value, expected)
    rows.append(row)
    return rows


def ppo_trl025_rows() -> list[ParityRow]:
    """Against values captured from TRL 0.25.1's PPOTrainer.train() (float32 arithmetic there)."""
    from helpers.ppo_golden import LATER, later_run

    note = ("captured from TRL 0.25.1's PPOTrainer.train() (scripts/ppo_golden/generate_trl025.py), which "
            "computes in float32; GAE over its episode mask, which reaches one token past EOS")
    rows = []
    for run in LATER["runs"]:
        r = later_run(run)
        row = ParityRow("PPO (TRL 0.25.1)", f"kl_estimator={run['kl_estimator']}, missing_eos_penalty, GAE, whiten",
                        "float32", FLOAT32_RTOL, FLOAT32_ATOL, note, cases=1)
        for name, mask in (("kl", r.response_mask), ("non_score_reward", r.response_mask),
                           ("advantages_unwhitened", r.episode_mask), ("returns", r.episode_mask),
                           ("advantages", r.response_mask)):
            row.compare(name, r.ours[name][mask], r.theirs[name][mask])
        row.compare("scores", r.ours["scores"], r.theirs["scores"])
        rows.append(row)
    return rows


ROW_BUILDERS: dict[str, Callable[[], list[ParityRow]]] = {
    "dpo": dpo_rows,
    "orpo": orpo_rows,
    "cpo": cpo_rows,
    "reward": reward_rows,
    "ppo_classic": ppo_classic_rows,
    "ppo_trl025": ppo_trl025_rows,
}
