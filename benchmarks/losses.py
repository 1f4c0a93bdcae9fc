"""Every alignlib loss against TRL 1.16's own code on the same log-probs: a parity report with timings.

For each loss (every DPO loss type, ORPO's odds-ratio term, every CPO type, SimPO and the
reward model's Bradley-Terry loss) both libraries get the same per-sequence log-probs (or
rewards) of B pairs; one call is the batch-mean loss and its gradient with respect to every
input (forward+backward). TRL's loss methods live inside its trainers, so they are called
through the stubs of tests/helpers/trl_reference.py (the unbound trainer method on a stub
`self`), which is what the parity tests use too; TRL's rows therefore include building that
stub, a small constant cost. Speed is not the point here: each alignlib row's extra holds
the largest absolute difference to TRL in the loss and in the gradients.

Inputs are float64, except ORPO (TRL casts to float32 inside odds_ratio_loss, so both run in
float32). The labels are the loss names; the implementations are "alignlib" and TRL.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import Row, measure

BASELINE = "TRL 1.16"
MODE = "forward+backward"

# Pairs per call.
SIZES = {"tiny": [64], "cpu": [4096], "gpu": [4096]}

# DPO loss types that need label smoothing (exo_pair needs it > 0), as in the parity tests.
DPO_LABEL_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
BETA = 0.1


def _trl_reference(device: str):
    """tests/helpers/trl_reference.py, whose stubs call TRL's loss methods; its stub accelerator on `device`."""
    tests_dir = str(Path(__file__).resolve().parents[1] / "tests")
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    from helpers import trl_reference

    trl_reference._Accelerator.device = torch.device(device)
    return trl_reference


def make_inputs(pairs: int, device: str) -> dict[str, torch.Tensor]:
    """Summed log-probs (pairs,) of policy and reference, response lengths, averaged log-probs and rewards."""
    g = torch.Generator().manual_seed(0)
    f64 = dict(generator=g, dtype=torch.float64)
    pi_w = -5 - 395 * torch.rand(pairs, **f64)
    pi_l = -5 - 395 * torch.rand(pairs, **f64)
    inputs = {
        "pi_w": pi_w,
        "pi_l": pi_l,
        "ref_w": pi_w + 3 * torch.randn(pairs, **f64),
        "ref_l": pi_l + 3 * torch.randn(pairs, **f64),
        "len_w": torch.randint(1, 64, (pairs,), generator=g),
        "len_l": torch.randint(1, 64, (pairs,), generator=g),
        "avg_w": -0.02 - 3 * torch.rand(pairs, **f64),
        "avg_l": -0.02 - 3 * torch.rand(pairs, **f64),
        "reward_w": 3 * torch.randn(pairs, **f64),
        "reward_l": 3 * torch.randn(pairs, **f64),
    }
    return {name: value.to(device) for name, value in inputs.items()}


def _mean_and_grads(out_losses: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = out_losses.mean()
    return loss, list(torch.autograd.grad(loss, leaves))


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


LossPair = tuple[Callable[[], tuple], Callable[[], tuple]]


def loss_cases(x: dict[str, torch.Tensor], trl) -> dict[str, LossPair]:
    """case name -> (alignlib call, TRL call); each returns (batch loss, [gradient per input])."""
    from alignlib.losses import (
        CPO_LOSS_TYPES,
        DPO_LOSS_TYPES,
        cpo_loss,
        dpo_loss,
        orpo_loss,
        reward_ranking_loss,
        simpo_loss,
    )

    cases: dict[str, LossPair] = {}
    dpo_inputs = (x["pi_w"], x["pi_l"], x["ref_w"], x["ref_l"])
    lengths = dict(chosen_lengths=x["len_w"], rejected_lengths=x["len_l"])
    for loss_type in DPO_LOSS_TYPES:
        kwargs = dict(beta=BETA, loss_type=loss_type, label_smoothing=DPO_LABEL_SMOOTHING.get(loss_type, 0.0), **lengths)

        def ours(kwargs=kwargs):
            leaves = _leaves(*dpo_inputs)
            return _mean_and_grads(dpo_loss(*leaves, **kwargs).losses, leaves)

        def theirs(kwargs=kwargs):
            loss, _, grads = trl.trl_dpo(*dpo_inputs, **kwargs)
            return loss, grads

        cases[f"dpo {loss_type}"] = (ours, theirs)

    avg32 = (x["avg_w"].float(), x["avg_l"].float())

    def orpo_ours():
        leaves = _leaves(*avg32)
        return _mean_and_grads(orpo_loss(*leaves, beta=BETA).losses, leaves)

    def orpo_theirs():
        loss, _, grads = trl.trl_orpo(*avg32, beta=BETA)
        return loss, grads

    cases["orpo (odds-ratio term)"] = (orpo_ours, orpo_theirs)

    for loss_type in CPO_LOSS_TYPES:
        # TRL's sigmoid/hinge score summed log-probs, ipo/simpo averaged ones.
        logps = (x["pi_w"], x["pi_l"]) if loss_type in ("sigmoid", "hinge") else (x["avg_w"], x["avg_l"])
        kwargs = dict(beta=BETA, loss_type=loss_type, simpo_gamma=0.5)

        def cpo_ours(kwargs=kwargs, logps=logps):
            leaves = _leaves(*logps)
            return _mean_and_grads(cpo_loss(*leaves, **kwargs).losses, leaves)

        def cpo_theirs(kwargs=kwargs, logps=logps):
            loss, _, grads = trl.trl_cpo(*logps, **kwargs)
            return loss, grads

        cases[f"cpo {loss_type}"] = (cpo_ours, cpo_theirs)

    avg = (x["avg_w"], x["avg_l"])

    def simpo_ours():
        leaves = _leaves(*avg)
        return _mean_and_grads(simpo_loss(*leaves, beta=2.0, gamma=0.5).losses, leaves)

    def simpo_theirs():  # TRL's SimPO is CPOTrainer's simpo type without the NLL
        loss, _, grads = trl.trl_cpo(*avg, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
        return loss, grads

    cases["simpo"] = (simpo_ours, simpo_theirs)

    rewards = (x["reward_w"], x["reward_l"])

    def reward_ours():
        leaves = _leaves(*rewards)
        return _mean_and_grads(reward_ranking_loss(*leaves).losses, leaves)

    def reward_theirs():
        loss, _, grads = trl.trl_reward(*rewards)
        return loss, grads

    cases["reward (Bradley-Terry)"] = (reward_ours, reward_theirs)
    return cases


def parity(ours: tuple, theirs: tuple) -> dict[str, float]:
    """Largest |alignlib - TRL| in the loss and over every gradient entry (finite entries only)."""
    (loss_a, grads_a), (loss_b, grads_b) = ours, theirs

    def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
        diff = (a.detach().double() - b.detach().double()).abs()
        finite = torch.isfinite(diff)
        return float(diff[finite].max()) if bool(finite.any()) else float("nan")

    grad_diffs = [max_abs(a, b) for a, b in zip(grads_a, grads_b, strict=True) if a is not None and b is not None]
    return {"loss": float(loss_b), "max_abs_diff_loss": max_abs(loss_a, loss_b),
            "max_abs_diff_grads": max(grad_diffs) if grad_diffs else float("nan")}


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    trl = _trl_reference(device)
    rows = []
    for pairs in sizes:
        cases = loss_cases(make_inputs(pairs, device), trl)
        for name, (ours, theirs) in cases.items():
            case = f"{name} B={pairs}"
            for impl, fn in ((BASELINE, theirs), ("alignlib", ours)):
                row = measure(case, impl, MODE, fn, device, warmup=warmup, repeats=repeats)
                if impl == "alignlib" and not row.note:
                    try:
                        row.extra.update(parity(ours(), theirs()))
                    except Exception as error:  # reported in the table, not fatal
                        row.note = f"parity check failed: {type(error).__name__}: {error}"[:160]
                rows.append(row)
                diff = row.extra.get("max_abs_diff_grads")
                print(f"  {case} | {impl}: {row.median_ms and round(row.median_ms, 3)} ms"
                      f"{f' max|diff| grads {diff:.3g}' if diff is not None else ''} {row.note}", flush=True)
    return rows
