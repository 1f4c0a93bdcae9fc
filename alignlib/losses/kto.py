r"""KTO: alignment from unpaired examples, each labelled desirable or undesirable.

Ethayarajh, Xu, Muennighoff, Jurafsky and Kiela, 2024, *KTO: Model Alignment as Prospect
Theoretic Optimization* (https://arxiv.org/abs/2402.01306), sec. 4. Each example is a
prompt x, one response y and a binary label; no pairs. With the implied reward (the
log-ratio DPO also uses)

    r(x, y) = log pi(y|x) - log pi_ref(y|x)

and a reference point z0 = KL(pi(y'|x) || pi_ref(y'|x)), KTO scores each response by a
Kahneman-Tversky value function:

    v(x, y) = lambda_D sig(beta (r(x, y) - z0))    if y is desirable
              lambda_U sig(beta (z0 - r(x, y)))    if y is undesirable

    L_KTO = E_{x, y} [ lambda_y - v(x, y) ]

so a desirable response gains by rising above the reference point and an undesirable one
by falling below it. lambda_y - v = lambda_y sig(-beta (r - z0)) (resp. sig(-beta (z0 - r))):
the loss computes that form, which keeps its small values' digits.

**The reference point.** The paper estimates z0 on each batch from *mismatched* pairs:
the response y'_j of one example scored as an answer to the prompt x_j of another (TRL
pairs each prompt with the completion of the example before it in the batch, cyclically),
clamped at 0, and passes no gradient through it:

    z0 = max(0, 1/m sum_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])

The estimate is a mean over the m mismatched pairs. Computed per micro-batch it depends on
how a step is split; `kto_kl_sum` returns the sum and the count, which add up over
micro-batches and ranks, so a trainer can form the step's z0 and pass it as `kl=`.

APO-zero, unpaired (D'Oosterlinck et al., 2024, https://arxiv.org/abs/2408.06266, the
unpaired form of eq. 7), TRL's `apo_zero_unpaired`, drops the reference point:
desirable rows get 1 - sig(beta r), undesirable rows sig(beta r).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (
    MAX_COEFFICIENT,
    check_batch,
    check_choice,
    check_finite,
    check_mask,
    check_positive,
    check_real,
    compute_dtype,
)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


class KTOLossOutput(NamedTuple):
    losses: torch.Tensor
    """(B,) per-example loss lambda_y - v(x, y), weighted, in input order; unreduced."""
    chosen_rewards: torch.Tensor
    """(n_desirable,) beta * r of the desirable rows, in input order, detached (empty if none)."""
    rejected_rewards: torch.Tensor
    """(n_undesirable,) beta * r of the undesirable rows, in input order, detached (empty if none)."""
    kl: torch.Tensor
    """() the reference point z0 used, clamped at 0, detached (0 for apo_zero_unpaired and without a KL term)."""


class KLSum(NamedTuple):
    """The pieces of z0's estimate: sum them over micro-batches and ranks, then z0 = max(0, total / count)."""

    total: torch.Tensor
    """() sum_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)] over the mismatched pairs, detached."""
    count: torch.Tensor
    """() m, the number of mismatched pairs, in total's dtype."""


def kto_kl_sum(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> KLSum:
    r"""Sum and count of the mismatched pairs' log-ratios, the additive pieces of KTO's z0.

    For a step split into micro-batches (and ranks), sum `total` and `count` over all of them
    (e.g. all_reduce a stacked pair), then pass `kl=total / count` to `kto_loss`: z0, and with
    it every example's loss, is then the same however the step is split.

    Args:
        policy_kl_logps: (m,) log pi(y'_j|x_j), summed over the response tokens, of mismatched pairs.
        ref_kl_logps: (m,) log pi_ref(y'_j|x_j) of the same pairs.
    """
    dtype = check_batch(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    log_ratios = (policy_kl_logps.to(dtype) - ref_kl_logps.to(dtype)).detach()
    return KLSum(log_ratios.sum(), torch.tensor(float(log_ratios.numel()), dtype=dtype, device=log_ratios.device))


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    *,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLossOutput:
    r"""The KTO loss per example: lambda_y - v(x, y), with v the value function above.

    ================== ===================================== ===================================
    loss_type          desirable row                         undesirable row
    ================== ===================================== ===================================
    kto                lambda_D (1 - sig(beta (r - z0)))     lambda_U (1 - sig(beta (z0 - r)))
    apo_zero_unpaired  lambda_D (1 - sig(beta r))            lambda_U sig(beta r)
    ================== ===================================== ===================================

    Args:
        policy_logps: (B,) log pi(y|x), summed over response tokens.
        ref_logps: (B,) log pi_ref(y|x).
        desirable: (B,) bool (or 0/1), True where the example is desirable. A batch may hold
            one label only.
        policy_kl_logps, ref_kl_logps: (m,) log pi and log pi_ref of m mismatched
            prompt/response pairs; z0 = max(0, mean of their differences), no gradient. Both
            or neither; None (and no `kl`) means z0 = 0. m need not equal B.
        kl: instead of the KL log-probs, z0 itself, usually the step's `total / count` from
            `kto_kl_sum` (a number or a 0-d tensor; clamped at 0 here, no gradient). With it
            the loss is exactly per example: sums over micro-batches add up to the step's.
        beta: in (0, 1e6], not below 1.18e-38.
        desirable_weight, undesirable_weight: lambda_D, lambda_U in (0, 1e6]. The paper
            suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3].
        loss_type: one of KTO_LOSS_TYPES (TRL 1.16's KTOTrainer types). apo_zero_unpaired has
            no reference point and refuses the KL arguments.

    Returns:
        KTOLossOutput(losses (B,), chosen_rewards, rejected_rewards, kl), in float32
        (float64 if any input is float64). `losses.mean()` is TRL's KTOTrainer loss.

    Raises:
        ValueError naming the argument: shapes that disagree, values non-finite or beyond
        |x| <= 2^40, a label that is not 0/1, options out of range, KL log-probs together
        with `kl`, or KL inputs for apo_zero_unpaired.
    """
    check_batch(policy_logps=policy_logps, ref_logps=ref_logps)
    kl_inputs = [t for t in (policy_kl_logps, ref_kl_logps, kl) if isinstance(t, torch.Tensor)]
    dtype = compute_dtype(policy_logps, ref_logps, *kl_inputs)  # float64 if any input is
    desirable = check_mask("desirable", desirable, "policy_logps", policy_logps)
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_positive("beta", beta, upper=MAX_COEFFICIENT)
    check_positive("desirable_weight", desirable_weight, upper=MAX_COEFFICIENT)
    check_positive("undesirable_weight", undesirable_weight, upper=MAX_COEFFICIENT)
    z0 = _reference_point(policy_kl_logps, ref_kl_logps, kl, loss_type, dtype, policy_logps.device)

    r = policy_logps.to(dtype) - ref_logps.to(dtype)  # log pi(y|x) / pi_ref(y|x)
    if loss_type == "kto":
        # lambda_y - v(x, y), with lambda (1 - sig(t)) written as lambda sig(-t).
        desirable_losses = desirable_weight * torch.sigmoid(-beta * (r - z0))
        undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - r))
    else:  # apo_zero_unpaired: raise the desirable log-ratios, lower the undesirable ones
        desirable_losses = desirable_weight * torch.sigmoid(-beta * r)
        undesirable_losses = undesirable_weight * torch.sigmoid(beta * r)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)

    rewards = (beta * r).detach()
    return KTOLossOutput(losses, rewards[desirable], rewards[~desirable], z0)


def _reference_point(
    policy_kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    kl: torch.Tensor | float | None,
    loss_type: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """z0 = max(0, mean KL log-ratio), from the KL log-probs or from `kl`; 0 without either. Detached."""
    given = [name for name, value in (("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps),
                                      ("kl", kl)) if value is not None]
    if loss_type == "apo_zero_unpaired" and given:
        raise ValueError(f"loss_type='apo_zero_unpaired' has no reference point; {', '.join(given)} would be ignored")
    if kl is not None and len(given) > 1:
        raise ValueError("pass either kl (z0) or policy_kl_logps and ref_kl_logps, not both")
    if kl is not None:
        if isinstance(kl, torch.Tensor):
            if kl.dim() != 0 or not kl.is_floating_point():
                raise ValueError(f"kl must be a real number or a 0-d floating-point tensor, got {kl!r}")
            z = kl
        else:
            check_real("kl", kl)
            z = torch.tensor(float(kl), dtype=dtype, device=device)
        check_finite("kl", z)
        return z.detach().to(dtype).clamp(min=0)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        missing = "ref_kl_logps" if ref_kl_logps is None else "policy_kl_logps"
        raise ValueError(f"{missing} is None: pass both KL log-probs (or neither, for z0 = 0)")
    if policy_kl_logps is None:
        return torch.zeros((), dtype=dtype, device=device)
    pieces = kto_kl_sum(policy_kl_logps, ref_kl_logps)
    return (pieces.total / pieces.count).to(dtype).clamp(min=0)
