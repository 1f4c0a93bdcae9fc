"""The PPO-with-KL pieces as worked examples: estimators, reward shaping, GAE, whitening, the clipped losses."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    kl_penalty,
    kl_shaped_rewards,
    penalize_missing_eos,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)

MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)


def rand(seed, shape=(3, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- KL estimators ----------------------------------------------------------------------


@given(st.floats(-20, 0), st.floats(-20, 0))
def test_estimators_relate_as_their_formulas_say(logp, ref):
    lp, rp = torch.tensor([logp], dtype=torch.float64), torch.tensor([ref], dtype=torch.float64)
    k1 = kl_penalty(lp, rp, "k1")
    assert torch.equal(kl_penalty(lp, rp, "k2"), 0.5 * k1**2)
    assert torch.equal(kl_penalty(lp, rp, "mse"), kl_penalty(lp, rp, "k2"))
    assert torch.equal(kl_penalty(lp, rp, "abs"), k1.abs())
    assert kl_penalty(lp, rp, "k3").item() >= 0  # (r - 1) - log r >= 0 for r > 0


def test_k1_and_k3_are_unbiased_estimates_of_the_kl():
    """Sample tokens from pi; the mean of k1 and of k3 both approach KL(pi || pi_ref)."""
    g = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    ref = torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum()
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(pi.log()[tokens], ref.log()[tokens], estimator).mean()
        assert estimate.item() == pytest.approx(exact.item(), abs=5e-3)


# --- reward shaping ------------------------------------------------------------------------


def test_score_lands_on_the_last_response_token():
    scores = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    out = kl_shaped_rewards(scores, zeros, zeros, MASK, kl_coef=0.1)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[0, 3], expected[1, 1], expected[2, 2] = 1.0, 2.0, 3.0
    assert torch.equal(out.rewards, expected)


def test_padding_never_leaks_even_if_it_holds_inf_or_nan():
    logprobs, ref = rand(1), rand(2)
    dirty_logprobs = torch.where(MASK, logprobs, float("nan"))
    dirty_ref = torch.where(MASK, ref, float("inf"))
    scores = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    clean = kl_shaped_rewards(scores, logprobs, ref, MASK, kl_coef=0.2, estimator="k3")
    dirty = kl_shaped_rewards(scores, dirty_logprobs, dirty_ref, MASK, kl_coef=0.2, estimator="k3")
    assert torch.equal(clean.rewards, dirty.rewards)
    values = rand(3)
    a = gae_advantages(clean.rewards, values, MASK)
    b = gae_advantages(clean.rewards, torch.where(MASK, values, 1e6), MASK)
    assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    out = penalize_missing_eos(scores, torch.tensor([True, False, True]), 1.5)
    assert out.tolist() == [1.0, 0.5, 3.0]
    assert torch.equal(penalize_missing_eos(scores, torch.tensor([True, False, True]), None), scores)


# --- GAE and whitening ------------------------------------------------------------------


def test_gae_with_gamma_and_lambda_one_gives_rewards_to_go():
    rewards, values = rand(4), rand(5)
    out = gae_advantages(rewards, values, MASK, gamma=1.0, lam=1.0)
    masked_rewards = torch.where(MASK, rewards, 0.0)
    rewards_to_go = masked_rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(out.returns, torch.where(MASK, rewards_to_go, 0.0))


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards, values = rand(6), rand(7)
    out = gae_advantages(rewards, values, MASK, gamma=0.9, lam=0.0)
    v = torch.where(MASK, values, 0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    td = torch.where(MASK, rewards, 0.0) + 0.9 * next_v - v
    torch.testing.assert_close(out.advantages, torch.where(MASK, td, 0.0))


def test_whiten_conventions():
    x = rand(8) * 3 + 5
    w = whiten(x, MASK)
    assert w[MASK].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert w[MASK].var().item() == pytest.approx(1.0, rel=1e-6)  # unbiased, as TRL
    kept = whiten(x, MASK, shift_mean=False)
    assert kept[MASK].mean().item() == pytest.approx(x[MASK].mean().item())
    assert bool((w[~MASK] == 0).all())


# --- the clipped losses -------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    logprobs, advantages = rand(9), rand(10)
    out = ppo_policy_loss(logprobs, logprobs.clone(), advantages, MASK)
    assert out.loss.item() == pytest.approx(-advantages[MASK].mean().item())
    assert out.clipfrac.item() == 0 and out.approx_kl.item() == 0


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    advantage = torch.ones(1, 1, dtype=torch.float64)
    inside = torch.full((1, 1), 0.1, dtype=torch.float64, requires_grad=True)  # ratio 1.105
    outside = torch.full((1, 1), 0.5, dtype=torch.float64, requires_grad=True)  # ratio 1.65 > 1.2
    ppo_policy_loss(inside, old, advantage, mask).loss.backward()
    out = ppo_policy_loss(outside, old, advantage, mask)
    out.loss.backward()
    assert inside.grad.item() == pytest.approx(-math.exp(0.1))
    assert outside.grad.item() == 0 and out.clipfrac.item() == 1


def test_value_loss_clips_around_the_old_value():
    old = torch.zeros(1, 2, dtype=torch.float64)
    returns = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    out = ppo_value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), cliprange_value=0.2)
    # token 0: unclipped (0.5-1)^2 = 0.25, clipped (0.2-1)^2 = 0.64 -> 0.64; token 1: 2.25 vs 1.44 -> 2.25
    assert out.per_token_losses[0].tolist() == pytest.approx([0.32, 1.125])
    assert out.clipfrac.item() == 0.5


def test_ppo_loss_gradcheck_and_entropy_bonus():
    old_logprobs, advantages, old_values, returns = rand(11), rand(12), rand(13), rand(14)
    logprobs = (old_logprobs + 0.05 * rand(15)).requires_grad_(True)
    values = (old_values + 0.05 * rand(16)).requires_grad_(True)
    entropy = rand(17).abs().requires_grad_(True)

    def fn(lp, v, h):
        return ppo_loss(lp, old_logprobs, advantages, v, old_values, returns, MASK, entropy=h, entropy_coef=0.01).loss

    assert torch.autograd.gradcheck(fn, (logprobs, values, entropy))
    out = ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, MASK, vf_coef=0.5)
    assert out.loss.item() == pytest.approx(out.policy_loss.item() + 0.5 * out.value_loss.item())


# --- KL controllers ------------------------------------------------------------------------


def test_adaptive_controller_moves_towards_the_target():
    c = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    c.update(12.0, n_steps=100)  # KL double the target: error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    c.update(3.0, n_steps=100)  # half the target: error -0.5, clipped to -0.2
    assert c.value == pytest.approx(0.1 * 1.02 * 0.98)
    f = FixedKLController(0.05)
    f.update(100.0, 100)
    assert f.value == 0.05


# --- bad input -------------------------------------------------------------------------------


def test_errors():
    x = rand(18)
    scores = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown estimator 'k4'; known: k1, k2, k3, abs, mse"):
        kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="mask rows \\[1\\] have no response token"):
        kl_shaped_rewards(scores, x, x, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]), kl_coef=0.1)
    with pytest.raises(ValueError, match="scores must have shape \\(3,\\)"):
        kl_shaped_rewards(torch.ones(2, dtype=torch.float64), x, x, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="scores contains non-finite"):
        kl_shaped_rewards(torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), x, x, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        kl_shaped_rewards(scores, x, x, MASK, kl_coef=-1.0)
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        kl_shaped_rewards(scores, x, x[:, :3], MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="mask must have shape \\(3, 4\\)"):
        gae_advantages(x, x, MASK[:, :3])
    with pytest.raises(ValueError, match="lam must lie in \\[0, 1\\]"):
        gae_advantages(x, x, MASK, lam=1.5)
    with pytest.raises(ValueError, match="logprobs has non-finite values on response tokens"):
        ppo_policy_loss(torch.where(MASK, float("inf"), 0.0).double(), x, x, MASK)
    with pytest.raises(ValueError, match="whiten needs at least 2"):
        whiten(x, torch.zeros(3, 4, dtype=torch.bool).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(True)))
    with pytest.raises(ValueError, match="cliprange"):
        ppo_policy_loss(x, x, x, MASK, cliprange=0)
    with pytest.raises(ValueError, match="entropy_coef is non-zero"):
        ppo_loss(x, x, x, x, x, x, MASK, entropy_coef=0.1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0, horizon=10)


SUBNORMAL = 1e-40  # below float32's smallest normal number: 0 (or a subnormal) in float32 arithmetic


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x, m: kl_shaped_rewards(x[:, 0], x, x, m, kl_coef=SUBNORMAL), "kl_coef"),
        (lambda x, m: whiten(x, m, eps=SUBNORMAL), "eps"),
        (lambda x, m: ppo_policy_loss(x, x, x, m, cliprange=SUBNORMAL), "cliprange"),
        (lambda x, m: ppo_value_loss(x, x, x, m, cliprange_value=SUBNORMAL), "cliprange_value"),
        (lambda x, m: ppo_loss(x, x, x, x, x, x, m, vf_coef=SUBNORMAL), "vf_coef"),
        (lambda x, m: ppo_loss(x, x, x, x, x, x, m, entropy=x, entropy_coef=SUBNORMAL), "entropy_coef"),
        (lambda x, m: AdaptiveKLController(SUBNORMAL, 6.0, 1e4), "init_kl_coef"),
        (lambda x, m: AdaptiveKLController(0.1, SUBNORMAL, 1e4), "target"),
        (lambda x, m: AdaptiveKLController(0.1, 6.0, SUBNORMAL), "horizon"),
        (lambda x, m: FixedKLController(SUBNORMAL), "kl_coef"),
    ],
)
def test_subnormal_coefficients_are_refused_as_for_the_pairwise_losses(call, name):
    with pytest.raises(ValueError, match=f"^{name} must be (0 or )?at least 1.18e-38 .*got 1e-40$"):
        call(rand(19), MASK)


def test_gamma_and_lam_must_be_numbers_in_the_unit_interval():
    x = rand(20)
    with pytest.raises(ValueError, match="^gamma must lie in \\[0, 1\\], got True$"):
        gae_advantages(x, x, MASK, gamma=True)
    with pytest.raises(ValueError, match="^lam must lie in \\[0, 1\\], got nan$"):
        gae_advantages(x, x, MASK, lam=float("nan"))
