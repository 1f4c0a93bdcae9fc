r"""Direct Preference Optimization and its variants, as one pure function.

DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290) trains a policy
:math:`\pi_\theta` on pairs (x, y_w, y_l) -- a prompt, a chosen (winning) and a
rejected (losing) response -- against a frozen reference :math:`\pi_{ref}`.
Every variant here starts from the same two log-ratios, one per response:

    u_w = log pi_theta(y_w | x) - log pi_ref(y_w | x)        (chosen_logratios)
    u_l = log pi_theta(y_l | x) - log pi_ref(y_l | x)        (rejected_logratios)

The implicit reward of a response is beta * u (returned as chosen_rewards and
rejected_rewards), and the sigmoid loss is the Bradley-Terry likelihood of the
preference under those rewards:

    L_sigmoid = -log sigmoid(beta * (u_w - u_l))

The other loss types change the link function, the regulariser, or how a batch
is matched up; each branch of `dpo_loss` cites its paper and equation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import (
    EXP_MAX,
    MAX_COEFFICIENT,
    MAX_MAGNITUDE,
    Interval,
    check_batch,
    check_choice,
    check_coefficient,
    check_label_smoothing,
    check_lengths,
    check_positive,
    clamp_to_finite,
)

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Loss types built on the score difference s(u_w) - s(u_l); only these have an
# f-divergence generalisation (f-DPO, Wang et al., 2023). The rest use u directly.
_F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
# Loss types that read label_smoothing, and the interval each accepts: eps = 0.5 makes a
# label a coin flip (robust divides by 1 - 2 eps), and EXO takes log(eps).
_LABEL_SMOOTHING_RANGES = {
    "sigmoid": Interval(0.0, 0.5, high_open=True),
    "robust": Interval(0.0, 0.5, high_open=True),
    "aot": Interval(0.0, 0.5, high_open=True),
    "aot_unpaired": Interval(0.0, 0.5, high_open=True),
    "exo_pair": Interval(0.0, 0.5, low_open=True, high_open=True),
}
_LABEL_SMOOTHING_HINTS = {"exo_pair": "the EXO paper uses 1e-3"}


class DPOLossOutput(NamedTuple):
    losses: torch.Tensor
    """(B,) per-pair loss, unreduced. For aot/aot_unpaired, entry i belongs to the
    i-th quantile of the batch, not to pair i (those losses sort the batch)."""
    chosen_rewards: torch.Tensor
    """(B,) beta * (log pi(y_w|x) - log pi_ref(y_w|x)), detached."""
    rejected_rewards: torch.Tensor
    """(B,) beta * (log pi(y_l|x) - log pi_ref(y_l|x)), detached."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
) -> DPOLossOutput:
    r"""The DPO loss family, per pair.

    With u_w, u_l the chosen and rejected log-ratios, s(.) the f-divergence score
    (s(u) = u for the default reverse KL), h = s(u_w) - s(u_l), and eps the label
    smoothing:

    ============== ================================================================ =====================
    loss_type      per-pair loss                                                    paper
    ============== ================================================================ =====================
    sigmoid        -(1-eps) log sig(beta h) - eps log sig(-beta h)                  DPO eq. 7; cDPO
    hinge          max(0, 1 - beta h)                                               SLiC (Zhao 2023)
    ipo            (s(u_w)/|y_w| - s(u_l)/|y_l| - 1/(2 beta))^2                     IPO eq. 17
    exo_pair       KL(q || p_eps), q = (sig(beta h), sig(-beta h)), p_eps=(1-eps,eps) EXO eq. 16
    nca_pair       -log sig(beta u_w) - 1/2 log sig(-beta u_w) - 1/2 log sig(-beta u_l)  NCA (Chen 2024)
    robust         [-(1-eps) log sig(beta h) + eps log sig(-beta h)] / (1 - 2 eps)  rDPO (Chowdhury 2024)
    bco_pair       -log sig(beta u_w) - log sig(-beta u_l)                          BCO (Jung 2024)
    sppo_hard      (u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2                      SPPO eq. 4.7, P in {0,1}
    aot            sigmoid loss on sort(log pi_w - log pi_l) - sort(ref ditto)     AOT (Melnyk 2024)
    aot_unpaired   sigmoid loss on sort(u_w) - sort(u_l)                            AOT, unpaired
    apo_zero       1 - sig(beta u_w) + sig(beta u_l)                                APO eq. 7
    apo_down       sig(beta u_w) + 1 - sig(beta (u_w - u_l))                        APO eq. 8
    discopop       (1-m) (-log sig(beta h)) + m exp(-beta h), m = sig(beta h / tau) DiscoPOP eq. 5
    sigmoid_norm   -log sig(beta (s(u_w)/|y_w| - s(u_l)/|y_l|))                     length-normalised DPO
    ============== ================================================================ =====================

    f-divergence scores (f-DPO, Wang et al. 2023, https://arxiv.org/abs/2309.16240),
    s(u) = f'(e^u): reverse_kl u; forward_kl 1 - e^{-u}; js_divergence
    log 2 + log sig(u); alpha_divergence (e^{(alpha-1) u} - 1) / (alpha - 1).

    Args:
        policy_chosen_logps: (B,) log pi_theta(y_w | x), summed over response tokens.
        policy_rejected_logps: (B,) log pi_theta(y_l | x), summed over response tokens.
        ref_chosen_logps: (B,) log pi_ref(y_w | x).
        ref_rejected_logps: (B,) log pi_ref(y_l | x).
        beta: in (0, 1e6], not below 1.18e-38 (float32's smallest normal number). The KL
            strength (DPO's beta); for ipo the regulariser tau.
        loss_type: one of DPO_LOSS_TYPES (TRL 1.16's DPOTrainer types, less `sft`).
        label_smoothing: eps, the assumed probability that a label is flipped. Read
            by sigmoid (conservative DPO), robust, aot and aot_unpaired (in [0, 0.5))
            and exo_pair (needs 0 < eps < 0.5; the EXO paper uses 1e-3). Any other
            loss_type rejects a non-zero value instead of ignoring it.
        chosen_lengths, rejected_lengths: (B,) response token counts; required by
            ipo and sigmoid_norm, which compare per-token averages (counts of 0 are
            treated as 1, as TRL does).
        f_divergence_type: one of F_DIVERGENCES; a non-default value is accepted
            only by the loss types built on h (sigmoid, sigmoid_norm, hinge, ipo,
            exo_pair, robust, discopop).
        f_alpha_divergence_coef: alpha for alpha_divergence, in [-1e6, 1e6] (alpha = 1 is reverse KL).
        discopop_tau: > 0 (and not below 1.18e-38), the temperature of DiscoPOP's mixing weight.

    Returns:
        DPOLossOutput(losses (B,), chosen_rewards (B,), rejected_rewards (B,)),
        computed in float32 (float64 if any input is float64). Reduce `losses`
        yourself, usually with `.mean()`.

    Raises:
        ValueError naming the argument for shapes that disagree, inputs that are
        non-finite or beyond |x| <= 2^40 = 1.1e12 (the losses' domain, see `_checks`), and
        options out of range (beta above 1e6 included). Within the domain and for
        beta >= 1e-6 the losses, rewards and gradients are finite, and never NaN;
        forward_kl and alpha_divergence exponentiate the log-ratios, so once their
        scores pass about 1e12 a loss may be +inf or saturate at the dtype's largest
        value (TRL's is inf or NaN there).
    """
    dtype = check_batch(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    check_positive("beta", beta, upper=MAX_COEFFICIENT)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    check_label_smoothing(label_smoothing, loss_type, _LABEL_SMOOTHING_RANGES, _LABEL_SMOOTHING_HINTS)
    if f_divergence_type != "reverse_kl" and loss_type not in _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} is only defined for loss types built on the score "
            f"difference ({', '.join(_F_DIVERGENCE_LOSS_TYPES)}); loss_type={loss_type!r} needs 'reverse_kl'"
        )
    if loss_type == "discopop":
        check_positive("discopop_tau", discopop_tau)
    if f_divergence_type == "alpha_divergence":
        check_coefficient("f_alpha_divergence_coef", f_alpha_divergence_coef)

    pi_w, pi_l = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    ref_w, ref_l = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    eps = label_smoothing

    u_w = pi_w - ref_w  # chosen log-ratio   log pi(y_w|x) / pi_ref(y_w|x)
    u_l = pi_l - ref_l  # rejected log-ratio log pi(y_l|x) / pi_ref(y_l|x)
    s_w = _f_divergence_score(u_w, f_divergence_type, f_alpha_divergence_coef)
    s_l = _f_divergence_score(u_l, f_divergence_type, f_alpha_divergence_coef)
    h = s_w - s_l
    # beta h, kept finite where a huge exponential score makes it overflow (0 * inf = NaN below).
    beta_h = clamp_to_finite(beta * h)

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta_h) - eps * F.logsigmoid(-beta_h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta_h)
    elif loss_type == "ipo":
        # TRL (and the IPO authors' own runs) average the log-ratios per token;
        # the paper's eq. 17 writes sequence-level ones.
        len_w = check_lengths("chosen_lengths", chosen_lengths, s_w, "loss_type='ipo'")
        len_l = check_lengths("rejected_lengths", rejected_lengths, s_l, "loss_type='ipo'")
        losses = (s_w / len_w - s_l / len_l - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        # KL between the model's preference distribution q over {y_w, y_l} and the
        # smoothed label p = (1 - eps, eps).
        q_w, log_q_w = torch.sigmoid(beta_h), F.logsigmoid(beta_h)
        q_l, log_q_l = torch.sigmoid(-beta_h), F.logsigmoid(-beta_h)
        losses = q_w * (log_q_w - math.log1p(-eps)) + q_l * (log_q_l - math.log(eps))
    elif loss_type == "nca_pair":
        r_w, r_l = beta * u_w, beta * u_l
        losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    elif loss_type == "robust":
        # Unbiased under label flips with probability eps.
        losses = (-(1 - eps) * F.logsigmoid(beta_h) + eps * F.logsigmoid(-beta_h)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * u_w) - F.logsigmoid(-beta * u_l)
    elif loss_type == "sppo_hard":
        losses = (u_w - 1 / (2 * beta)) ** 2 + (u_l + 1 / (2 * beta)) ** 2
    elif loss_type == "aot":
        # Optimal transport between the batch's policy and reference margin
        # distributions: compare them quantile by quantile.
        policy_margins, _ = torch.sort(pi_w - pi_l)
        ref_margins, _ = torch.sort(ref_w - ref_l)
        delta = policy_margins - ref_margins
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(u_w)[0] - torch.sort(u_l)[0]
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "apo_zero":
        # Chosen better than the policy's own outputs: raise y_w, lower y_l.
        losses = (1 - torch.sigmoid(beta * u_w)) + torch.sigmoid(beta * u_l)
    elif loss_type == "apo_down":
        # Chosen worse than the policy's own outputs: lower y_w, lower y_l more.
        losses = torch.sigmoid(beta * u_w) + (1 - torch.sigmoid(beta * (u_w - u_l)))
    elif loss_type == "discopop":
        x = beta_h
        m = torch.sigmoid(x / discopop_tau)  # mixing weight, -> 1 for confident pairs
        # m * exp(-x) written as exp(log m - x): equal, and finite where exp(-x)
        # alone would overflow against an m that underflows to 0. For tau <= 1 the
        # exponent never exceeds 0; for tau > 1 it grows like |x| (1 - 1/tau) as
        # x -> -inf, so it is clamped at log(MAX_MAGNITUDE): the term saturates at 2^40.
        log_m_exp = (F.logsigmoid(x / discopop_tau) - x).clamp(max=math.log(MAX_MAGNITUDE))
        losses = (1 - m) * -F.logsigmoid(x) + torch.exp(log_m_exp)
    elif loss_type == "sigmoid_norm":
        len_w = check_lengths("chosen_lengths", chosen_lengths, s_w, "loss_type='sigmoid_norm'")
        len_l = check_lengths("rejected_lengths", rejected_lengths, s_l, "loss_type='sigmoid_norm'")
        losses = -F.logsigmoid(beta * (s_w / len_w - s_l / len_l))
    else:  # unreachable: check_choice above
        raise AssertionError(loss_type)

    return DPOLossOutput(losses, (beta * u_w).detach(), (beta * u_l).detach())


def _f_divergence_score(u: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """s(u) = f'(t) at t = pi/pi_ref = e^u, for the f-divergence regulariser.

    The exponents are clamped at EXP_MAX, as TRL clamps alpha_divergence's, and the score
    is kept finite; a loss built from a huge score (IPO's square, robust's division) may
    still be +inf where its true value exceeds the dtype, as TRL's is (see `_checks`).
    """
    if f_divergence_type == "reverse_kl":  # f(t) = t log t
        return u
    if f_divergence_type == "forward_kl":  # f(t) = -log t, s = 1 - e^{-u}
        return -torch.expm1((-u).clamp(-EXP_MAX[u.dtype], EXP_MAX[u.dtype]))
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2) + F.logsigmoid(u)
    # alpha_divergence, f'(t) = (t^(alpha-1) - 1) / (alpha - 1); alpha -> 1 is log t.
    if abs(alpha - 1.0) < 1e-6:
        return u
    # Clamped on both sides: below -EXP_MAX, exp(t) - 1 is -1 to the last digit, and a
    # gradient that reaches it as inf times exp(t) = 0 would be NaN.
    t = ((alpha - 1.0) * u).clamp(-EXP_MAX[u.dtype], EXP_MAX[u.dtype])
    # For alpha close to 1 the quotient can overflow; clamp_to_finite keeps it finite.
    return clamp_to_finite((torch.exp(t) - 1.0) / (alpha - 1.0))
