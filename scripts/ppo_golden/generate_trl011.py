"""Golden values from TRL 0.11.4's classic PPOTrainer, for tests/losses/test_ppo_golden.py.

TRL 1.x has no classic PPO. 0.11.4 is the last release whose PPOTrainer has the
methods alignlib's PPO pieces mirror: compute_rewards (KL-shaped rewards),
compute_advantages (GAE + whitening), loss (clipped policy and value losses and
their stats), plus masked_whiten and the KL controllers. This script runs those
methods, unbound, on a stub `self` that carries only the config they read, over
fixed random inputs with padding, and writes inputs and outputs to JSON.

Run it through make_golden.sh (it builds the pinned virtual environment):

    bash scripts/ppo_golden/make_golden.sh

Do not import alignlib here: the golden file must come from TRL alone.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.core import masked_whiten
from trl.trainer.ppo_trainer import PPOTrainer
from trl.trainer.utils import AdaptiveKLController, FixedKLController

assert trl.__version__ == "0.11.4", trl.__version__
torch.set_default_dtype(torch.float64)


def as_list(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double().tolist()
    if isinstance(x, np.ndarray):
        return x.astype(np.float64).tolist()
    return float(x)


def make_inputs(seed: int = 0, right_padding: bool = True, batch: int = 6, length: int = 9, vocab: int = 11):
    """Responses of different lengths inside a (batch, length) window, zeros of the mask on both sides.

    Classic TRL's mask is 0 on the query part and on right padding; padding positions
    hold arbitrary numbers, which must not leak into anything.

    With right_padding=False every response runs to the end of the window. TRL's
    whiten_rewards=True needs that: masked_whiten leaves (0 - mean) / std + mean on
    padding, and GAE then carries those values from right padding back into the
    response's advantages (alignlib zeroes them).
    """
    rng = np.random.default_rng(seed)
    starts = [0, 0, 1, 2, 0, 3]
    ends = [9, 5, 9, 4, 1, 8] if right_padding else [length] * batch  # exclusive; row 4 may be 1 token
    mask = np.zeros((batch, length))
    for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
        mask[row, start:end] = 1
    logprobs = -rng.gamma(2.0, 1.0, (batch, length))
    ref_logprobs = logprobs + rng.normal(0, 0.3, (batch, length))
    return {
        "mask": torch.tensor(mask),
        "scores": torch.tensor(rng.normal(0.5, 1.5, batch)),
        "logprobs": torch.tensor(logprobs),
        "ref_logprobs": torch.tensor(ref_logprobs),
        "values": torch.tensor(rng.normal(0, 1, (batch, length))),
        # the policy and value head after some updates: the new log-probs move by up to
        # +-0.4 (so some ratios leave [0.8, 1.2]), the value predictions by up to +-0.5
        "new_logprobs": torch.tensor(logprobs + rng.uniform(-0.4, 0.4, (batch, length))),
        "vpreds_offset": torch.tensor(rng.uniform(-0.5, 0.5, (batch, length))),
        "logits": torch.tensor(rng.normal(0, 2, (batch, length, vocab))),
    }


def stub_trainer(**config) -> SimpleNamespace:
    defaults = dict(
        kl_penalty="kl",
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        ratio_threshold=10.0,
    )
    defaults.update(config)
    stub = SimpleNamespace(config=SimpleNamespace(**defaults), kl_ctl=SimpleNamespace(value=config.get("kl_coef", 0.2)))
    stub._kl_penalty = lambda logprob, ref_logprob: PPOTrainer._kl_penalty(stub, logprob, ref_logprob)
    return stub


INPUT_SETS = {"padded": make_inputs(seed=0), "no_right_padding": make_inputs(seed=1, right_padding=False)}


def ppo_step(**config) -> dict:
    """One classic PPO step on fixed tensors: rewards -> advantages -> loss (with gradients)."""
    t = stub_trainer(**config)
    inputs = INPUT_SETS[config["inputs"]]
    mask = inputs["mask"]
    rewards, non_score, kls = PPOTrainer.compute_rewards(
        t, inputs["scores"], inputs["logprobs"], inputs["ref_logprobs"], mask
    )
    values, advantages, returns = PPOTrainer.compute_advantages(t, inputs["values"], rewards, mask)
    new_logprobs = inputs["new_logprobs"].clone().requires_grad_(True)
    vpreds = (values + inputs["vpreds_offset"]).detach().requires_grad_(True)
    pg_loss, vf_loss_scaled, stats = PPOTrainer.loss(
        t, inputs["logprobs"], values, inputs["logits"], vpreds, new_logprobs, mask, advantages, returns
    )
    total = pg_loss + vf_loss_scaled
    grad_logprobs, grad_vpreds = torch.autograd.grad(total, [new_logprobs, vpreds])
    keep = ("loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/approxkl", "policy/policykl",
            "policy/clipfrac", "policy/advantages_mean", "returns/mean", "returns/var", "val/vpred", "val/error",
            "val/clipfrac", "val/mean", "val/var")
    return {
        "config": config,
        "rewards": as_list(rewards),
        "non_score_rewards": as_list(non_score),
        "kls": as_list(kls),
        "masked_values": as_list(values),
        "advantages": as_list(advantages),
        "returns": as_list(returns),
        "vpreds": as_list(vpreds),
        "pg_loss": as_list(pg_loss),
        "vf_loss_scaled": as_list(vf_loss_scaled),
        "stats": {k: as_list(stats[k]) for k in keep},
        "grad_new_logprobs": as_list(grad_logprobs),
        "grad_vpreds": as_list(grad_vpreds),
    }


def main(out_path: str) -> None:
    inputs = INPUT_SETS["padded"]
    golden = {
        "generator": "scripts/ppo_golden/generate_trl011.py",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "inputs": {name: {k: as_list(v) for k, v in tensors.items()} for name, tensors in INPUT_SETS.items()},
        "steps": [
            ppo_step(inputs="padded", kl_penalty="kl", kl_coef=0.2),
            ppo_step(inputs="padded", kl_penalty="abs", kl_coef=0.05, gamma=0.99, lam=0.9),
            ppo_step(inputs="padded", kl_penalty="mse", kl_coef=0.1, cliprange=0.1, cliprange_value=0.3, vf_coef=0.5),
            ppo_step(inputs="no_right_padding", kl_penalty="kl", kl_coef=0.1, whiten_rewards=True, gamma=0.98),
        ],
    }
    mask = inputs["mask"]
    golden["masked_whiten"] = {
        "shift_mean_true": as_list(masked_whiten(inputs["values"], mask, shift_mean=True)),
        "shift_mean_false": as_list(masked_whiten(inputs["values"], mask, shift_mean=False)),
    }
    adaptive = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    kl_sequence = [1.0, 6.0, 12.0, 30.0, 0.5, 5.9, 6.1]
    trajectory = []
    for kl in kl_sequence:
        adaptive.update(kl, n_steps=256)
        trajectory.append(float(adaptive.value))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, n_steps=256)
    golden["kl_controllers"] = {
        "adaptive": {"init_kl_coef": 0.2, "target": 6.0, "horizon": 10000, "n_steps": 256,
                     "kl_sequence": kl_sequence, "values": trajectory},
        "fixed": {"kl_coef": 0.3, "value_after_update": float(fixed.value)},
    }
    with open(out_path, "w") as f:
        json.dump(golden, f, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(sys.argv[1])
