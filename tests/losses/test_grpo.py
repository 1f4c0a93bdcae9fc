"""group_advantages, rloo_advantages, grpo_loss and rloo_loss as worked examples: each by hand with
`math` on a tiny batch, what the equations promise, and the error messages. Parity with TRL's own
code is in test_grpo_parity.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import (
    GRPO_LOSS_TYPES,
    group_advantages,
    grpo_loss,
    grpo_normalizer,
    rloo_advantages,
    rloo_loss,
)

NAN = float("nan")


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


# --- advantages ------------------------------------------------------------------------------

# Group 1: 1, 0, 0.5 and an unscorable NaN: mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5.
# Group 2: all 2 (std 0). Group 3: 3 and three NaN (one scorable: no std, no baseline).
REWARDS = f64([1.0, 0.0, 0.5, NAN, 2.0, 2.0, 2.0, 2.0, 3.0, NAN, NAN, NAN])
# Batch of scorable rewards: 1, 0, 0.5, 2, 2, 2, 2, 3: mean 12.5 / 8, unbiased std below.
SCORABLE = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0, 3.0]
BATCH_MEAN = sum(SCORABLE) / 8
BATCH_STD = math.sqrt(sum((r - BATCH_MEAN) ** 2 for r in SCORABLE) / 7)


def test_group_advantages_by_hand():
    group = [0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0] + [0.0] * 4 + [0.0] * 4
    assert group_advantages(REWARDS, 4).tolist() == pytest.approx(group, rel=1e-12)
    batch = [0.5 / (BATCH_STD + 1e-4), -0.5 / (BATCH_STD + 1e-4), 0.0, 0.0] + [0.0] * 8
    assert group_advantages(REWARDS, 4, "batch").tolist() == pytest.approx(batch, rel=1e-12)
    assert group_advantages(REWARDS, 4, "none").tolist() == [0.5, -0.5, 0.0, 0.0] + [0.0] * 8


def test_rloo_advantages_by_hand():
    # Group 1: baselines (0 + 0.5) / 2, (1 + 0.5) / 2, (1 + 0) / 2; NaN -> 0. Group 2: all 0.
    # Group 3: a lone scorable reward has no baseline -> 0.
    loo = [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 0.0] + [0.0] * 8
    assert rloo_advantages(REWARDS, 4).tolist() == pytest.approx(loo, abs=1e-15)
    # normalize: over the 7 rows with a baseline (group 1's three, group 2's four): values 0.75, -0.75, 0, 0, ...
    # mean 0, unbiased std sqrt(2 * 0.5625 / 6)
    std = math.sqrt(2 * 0.5625 / 6)
    normalized = [0.75 / (std + 1e-4), -0.75 / (std + 1e-4), 0.0, 0.0] + [0.0] * 8
    assert rloo_advantages(REWARDS, 4, normalize=True).tolist() == pytest.approx(normalized, abs=1e-12)


def test_rloo_is_the_group_advantage_scaled_by_g_over_g_minus_1():
    """r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_j r_j), for complete groups."""
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards, 4), 4 / 3 * group_advantages(rewards, 4, "none"))


@given(st.lists(st.floats(-1e6, 1e6), min_size=6, max_size=6), st.sampled_from(["group", "batch", "none"]))
def test_full_groups_have_advantages_summing_to_zero(values, scale):
    advantages = group_advantages(f64(values), 3, scale)
    for group in advantages.view(2, 3):
        assert abs(group.sum().item()) <= 1e-9 * max(1.0, max(abs(v) for v in values) / 1e-4)
    assert abs(rloo_advantages(f64(values), 3).view(2, 3).sum(dim=1)).max().item() <= 1e-9 * max(
        1.0, max(abs(v) for v in values))


# --- the GRPO update by hand ---------------------------------------------------------------------

# Two responses, three and two tokens. log rho = lp - old: (0.1, 0.4, -0.4) and (0.0, -0.5).
MASK = torch.tensor([[True, True, True], [True, True, False]])
LP = f64([[-1.0, -0.5, -2.0], [-0.2, -1.5, 0.0]])
OLD = f64([[-1.1, -0.9, -1.6], [-0.2, -1.0, 0.0]])
REF = f64([[-1.2, -0.5, -2.5], [-0.1, -1.5, 0.0]])
ADV = f64([1.0, -2.0])
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.1
LOG_RATIOS = [[0.1, 0.4, -0.4], [0.0, -0.5]]
LPS = [[-1.0, -0.5, -2.0], [-0.2, -1.5]]
REFS = [[-1.2, -0.5, -2.5], [-0.1, -1.5]]


def clip(x, low, high):
    return min(max(x, low), high)


def per_token_by_hand(loss_type, level, beta):
    """l_it from the docstring's table, in plain Python: lists of per-token losses per response."""
    rows = []
    for i, (log_ratios, a) in enumerate(zip(LOG_RATIOS, ADV.tolist(), strict=True)):
        seq = math.exp(sum(log_ratios) / len(log_ratios))  # GSPO: exp(mean log rho)
        row = []
        for t, log_r in enumerate(log_ratios):
            rho = math.exp(log_r) if level == "token" else seq
            if loss_type == "cispo":
                loss = -min(rho, EPS_HIGH) * a * LPS[i][t]
            elif loss_type == "sapo":
                tau = 1.0 if a > 0 else 1.05
                loss = -(4 / tau) * (1 / (1 + math.exp(-tau * (rho - 1)))) * a
            else:
                loss = -min(rho * a, clip(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
            x = REFS[i][t] - LPS[i][t]  # k3 = e^x - x - 1, times rho (bias correction)
            row.append(loss + beta * (math.exp(x) - x - 1) * rho)
        rows.append(row)
    return rows


def reduce_by_hand(loss_type, rows):
    if loss_type in ("grpo", "sapo"):
        return sum(sum(row) / len(row) for row in rows) / 2
    if loss_type == "dr_grpo":
        return sum(map(sum, rows)) / (2 * 4)  # B * max_completion_length
    return sum(map(sum, rows)) / 5  # bnpo, dapo, cispo: the 5 response tokens


@pytest.mark.parametrize("beta", [0.0, BETA])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_by_hand(loss_type, level, beta):
    out = grpo_loss(LP, OLD, ADV, MASK, ref_logprobs=REF, beta=beta, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                    loss_type=loss_type, importance_sampling_level=level, max_completion_length=4)
    rows = per_token_by_hand(loss_type, level, beta)
    assert out.loss.item() == pytest.approx(reduce_by_hand(loss_type, rows), rel=1e-12)
    assert out.per_token_losses[MASK].tolist() == pytest.approx(rows[0] + rows[1], rel=1e-12)
    assert out.per_token_losses[1, 2].item() == 0.0


def test_clip_fractions_by_hand():
    # token level: row 0 (A > 0) clips rho = e^0.4 > 1.28 above; row 1 (A < 0) clips e^-0.5 < 0.8 below.
    out = grpo_loss(LP, OLD, ADV, MASK, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert (out.clip_low.item(), out.clip_high.item()) == (pytest.approx(1 / 5), pytest.approx(1 / 5))
    # sequence level: rho_0 = e^(0.1/3) inside, rho_1 = e^-0.25 = 0.78 < 0.8 with A < 0: one of two responses
    out = grpo_loss(LP, OLD, ADV, MASK, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                    importance_sampling_level="sequence")
    assert (out.clip_low.item(), out.clip_high.item()) == (0.5, 0.0)
    # cispo: rho > eps_high = 1.05 with A > 0: e^0.1 and e^0.4 of row 0
    out = grpo_loss(LP, OLD, ADV, MASK, epsilon_high=1.05, loss_type="cispo")
    assert (out.clip_low.item(), out.clip_high.item()) == (0.0, pytest.approx(2 / 5))


def test_kl_is_the_mean_k3_over_response_tokens():
    on_policy = grpo_loss(LP, LP, ADV, MASK, ref_logprobs=REF, beta=BETA)
    k3 = [math.exp(r - p) - (r - p) - 1 for rr, pp in zip(REFS, LPS, strict=True) for r, p in zip(rr, pp, strict=True)]
    assert on_policy.kl.item() == pytest.approx(sum(k3) / 5, rel=1e-12)
    assert grpo_loss(LP, OLD, ADV, MASK).kl is None


def test_on_policy_gradient_is_reinforce():
    """old = lp: every ratio is 1, and grpo's gradient per token is -A_i / (|o_i| B)."""
    lp = LP.clone().requires_grad_(True)
    out = grpo_loss(lp, LP, ADV, MASK)
    (grad,) = torch.autograd.grad(out.loss, lp)
    expected = [[-1.0 / 6] * 3, [2.0 / 4, 2.0 / 4, 0.0]]
    assert grad.tolist()[0] == pytest.approx(expected[0], rel=1e-12)
    assert grad.tolist()[1] == pytest.approx(expected[1], rel=1e-12)


def test_cispo_gradient_is_the_clipped_weight_times_the_advantage():
    lp, old = LP.clone().requires_grad_(True), OLD.clone().requires_grad_(True)
    out = grpo_loss(lp, old, ADV, MASK, loss_type="cispo", epsilon_high=1.2)
    grad_lp, grad_old = torch.autograd.grad(out.loss, [lp, old], allow_unused=True)
    assert grad_old is None  # the ratio is detached
    weights = [[-min(math.exp(x), 1.2) * a / 5 for x in row] for row, a in zip(LOG_RATIOS, (1.0, -2.0), strict=True)]
    assert grad_lp[MASK].tolist() == pytest.approx(weights[0] + weights[1], rel=1e-12)


def test_normalizers_by_hand():
    assert grpo_normalizer(MASK, "grpo").item() == grpo_normalizer(MASK, "sapo").item() == 2
    assert grpo_normalizer(MASK, "dapo").item() == grpo_normalizer(MASK, "bnpo").item() == 5
    assert grpo_normalizer(MASK, "dr_grpo", max_completion_length=4).item() == 8
    out = grpo_loss(LP, OLD, ADV, MASK, loss_type="dapo", epsilon_high=EPS_HIGH, normalizer=10.0)
    assert out.loss.item() == pytest.approx(sum(map(sum, per_token_by_hand("dapo", "token", 0.0))) / 10, rel=1e-12)


def test_rloo_loss_by_hand():
    # rho_i = exp(sum_t log rho): e^0.1 (A = 1, inside the clip), e^-0.5 (A = -2, clipped at 0.8)
    lp = LP.clone().requires_grad_(True)
    out = rloo_loss(lp, OLD, ADV, MASK)
    losses = [-math.exp(0.1), 2 * 0.8]
    assert out.per_sequence_losses.tolist() == pytest.approx(losses, rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-12)
    assert (out.clip_low.item(), out.clip_high.item()) == (0.5, 0.0)
    (grad,) = torch.autograd.grad(out.loss, lp)
    # row 0: d(-rho)/d lp_t = -rho / 2 on each token; row 1 is clipped: no gradient
    assert grad[0].tolist() == pytest.approx([-math.exp(0.1) / 2] * 3, rel=1e-12)
    assert grad[1].tolist() == [0.0, 0.0, 0.0]


# --- a step split into micro-batches, and padding ----------------------------------------------


def rollout(seed, batch=6, length=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length).expand(batch, length) < torch.randint(1, length + 1, (batch, 1), generator=g)
    lp = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    old = lp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    return lp, old, torch.randn(batch, generator=g, dtype=torch.float64), mask, ref


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_micro_batches_with_the_steps_normalizer_add_up_to_the_step(loss_type, level):
    lp, old, adv, mask, ref = rollout(1)
    options = {"loss_type": loss_type, "importance_sampling_level": level, "beta": 0.1, "max_completion_length": 9}
    parts = (slice(0, 1), slice(1, 4), slice(4, 6))
    normalizer = sum(grpo_normalizer(mask[p], loss_type, 9) for p in parts)
    whole = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, **options)
    split = sum(grpo_loss(lp[p], old[p], adv[p], mask[p], ref_logprobs=ref[p], normalizer=normalizer,
                          **options).loss for p in parts)
    assert split.item() == pytest.approx(whole.loss.item(), rel=1e-12)


@pytest.mark.parametrize("filler", [NAN, float("inf"), -1e30])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_padding_never_leaks(loss_type, filler):
    lp, old, adv, mask, ref = rollout(2)
    lp, old, ref = (torch.where(mask, t, filler) for t in (lp, old, ref))
    leaf = lp.clone().requires_grad_(True)
    out = grpo_loss(leaf, old, adv, mask, ref_logprobs=ref, beta=0.1, loss_type=loss_type, max_completion_length=9)
    out.loss.backward()
    assert bool(out.loss.isfinite()) and bool(out.per_token_losses.isfinite().all())
    assert bool(leaf.grad.isfinite().all()) and bool((leaf.grad[~mask] == 0).all())


@given(st.floats(-40, 40), st.floats(-1e3, 1e3), st.sampled_from(GRPO_LOSS_TYPES),
       st.sampled_from(["token", "sequence"]))
def test_huge_log_ratios_stay_finite(log_ratio, advantage, loss_type, level):
    """Beyond e^20 the ratio is clamped: no inf or NaN, in the loss or the gradient."""
    lp = torch.full((1, 3), -1.0, dtype=torch.float64, requires_grad=True)
    old = (lp - log_ratio).detach()
    out = grpo_loss(lp, old, f64([advantage]), torch.ones(1, 3, dtype=torch.bool), ref_logprobs=old, beta=0.5,
                    loss_type=loss_type, importance_sampling_level=level, max_completion_length=3)
    out.loss.backward()
    assert bool(out.loss.isfinite()) and bool(lp.grad.isfinite().all())


def test_float32_in_float32_out():
    lp, old, adv, mask, ref = (t.float() if t.is_floating_point() else t for t in rollout(3))
    out = grpo_loss(lp.bfloat16(), old, adv, mask, ref_logprobs=ref, beta=0.1)
    assert out.loss.dtype == out.per_token_losses.dtype == out.kl.dtype == torch.float32
    assert group_advantages(torch.randn(4), 2).dtype == torch.float32


# --- bad input ---------------------------------------------------------------------------------

_LP, _OLD, _ADV, _MASK, _REF = rollout(4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: group_advantages(f64([1.0] * 6), 4), "group_size=4 must divide the number of rewards, 6"),
        (lambda: group_advantages(f64([1.0] * 6), 1), r"group_size must be an int >= 2 for scale='group'"),
        (lambda: group_advantages(f64([1.0] * 6), 2.0), "group_size must be an int"),
        (lambda: group_advantages(f64([1.0, float("inf")]), 2), "rewards must be finite"),
        (lambda: group_advantages(f64([1.0, 2.0]), 2, "rank"), "unknown scale 'rank'; known: group, batch, none"),
        (lambda: rloo_advantages(f64([1.0] * 4), 1), "group_size must be an int >= 2"),
        (lambda: rloo_advantages(f64([[1.0, 2.0]]), 2), r"rewards must be a \(B,\) floating-point tensor"),
        (lambda: grpo_loss(torch.where(_MASK, NAN, _LP), _OLD, _ADV, _MASK),
         "logprobs has non-finite values on response tokens"),
        (lambda: grpo_loss(_LP, _OLD, f64([NAN] * 6), _MASK), "advantages contains non-finite"),
        (lambda: grpo_loss(_LP, _OLD, _ADV[:4], _MASK), r"advantages must have shape \(6,\)"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK[:, :3]), r"mask must have shape \(6, 7\)"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, beta=0.1), "pass ref_logprobs"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, loss_type="dr_grpo"), "max_completion_length"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, loss_type="ppo"), "unknown loss_type 'ppo'"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, importance_sampling_level="word"),
         "unknown importance_sampling_level 'word'"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, epsilon_low=1.5), r"epsilon_low must lie in \[0, 1\]"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, loss_type="cispo", epsilon_high=0.0), "epsilon_high"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, normalizer=0.0), "normalizer must be a finite number > 0"),
        (lambda: grpo_loss(_LP, _OLD, _ADV, _MASK, loss_type="sapo", sapo_temperature_neg=-1.0),
         "sapo_temperature_neg"),
        (lambda: rloo_loss(_LP, _OLD, _ADV[:, None].expand(6, 7), _MASK), r"advantages must be \(B,\)"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
