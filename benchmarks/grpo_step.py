"""One GRPO update on a fixed rollout: alignlib's online loop vs TRL 1.16's GRPOTrainer.

Both train their own copy of the same seeded Llama (benchmarks/dpo_step.make_policy: built from a
LlamaConfig, no hub) with the same peft LoRA adapter, on the same fixed rollout of B completions
(G per prompt) of up to T tokens after prompts of P: prompts left-padded, completions of random
lengths, rewards fixed (so both get the same group advantages), and the reference's log-probs
(the adapter disabled) computed once, outside the timed region, for the KL term (beta 0.04).
Loss type dapo, one iteration (the ratio is 1: on-policy), gradient clipping at 1.

One timed call = one optimizer step on that rollout, generation and scoring excluded:
- alignlib: `alignlib.rl.update`, the loop's own stage 5 (policy forward with the entropy,
  `grpo_loss`, backward, clipping, the non-finite guard, AdamW), with use_kernels False and True
  (the lm_head fused with the log-softmax: the (B, T, V) logits never exist; no entropy then);
- TRL: the trainer, built once outside the timed region, runs `trainer.training_step(model,
  inputs)` (its compute_loss + backward) with its input preparation (which would generate)
  replaced by the fixed rollout, then the same clipping and its own AdamW step.

Tokens/s (prompt and completion tokens) goes in row.extra["tokens_per_s"] and each
implementation's first-step loss (the same weights and rollout: alignlib's and TRL's must agree)
in row.extra["first_step_loss"]. The baseline is TRL.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from benchmarks.dpo_step import StepSize, _row, _trainable, make_policy, tiny_tokenizer
from benchmarks.harness import Row

BASELINE = "TRL 1.16 GRPOTrainer"
MODE = "optimizer step"
LEARNING_RATE = 1e-5
BETA = 0.04
__all__ = ["BASELINE", "SIZES", "run"]


@dataclass(frozen=True)
class GRPOSize:
    """The model and the rollout: B completions (groups of G) of at most T tokens after prompts of P."""

    hidden: int
    layers: int
    vocab: int
    prompt: int
    completion: int
    completions: int
    group: int
    rank: int = 16

    @property
    def label(self) -> str:
        return (f"h={self.hidden} L={self.layers} V={self.vocab} P={self.prompt} T={self.completion} "
                f"B={self.completions} G={self.group} r={self.rank}")

    @property
    def model(self) -> StepSize:
        return StepSize(hidden=self.hidden, layers=self.layers, vocab=self.vocab, seq=self.prompt + self.completion,
                        pairs=self.completions, rank=self.rank)


SIZES = {
    "tiny": [GRPOSize(hidden=64, layers=2, vocab=512, prompt=16, completion=48, completions=8, group=4, rank=8)],
    "cpu": [GRPOSize(hidden=256, layers=4, vocab=32000, prompt=64, completion=192, completions=8, group=4)],
    "gpu": [GRPOSize(hidden=2048, layers=16, vocab=32000, prompt=256, completion=768, completions=16, group=8)],
}


def make_rollout(size: GRPOSize, device: str):
    """The fixed rollout (alignlib.rollout.Rollout) and its rewards (B,): seeded, identical on every call."""
    from alignlib.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    B, P, T = size.completions, size.prompt, size.completion
    prompt_lengths = torch.randint(P // 2, P + 1, (B // size.group,), generator=g).repeat_interleave(size.group)
    query_mask = torch.arange(P).expand(B, P) >= (P - prompt_lengths).unsqueeze(1)  # left padding
    query_ids = torch.randint(3, size.vocab, (B // size.group, P), generator=g).repeat_interleave(size.group, dim=0)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    response_mask = torch.arange(T).expand(B, T) < lengths.unsqueeze(1)
    response_ids = torch.randint(3, size.vocab, (B, T), generator=g)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rollout = Rollout(query_ids.masked_fill(~query_mask, 0).to(device), query_mask.long().to(device),
                      response_ids.masked_fill(~response_mask, 0).to(device), response_mask.to(device),
                      (lengths < T).to(device))
    return rollout, rewards.to(device)


def _config(size: GRPOSize, use_kernels: bool):
    from alignlib.configs import GRPOConfig

    return GRPOConfig(per_device_train_batch_size=size.completions, num_generations=size.group, beta=BETA,
                      loss_type="dapo", max_completion_length=size.completion, learning_rate=LEARNING_RATE,
                      use_kernels=use_kernels, max_grad_norm=1.0)


def reference_logprobs_of(policy, rollout, size: GRPOSize) -> torch.Tensor:
    """log pi_ref of the rollout's tokens: the policy with its adapter disabled."""
    from alignlib.models import ReferenceForward
    from alignlib.rollout import reference_logprobs

    return reference_logprobs(ReferenceForward("adapter_disabled", policy, disable_adapter=True), rollout,
                              slice(None), 1.0)


# ----------------------------------------------------------------------------------------------
# One step through each library
# ----------------------------------------------------------------------------------------------


def alignlib_step_fn(size: GRPOSize, device: str, *, use_kernels: bool, losses: list[float]) -> Callable[[], None]:
    """alignlib.rl.update on the fixed rollout: the loop's stage 5, as online_step calls it."""
    from alignlib.distributed import SINGLE_PROCESS
    from alignlib.fused_lora import enable_fused_lora
    from alignlib.losses import group_advantages
    from alignlib.rl import update
    from alignlib.rl_objectives import GroupTargets, make_objective
    from alignlib.rollout import PolicyWithValueHead
    from alignlib.training import NonFiniteGuard, make_optimizer

    policy = make_policy(size.model, device)
    if use_kernels:
        enable_fused_lora(policy)
    rollout, rewards = make_rollout(size, device)
    config = _config(size, use_kernels)
    targets = GroupTargets(group_advantages(rewards, size.group, "group"), reference_logprobs_of(policy, rollout, size))
    model = PolicyWithValueHead(policy, value_head=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = SimpleNamespace(objective=make_objective(config), config=config, processes=SINGLE_PROCESS, model=model,
                          trainable=trainable, optimizer=make_optimizer(model, config.optim, lr=config.learning_rate),
                          guard=NonFiniteGuard("stop", verbose=False), device=torch.device(device))

    def step() -> None:
        stats = update(run, rollout, None, targets, step=0)
        losses.append(stats["loss"])

    return step


def trl_step_fn(size: GRPOSize, device: str, output_dir: str, losses: list[float]) -> Callable[[], None]:
    """GRPOTrainer.training_step on the fixed rollout (its generation replaced by it), clipping, its AdamW step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = make_policy(size.model, device)
    rollout, rewards = make_rollout(size, device)
    from alignlib.losses import group_advantages

    inputs = {"prompt_ids": rollout.query_ids, "prompt_mask": rollout.query_mask,
              "completion_ids": rollout.response_ids, "completion_mask": rollout.response_mask.long(),
              "advantages": group_advantages(rewards, size.group, "group"), "old_per_token_logps": None,
              "ref_per_token_logps": reference_logprobs_of(model, rollout, size),
              "num_items_in_batch": rollout.response_mask.sum()}
    lora_config = model.peft_config["default"]
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    base = model.unload()
    args = GRPOConfig(output_dir=output_dir, report_to="none", use_cpu=device == "cpu", bf16=device == "cuda",
                      per_device_train_batch_size=size.completions, num_generations=size.group, beta=BETA,
                      loss_type="dapo", max_completion_length=size.completion, learning_rate=LEARNING_RATE,
                      max_grad_norm=1.0, logging_steps=10**9, save_strategy="no",
                      gradient_checkpointing=False)  # TRL's default is True; alignlib recomputes nothing either
    trainer = GRPOTrainer(model=base, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
                          args=args, peft_config=lora_config, processing_class=tiny_tokenizer(),
                          train_dataset=Dataset.from_list([{"prompt": "Hello world!"}] * size.group))
    params = dict(trainer.model.named_parameters())
    missing = sorted(set(adapter) - set(params))
    if missing:
        raise RuntimeError(f"TRL's LoRA model differs from alignlib's (missing {missing[:3]})")
    with torch.no_grad():
        for name, value in adapter.items():
            params[name].copy_(value)
    trainer._prepare_inputs = lambda generation_batch: generation_batch  # the fixed rollout, not a generation
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop, read by training_step
    optimizer = trainer.create_optimizer()
    trainable = _trainable(trainer.model)

    def step() -> None:
        loss = trainer.training_step(trainer.model, inputs, None)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    return step


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    rows = []
    for size in sizes:
        rollout, _ = make_rollout(size, device)
        tokens = int(rollout.query_mask.sum()) + int(rollout.response_mask.sum())
        with tempfile.TemporaryDirectory() as output_dir:
            impls = {
                "alignlib": lambda losses, size=size: alignlib_step_fn(size, device, use_kernels=False, losses=losses),
                "alignlib use_kernels": lambda losses, size=size: alignlib_step_fn(size, device, use_kernels=True,
                                                                                   losses=losses),
                BASELINE: lambda losses, size=size, output_dir=output_dir: trl_step_fn(size, device, output_dir,
                                                                                      losses),
            }
            measured = []
            for impl, make_step in impls.items():
                row = _row(size.label, impl, make_step, tokens, device, warmup, repeats)
                measured.append(row)
                print(f"  {size.label} | {impl}: {row.median_ms and round(row.median_ms, 1)} ms {row.extra} {row.note}",
                      flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        base = next((r for r in measured if r.impl == BASELINE and "first_step_loss" in r.extra), None)
        for row in measured:
            if base is not None and row is not base and "first_step_loss" in row.extra:
                row.extra["first_step_loss_diff_vs_trl"] = abs(row.extra["first_step_loss"] -
                                                               base.extra["first_step_loss"])
        rows += measured
    return rows
