"""kto_loss as worked examples: each loss type by hand with `math`, what the equations promise,
and the error messages. Parity with TRL's own code is in test_kto_parity.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.losses import KTO_LOSS_TYPES, kto_kl_sum, kto_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


# Three examples: r = log pi - log pi_ref = 1.0 (desirable), -0.5 (undesirable), 2.0 (desirable).
# Two mismatched pairs with log-ratios 0.75 and 0.25: z0 = max(0, 0.5) = 0.5.
POLICY, REF = f64(-3.0, -6.5, -2.0), f64(-4.0, -6.0, -4.0)
DESIRABLE = torch.tensor([True, False, True])
KL_POLICY, KL_REF = f64(-7.25, -9.0), f64(-8.0, -9.25)
R, Z0, BETA = (1.0, -0.5, 2.0), 0.5, 0.8
L_D, L_U = 1.33, 0.75

BY_HAND = {
    # lambda_D (1 - sig(beta (r - z0))) for desirable rows, lambda_U (1 - sig(beta (z0 - r))) for undesirable
    "kto": [L_D * (1 - sig(BETA * (R[0] - Z0))), L_U * (1 - sig(BETA * (Z0 - R[1]))),
            L_D * (1 - sig(BETA * (R[2] - Z0)))],
    # no reference point: lambda_D (1 - sig(beta r)), lambda_U sig(beta r)
    "apo_zero_unpaired": [L_D * (1 - sig(BETA * R[0])), L_U * sig(BETA * R[1]), L_D * (1 - sig(BETA * R[2]))],
}


def test_every_loss_type_has_a_worked_example():
    assert set(BY_HAND) == set(KTO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_by_hand(loss_type):
    kl_logps = (KL_POLICY, KL_REF) if loss_type == "kto" else ()
    out = kto_loss(POLICY, REF, DESIRABLE, *kl_logps, beta=BETA, desirable_weight=L_D, undesirable_weight=L_U,
                   loss_type=loss_type)
    assert out.losses.tolist() == pytest.approx(BY_HAND[loss_type], rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([BETA * R[0], BETA * R[2]], rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([BETA * R[1]], rel=1e-12)
    assert out.kl.item() == pytest.approx(Z0 if loss_type == "kto" else 0.0, abs=1e-15)


def test_z0_given_directly_is_the_same_as_from_the_kl_logps():
    from_logps = kto_loss(POLICY, REF, DESIRABLE, KL_POLICY, KL_REF, beta=BETA)
    given_z0 = kto_loss(POLICY, REF, DESIRABLE, kl=Z0, beta=BETA)
    as_tensor = kto_loss(POLICY, REF, DESIRABLE, kl=torch.tensor(Z0, dtype=torch.float64), beta=BETA)
    assert torch.equal(from_logps.losses, given_z0.losses) and torch.equal(given_z0.losses, as_tensor.losses)


def test_z0_is_clamped_at_zero():
    # mismatched log-ratios -1 and -3: mean -2, so z0 = 0 and the loss is that of z0 = 0
    out = kto_loss(POLICY, REF, DESIRABLE, f64(-5.0, -6.0), f64(-4.0, -3.0), beta=BETA)
    assert out.kl.item() == 0.0
    assert out.losses.tolist() == pytest.approx([1 - sig(BETA * R[0]), 1 - sig(-BETA * R[1]),
                                                 1 - sig(BETA * R[2])], rel=1e-12)
    assert kto_loss(POLICY, REF, DESIRABLE, kl=-2.0, beta=BETA).kl.item() == 0.0


def test_no_kl_term_means_z0_zero():
    without = kto_loss(POLICY, REF, DESIRABLE, beta=BETA)
    assert torch.equal(without.losses, kto_loss(POLICY, REF, DESIRABLE, kl=0.0, beta=BETA).losses)


def test_policy_equal_to_reference_gives_half_the_weights():
    """r = 0 and z0 = 0: every example's value is lambda sig(0) = lambda / 2, so the loss is lambda / 2."""
    logps = f64(-3.0, -1.0, -8.0, -2.0)
    desirable = torch.tensor([True, False, False, True])
    out = kto_loss(logps, logps.clone(), desirable, logps, logps.clone(), desirable_weight=2.0,
                   undesirable_weight=0.5)
    assert out.losses.tolist() == [1.0, 0.25, 0.25, 1.0]


def test_output_is_in_input_order_and_unpacks():
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(POLICY, REF, DESIRABLE, KL_POLICY, KL_REF)
    assert losses.shape == (3,) and chosen_rewards.shape == (2,) and rejected_rewards.shape == (1,)
    assert kl.shape == ()


def test_no_gradient_reaches_the_kl_logps_or_the_rewards():
    policy, kl_policy = POLICY.clone().requires_grad_(True), KL_POLICY.clone().requires_grad_(True)
    out = kto_loss(policy, REF, DESIRABLE, kl_policy, KL_REF, beta=BETA)
    assert not out.chosen_rewards.requires_grad and not out.kl.requires_grad
    grad_policy, grad_kl = torch.autograd.grad(out.losses.sum(), [policy, kl_policy], allow_unused=True)
    assert grad_kl is None
    # d/dr [lambda sig(-beta (r - z0))] = -beta lambda s (1 - s), s = sig(beta (r - z0)); for undesirable +beta ...
    s0, s1 = sig(BETA * (R[0] - Z0)), sig(BETA * (Z0 - R[1]))
    assert grad_policy[0].item() == pytest.approx(-BETA * s0 * (1 - s0), rel=1e-12)
    assert grad_policy[1].item() == pytest.approx(BETA * s1 * (1 - s1), rel=1e-12)


@pytest.mark.parametrize("label", [True, False])
def test_a_batch_of_one_label_has_no_nan(label):
    desirable = torch.full((3,), label)
    out = kto_loss(POLICY, REF, desirable, KL_POLICY, KL_REF)
    assert bool(out.losses.isfinite().all())
    assert (out.chosen_rewards if label else out.rejected_rewards).numel() == 3
    assert (out.rejected_rewards if label else out.chosen_rewards).numel() == 0


def test_kl_sums_add_up_over_micro_batches():
    policy_kl, ref_kl = f64(-1.0, -2.0, -3.0, -4.0, -5.0), f64(-1.5, -1.0, -3.5, -6.0, -4.0)
    whole = kto_kl_sum(policy_kl, ref_kl)
    parts = [kto_kl_sum(policy_kl[s], ref_kl[s]) for s in (slice(0, 2), slice(2, 5))]
    assert whole.total.item() == pytest.approx(0.5 - 1.0 + 0.5 + 2.0 - 1.0, rel=1e-12)
    assert sum(p.total for p in parts).item() == pytest.approx(whole.total.item(), rel=1e-12)
    assert sum(p.count for p in parts).item() == whole.count.item() == 5


def test_low_precision_inputs_compute_and_return_float32():
    bf16 = [t.to(torch.bfloat16) for t in (POLICY, REF, KL_POLICY, KL_REF)]
    out = kto_loss(bf16[0], bf16[1], DESIRABLE, bf16[2], bf16[3])
    assert out.losses.dtype == out.kl.dtype == torch.float32
    as_f32 = kto_loss(*(t.float() for t in bf16[:2]), DESIRABLE, *(t.float() for t in bf16[2:]))
    assert torch.equal(out.losses, as_f32.losses)


@given(st.lists(st.tuples(st.floats(-1e12, 0), st.floats(-1e12, 0), st.booleans()), min_size=1, max_size=6),
       st.sampled_from([1e-6, 0.1, 1.0, 1e6]), st.sampled_from(KTO_LOSS_TYPES),
       st.sampled_from([-1e12, -30.0, 0.0, 3.0, 1e12]))
def test_extremes_give_no_nan(rows, beta, loss_type, z0):
    policy, ref = f64(*[r[0] for r in rows]), f64(*[r[1] for r in rows])
    policy.requires_grad_(True)
    desirable = torch.tensor([r[2] for r in rows])
    out = kto_loss(policy, ref, desirable, beta=beta, loss_type=loss_type, kl=z0 if loss_type == "kto" else None)
    out.losses.sum().backward()
    assert bool(out.losses.isfinite().all()) and bool((out.losses >= 0).all())
    assert bool(policy.grad.isfinite().all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ref_logps": f64(-1.0, -2.0)}, r"ref_logps has shape \(2,\) but policy_logps has shape \(3,\)"),
        ({"policy_logps": f64(-1.0, float("nan"), -2.0)}, "policy_logps contains non-finite"),
        ({"desirable": torch.tensor([True, False])}, r"desirable must have shape \(3,\) like policy_logps"),
        ({"desirable": torch.tensor([0, 2, 1])}, "desirable must hold only 0/1"),
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"desirable_weight": -1.0}, "desirable_weight"),
        ({"undesirable_weight": 2e6}, "undesirable_weight must be at most"),
        ({"loss_type": "bco"}, "unknown loss_type 'bco'; known: kto, apo_zero_unpaired"),
        ({"ref_kl_logps": None}, "ref_kl_logps is None"),
        ({"kl": 0.3}, "pass either kl"),
        ({"loss_type": "apo_zero_unpaired"}, "apo_zero_unpaired' has no reference point; policy_kl_logps"),
        ({"policy_kl_logps": None, "ref_kl_logps": None, "kl": float("inf")}, "kl must be finite"),
        ({"policy_kl_logps": None, "ref_kl_logps": None, "kl": torch.ones(2)}, "kl must be a real number"),
        ({"policy_kl_logps": f64(-1.0), "ref_kl_logps": f64(-1.0, -2.0)}, "ref_kl_logps has shape"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    call = {"policy_logps": POLICY, "ref_logps": REF, "desirable": DESIRABLE, "policy_kl_logps": KL_POLICY,
            "ref_kl_logps": KL_REF, **kwargs}
    with pytest.raises(ValueError, match=message):
        kto_loss(**call)
