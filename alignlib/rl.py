r"""The online loop: PPO, GRPO and RLOO as objectives of one loop of rollout, score, advantages, update.

One step (`online_step`; `train_online` runs max_steps of them), for every objective:

    prompts   = the step's prompts (prompt_batch: depends only on seed and step), each G times    G = num_generations
    rollout   = this rank's block of the completions, each sampled with its own seed (seed, step, index);
                the blocks gathered, so every rank holds the whole batch                          1 rollout
    rewards   = the reward functions / reward model on this rank's block, weighted, summed; gathered   2 score
    old, ref, V = log-probs under the sampling policy and the reference, and values, without grad,
                  as far as the objective reads them; this rank's block, gathered                 3
    targets   = objective.targets(...)       PPO: KL-shaped rewards, GAE        GRPO: group_advantages
                                             RLOO: rloo_advantages(rewards - beta KL)              4 advantages
    for each of objective.passes passes (PPO: ppo_epochs, GRPO/RLOO: num_iterations):              5 update
        for each optimizer step's rows (PPO: shuffled minibatches; GRPO/RLOO: the whole batch):
            N = the step's normaliser, counted over all of its rows
            for each micro-batch of this rank's block of those rows:
                backward(objective.loss(policy_forward(micro-batch), ..., normalizer=N))
            sum the gradients over ranks; clip
            if the loss and the norm are finite: optimizer step   (else on_nonfinite: stop, or skip the update)
    objective.after_step (PPO: the KL controller); scheduler step                                 6

Every loss is a sum over rows divided by N, the normaliser of the whole optimizer step over
every rank (alignlib.rl_objectives), so the micro-batch losses of all ranks add up to the
step's loss, and the gradients summed over ranks are the step's gradient. Group statistics
(GRPO's means and stds, RLOO's baselines, PPO's whitening) are taken over the gathered batch,
whole groups, whichever rank sampled them. With sampling seeded per completion, W ranks compute
what one process computes on the same global batch (per_device_train_batch_size is per rank),
up to float round-off; and a resumed run samples what the uninterrupted one sampled.

Unscorable completions (on_reward_error="unscorable"): GRPO and RLOO keep them with advantage 0
(TRL's handling); PPO drops them from the step. Dropout stays off throughout (the model is kept
in eval mode), so the sampling policy's log-probs and the first update's come from one function.

The set-up (`setup_online`) keeps the output folder's guarantees (alignlib.run_folder: the folder
checked before anything is written, locked, another run's files moved aside only on request, a
resume refused unless it is the same run); the math is alignlib.rl_objectives' and alignlib.losses'.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlib.checkpoint import read_trainer_state, write_text_atomic
from alignlib.configs import GRPOConfig, OnlineConfig, PPOConfig, RLOOConfig
from alignlib.demo import HELDOUT_FILE, TRAIN_FILE, demo_prompts, demo_reward, online_embedded_default
from alignlib.distributed import (
    SINGLE_PROCESS,
    Processes,
    block,
    gather_objects,
    gather_rows,
    main_process_first,
    run_on_main,
    sum_gradients,
    sum_tensor,
    teardown,
    together,
)
from alignlib.distributed import setup as setup_processes
from alignlib.metrics import MetricsLogger, Progress
from alignlib.models import (
    ModelConfig,
    ReferenceForward,
    auto_reference_strategy,
    is_quantized,
    load_causal_lm,
    load_model_tokenizer,
    make_reference,
)
from alignlib.rewards import RewardFunction, RewardResult, Rewards, make_reward
from alignlib.rl_objectives import (
    Averages,
    Forward,
    OnlineObjective,
    PPOTargets,
    compute_targets,
    make_objective,
    ppo_minibatch_loss,
)
from alignlib.rollout import (
    PolicyWithValueHead,
    Rollout,
    as_prompt_list,
    check_prompt_lengths,
    chunks,
    completion_seed,
    concat_rollouts,
    gather_rollout,
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

__all__ = ["GRPOConfig", "OnlineConfig", "OnlineRun", "PPOConfig", "PPOTargets", "RLOOConfig", "compute_targets",
           "online_step", "ppo_minibatch_loss", "setup_online", "train_online", "train_ppo"]


@dataclass
class OnlineRun:
    """Everything a step touches, built once by `setup_online`."""

    config: OnlineConfig
    model_config: ModelConfig  # the embedded default's demo model filled in
    objective: OnlineObjective
    processes: Processes
    model: PolicyWithValueHead
    trainable: list[torch.Tensor]
    tokenizer: Any
    reference: ReferenceForward | None  # None: GRPO/RLOO with beta 0 in full fine-tuning (no copy loaded)
    reward: Rewards
    device: torch.device
    prompts: list[str]
    eval_prompts: list[str]
    eval_held_out: bool  # eval_prompts are a held-out set (else: the first training prompts)
    sampler: SeededSampler  # the order prompts are drawn in
    optimizer: torch.optim.Optimizer
    scheduler: Any
    guard: NonFiniteGuard
    logger: MetricsLogger
    start_step: int
    record: dict  # what makes this run this run (alignlib.run_folder.run_record), kept in every checkpoint
    eval_before: float | None  # the evaluation before training, carried in checkpoints
    step: int  # steps done

    @property
    def completions_per_step(self) -> int:
        """Completions of one step over every rank."""
        cfg = self.config
        return cfg.per_device_train_batch_size * getattr(cfg, "gradient_accumulation_steps", 1) * \
            self.processes.world_size

    def generate(self, prompts: list[str], seeds: list[int], max_new_tokens: int, *,
                 use_reference: bool = False) -> Rollout:
        """Completions of `prompts` (row i sampled with seeds[i]) by the policy or the reference,
        per_device_train_batch_size rows at a time."""
        parts = [self._sample(prompts[rows], seeds[rows], max_new_tokens, use_reference)
                 for rows in chunks(len(prompts), self.config.per_device_train_batch_size)]
        return concat_rollouts(parts, self.tokenizer.pad_token_id, self.device)

    def _sample(self, prompts: list[str], seeds: list[int], max_new_tokens: int, use_reference: bool) -> Rollout:
        cfg = self.config
        kwargs = {"max_new_tokens": max_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
                  "top_p": cfg.top_p, "device": self.device, "seeds": seeds}
        if not use_reference:
            return generate_rollout(self.model.policy, self.tokenizer, prompts, **kwargs)
        if self.reference.disable_adapter:
            with self.model.policy.disable_adapter():
                return generate_rollout(self.model.policy, self.tokenizer, prompts, **kwargs)
        return generate_rollout(self.reference.model, self.tokenizer, prompts, **kwargs)

    def score(self, prompts: list[str], rollout: Rollout, where) -> RewardResult:
        """The rewards of this rank's completions, gathered from every rank; failures printed on rank 0."""
        completions = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        result = together(lambda: self.reward(prompts, completions, rollout.contains_eos.cpu(), where), self.processes) \
            if prompts else RewardResult(torch.zeros(0), torch.zeros(0, len(self.reward.names)), [])
        failures = [line for lines in gather_objects(result.failures, self.processes) for line in lines]
        if self.processes.is_main:
            for line in failures:
                print(line, flush=True)
        return RewardResult(gather_rows(result.total.to(self.device), self.processes),
                            gather_rows(result.per_function.to(self.device), self.processes), failures)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train_online(
    config: OnlineConfig,
    model_config: ModelConfig,
    *,
    reward_fn: RewardFunction | Sequence[RewardFunction] | None = None,
    prompts: Sequence[str] | Any | None = None,
    eval_prompts: Sequence[str] | Any | None = None,
) -> dict[str, Any]:
    """Train with the objective of `config` (PPOConfig, GRPOConfig or RLOOConfig); return the last
    step's stats, with the mean reward on the evaluation prompts before and after training
    (`eval/reward_before`, `eval/reward_after`) and the policy's KL to the reference there
    (`eval/kl_after`, NaN without a reference).

    With no model (model_config.model_name_or_path None) this runs the embedded default
    (alignlib.demo.online_embedded_default): the demo base model, the demo's "how do i ..."
    prompts (held-out ones for the evaluation) and `demo_reward`. Otherwise prompts come from
    `prompts` (a list of strings or a Dataset with a 'prompt' column) or config.dataset, and
    the reward from `reward_fn` (one callable or several) or the config's reward_funcs /
    reward_model.

    Under torchrun every rank calls this (see the module docstring). Writes
    output_dir/metrics.jsonl (TRL's metric names), checkpoints every save_steps (resume with
    resume_from_checkpoint), and the final model or adapter in output_dir/final.
    """
    processes = setup_processes()
    lock, run = OutputDirLock(config.output_dir), None
    try:
        run = setup_online(config, model_config, processes, reward_fn=reward_fn, prompts=prompts,
                           eval_prompts=eval_prompts, lock=lock)
        return online_loop(run)
    except KeyboardInterrupt:
        raise Interrupted(run.step if run is not None else None, config.output_dir) from None
    finally:
        lock.release()
        teardown(processes)


def train_ppo(config: PPOConfig, model_config: ModelConfig, **kwargs: Any) -> dict[str, Any]:
    """`train_online` for a PPOConfig (the name PPO runs had before GRPO and RLOO joined the loop)."""
    return train_online(config, model_config, **kwargs)


def online_loop(run: OnlineRun) -> dict[str, Any]:
    """Steps from run.start_step to max_steps, with metrics and checkpoints when due; the mean reward
    of the evaluation prompts before and after; the saved model (see train_online)."""
    config, name = run.config, run.objective.name
    if run.eval_before is None:
        run.eval_before = evaluate(run, use_reference=run.reference is not None)["reward_mean"]
    step_stats: dict[str, Any] = {}
    started = time.perf_counter()
    with run.logger, Progress(total=config.max_steps, initial=run.start_step, desc=name,
                              disable=config.disable_tqdm) as bar:
        for step in range(run.start_step, config.max_steps):
            done = step + 1
            step_stats = online_step(run, step)
            run.step = done
            if done % config.logging_steps == 0 or done == config.max_steps:
                run.logger.log(step_stats, step=done)
            bar.update(reward=step_stats.get("env/reward_mean", step_stats.get("reward")),
                       kl=step_stats.get("objective/kl", step_stats.get("kl")))
            if config.save_steps is not None and done % config.save_steps == 0:
                save_training_checkpoint(
                    config.output_dir, done, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                    processes=run.processes, data_state={"step": done, "seed": config.seed},
                    metadata={"objective": name, "run": run.record, "eval_before": run.eval_before,
                              "kl_coef": getattr(getattr(run.objective, "kl_controller", None), "value", None)},
                    save_total_limit=config.save_total_limit)
        after = evaluate(run, use_reference=False)
        final = {"eval/reward_before": run.eval_before, "eval/reward_after": after["reward_mean"],
                 "eval/kl_after": after["kl"], "eval/num_prompts": len(run.eval_prompts),
                 "eval/held_out": float(run.eval_held_out)}
        run.logger.log(final, step=config.max_steps)
    final_dir = Path(config.output_dir) / "final"
    run_on_main(lambda: save_model(run.model.policy, run.tokenizer, final_dir), run.processes)
    if run.model.value_head is not None:
        run_on_main(lambda: torch.save(run.model.value_head.state_dict(), final_dir / "value_head.pt"), run.processes)
    kl_controller = getattr(run.objective, "kl_controller", None)
    return {**step_stats, **final, "steps": config.max_steps, "resumed_from_step": run.start_step,
            "train_runtime": time.perf_counter() - started, "objective": name,
            "kl_coef": kl_controller.value if kl_controller is not None else None,
            "model_name_or_path": run.model_config.model_name_or_path, "use_peft": run.model_config.use_peft}


def online_step(run: OnlineRun, step: int) -> dict[str, float]:
    """One step (0-based `step`): the six stages of the module docstring; returns its stats."""
    config, objective, processes, started = run.config, run.objective, run.processes, time.perf_counter()
    group = config.group_size
    prompt_ids = prompt_batch(run.sampler, step, run.completions_per_step // group)
    mine = block(list(range(run.completions_per_step)), processes)  # this rank's completions, prompt k // group
    prompts = [run.prompts[prompt_ids[k // group]] for k in mine]
    seeds = [completion_seed(config.seed, "train", step, k) for k in mine]
    local = run.generate(prompts, seeds, _max_new_tokens(config, step))  # 1
    rollout = gather_rollout(local, processes, run.tokenizer.pad_token_id)

    def where(row: int) -> str:
        k = mine[row]
        return f"completion {k} of step {step + 1} (prompt #{prompt_ids[k // group]}: {prompts[row][:60]!r})"

    scored = run.score(prompts, local, where)  # 2
    rewards = scored.total
    stats = objective.batch_stats(rewards, scored.per_function, run.reward.names, rollout)
    if objective.drops_unscorable() and bool(rewards.isnan().any()):  # PPO trains on scored completions only
        keep = ~rewards.isnan()
        rollout, rewards = rollout.rows(keep), rewards[keep]
        if rollout.response_ids.shape[0] == 0:
            raise ValueError(f"step {step + 1}: every completion is unscorable (see the lines above); nothing to "
                             "train on")
    old_logprobs, ref_logprobs, values = forward_without_grad(run, rollout)  # 3
    targets, target_stats = objective.targets(rewards, rollout, old_logprobs, ref_logprobs, values)  # 4
    stats.update(target_stats)
    stats.update(update(run, rollout, old_logprobs, targets, step))  # 5
    objective.after_step(stats, rollout.response_ids.shape[0])  # 6
    stats["learning_rate"] = run.scheduler.get_last_lr()[0]
    step_scheduler(run.scheduler)
    elapsed = time.perf_counter() - started
    tokens = int(rollout.query_mask.sum()) + int(rollout.response_mask.sum())
    stats.update({"tokens_per_second": tokens / elapsed, f"time/{objective.name}/total": elapsed})
    return stats


@torch.no_grad()
def forward_without_grad(run: OnlineRun, rollout: Rollout) -> tuple[torch.Tensor | None, ...]:
    """The sampling policy's log-probs, the reference's and V(s_t), each (B, T) or None where the
    objective does not read it; this rank's block of rows, gathered."""
    objective, cfg, processes = run.objective, run.config, run.processes
    rows = block(list(range(rollout.response_ids.shape[0])), processes)
    wants_policy = objective.uses_old_logprobs or objective.value_head
    logprobs, ref_logprobs, values = [], [], []
    for part in chunks(len(rows), objective.micro_batch_size):
        index = torch.tensor(rows[part], dtype=torch.long, device=run.device)
        if wants_policy:
            lp, v, _ = policy_forward(run.model, rollout, index, cfg.temperature, use_kernels=cfg.use_kernels)
            logprobs.append(lp)
            values.append(v)
        if objective.uses_reference:
            ref_logprobs.append(reference_logprobs(run.reference, rollout, index, cfg.temperature))
    width = rollout.response_ids.shape[1]

    def gathered(parts: list, wanted: bool) -> torch.Tensor | None:
        if not wanted:
            return None
        local = torch.cat(parts) if parts else torch.zeros(0, width, device=run.device)
        return gather_rows(local, processes)

    return (gathered(logprobs, wanted=wants_policy), gathered(ref_logprobs, wanted=objective.uses_reference),
            gathered(values, wanted=objective.value_head))


def update(run: OnlineRun, rollout: Rollout, old_logprobs: torch.Tensor | None, targets: Any,
           step: int) -> dict[str, float]:
    """objective.passes passes of clipped updates on the rollout batch (stage 5); the stats of its
    optimizer steps, averaged."""
    objective, cfg, processes = run.objective, run.config, run.processes
    n = rollout.response_ids.shape[0]
    trained = objective.trained_rows(rollout)
    mask = rollout.response_mask & trained[:, None]  # mask_truncated_completions: those rows count, with no tokens
    collected, early_stopped, passes_done, updates = [], False, 0, 0
    for epoch in range(objective.passes):
        for number, rows in enumerate(objective.optimizer_steps(n, step, epoch, processes.world_size), start=1):
            normalizer = objective.normalizer(mask[rows])
            if normalizer <= 0:  # every row of this optimizer step is left out of the loss
                continue
            averages, loss_value = Averages(), 0.0
            mine = [row for row in block(rows, processes) if bool(trained[row])]
            for part in chunks(len(mine), objective.micro_batch_size):
                index = torch.tensor(mine[part], dtype=torch.long, device=run.device)
                forward, poison = _forward_with_grad(run, rollout, index)
                loss = objective.loss(forward, index, old_logprobs, targets, mask[index], normalizer, averages)
                (loss + poison).backward()
                loss_value += (loss + poison).item()
            sum_gradients(run.trainable, processes)
            loss_value = sum_tensor(torch.tensor([loss_value], dtype=torch.float64, device=run.device), processes).item()
            grad_norm = clip_grad_norm(run.trainable, cfg.max_grad_norm)
            stats = averages.means(processes)
            where = f"{objective.name} step {step + 1}, pass {epoch + 1}, optimizer step {number}"
            if run.guard.allows(step + 1, loss_value, grad_norm, where=where):
                run.optimizer.step()
                updates += 1
                stats.update(objective.step_stats(targets, rows, rollout.response_mask))
                collected.append({**stats, **objective.update_metrics(loss_value, grad_norm)})
                early_stopped = objective.stop_early(stats)
            run.optimizer.zero_grad(set_to_none=True)
            if early_stopped:
                break
        passes_done = epoch + 1
        if early_stopped:
            break
    return objective.update_summary(collected, passes_done, early_stopped, updates)


def _forward_with_grad(run: OnlineRun, rollout: Rollout, index: torch.Tensor) -> tuple[Forward, torch.Tensor]:
    """The policy's log-probs (values, entropy) of rows `index`, padding zeroed, and a loss term that is 0,
    or NaN when the forward gave NaN/inf (carried to on_nonfinite past the losses' input checks)."""
    cfg = run.config
    entropy = "grad" if getattr(cfg, "entropy_coef", 0) > 0 else (None if cfg.use_kernels else "detached")
    logprobs, values, per_token_entropy = policy_forward(run.model, rollout, index, cfg.temperature, entropy=entropy,
                                                         use_kernels=cfg.use_kernels)
    mask = rollout.response_mask[index]
    poison = torch.zeros((), device=run.device)
    outputs = []
    for tensor in (logprobs, values, per_token_entropy):
        if tensor is None:
            outputs.append(None)
            continue
        clean, term = finite_or_poisoned(torch.where(mask, tensor, 0.0))
        outputs.append(clean)
        poison = poison + term
    return Forward(*outputs), poison


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------


def setup_online(config: OnlineConfig, model_config: ModelConfig, processes: Processes = SINGLE_PROCESS, *,
                 reward_fn: RewardFunction | Sequence[RewardFunction] | None = None,
                 prompts: Sequence[str] | Any | None = None, eval_prompts: Sequence[str] | Any | None = None,
                 lock: OutputDirLock | None = None) -> OnlineRun:
    """Build the run: the output folder checked, prompts, policy (with a value head for PPO),
    reference, rewards, optimizer, resume; last (once all of that is validated) the folder locked
    and claimed."""
    checkpoint = checkpoint_to_resume(config.resume_from_checkpoint, config.output_dir, verbose=processes.is_main)
    restarting = checkpoint is None and resume_requested(config.resume_from_checkpoint)
    if lock is not None:
        run_on_main(lock.check_free, processes)
    run_on_main(lambda: check_output_dir(config.output_dir, resuming=checkpoint is not None,
                                         overwrite=config.overwrite_output_dir, restarting=restarting), processes)
    demo = model_config.model_name_or_path is None
    eval_held_out = eval_prompts is not None or config.eval_dataset is not None
    if demo:
        with main_process_first(processes):  # rank 0 builds the demo base model, the others then read it
            config, model_config = online_embedded_default(config, model_config, verbose=processes.is_main)
        if prompts is None and config.dataset is None:
            prompts = demo_prompts(TRAIN_FILE)
            eval_prompts = eval_prompts if eval_prompts is not None else demo_prompts(HELDOUT_FILE)
            eval_held_out = True
    objective = make_objective(config)

    set_seed(config.seed)
    device = processes.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_model_tokenizer(model_config, padding_side="left")  # with its chat format (--chat_template)
    with main_process_first(processes):  # rank 0 fills the datasets cache
        if prompts is None and config.dataset is not None:
            prompts = load_prompts(config.dataset, config.dataset_split, tokenizer)
        if eval_prompts is None and config.eval_dataset is not None:
            eval_prompts = load_prompts(config.eval_dataset, config.eval_split, tokenizer)
    prompts = as_prompt_list(prompts, "the prompt set")
    eval_prompts = as_prompt_list(eval_prompts, "the eval prompt set") if eval_prompts is not None else prompts
    eval_prompts = eval_prompts[: config.num_eval_prompts]

    policy = load_causal_lm(model_config)
    if not is_quantized(policy):
        policy.to(device)
    device = next(policy.parameters()).device  # a quantised model sits where bitsandbytes put it
    model = PolicyWithValueHead(policy, value_head=objective.value_head)
    if model.value_head is not None:
        model.value_head.to(device)
    model.eval()  # dropout off for the whole run
    check_prompt_lengths(tokenizer, prompts, policy, config.max_new_tokens, "the prompt set")
    check_prompt_lengths(tokenizer, eval_prompts, policy, config.max_new_tokens, "the eval prompt set")
    reference = None
    if objective.uses_reference or model_config.use_peft:  # the adapter-disabled reference costs nothing
        reference = make_reference(auto_reference_strategy(model_config), policy, model_config)
    reward = make_reward(config, reward_fn, device, default=demo_reward if demo else None)

    optimizer = make_optimizer(model, config.optim, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config.lr_scheduler_type, num_training_steps=config.max_steps,
                               num_warmup_steps=config.warmup_steps)
    record = run_record(objective.name, config, model_config, data=_prompts_fingerprint(prompts),
                        world_size=processes.world_size)
    start_step, eval_before = 0, None
    if restarting and not config.overwrite_output_dir:
        run_on_main(lambda: check_restart(config.output_dir, record), processes)
    if checkpoint is not None:
        metadata = read_trainer_state(checkpoint)["metadata"]
        check_same_run(metadata.get("run"), record, checkpoint, verbose=processes.is_main)
        state = resume_training(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, processes=processes)
        start_step, eval_before = state["step"], metadata.get("eval_before")
        if metadata.get("kl_coef") is not None:
            objective.kl_controller.value = float(metadata["kl_coef"])
    if lock is not None:  # the first write: the folder is locked now
        run_on_main(lock.acquire, processes)
    if checkpoint is None and processes.is_main:
        moved = claim_output_dir(config.output_dir, overwrite=config.overwrite_output_dir)
        if moved is not None:
            print(f"overwrite_output_dir: the previous run's files in {config.output_dir} were moved to {moved}")
    logger = MetricsLogger(config.output_dir, resume_step=start_step if checkpoint is not None else None)
    if processes.is_main:
        write_text_atomic(Path(config.output_dir) / "config.json", json.dumps(
            {"objective": objective.name, objective.name: portable_settings(config),
             "model": portable_settings(model_config), "world_size": processes.world_size, "run": record},
            indent=2, default=str))
    guard = NonFiniteGuard(config.on_nonfinite, lambda record, step: logger.log(record, step=step),
                           verbose=processes.is_main)
    return OnlineRun(config, model_config, objective, processes, model, [p for p in model.parameters() if p.requires_grad],
                     tokenizer, reference, reward, device, prompts, eval_prompts, eval_held_out,
                     SeededSampler(len(prompts), seed=config.seed), optimizer, scheduler, guard, logger, start_step,
                     record, eval_before, start_step)


def _prompts_fingerprint(prompts: list[str]) -> str:
    """sha256 (16 hex digits) of the training prompts, in order."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _max_new_tokens(config: OnlineConfig, step: int) -> int:
    """max_new_tokens, or with PPO's min_response_length a length drawn for this step (seeded by step)."""
    low = getattr(config, "min_response_length", None)
    if low is None:
        return config.max_new_tokens
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    return int(torch.randint(low, config.max_new_tokens + 1, (1,), generator=generator))


@torch.no_grad()
def evaluate(run: OnlineRun, *, use_reference: bool) -> dict[str, float]:
    """Mean reward of one sampled answer to each evaluation prompt (from the reference, i.e. the
    model before training, or the policy), and the policy's mean sequence KL (k1) to the
    reference (NaN without one). Prompts are split over ranks; sampling is seeded per prompt."""
    cfg, processes = run.config, run.processes
    mine = block(list(range(len(run.eval_prompts))), processes)
    prompts = [run.eval_prompts[i] for i in mine]
    seeds = [completion_seed(cfg.seed, "eval", i) for i in mine]
    rollout = run.generate(prompts, seeds, cfg.max_new_tokens, use_reference=use_reference)
    rewards = run.score(prompts, rollout, lambda row: f"evaluation prompt #{mine[row]} ({prompts[row][:60]!r})").total
    kl = torch.full((len(mine),), math.nan, device=run.device)
    if run.reference is not None and not use_reference and mine:
        logprobs, _, _ = policy_forward(run.model, rollout, slice(None), cfg.temperature)
        ref = reference_logprobs(run.reference, rollout, slice(None), cfg.temperature)
        kl = torch.where(rollout.response_mask, logprobs - ref, 0.0).sum(dim=1)
    kl = gather_rows(kl.float(), processes)
    scored = rewards[~rewards.isnan()]
    return {"reward_mean": scored.mean().item() if scored.numel() else math.nan,
            "kl": 0.0 if use_reference else kl.mean().item()}
