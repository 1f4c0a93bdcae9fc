"""orpo_loss: the odds-ratio term, its stability near P = 1 and P = 0, and its errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import orpo_loss
from alignlib.losses.orpo import log1mexp


def test_log_odds_by_hand():
    # P(y_w) = 0.5 -> odds 1; P(y_l) = 0.2 -> odds 0.25; log odds ratio = log 4
    out = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), beta=0.25)
    assert out.log_odds_chosen.item() == pytest.approx(math.log(4), rel=1e-6)
    assert out.log_odds_ratio.item() == pytest.approx(math.log(4 / 5), rel=1e-6)  # log sigmoid(log 4) = log(4/5)
    assert out.losses.item() == pytest.approx(-0.25 * math.log(4 / 5), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.25 * math.log(0.5))


@given(st.floats(-1e4, -1e-12))
def test_log1mexp_keeps_its_digits(x):
    """float32 log1mexp against float64 ground truth computed by the branch that is exact there."""
    ours = log1mexp(torch.tensor([x], dtype=torch.float32)).double().item()
    x64 = torch.tensor([x], dtype=torch.float64)
    truth = torch.log(-torch.expm1(x64)) if x > -0.5 else torch.log1p(-torch.exp(x64))
    assert ours == pytest.approx(truth.item(), rel=2e-6, abs=1e-30)


@given(
    st.lists(st.floats(-1e4, -1e-12), min_size=1, max_size=6),
    st.sampled_from([torch.float32, torch.float64]),
    st.floats(0.01, 10),
)
def test_stable_over_the_whole_range(values, dtype, beta):
    chosen = torch.tensor(values, dtype=dtype, requires_grad=True)
    rejected = torch.tensor(values[::-1], dtype=dtype, requires_grad=True)
    out = orpo_loss(chosen, rejected, beta=beta)
    out.losses.sum().backward()
    for t in (out.losses, out.log_odds_ratio, out.log_odds_chosen, chosen.grad, rejected.grad):
        assert bool(torch.isfinite(t).all())


def test_probability_one_is_clamped_not_nan():
    chosen = torch.tensor([0.0, -0.0], requires_grad=True)
    out = orpo_loss(chosen, torch.tensor([-1.0, -2.0]))
    out.losses.sum().backward()
    assert bool(torch.isfinite(out.losses).all()) and bool(torch.isfinite(chosen.grad).all())


@given(st.floats(-20, -0.01), st.floats(-20, -0.01), st.floats(0.001, 1.0))
def test_loss_falls_as_the_chosen_likelihood_rises(chosen, rejected, step):
    def loss(c):
        return orpo_loss(torch.tensor([c], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64)).losses.item()

    higher = min(chosen + step, -1e-9)
    assert loss(higher) <= loss(chosen)


def test_gradcheck_float64():
    x = [(-3 * torch.rand(5, dtype=torch.float64) - 1e-3).requires_grad_(True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b, beta=0.3).losses, x)


def test_errors():
    good = torch.tensor([-0.5, -1.0])
    with pytest.raises(ValueError, match="policy_chosen_logps must be log-probabilities \\(<= 0\\)"):
        orpo_loss(torch.tensor([0.5, -1.0]), good)
    with pytest.raises(ValueError, match="policy_rejected_logps has shape \\(3,\\)"):
        orpo_loss(good, torch.tensor([-0.5, -1.0, -2.0]))
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(good, good, beta=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        orpo_loss(torch.tensor([-float("inf"), -1.0]), good)
