"""reward_ranking_loss: Bradley-Terry with Llama-2's margin and the centering term."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import reward_ranking_loss


def test_by_hand():
    out = reward_ranking_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=0.5, center_rewards_coefficient=0.01)
    expected = -math.log(1 / (1 + math.exp(-0.5))) + 0.01 * 9.0
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)


@given(st.floats(-30, 30), st.floats(-30, 30), st.floats(0, 5))
def test_a_margin_raises_the_loss(r_w, r_l, m):
    win, lose = torch.tensor([r_w], dtype=torch.float64), torch.tensor([r_l], dtype=torch.float64)
    assert reward_ranking_loss(win, lose, margin=m).losses.item() >= reward_ranking_loss(win, lose).losses.item()


@given(st.floats(-30, 30), st.floats(-30, 30))
def test_loss_depends_on_the_difference_only_without_centering(r_w, r_l):
    win, lose = torch.tensor([r_w], dtype=torch.float64), torch.tensor([r_l], dtype=torch.float64)
    shifted = reward_ranking_loss(win + 7.0, lose + 7.0).losses
    torch.testing.assert_close(shifted, reward_ranking_loss(win, lose).losses)


def test_gradcheck_float64():
    x = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    margin = torch.rand(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: reward_ranking_loss(a, b, margin=margin, center_rewards_coefficient=0.1).losses, x
    )


def test_errors():
    win, lose = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="margin must be a number or have shape \\(4,\\)"):
        reward_ranking_loss(win, lose, margin=torch.ones(3))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        reward_ranking_loss(win, lose, center_rewards_coefficient=-0.1)
    with pytest.raises(ValueError, match="chosen_rewards must have shape \\(B,\\)"):
        reward_ranking_loss(win.unsqueeze(-1), lose)


def test_center_rewards_coefficient_follows_the_coefficient_rule():
    win, lose = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="center_rewards_coefficient must be 0 or at least 1.18e-38"):
        reward_ranking_loss(win, lose, center_rewards_coefficient=1e-40)
    with pytest.raises(ValueError, match="center_rewards_coefficient must be at most 1e\\+06"):
        reward_ranking_loss(win, lose, center_rewards_coefficient=2e6)
    zero = reward_ranking_loss(win, lose, center_rewards_coefficient=0.0)
    assert torch.equal(zero.losses, reward_ranking_loss(win, lose).losses)
