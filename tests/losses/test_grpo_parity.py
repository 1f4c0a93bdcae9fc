"""grpo_loss, rloo_loss and the group advantages against TRL 1.16's own code, on the same inputs.

- grpo_loss: GRPOTrainer._compute_loss, its per-token log-prob method stubbed to return the
  policy's log-probs (helpers/trl_reference.trl_grpo_loss): every loss type, token- and
  sequence-level importance ratios, beta 0 and 0.04, padded rollouts (helpers/parity.py's
  ROLLOUT_LOGPS). Compared: the loss, the gradients with respect to the log-probs, the old and
  the reference log-probs and the advantages, and TRL's logged `kl` and clip fractions.
- group_advantages / rloo_advantages: GRPOTrainer's and RLOOTrainer's
  _generate_and_score_completions, driven with a stubbed generation and one stubbed reward
  function (no model runs), on rewards with zero-std groups and NaN (unscorable) entries.
- rloo_loss: RLOOTrainer._compute_loss.

Then the gradient-accumulation point: TRL divides grpo's and bnpo's micro-batch losses by the
number of accumulation steps, so with unequal micro-batches its step loss depends on the
split; alignlib's, given the step's normaliser, does not.
"""

import pytest
import torch
from helpers import trl_reference as trl
from helpers.parity import (
    ADVANTAGE_VARIANTS,
    GROUP_EXACT,
    GROUP_REWARDS,
    GRPO_VARIANTS,
    RLOO_VARIANTS,
    ROLLOUT_LOGPS,
    Comparison,
)

from alignlib.losses import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    group_advantages,
    grpo_loss,
    grpo_normalizer,
    kl_penalty,
    rloo_advantages,
    rloo_loss,
)

CLIPPED = ("grpo", "bnpo", "dapo", "dr_grpo")  # the loss types TRL logs clip_ratio/* for


def with_grad(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("inputs", ROLLOUT_LOGPS, ids=str)
@pytest.mark.parametrize("variant", GRPO_VARIANTS, ids=str)
def test_grpo_loss_matches_trl(variant, inputs):
    """GRPOTrainer._compute_loss with the policy's per-token log-probs stubbed in."""
    options = dict(variant.options)
    step_multiple = options.pop("step_multiple", None)  # a dapo normaliser as if the step had more tokens
    normalizer = None if step_multiple is None else float(step_multiple * inputs.mask.sum())
    tensors = [inputs.logprobs, inputs.old_logprobs, inputs.advantages]
    ref = [inputs.ref_logprobs] if options.get("beta", 0.0) > 0 else []

    leaves = with_grad(*tensors, *ref)
    ours = grpo_loss(*leaves[:3], inputs.mask, ref_logprobs=leaves[3] if ref else None, normalizer=normalizer,
                     **options)
    grads = torch.autograd.grad(ours.loss, leaves, allow_unused=True)  # cispo: no gradient reaches old_logprobs

    trl_loss, trl_metrics, trl_grads = trl.trl_grpo_loss(
        *tensors, inputs.mask, ref_logprobs=ref[0] if ref else None, num_items_in_batch=normalizer, **options
    )

    compare = Comparison(variant)
    compare("loss", ours.loss, trl_loss)
    names = ("d/logprobs", "d/old_logprobs", "d/advantages", "d/ref_logprobs")
    for name, leaf, grad, trl_grad in zip(names, leaves, grads, trl_grads, strict=False):
        zero = torch.zeros_like(leaf)
        compare(name, zero if grad is None else grad, zero if trl_grad is None else trl_grad)
    if ref:
        compare("kl", ours.kl, trl_metrics["kl"])
    # TRL logs the clip fractions as float32 means of 0/1 flags; alignlib's are rounded to float32 to compare.
    low, high = ours.clip_low.float(), ours.clip_high.float()
    if options["loss_type"] in CLIPPED:
        compare("clip_ratio/low_mean", low, trl_metrics["clip_ratio/low_mean"])
        compare("clip_ratio/high_mean", high, trl_metrics["clip_ratio/high_mean"])
        compare("clip_ratio/region_mean", (ours.clip_low + ours.clip_high).float(),
                trl_metrics["clip_ratio/region_mean"])
    elif options["loss_type"] == "cispo":
        compare("cispo_clip_ratio", high, trl_metrics["cispo_clip_ratio"])
    compare.check()


def _kl_rollout(batch: int):
    """Rollout and reference log-probs (B, 6) with right padding, for RLOO's KL-in-the-reward."""
    g = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 7, (batch, 1), generator=g)
    lengths[0] = 6  # one full row: TRL pads the completions to the longest
    mask = torch.arange(6).expand(batch, 6) < lengths
    old = -3 * torch.rand(batch, 6, generator=g, dtype=torch.float64)
    return old, old + 0.4 * torch.randn(batch, 6, generator=g, dtype=torch.float64), mask


@pytest.mark.parametrize("rewards", GROUP_REWARDS, ids=str)
@pytest.mark.parametrize("variant", ADVANTAGE_VARIANTS, ids=str)
def test_advantages_match_trl(variant, rewards):
    """GRPOTrainer's / RLOOTrainer's _generate_and_score_completions, generation and reward stubbed."""
    if variant.family == "group_advantages":
        ours = group_advantages(rewards.rewards, rewards.group_size, **variant.options)
        theirs = trl.trl_grpo_advantages(rewards.rewards, rewards.group_size, **variant.options)
    else:
        beta = variant.options.get("beta", 0.0)
        normalize = variant.options["normalize"]
        shaped, kl_inputs = rewards.rewards, {}
        if beta:
            old, ref, mask = _kl_rollout(len(rewards.rewards))
            shaped = rewards.rewards - beta * torch.where(mask, kl_penalty(old, ref, "k1"), 0.0).sum(dim=1)
            kl_inputs = {"beta": beta, "old_logprobs": old, "ref_logprobs": ref, "mask": mask}
        ours = rloo_advantages(shaped, rewards.group_size, normalize=normalize)
        theirs = trl.trl_rloo_advantages(rewards.rewards, rewards.group_size, normalize=normalize, **kl_inputs)
    compare = Comparison(variant)
    compare("advantages", ours, theirs)
    compare.check()


@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_group_advantages_match_trl_exactly_where_trls_std_is_exact(group_size):
    rewards = torch.randn(6 * group_size, generator=torch.Generator().manual_seed(group_size), dtype=torch.float64)
    compare = Comparison(GROUP_EXACT)
    compare("advantages", group_advantages(rewards, group_size, "group"),
            trl.trl_grpo_advantages(rewards, group_size, scale="group"))
    compare.check()


@pytest.mark.parametrize("inputs", [r for r in ROLLOUT_LOGPS if r.advantages.dim() == 1], ids=str)
@pytest.mark.parametrize("variant", RLOO_VARIANTS, ids=str)
def test_rloo_loss_matches_trl(variant, inputs):
    """RLOOTrainer._compute_loss with the policy's per-token log-probs stubbed in."""
    tensors = [inputs.logprobs, inputs.old_logprobs, inputs.advantages]
    leaves = with_grad(*tensors)
    ours = rloo_loss(*leaves[:3], inputs.mask, **variant.options)
    grads = torch.autograd.grad(ours.loss, leaves)

    trl_loss, trl_metrics, trl_grads = trl.trl_rloo_loss(*tensors, inputs.mask, **variant.options)

    compare = Comparison(variant)
    compare("loss", ours.loss, trl_loss)
    for name, grad, trl_grad in zip(("d/logprobs", "d/old_logprobs", "d/advantages"), grads, trl_grads,
                                    strict=True):
        compare(name, grad, trl_grad)
    compare("clip_ratio/low_mean", ours.clip_low.float(), trl_metrics["clip_ratio/low_mean"])
    compare("clip_ratio/high_mean", ours.clip_high.float(), trl_metrics["clip_ratio/high_mean"])
    compare.check()


# --- gradient accumulation: a step split into micro-batches -------------------------------------

STEP = ROLLOUT_LOGPS[0]  # typical: B = 8, lengths 1..12
SPLIT = (slice(0, 3), slice(3, 8))  # unequal micro-batches: 3 and 5 responses, unequal token counts


def _rows(rows):
    return STEP.logprobs[rows], STEP.old_logprobs[rows], STEP.advantages[rows], STEP.mask[rows]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_trl_grpo_and_bnpo_depend_on_the_split_alignlibs_do_not(loss_type):
    """TRL divides each micro-batch's mean by the number of accumulation steps: with micro-batches of
    3 and 5 responses its step loss is not the loss of the 8 at once. alignlib, given the step's
    normaliser (the micro-batches' grpo_normalizer summed), adds up to the whole batch's loss and gradient."""
    whole, _, (whole_grad, *_) = trl.trl_grpo_loss(*_rows(slice(None)), loss_type=loss_type)
    split = sum(trl.trl_grpo_loss(*_rows(rows), loss_type=loss_type, gradient_accumulation_steps=2)[0]
                for rows in SPLIT)
    assert abs(float(split.detach()) - float(whole.detach())) > 1e-3

    normalizer = sum(grpo_normalizer(STEP.mask[rows], loss_type) for rows in SPLIT)
    logprobs = STEP.logprobs.clone().requires_grad_(True)
    ours = sum(grpo_loss(logprobs[rows], *_rows(rows)[1:], loss_type=loss_type, normalizer=normalizer).loss
               for rows in SPLIT)
    (grad,) = torch.autograd.grad(ours, logprobs)
    torch.testing.assert_close(ours, whole.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_trl_dapo_is_split_independent_like_alignlibs():
    """dapo divides by num_items_in_batch, the step's token count: TRL's micro-batch losses (each scaled
    by its accumulation steps over steps_per_generation, here 2 / 2) add up to the whole batch's."""
    tokens = float(STEP.mask.sum())
    whole = trl.trl_grpo_loss(*_rows(slice(None)), loss_type="dapo")[0]
    split = sum(trl.trl_grpo_loss(*_rows(rows), loss_type="dapo", num_items_in_batch=tokens,
                                  gradient_accumulation_steps=2)[0] for rows in SPLIT)
    ours = sum(grpo_loss(*_rows(rows), loss_type="dapo", normalizer=tokens).loss for rows in SPLIT)
    torch.testing.assert_close(split.detach(), whole.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours, whole.detach(), rtol=1e-12, atol=0)


def test_every_loss_type_level_and_case_is_covered():
    assert {v.options["loss_type"] for v in GRPO_VARIANTS} == set(GRPO_LOSS_TYPES)
    assert {v.options["importance_sampling_level"] for v in GRPO_VARIANTS if "importance_sampling_level" in v.options} \
        == set(IMPORTANCE_SAMPLING_LEVELS)
    assert {v.options.get("beta", 0.0) > 0 for v in GRPO_VARIANTS} == {False, True}
    assert all(not bool(r.mask.all()) for r in ROLLOUT_LOGPS if len(r.mask) > 1)  # padded
    assert {v.options["scale"] for v in ADVANTAGE_VARIANTS if "scale" in v.options} == {"group", "batch", "none"}
    assert any(bool(r.rewards.isnan().any()) for r in GROUP_REWARDS)
