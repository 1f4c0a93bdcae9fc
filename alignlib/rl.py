r"""RLHF with PPO and a KL penalty: rollout, score, KL-shaped rewards, GAE, the clipped update.

One PPO step (`ppo_step`; `train_ppo` runs `max_steps` of them):

1. Rollout: `per_device_train_batch_size` prompts, left-padded, sampled from the policy with
   `generate` (temperature, top_k, top_p, up to `response_length` new tokens, stopping at EOS).
   Tokens after the first EOS are padding; the EOS itself belongs to the response.
2. Score: a reward model (a sequence classifier, read at its last token) or a Python callable
   `reward(prompts, responses) -> scores` (alignlib.rewards); then the missing-EOS penalty,
   the baseline, the clip.
3. Without grad: the rollout policy's log-probs, the reference's (the same model with its LoRA
   adapter disabled, or a frozen copy in full fine-tuning), and V(s_t) from a value head (one
   nn.Linear on the policy's last hidden state, trained with it).
4. `compute_targets`: r_t = -kl_coef KL_t (+ the score at the last response token), GAE
   advantages (whitened) and returns.
5. `ppo_update`: `ppo_epochs` passes over shuffled minibatches of `mini_batch_size` rows:
   `ppo_minibatch_loss` (clipped policy loss, clipped value loss, optional entropy bonus),
   gradient clipping, one optimizer step each (on_nonfinite: stop, or skip the update); stop
   early once the approx-KL to the rollout policy exceeds 1.5 x target_kl.
6. The KL controller (adaptive or fixed) updates kl_coef from the batch's mean sequence KL.

All the math is alignlib.losses' (validated against classic TRL's PPOTrainer); this module
only orchestrates. Rollouts and their forward passes are alignlib.rollout's; optimizer,
scheduler, resume and checkpoints alignlib.training's. Dropout stays off throughout (the model
is kept in eval mode), so the rollout log-probs and the first minibatch's log-probs come from
the same function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from alignlib.checkpoint import read_trainer_state, write_text_atomic
from alignlib.configs import ONLINE_OBJECTIVES, PPOConfig
from alignlib.demo import HELDOUT_FILE, TRAIN_FILE, demo_prompts, demo_reward, ppo_embedded_default
from alignlib.losses import (
    AdaptiveKLController,
    FixedKLController,
    PPOLossOutput,
    gae_advantages,
    kl_shaped_rewards,
    masked_mean,
    penalize_missing_eos,
    ppo_loss,
    whiten,
)
from alignlib.metrics import MetricsLogger, Progress
from alignlib.models import ModelConfig, is_quantized, load_causal_lm, load_tokenizer, make_reference
from alignlib.rewards import Reward, RewardFunction, make_reward
from alignlib.rollout import (
    PolicyWithValueHead,
    Rollout,
    as_prompt_list,
    check_prompt_lengths,
    chunks,
    generate_rollout,
    load_prompts,
    policy_forward,
    prompt_batch,
    reference_logprobs,
)
from alignlib.run_folder import (
    OutputDirLock,
    check_output_dir,
    check_restart,
    check_same_run,
    claim_output_dir,
    portable_settings,
    run_record,
)
from alignlib.saved_models import save_model
from alignlib.training import (
    Interrupted,
    NonFiniteGuard,
    SeededSampler,
    checkpoint_to_resume,
    clip_grad_norm,
    finite_or_poisoned,
    make_optimizer,
    make_scheduler,
    resume_requested,
    resume_training,
    save_training_checkpoint,
    set_seed,
    step_scheduler,
)

__all__ = [
    "OBJECTIVES",
    "PPOConfig",
    "PPORun",
    "PPOTargets",
    "compute_targets",
    "ppo_minibatch_loss",
    "ppo_step",
    "ppo_update",
    "train_ppo",
]

OBJECTIVES = ONLINE_OBJECTIVES


@dataclass
class PPORun:
    """Everything a PPO step touches, built once by `setup_ppo`."""

    config: PPOConfig
    model_config: ModelConfig  # the embedded default's demo model filled in
    model: PolicyWithValueHead
    tokenizer: Any
    reference: Any  # alignlib.models.ReferenceForward
    reward: Reward
    device: torch.device
    prompts: list[str]
    eval_prompts: list[str]
    eval_held_out: bool  # eval_prompts are a held-out set (else: the first training prompts)
    sampler: SeededSampler  # the order prompts are drawn in
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_controller: AdaptiveKLController | FixedKLController
    guard: NonFiniteGuard
    logger: MetricsLogger
    start_step: int
    record: dict  # what makes this run this run (alignlib.run_folder.run_record), kept in every checkpoint
    step: int  # PPO steps done

    def generate(self, prompts: list[str], max_new_tokens: int, *, use_reference: bool = False) -> Rollout:
        cfg = self.config
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                  "top_p": cfg.top_p, "device": self.device}
        if not use_reference:
            return generate_rollout(self.model.policy, self.tokenizer, prompts, **kwargs)
        if self.reference.disable_adapter:
            with self.model.policy.disable_adapter():
                return generate_rollout(self.model.policy, self.tokenizer, prompts, **kwargs)
        return generate_rollout(self.reference.model, self.tokenizer, prompts, **kwargs)

    def scores(self, prompts: list[str], rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw scores, final scores) (B,) float32 on the device: the reward, then the missing-EOS
        penalty, the baseline and the clip."""
        responses = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        raw = self.reward(prompts, responses, rollout.contains_eos.cpu()).to(self.device)
        cfg = self.config
        scores = penalize_missing_eos(raw, rollout.contains_eos, cfg.missing_eos_penalty) - cfg.reward_baseline
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return raw, scores

    @torch.no_grad()
    def old_logprobs_values(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rollout policy's log-probs, the reference's, and V(s_t), each (B, T), minibatch by minibatch."""
        cfg = self.config
        logprobs, values, ref_logprobs = [], [], []
        for rows in chunks(rollout.query_ids.shape[0], cfg.mini_batch_size):
            lp, v, _ = policy_forward(self.model, rollout, rows, cfg.temperature)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(reference_logprobs(self.reference, rollout, rows, cfg.temperature))
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train_ppo(
    config: PPOConfig,
    model_config: ModelConfig,
    *,
    reward_fn: RewardFunction | None = None,
    prompts: Sequence[str] | Any | None = None,
    eval_prompts: Sequence[str] | Any | None = None,
) -> dict[str, Any]:
    """Run PPO; return the final stats, with the mean reward on the evaluation prompts before and
    after training (`eval/reward_before`, `eval/reward_after`) and the policy's KL to the
    reference there (`eval/kl_after`).

    With no model (model_config.model_name_or_path None) this runs the embedded default
    (alignlib.demo.ppo_embedded_default): the demo base model, the demo's "how do i ..."
    prompts (held-out ones for the evaluation) and `demo_reward`. Otherwise prompts come from
    `prompts` (a list of strings or a Dataset with a 'prompt' column) or config.dataset, and
    the reward from `reward_fn`, config.reward or config.reward_model.

    Writes output_dir/metrics.jsonl (one record per logging step, classic TRL's names),
    checkpoints every save_steps (resume with resume_from_checkpoint), and the final model or
    adapter in output_dir/final.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would run its own PPO into the same output_dir
        raise ValueError("PPO runs in one process: torchrun / several ranks are supported by the pairwise "
                         "trainer (dpo, orpo, simpo, cpo, reward) only")
    lock, run = OutputDirLock(config.output_dir), None
    try:
        run = setup_ppo(config, model_config, reward_fn=reward_fn, prompts=prompts, eval_prompts=eval_prompts,
                        lock=lock)
        return ppo_loop(run)
    except KeyboardInterrupt:
        raise Interrupted(run.step if run is not None else None, config.output_dir) from None
    finally:
        lock.release()


def ppo_loop(run: PPORun) -> dict[str, Any]:
    """Steps from run.start_step to max_steps, with metrics and checkpoints when due; the mean reward
    of the evaluation prompts before and after; the saved model (see train_ppo)."""
    config = run.config
    eval_seed = config.seed + 12345
    before = evaluate(run, use_reference=True, seed=eval_seed)
    step_stats: dict[str, Any] = {}
    started = time.perf_counter()
    with run.logger, Progress(total=config.max_steps, initial=run.start_step, desc="ppo",
                              disable=config.disable_tqdm) as bar:
        for step in range(run.start_step, config.max_steps):
            done = step + 1
            step_stats = ppo_step(run, step)
            run.step = done
            if done % config.logging_steps == 0 or done == config.max_steps:
                run.logger.log(step_stats, step=done)
            bar.update(reward=step_stats["env/reward_mean"], kl=step_stats["objective/kl"])
            if config.save_steps is not None and done % config.save_steps == 0:
                save_training_checkpoint(
                    config.output_dir, done, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                    data_state={"prompts_seen": done * config.per_device_train_batch_size, "seed": config.seed},
                    metadata={"kl_coef": run.kl_controller.value, "run": run.record},
                    save_total_limit=config.save_total_limit)
        after = evaluate(run, use_reference=False, seed=eval_seed)
        final = {"eval/reward_before": before["reward_mean"], "eval/reward_after": after["reward_mean"],
                 "eval/kl_after": after["kl"], "eval/num_prompts": len(run.eval_prompts),
                 "eval/held_out": float(run.eval_held_out)}
        run.logger.log(final, step=config.max_steps)
    output_dir = Path(config.output_dir)
    save_model(run.model.policy, run.tokenizer, output_dir / "final")
    torch.save(run.model.value_head.state_dict(), output_dir / "final" / "value_head.pt")
    return {**step_stats, **final, "steps": config.max_steps, "resumed_from_step": run.start_step,
            "train_runtime": time.perf_counter() - started, "kl_coef": run.kl_controller.value,
            "model_name_or_path": run.model_config.model_name_or_path, "use_peft": run.model_config.use_peft}


def ppo_step(run: PPORun, step: int) -> dict[str, float]:
    """One PPO step (0-based `step`): the six stages of the module docstring; returns its stats."""
    config, started = run.config, time.perf_counter()
    prompts = [run.prompts[i] for i in prompt_batch(run.sampler, step, config.per_device_train_batch_size)]
    rollout = run.generate(prompts, _max_new_tokens(config, step))  # 1
    raw, scores = run.scores(prompts, rollout)  # 2
    old_logprobs, ref_logprobs, values = run.old_logprobs_values(rollout)  # 3
    targets = compute_targets(scores, old_logprobs, ref_logprobs, values, rollout.response_mask,  # 4
                              kl_coef=run.kl_controller.value, config=config)
    stats = _step_stats(raw, scores, rollout, old_logprobs, targets, run.kl_controller.value)
    stats.update(ppo_update(run, rollout, old_logprobs, targets, step))  # 5
    run.kl_controller.update(stats["objective/kl"], len(prompts))  # 6
    stats["learning_rate"] = run.scheduler.get_last_lr()[0]
    step_scheduler(run.scheduler)
    elapsed = time.perf_counter() - started
    tokens = int(rollout.query_mask.sum()) + int(rollout.response_mask.sum())
    stats.update({"tokens_per_second": tokens / elapsed, "time/ppo/total": elapsed})
    return stats


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def setup_ppo(config: PPOConfig, model_config: ModelConfig, *, reward_fn: RewardFunction | None = None,
              prompts: Sequence[str] | Any | None = None, eval_prompts: Sequence[str] | Any | None = None,
              lock: OutputDirLock | None = None) -> PPORun:
    """Build the run: the output folder checked and locked, prompts, policy with its value head,
    reference, reward, optimizer, resume; last (once all of that is validated) the folder claimed."""
    checkpoint = checkpoint_to_resume(config.resume_from_checkpoint, config.output_dir)
    restarting = checkpoint is None and resume_requested(config.resume_from_checkpoint)
    if lock is not None:
        lock.check_free()
    check_output_dir(config.output_dir, resuming=checkpoint is not None, overwrite=config.overwrite_output_dir,
                     restarting=restarting)
    demo = model_config.model_name_or_path is None
    eval_held_out = eval_prompts is not None or config.eval_dataset is not None
    if demo:
        config, model_config = ppo_embedded_default(config, model_config)
        if prompts is None and config.dataset is None:
            prompts = demo_prompts(TRAIN_FILE)
            eval_prompts = eval_prompts if eval_prompts is not None else demo_prompts(HELDOUT_FILE)
            eval_held_out = True

    set_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_config.model_name_or_path, padding_side="left",
                               trust_remote_code=model_config.trust_remote_code)
    if prompts is None and config.dataset is not None:
        prompts = load_prompts(config.dataset, config.dataset_split, tokenizer)
    prompts = as_prompt_list(prompts, "the prompt set")
    if eval_prompts is None and config.eval_dataset is not None:
        eval_prompts = load_prompts(config.eval_dataset, config.eval_split, tokenizer)
    eval_prompts = as_prompt_list(eval_prompts, "the eval prompt set") if eval_prompts is not None else prompts
    eval_prompts = eval_prompts[: config.num_eval_prompts]

    policy = load_causal_lm(model_config)
    if not is_quantized(policy):
        policy.to(device)
    device = next(policy.parameters()).device  # a quantised model sits where bitsandbytes put it
    model = PolicyWithValueHead(policy)
    model.value_head.to(device)
    model.eval()  # dropout off for the whole run
    check_prompt_lengths(tokenizer, prompts, policy, config.response_length, "the prompt set")
    check_prompt_lengths(tokenizer, eval_prompts, policy, config.response_length, "the eval prompt set")
    reference = make_reference("adapter_disabled" if model_config.use_peft else "model", policy, model_config)
    reward = make_reward(config, reward_fn, device, default=demo_reward if demo else None)

    optimizer = make_optimizer(model, config.optim, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config.lr_scheduler_type, num_training_steps=config.max_steps,
                               num_warmup_steps=config.warmup_steps)
    kl_controller = (AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
                     if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))
    record = run_record("ppo", config, model_config, data=_prompts_fingerprint(prompts))
    start_step = 0
    if restarting and not config.overwrite_output_dir:
        check_restart(config.output_dir, record)
    if checkpoint is not None:
        check_same_run(read_trainer_state(checkpoint)["metadata"].get("run"), record, checkpoint)
        state = resume_training(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = state["step"]
        kl_controller.value = float(state["metadata"]["kl_coef"])
    if lock is not None:  # the first write: the folder is locked now
        lock.acquire()
    if checkpoint is None:
        moved = claim_output_dir(config.output_dir, overwrite=config.overwrite_output_dir)
        if moved is not None:
            print(f"overwrite_output_dir: the previous run's files in {config.output_dir} were moved to {moved}")
    logger = MetricsLogger(config.output_dir, resume_step=start_step if checkpoint is not None else None)
    write_text_atomic(Path(config.output_dir) / "config.json", json.dumps(
        {"objective": "ppo", "ppo": dataclasses.asdict(config), "model": portable_settings(model_config),
         "world_size": 1, "run": record}, indent=2, default=str))
    guard = NonFiniteGuard(config.on_nonfinite, lambda record, step: logger.log(record, step=step))
    return PPORun(config, model_config, model, tokenizer, reference, reward, device, prompts, eval_prompts,
                  eval_held_out, SeededSampler(len(prompts), seed=config.seed), optimizer, scheduler, kl_controller,
                  guard, logger, start_step, record, start_step)


def _prompts_fingerprint(prompts: list[str]) -> str:
    """sha256 (16 hex digits) of the training prompts, in order."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _max_new_tokens(config: PPOConfig, step: int) -> int:
    """response_length, or with min_response_length a length drawn for this step (seeded by step)."""
    if config.min_response_length is None:
        return config.response_length
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    low, high = config.min_response_length, config.response_length
    return int(torch.randint(low, high + 1, (1,), generator=generator))


@torch.no_grad()
def evaluate(run: PPORun, *, use_reference: bool, seed: int) -> dict[str, float]:
    """Mean reward of sampled answers to the evaluation prompts (from the reference, i.e. the
    model before training, or the policy), and the policy's mean sequence KL (k1) to the
    reference. Runs on its own RNG stream, so training is unaffected."""
    cfg, prompts = run.config, run.eval_prompts
    rewards, kls = [], []
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for rows in chunks(len(prompts), max(cfg.per_device_train_batch_size, 64)):
            batch = prompts[rows]
            rollout = run.generate(batch, cfg.response_length, use_reference=use_reference)
            raw, _ = run.scores(batch, rollout)
            rewards.append(raw)
            if use_reference:
                kls.append(torch.zeros_like(raw))
                continue
            logprobs, _, _ = policy_forward(run.model, rollout, slice(None), cfg.temperature)
            ref = reference_logprobs(run.reference, rollout, slice(None), cfg.temperature)
            kls.append(torch.where(rollout.response_mask, logprobs - ref, 0.0).sum(dim=1))
    return {"reward_mean": torch.cat(rewards).mean().item(), "kl": torch.cat(kls).mean().item()}


# ----------------------------------------------------------------------------------------------
# The update math: rollout tensors -> rewards, advantages, returns -> losses and stats
# ----------------------------------------------------------------------------------------------


class PPOTargets(NamedTuple):
    """What one rollout batch trains towards; every field (B, T) over response tokens, 0 on padding."""

    rewards: torch.Tensor
    """-kl_coef KL_t, plus the score at the last response token (whitened if whiten_rewards)."""
    kl: torch.Tensor
    """The per-token KL estimate (config.kl_estimator)."""
    non_score_rewards: torch.Tensor
    """-kl_coef KL_t."""
    advantages: torch.Tensor
    """GAE advantages, whitened over the batch."""
    returns: torch.Tensor
    """R_t = A_t + V_t (A before whitening): the value targets."""
    values: torch.Tensor
    """V(s_t) at rollout time, 0 on padding."""


def compute_targets(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    config: PPOConfig,
) -> PPOTargets:
    """KL-shaped rewards, GAE and whitening for one rollout batch (classic TRL's compute_rewards
    followed by compute_advantages).

    Args:
        scores: (B,) final scores (after penalty, baseline, clip).
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under the rollout policy
            and the reference.
        values: (B, T) V(s_t) at rollout time.
        mask: (B, T) True on response tokens.
        kl_coef: the controller's current value.
        config: kl_estimator, whiten_rewards, gamma, lam.
    """
    mask = mask.bool()
    shaped = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=config.kl_estimator)
    rewards = whiten(shaped.rewards, mask, shift_mean=False) if config.whiten_rewards else shaped.rewards
    gae = gae_advantages(rewards, values, mask, gamma=config.gamma, lam=config.lam)
    return PPOTargets(
        rewards=rewards,
        kl=shaped.kl,
        non_score_rewards=shaped.non_score_rewards,
        advantages=whiten(gae.advantages, mask),
        returns=gae.returns,
        values=torch.where(mask, values, 0.0),
    )


def ppo_update(run: PPORun, rollout: Rollout, old_logprobs: torch.Tensor, targets: PPOTargets,
               step: int) -> dict[str, float]:
    """ppo_epochs passes of shuffled minibatches; returns the minibatch stats averaged, "ppo/"-prefixed."""
    cfg = run.config
    batch_size = rollout.query_ids.shape[0]
    params = [p for p in run.model.parameters() if p.requires_grad]
    collected: list[dict[str, torch.Tensor]] = []
    early_stopped, epochs_done, updates = False, 0, 0
    for epoch in range(cfg.ppo_epochs):
        generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 101 + epoch)
        order = torch.randperm(batch_size, generator=generator).to(run.device)
        for number, rows in enumerate(chunks(batch_size, cfg.mini_batch_size), start=1):
            index = order[rows]
            logprobs, values, entropy = policy_forward(run.model, rollout, index, cfg.temperature,
                                                       entropy="grad" if cfg.entropy_coef > 0 else "detached")
            # NaN/inf from the forward pass reach the guard below as a NaN loss, past the losses' input checks
            mask = rollout.response_mask[index]
            logprobs, logprobs_poison = finite_or_poisoned(torch.where(mask, logprobs, 0.0))
            values, values_poison = finite_or_poisoned(torch.where(mask, values, 0.0))
            entropy, entropy_poison = finite_or_poisoned(torch.where(mask, entropy, 0.0))
            mb_targets = PPOTargets(*(t[index] for t in targets))
            out, stats = ppo_minibatch_loss(logprobs, values, old_logprobs[index], mb_targets, mask, config=cfg,
                                            entropy=entropy)
            loss = out.loss + logprobs_poison + values_poison + entropy_poison
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
            where = f"PPO step {step + 1}, epoch {epoch + 1}, minibatch {number}"
            if not run.guard.allows(step + 1, loss.item(), grad_norm, where=where):
                continue
            if cfg.max_grad_norm is not None:
                stats["grad_norm"] = torch.tensor(grad_norm)
            run.optimizer.step()
            updates += 1
            collected.append(stats)
            if cfg.target_kl is not None and float(out.approx_kl) > 1.5 * cfg.target_kl:
                early_stopped = True
                break
        epochs_done = epoch + 1
        if early_stopped:
            break
    run.optimizer.zero_grad(set_to_none=True)
    averaged = {f"ppo/{k}": torch.stack([s[k] for s in collected]).mean().item() for k in (collected or [{}])[0]}
    averaged.update({"ppo/epochs": epochs_done, "ppo/early_stopped": float(early_stopped),
                     "ppo/minibatch_updates": updates})
    return averaged


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the True entries of mask (as TRL's masked_var)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def ppo_minibatch_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    old_logprobs: torch.Tensor,
    targets: PPOTargets,
    mask: torch.Tensor,
    *,
    config: PPOConfig,
    entropy: torch.Tensor | None = None,
) -> tuple[PPOLossOutput, dict[str, torch.Tensor]]:
    """The loss to backpropagate for one minibatch, and classic TRL's per-minibatch stats.

    Args:
        logprobs: (b, T) log-probs of the rollout tokens under the policy being trained (grad).
        values: (b, T) V(s_t) from the value head being trained (grad).
        old_logprobs: (b, T) the rollout policy's log-probs.
        targets: the minibatch's rows of compute_targets' result.
        mask: (b, T) True on response tokens.
        config: cliprange, cliprange_value, vf_coef, entropy_coef.
        entropy: (b, T) the policy's per-token entropy (with grad when entropy_coef > 0), or None.

    Returns (out, stats): stats under classic TRL's names without the "ppo/" prefix
    (loss/policy, policy/approxkl, val/clipfrac, returns/mean, ...), detached.
    """
    mask = mask.bool()
    out = ppo_loss(
        logprobs, old_logprobs, targets.advantages, values, targets.values, targets.returns, mask,
        cliprange=config.cliprange, cliprange_value=config.cliprange_value, vf_coef=config.vf_coef,
        entropy=entropy, entropy_coef=config.entropy_coef,
    )
    stats = {
        "loss/policy": out.policy_loss,
        "loss/value": out.value_loss,
        "loss/total": out.loss,
        "policy/approxkl": out.approx_kl,
        "policy/policykl": out.policy_kl,
        "policy/clipfrac": out.policy_clipfrac,
        "policy/advantages_mean": masked_mean(targets.advantages, mask),
        "returns/mean": masked_mean(targets.returns, mask),
        "returns/var": masked_var(targets.returns, mask),
        "val/vpred": masked_mean(values, mask),
        "val/error": masked_mean((values - targets.returns) ** 2, mask),
        "val/clipfrac": out.value_clipfrac,
        "val/mean": masked_mean(targets.values, mask),
        "val/var": masked_var(targets.values, mask),
    }
    if out.entropy is not None:
        stats["policy/entropy"] = out.entropy
    return out, {name: value.detach() for name, value in stats.items()}


def _step_stats(raw: torch.Tensor, scores: torch.Tensor, rollout: Rollout, old_logprobs: torch.Tensor,
                targets: PPOTargets, kl_coef: float) -> dict[str, float]:
    """Classic TRL's objective/*, env/* and tokens/* stats of one rollout batch."""
    mask = rollout.response_mask
    kl_per_sequence = targets.kl.sum(dim=1)
    response_lengths = mask.sum(dim=1).float()
    return {
        "objective/kl": kl_per_sequence.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/entropy": torch.where(mask, -old_logprobs, 0.0).sum(dim=1).mean().item(),
        "env/reward_mean": raw.mean().item(),
        "env/reward_std": raw.std().item() if raw.numel() > 1 else 0.0,
        "ppo/mean_scores": scores.mean().item(),
        "ppo/mean_non_score_reward": targets.non_score_rewards.sum(dim=1).mean().item(),
        "tokens/queries_len_mean": rollout.query_mask.sum(dim=1).float().mean().item(),
        "tokens/responses_len_mean": response_lengths.mean().item(),
        "tokens/responses_with_eos": rollout.contains_eos.float().mean().item(),
    }
