"""alignlib's losses against TRL 1.16's own loss code, on the same inputs.

One test per case: a variant (a loss with fixed options, one row of docs/parity.md), an input
set and a beta. Each test puts the inputs through alignlib and through TRL's trainer method
(called on a stub trainer, see helpers/trl_reference.py: TRL's code runs, nothing of it is
restated here), then compares the loss, the gradient with respect to every input, and the
per-pair outputs or the metrics TRL logs.

The variants, input sets and tolerances are in helpers/parity.py: float64 inputs compared at
rtol 1e-9 / atol 1e-12, except where TRL computes in float32 (each such variant's note says
why). Where TRL overflows to inf or NaN and alignlib stays finite, the value is counted, not
compared (docs/parity.md's notes list where and why). scripts/parity_report.py runs these tests
and writes what they compared into docs/parity.md.
"""

import pytest
import torch
from helpers import trl_reference as trl
from helpers.parity import (
    AVERAGE_LOGPS,
    BETAS,
    CDPO,
    CPO_CASES,
    DPO_VARIANTS,
    F_DIVERGENCE_VARIANTS,
    H_BASED,
    ORPO,
    REWARD_CASES,
    SEQUENCE_LOGPS,
    Comparison,
)

from alignlib.losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCES,
    cpo_loss,
    dpo_loss,
    orpo_loss,
    reward_ranking_loss,
)

beta_values = pytest.mark.parametrize("beta", BETAS, ids=lambda beta: f"beta={beta}")
DPO_GRADS = ("d/pi_w", "d/pi_l", "d/ref_w", "d/ref_l")  # with respect to each of dpo_loss's inputs


def with_grad(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@beta_values
@pytest.mark.parametrize("inputs", SEQUENCE_LOGPS, ids=str)
@pytest.mark.parametrize("variant", DPO_VARIANTS, ids=str)
def test_dpo_loss_matches_trl(variant, inputs, beta):
    """DPOTrainer._compute_loss, on a stub model that returns these log-probs."""
    logps = [t.to(variant.dtype) for t in inputs.logps]  # pi_w, pi_l, ref_w, ref_l
    lengths = {"chosen_lengths": inputs.chosen_lengths, "rejected_lengths": inputs.rejected_lengths}

    leaves = with_grad(*logps)
    ours = dpo_loss(*leaves, beta=beta, **lengths, **variant.options)
    loss = ours.losses.mean()
    grads = torch.autograd.grad(loss, leaves)

    trl_loss, trl_metrics, trl_grads = trl.trl_dpo(*logps, beta=beta, **lengths, **variant.options)

    compare = Comparison(variant)
    compare("loss", loss, trl_loss)
    for name, grad, trl_grad in zip(DPO_GRADS, grads, trl_grads, strict=True):
        compare(name, grad, trl_grad)
    margins = ours.chosen_rewards - ours.rejected_rewards
    compare("rewards/chosen", ours.chosen_rewards.mean(), trl_metrics["rewards/chosen"])
    compare("rewards/rejected", ours.rejected_rewards.mean(), trl_metrics["rewards/rejected"])
    compare("rewards/margins", margins.mean(), trl_metrics["rewards/margins"])
    compare("rewards/accuracies", (margins > 0).double().mean(), trl_metrics["rewards/accuracies"])
    compare.check()


@beta_values
@pytest.mark.parametrize("inputs", SEQUENCE_LOGPS, ids=str)
def test_cdpo_matches_trl_cpo_on_log_ratios(inputs, beta):
    """Conservative DPO (sigmoid with label smoothing). TRL 1.16's DPOTrainer ignores label_smoothing
    for sigmoid, so this runs CPOTrainer.cpo_loss, whose smoothed sigmoid on beta (a_w - a_l) is
    cDPO's loss when a_w, a_l are the log-ratios u_w, u_l."""
    pi_w, pi_l, ref_w, ref_l = inputs.logps

    leaves = with_grad(pi_w, pi_l, ref_w, ref_l)
    ours = dpo_loss(*leaves, beta=beta, **CDPO.options)
    loss = ours.losses.mean()
    grads = torch.autograd.grad(loss, leaves)

    u_w, u_l = pi_w - ref_w, pi_l - ref_l
    trl_loss, _, (trl_d_u_w, trl_d_u_l) = trl.trl_cpo(u_w, u_l, beta=beta, **CDPO.options)
    trl_grads = (trl_d_u_w, trl_d_u_l, -trl_d_u_w, -trl_d_u_l)  # u = pi - ref: d/ref = -d/u

    compare = Comparison(CDPO)
    compare("loss", loss, trl_loss)
    for name, grad, trl_grad in zip(DPO_GRADS, grads, trl_grads, strict=True):
        compare(name, grad, trl_grad)
    compare.check()


@beta_values
@pytest.mark.parametrize("inputs", AVERAGE_LOGPS, ids=str)
def test_orpo_loss_matches_trl(inputs, beta):
    """ORPOTrainer.odds_ratio_loss, which computes in float32 (it upcasts with .float())."""
    chosen, rejected = inputs.chosen.float(), inputs.rejected.float()

    leaves = with_grad(chosen, rejected)
    ours = orpo_loss(*leaves, beta=beta)
    loss = ours.losses.mean()
    grads = torch.autograd.grad(loss, leaves)

    trl_loss, trl_out, trl_grads = trl.trl_orpo(chosen, rejected, beta=beta)

    compare = Comparison(ORPO)
    compare("loss", loss, trl_loss)
    for name in ("losses", "chosen_rewards", "rejected_rewards"):
        compare(name, getattr(ours, name), trl_out[name])
    compare("log_odds_ratio (mean)", ours.log_odds_ratio.mean(), trl_out["log_odds_ratio"])
    compare("log_odds_chosen (mean)", ours.log_odds_chosen.mean(), trl_out["log_odds_chosen"])
    for name, grad, trl_grad in zip(("d/chosen", "d/rejected"), grads, trl_grads, strict=True):
        compare(name, grad, trl_grad)
    compare.check()


@beta_values
@pytest.mark.parametrize(("variant", "inputs"), CPO_CASES, ids=str)
def test_cpo_loss_matches_trl(variant, inputs, beta):
    """CPOTrainer.cpo_loss: sigmoid and hinge on summed and on averaged log-probs, ipo and simpo
    on averaged ones; with and without AlphaPO's alpha and label smoothing."""
    leaves = with_grad(inputs.chosen, inputs.rejected)
    ours = cpo_loss(*leaves, beta=beta, **variant.options)
    loss = ours.losses.mean()
    grads = torch.autograd.grad(loss, leaves)

    trl_loss, trl_out, trl_grads = trl.trl_cpo(inputs.chosen, inputs.rejected, beta=beta, **variant.options)

    compare = Comparison(variant)
    compare("loss", loss, trl_loss)
    for name in ("losses", "chosen_rewards", "rejected_rewards"):
        compare(name, getattr(ours, name), trl_out[name])
    for name, grad, trl_grad in zip(("d/chosen", "d/rejected"), grads, trl_grads, strict=True):
        compare(name, grad, trl_grad)
    compare.check()


@pytest.mark.parametrize(("variant", "inputs"), REWARD_CASES, ids=str)
def test_reward_ranking_loss_matches_trl(variant, inputs):
    """RewardTrainer.compute_loss, on a stub model whose scalar outputs are these rewards."""
    leaves = with_grad(inputs.chosen, inputs.rejected)
    ours = reward_ranking_loss(*leaves, margin=inputs.margin, **variant.options)
    loss = ours.losses.mean()
    grads = torch.autograd.grad(loss, leaves)

    trl_loss, trl_metrics, trl_grads = trl.trl_reward(
        inputs.chosen, inputs.rejected, margin=inputs.margin, **variant.options
    )

    compare = Comparison(variant)
    compare("loss", loss, trl_loss)
    margins = ours.chosen_rewards - ours.rejected_rewards
    compare("accuracy", (margins > 0).double().mean(), trl_metrics["accuracy"])
    compare("margin", margins.mean(), trl_metrics["margin"])
    for name, grad, trl_grad in zip(("d/chosen", "d/rejected"), grads, trl_grads, strict=True):
        compare(name, grad, trl_grad)
    compare.check()


def test_every_loss_type_and_option_is_covered():
    dpo_types = {v.options["loss_type"] for v in DPO_VARIANTS}
    assert dpo_types == set(DPO_LOSS_TYPES)
    f_divs = {(v.options["loss_type"], v.options["f_divergence_type"]) for v in F_DIVERGENCE_VARIANTS}
    assert f_divs == {(t, f) for t in H_BASED for f in F_DIVERGENCES if f != "reverse_kl"}
    assert {v.options["loss_type"] for v, _ in CPO_CASES} == set(CPO_LOSS_TYPES)
    assert {v.options["alpha"] != 0 for v, _ in CPO_CASES} == {False, True}
    margin_and_center = {(r.margin is not None, v.options["center_rewards_coefficient"])
                         for v, r in REWARD_CASES}
    assert margin_and_center == {(False, None), (False, 0.01), (True, None), (True, 0.01)}
    assert {len(s.policy_chosen) for s in SEQUENCE_LOGPS} == {1, 16} and set(BETAS) == {0.01, 0.1, 1.0, 10.0}
