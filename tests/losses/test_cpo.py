"""cpo_loss and simpo_loss: reference-free preference losses and AlphaPO's reward."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import CPO_LOSS_TYPES, cpo_loss, dpo_loss, simpo_loss


def avg_logps(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return [-0.05 - 3 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(2)]


def test_simpo_by_hand():
    # margin of averaged log-probs 0.5, beta 2, gamma 0.4: -log sigmoid(2 * 0.5 - 0.4)
    out = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), beta=2.0, gamma=0.4)
    assert out.losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.6))), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-2.0)


def test_cpo_simpo_type_is_simpo_loss():
    win, lose = avg_logps(0)
    a = cpo_loss(win, lose, beta=2.5, loss_type="simpo", simpo_gamma=0.8, label_smoothing=0.1)
    b = simpo_loss(win, lose, beta=2.5, gamma=0.8, label_smoothing=0.1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_cpo_sigmoid_is_dpo_with_a_zero_reference():
    win, lose = avg_logps(1)
    zero = torch.zeros_like(win)
    cpo = cpo_loss(win, lose, beta=0.3, label_smoothing=0.05)
    dpo = dpo_loss(win, lose, zero, zero, beta=0.3, label_smoothing=0.05)
    torch.testing.assert_close(cpo.losses, dpo.losses)


@given(st.floats(1e-7, 1e-5))
def test_alphapo_tends_to_log_probability(alpha):
    win, lose = avg_logps(2)
    shaped = simpo_loss(win, lose, alpha=alpha)
    plain = simpo_loss(win, lose)
    torch.testing.assert_close(shaped.chosen_rewards, plain.chosen_rewards, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_gradcheck_float64(loss_type, alpha):
    x = [t.requires_grad_(True) for t in avg_logps(3)]
    assert torch.autograd.gradcheck(lambda a, b: cpo_loss(a, b, beta=0.7, loss_type=loss_type, alpha=alpha).losses, x)


@given(st.sampled_from(CPO_LOSS_TYPES), st.sampled_from([torch.float32, torch.bfloat16]), st.floats(-1e4, -1e-6))
def test_extreme_inputs_are_finite(loss_type, dtype, value):
    win = torch.tensor([value, -1e4, -1e-6], dtype=dtype, requires_grad=True)
    lose = torch.tensor([-1e-6, value, -1e4], dtype=dtype, requires_grad=True)
    out = cpo_loss(win, lose, beta=0.1, loss_type=loss_type)
    out.losses.sum().backward()
    assert bool(torch.isfinite(out.losses).all()) and bool(torch.isfinite(win.grad).all())


def test_errors():
    win, lose = avg_logps(4)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'; known: sigmoid, hinge, ipo, simpo"):
        cpo_loss(win, lose, loss_type="kto")
    with pytest.raises(ValueError, match="has no effect on loss_type='hinge'"):
        cpo_loss(win, lose, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="\\[0, 0.5\\)"):
        simpo_loss(win, lose, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(win, lose, beta=-2.0)
    with pytest.raises(ValueError, match="gamma must be finite"):
        simpo_loss(win, lose, gamma=float("inf"))
    with pytest.raises(ValueError, match="alpha"):
        cpo_loss(win, lose, alpha=float("nan"))
    with pytest.raises(ValueError, match="policy_rejected_logps has shape"):
        cpo_loss(win, lose[:2])
