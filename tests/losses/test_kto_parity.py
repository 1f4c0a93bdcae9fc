"""kto_loss against TRL 1.16's KTOTrainer._compute_loss, on the same inputs.

One test per case: a variant (loss type and weights, one row of docs/parity.md), an input
set (helpers/parity.py's UNPAIRED_LOGPS: mixed labels, one label only, odd sizes, B=1, a KL
estimate below 0, extremes) and a beta. TRL's method runs on a stub trainer and a stub model
(helpers/trl_reference.trl_kto); the loss, the gradients with respect to the policy's and the
reference's log-probs, and TRL's logged `kl` and reward metrics are compared at float64
round-off. Then the point of kto_kl_sum: TRL estimates z0 per micro-batch, so its loss depends
on how a step is split; alignlib's, given the step's z0, does not.
"""

import pytest
import torch
from helpers import trl_reference as trl
from helpers.parity import BETAS, KTO_VARIANTS, UNPAIRED_LOGPS, Comparison

from alignlib.losses import KTO_LOSS_TYPES, kto_kl_sum, kto_loss


def with_grad(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("beta", BETAS, ids=lambda beta: f"beta={beta}")
@pytest.mark.parametrize("inputs", UNPAIRED_LOGPS, ids=str)
@pytest.mark.parametrize("variant", KTO_VARIANTS, ids=str)
def test_kto_loss_matches_trl(variant, inputs, beta):
    """KTOTrainer._compute_loss on a stub model that returns these log-probs (its KL forward too)."""
    uses_kl = variant.options["loss_type"] == "kto"
    kl_logps = (inputs.policy_kl, inputs.ref_kl) if uses_kl else (None, None)

    leaves = with_grad(inputs.policy, inputs.ref)
    ours = kto_loss(*leaves, inputs.desirable, *kl_logps, beta=beta, **variant.options)
    loss = ours.losses.mean()
    grads = torch.autograd.grad(loss, leaves)

    trl_loss, trl_metrics, trl_grads = trl.trl_kto(
        inputs.policy, inputs.ref, inputs.desirable, *kl_logps, beta=beta, **variant.options
    )

    compare = Comparison(variant)
    compare("loss", loss, trl_loss)
    for name, grad, trl_grad in zip(("d/policy_logps", "d/ref_logps"), grads, trl_grads, strict=True):
        compare(name, grad, trl_grad)
    compare("kl", ours.kl, trl_metrics["kl"])
    for rewards, key in ((ours.chosen_rewards, "rewards/chosen"), (ours.rejected_rewards, "rewards/rejected")):
        if key in trl_metrics:  # TRL logs a label's rewards only when the batch has that label
            compare(key, rewards.mean(), trl_metrics[key])
        else:
            assert rewards.numel() == 0
    if "rewards/margins" in trl_metrics:
        compare("rewards/margins", ours.chosen_rewards.mean() - ours.rejected_rewards.mean(),
                trl_metrics["rewards/margins"])
    compare.check()


def test_trl_z0_depends_on_the_split_and_alignlib_given_the_steps_z0_does_not():
    """A step of 16 examples as two micro-batches of 8. TRL's _compute_loss estimates z0 on each
    micro-batch (the Trainer then averages the two losses), so its step loss differs from the
    loss of the whole batch at once. With z0 summed over the micro-batches (kto_kl_sum) and
    passed as kl=, alignlib's micro-batch loss sums equal the whole batch's loss, gradients too."""
    inputs = UNPAIRED_LOGPS[0]  # typical, B = m = 16
    halves = [slice(0, 8), slice(8, 16)]
    beta = 1.0

    whole_loss, _, (whole_grad, _) = trl.trl_kto(inputs.policy, inputs.ref, inputs.desirable, inputs.policy_kl,
                                                  inputs.ref_kl, beta=beta, loss_type="kto")
    split = [trl.trl_kto(inputs.policy[h], inputs.ref[h], inputs.desirable[h], inputs.policy_kl[h],
                         inputs.ref_kl[h], beta=beta, loss_type="kto") for h in halves]
    z0s = [metrics["kl"] for _, metrics, _ in split]
    assert abs(z0s[0] - z0s[1]) > 0.1  # each micro-batch has its own reference point
    trl_split_loss = sum(loss for loss, _, _ in split) / 2
    assert abs(float(trl_split_loss.detach()) - float(whole_loss.detach())) > 1e-4

    pieces = [kto_kl_sum(inputs.policy_kl[h], inputs.ref_kl[h]) for h in halves]
    z0 = sum(p.total for p in pieces) / sum(p.count for p in pieces)
    policy = inputs.policy.clone().requires_grad_(True)
    step_loss = sum(
        kto_loss(policy[h], inputs.ref[h], inputs.desirable[h], kl=z0, beta=beta).losses.sum() for h in halves
    ) / 16
    (grad,) = torch.autograd.grad(step_loss, policy)
    torch.testing.assert_close(step_loss, whole_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_every_loss_type_is_covered():
    assert {v.options["loss_type"] for v in KTO_VARIANTS} == set(KTO_LOSS_TYPES)
    names = {s.name for s in UNPAIRED_LOGPS}
    assert {"desirable only", "undesirable only", "batch 1", "extreme"} <= names
    assert any(s.desirable.all() for s in UNPAIRED_LOGPS) and any((~s.desirable).all() for s in UNPAIRED_LOGPS)
    assert any(len(s.policy) % 2 for s in UNPAIRED_LOGPS)
    # one set whose KL log-ratios average below 0, so TRL and alignlib both clamp z0 at 0
    assert any(float((s.policy_kl - s.ref_kl).mean()) < 0 for s in UNPAIRED_LOGPS)
