"""dpo_loss as worked examples: each loss type's formula by hand on one pair, and what the
equations promise, checked on random inputs.

Parity with TRL's own code lives in test_trl_parity.py; this file checks the
mathematics (identities, monotonicity, gradients) and the error messages.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import DPO_LOSS_TYPES, F_DIVERGENCES, dpo_loss

LENGTH_TYPES = ("ipo", "sigmoid_norm")
SMOOTHING = {"exo_pair": 1e-3}


def batch(seed, n=6, scale=50.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [-scale * torch.rand(n, generator=g, dtype=dtype) for _ in range(4)]


def lengths(n=6):
    return {"chosen_lengths": torch.arange(1, n + 1), "rejected_lengths": torch.arange(n, 0, -1)}


def kwargs_for(loss_type, n=6):
    kw = {"loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    if loss_type in LENGTH_TYPES:
        kw.update(lengths(n))
    return kw


# --- the README contract -----------------------------------------------------------


def test_output_unpacks_into_three_and_is_unreduced():
    pi_w, pi_l, ref_w, ref_l = batch(0)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1)
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.1)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (6,)
    assert torch.equal(out.losses, losses)
    assert not chosen_rewards.requires_grad


def test_low_precision_inputs_compute_and_return_float32():
    pi_w, pi_l, ref_w, ref_l = (t.to(torch.bfloat16) for t in batch(1))
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l)
    assert out.losses.dtype == torch.float32
    ref = dpo_loss(*(t.float() for t in (pi_w, pi_l, ref_w, ref_l)))
    torch.testing.assert_close(out.losses, ref.losses)


# --- worked by hand: each loss type's formula (the docstring's table), in plain Python -------

# One pair: u_w = -5.0 - (-5.5) = 0.5, u_l = -7.5 - (-6.0) = -1.5, so h = u_w - u_l = 2.0 and,
# with beta = 0.4, beta h = 0.8. Lengths |y_w| = 4, |y_l| = 2 for ipo and sigmoid_norm.
PI_W, PI_L, REF_W, REF_L = -5.0, -7.5, -5.5, -6.0
U_W, U_L, H, BETA = 0.5, -1.5, 2.0, 0.4
LEN_W, LEN_L = 4, 2


def sig(x):
    return 1 / (1 + math.exp(-x))


def log_sig(x):
    return math.log(sig(x))


BH = BETA * H
# loss_type -> (options, the loss of the pair by the docstring's formula)
BY_HAND = {
    "sigmoid": ({"label_smoothing": 0.1}, -0.9 * log_sig(BH) - 0.1 * log_sig(-BH)),
    "hinge": ({}, 1 - 0.8),
    "ipo": ({}, (U_W / LEN_W - U_L / LEN_L - 1 / (2 * BETA)) ** 2),  # (0.125 + 0.75 - 1.25)^2
    "exo_pair": (
        {"label_smoothing": 1e-3},
        sig(BH) * (log_sig(BH) - math.log(1 - 1e-3)) + sig(-BH) * (log_sig(-BH) - math.log(1e-3)),
    ),
    "nca_pair": ({}, -log_sig(BETA * U_W) - 0.5 * log_sig(-BETA * U_W) - 0.5 * log_sig(-BETA * U_L)),
    "robust": ({"label_smoothing": 0.1}, (-0.9 * log_sig(BH) + 0.1 * log_sig(-BH)) / (1 - 0.2)),
    "bco_pair": ({}, -log_sig(BETA * U_W) - log_sig(-BETA * U_L)),
    "sppo_hard": ({}, (0.5 - 1.25) ** 2 + (-1.5 + 1.25) ** 2),  # 1/(2 beta) = 1.25
    "apo_zero": ({}, 1 - sig(BETA * U_W) + sig(BETA * U_L)),
    "apo_down": ({}, sig(BETA * U_W) + 1 - sig(BETA * (U_W - U_L))),
    # m = sig(beta h / tau) with tau = 0.5: (1 - m)(-log sig(beta h)) + m exp(-beta h)
    "discopop": ({"discopop_tau": 0.5}, (1 - sig(1.6)) * -log_sig(BH) + sig(1.6) * math.exp(-BH)),
    "sigmoid_norm": ({}, -log_sig(BETA * (U_W / LEN_W - U_L / LEN_L))),
}
AOT_TYPES = ("aot", "aot_unpaired")


def one_pair(*values):
    return [torch.tensor([v], dtype=torch.float64) for v in values]


def test_every_loss_type_has_a_worked_example():
    assert set(BY_HAND) | set(AOT_TYPES) == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", sorted(BY_HAND))
def test_one_pair_by_hand(loss_type):
    options, expected = BY_HAND[loss_type]
    lens = {"chosen_lengths": torch.tensor([LEN_W]), "rejected_lengths": torch.tensor([LEN_L])}
    out = dpo_loss(*one_pair(PI_W, PI_L, REF_W, REF_L), beta=BETA, loss_type=loss_type, **options, **lens)
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(BETA * U_W, rel=1e-12)  # 0.2
    assert out.rejected_rewards.item() == pytest.approx(BETA * U_L, rel=1e-12)  # -0.6


def test_aot_by_hand_matches_sorted_margins_not_pairs():
    # policy margins pi_w - pi_l = (3, 1), reference margins ref_w - ref_l = (1, 2).
    # Sorted: (1, 3) and (1, 2), so the deltas are (0, 1); pair by pair they would be (2, -1).
    pi_w, pi_l, ref_w, ref_l = (torch.tensor(v, dtype=torch.float64) for v in
                                ([-2.0, -6.0], [-5.0, -7.0], [-3.0, -4.0], [-4.0, -6.0]))
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5, loss_type="aot", label_smoothing=0.1)
    expected = [-0.9 * log_sig(0.5 * d) - 0.1 * log_sig(-0.5 * d) for d in (0.0, 1.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_aot_unpaired_by_hand_sorts_each_log_ratio_alone():
    # Same batch: u_w = pi_w - ref_w = (1, -2), u_l = pi_l - ref_l = (-1, -1).
    # sort(u_w) - sort(u_l) = (-2, 1) - (-1, -1) = (-1, 2); pair by pair it would be (2, -1).
    pi_w, pi_l, ref_w, ref_l = (torch.tensor(v, dtype=torch.float64) for v in
                                ([-2.0, -6.0], [-5.0, -7.0], [-3.0, -4.0], [-4.0, -6.0]))
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5, loss_type="aot_unpaired", label_smoothing=0.1)
    expected = [-0.9 * log_sig(0.5 * d) - 0.1 * log_sig(-0.5 * d) for d in (-1.0, 2.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


# f-divergence scores s(u) = f'(e^u), from the docstring; the loss is then the type's formula on
# h = s(u_w) - s(u_l) (here sigmoid and hinge, without label smoothing).
ALPHA = 0.5
SCORES = {
    "forward_kl": lambda u: 1 - math.exp(-u),
    "js_divergence": lambda u: math.log(2) + log_sig(u),
    "alpha_divergence": lambda u: (math.exp((ALPHA - 1) * u) - 1) / (ALPHA - 1),
}


@pytest.mark.parametrize("f_div", sorted(SCORES))
def test_f_divergences_by_hand(f_div):
    s = SCORES[f_div]
    h = s(U_W) - s(U_L)  # forward_kl: e^1.5 - e^-0.5 = 3.875
    options = {"f_divergence_type": f_div, "f_alpha_divergence_coef": ALPHA}
    sigmoid = dpo_loss(*one_pair(PI_W, PI_L, REF_W, REF_L), beta=BETA, **options)
    hinge = dpo_loss(*one_pair(PI_W, PI_L, REF_W, REF_L), beta=BETA, loss_type="hinge", **options)
    assert sigmoid.losses.item() == pytest.approx(-log_sig(BETA * h), rel=1e-12)
    assert hinge.losses.item() == pytest.approx(max(0.0, 1 - BETA * h), rel=1e-12, abs=1e-15)
    assert sigmoid.chosen_rewards.item() == pytest.approx(BETA * U_W)  # the rewards stay beta * u


# --- identities the equations promise ------------------------------------------------

logps = st.floats(min_value=-1e4, max_value=-1e-3, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=10.0)


@given(st.lists(logps, min_size=1, max_size=8), st.lists(logps, min_size=1, max_size=8), betas)
def test_sigmoid_is_log2_when_policy_equals_reference(chosen, rejected, beta):
    n = min(len(chosen), len(rejected))
    win = torch.tensor(chosen[:n], dtype=torch.float64)
    lose = torch.tensor(rejected[:n], dtype=torch.float64)
    out = dpo_loss(win, lose, win.clone(), lose.clone(), beta=beta)
    torch.testing.assert_close(out.losses, torch.full((n,), math.log(2), dtype=torch.float64))
    assert bool((out.chosen_rewards == 0).all()) and bool((out.rejected_rewards == 0).all())


@given(st.floats(-50, 50), st.floats(0.01, 20), betas)
def test_sigmoid_is_decreasing_in_the_reward_margin(margin, step, beta):
    zero = torch.zeros(1, dtype=torch.float64)

    def loss_at(m):
        return dpo_loss(torch.tensor([m], dtype=torch.float64), zero, zero, zero, beta=beta).losses.item()

    assert loss_at(margin + step) <= loss_at(margin)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_rewards_are_exactly_beta_times_the_log_ratios(loss_type):
    pi_w, pi_l, ref_w, ref_l = batch(2)
    beta = 0.37
    out = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, **kwargs_for(loss_type))
    assert torch.equal(out.chosen_rewards, beta * (pi_w - ref_w))
    assert torch.equal(out.rejected_rewards, beta * (pi_l - ref_l))


@given(st.integers(0, 10_000), betas)
def test_swapping_chosen_and_rejected(seed, beta):
    """sigmoid: -log sig(-x) = -log sig(x) + x, so swapping adds beta * h to the loss.
    ipo: (-d - c)^2 - (d - c)^2 = 4 d c with c = 1/(2 beta), so swapping adds 2 d / beta."""
    pi_w, pi_l, ref_w, ref_l = batch(seed)
    h = (pi_w - ref_w) - (pi_l - ref_l)
    straight = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta).losses
    swapped = dpo_loss(pi_l, pi_w, ref_l, ref_w, beta=beta).losses
    torch.testing.assert_close(swapped - straight, beta * h, rtol=1e-9, atol=1e-9)

    lens = lengths()
    d = (pi_w - ref_w) / lens["chosen_lengths"] - (pi_l - ref_l) / lens["rejected_lengths"]
    ipo = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, loss_type="ipo", **lens).losses
    ipo_swapped = dpo_loss(
        pi_l, pi_w, ref_l, ref_w, beta=beta, loss_type="ipo",
        chosen_lengths=lens["rejected_lengths"], rejected_lengths=lens["chosen_lengths"],
    ).losses
    torch.testing.assert_close(ipo_swapped - ipo, 2 * d / beta, rtol=1e-9, atol=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
    """rDPO's point: its expectation over flips with probability eps is the clean sigmoid loss."""
    pi_w, pi_l, ref_w, ref_l = batch(3, scale=5.0)
    eps, beta = 0.2, 0.5
    kept = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta, loss_type="robust", label_smoothing=eps).losses
    flipped = dpo_loss(pi_l, pi_w, ref_l, ref_w, beta=beta, loss_type="robust", label_smoothing=eps).losses
    clean = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=beta).losses
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


def test_alpha_divergence_at_alpha_one_is_reverse_kl():
    args = batch(4)
    a = dpo_loss(*args, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0).losses
    b = dpo_loss(*args).losses
    assert torch.equal(a, b)


def test_aot_sorts_the_batch():
    """AOT's loss is invariant to permuting the pairs: it matches quantiles, not pairs."""
    args = batch(5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    a = dpo_loss(*args, loss_type="aot").losses
    b = dpo_loss(*(t[perm] for t in args), loss_type="aot").losses
    assert torch.equal(a, b)


# --- gradients ---------------------------------------------------------------------


VARIANTS = [(t, "reverse_kl") for t in DPO_LOSS_TYPES] + [
    (t, f) for f in F_DIVERGENCES[1:] for t in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
]


@pytest.mark.parametrize(("loss_type", "f_div"), VARIANTS)
def test_gradcheck_float64(loss_type, f_div):
    inputs = [t.requires_grad_(True) for t in batch(6, n=4, scale=3.0)]
    kw = kwargs_for(loss_type, n=4)

    def fn(*x):
        return dpo_loss(*x, beta=0.7, f_divergence_type=f_div, **kw).losses

    # hinge has a kink at 1 - beta h = 0; random inputs land on it with probability 0.
    assert torch.autograd.gradcheck(fn, inputs)


@given(
    st.sampled_from(DPO_LOSS_TYPES),
    st.sampled_from([torch.float32, torch.bfloat16]),
    st.lists(st.floats(-1e4, -1e-6), min_size=4, max_size=4),
    betas,
)
def test_extreme_inputs_give_finite_losses_and_grads(loss_type, dtype, values, beta):
    inputs = [torch.tensor([v, v / 3, -1e4, -1e-6], dtype=dtype).requires_grad_(True) for v in values]
    out = dpo_loss(*inputs, beta=beta, **kwargs_for(loss_type, n=4))
    out.losses.sum().backward()
    assert bool(torch.isfinite(out.losses).all()), out.losses
    assert all(bool(torch.isfinite(t.grad).all()) for t in inputs)


def test_discopop_is_finite_where_the_naive_product_overflows():
    """exp(-x) overflows to inf where sigmoid(x / tau) underflows to 0; alignlib never forms that product."""
    pi_w = torch.tensor([-1e4], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, dtype=torch.float64)
    out = dpo_loss(pi_w, zeros, zeros, zeros, beta=1.0, loss_type="discopop")
    out.losses.sum().backward()
    assert math.isfinite(out.losses.item()) and math.isfinite(pi_w.grad.item())
    assert out.losses.item() == pytest.approx(1e4, rel=1e-6)  # -log sig(-1e4) = 1e4


# --- bad input ----------------------------------------------------------------------


def test_errors_name_what_was_wrong():
    win, lose, rw, rl = batch(7)
    with pytest.raises(ValueError, match="policy_rejected_logps has shape \\(5,\\) but policy_chosen_logps"):
        dpo_loss(win, lose[:5], rw, rl)
    with pytest.raises(ValueError, match="ref_chosen_logps must have shape \\(B,\\)"):
        dpo_loss(win, lose, rw.reshape(2, 3), rl)
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(*(t[:0] for t in (win, lose, rw, rl)))
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0"):
        dpo_loss(win, lose, rw, rl, beta=0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(win, lose, rw, rl, beta=-0.1)
    with pytest.raises(ValueError, match="unknown loss_type 'sigmod'; known: sigmoid, hinge, ipo"):
        dpo_loss(win, lose, rw, rl, loss_type="sigmod")
    with pytest.raises(ValueError, match="unknown f_divergence_type"):
        dpo_loss(win, lose, rw, rl, f_divergence_type="kl")
    with pytest.raises(ValueError, match="pass chosen_lengths"):
        dpo_loss(win, lose, rw, rl, loss_type="ipo")
    with pytest.raises(ValueError, match="pass rejected_lengths"):
        dpo_loss(win, lose, rw, rl, loss_type="sigmoid_norm", chosen_lengths=torch.ones(6))
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        dpo_loss(win, lose, rw, rl, loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(6))
    with pytest.raises(ValueError, match="non-finite"):
        dpo_loss(win, lose, rw, torch.full((6,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        dpo_loss(win.long(), lose, rw, rl)
    with pytest.raises(ValueError, match="only defined for loss types built on the score"):
        dpo_loss(win, lose, rw, rl, loss_type="bco_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(win, lose, rw, rl, loss_type="discopop", discopop_tau=0.0)


@pytest.mark.parametrize(
    ("loss_type", "eps", "match"),
    [
        ("robust", 0.5, "\\[0, 0.5\\)"),
        ("robust", -0.1, "\\[0, 0.5\\)"),
        ("sigmoid", 0.7, "\\[0, 0.5\\)"),
        ("exo_pair", 0.0, "EXO paper uses 1e-3"),
        ("hinge", 0.1, "has no effect on loss_type='hinge'"),
        ("ipo", 0.1, "has no effect"),
    ],
)
def test_label_smoothing_range(loss_type, eps, match):
    args = batch(8)
    with pytest.raises(ValueError, match=match):
        dpo_loss(*args, loss_type=loss_type, label_smoothing=eps, **lengths())
