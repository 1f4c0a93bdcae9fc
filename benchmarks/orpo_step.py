"""One optimizer step of ORPO with LoRA: alignlib's trainer step vs trl.experimental's ORPOTrainer (TRL 1.16).

The same model, adapter, batch and step as benchmarks/dpo_step.py (see there), for ORPO
(beta = lambda = 0.1; no reference policy). TRL gets the batch as its ORPO collator lays it
out (chosen_* and rejected_* tensors), built once outside the timed region.

First-step losses differ by design: TRL's ORPOTrainer takes the NLL over the chosen prompt
and response, alignlib over the response only (the paper's L_SFT). So each row's extra also
holds the odds-ratio part (loss minus NLL), which must agree between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.dpo_step import (
    BETA,
    PLACEHOLDER_ROWS,
    SIZES,
    StepSize,
    _trainable,
    make_policy,
    run_objective,
    tiny_tokenizer,
    trl_common_args,
)
from benchmarks.harness import Row

BASELINE = "TRL 1.16 ORPOTrainer"
__all__ = ["BASELINE", "SIZES", "run"]
_TRL_FIRST_ODDS_RATIO_PART: dict[str, float] = {}  # size label -> TRL's first-step loss minus its NLL


def trl_orpo_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """alignlib's stacked batch split into ORPOTrainer's chosen_* / rejected_* tensors."""
    pairs = batch["input_ids"].shape[0] // 2
    inputs = {}
    for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
        inputs[f"{side}_input_ids"] = batch["input_ids"][rows]
        inputs[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        inputs[f"{side}_labels"] = batch["labels"][rows]
    return inputs


def _build_trl_orpo_step(model, batch, device: str, output_dir: str, size: StepSize,
                         losses: list[float]) -> Callable[[], None]:
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**trl_common_args(device, output_dir, size.pairs), max_length=size.seq + 8)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PLACEHOLDER_ROWS),
                          processing_class=tiny_tokenizer())
    inputs = trl_orpo_inputs(batch)
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop, read by training_step
    trainable = _trainable(trainer.model)

    def step() -> None:
        loss = trainer.training_step(trainer.model, inputs)
        torch.nn.utils.clip_grad_norm_(trainable, trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not losses:  # the odds-ratio part of the first step: loss minus TRL's NLL
            _TRL_FIRST_ODDS_RATIO_PART[size.label] = float(loss) - float(trainer._stored_metrics["train"]["nll_loss"][-1])
        losses.append(float(loss))

    return step


def _alignlib_odds_ratio_part(size: StepSize, batch: dict, device: str) -> float:
    """alignlib's first-step loss minus its NLL, from the fresh weights (no optimizer step)."""
    from alignlib.configs import TrainConfig
    from alignlib.objectives import pairwise_terms

    model = make_policy(size, device)
    model.train()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        terms = pairwise_terms("orpo", TrainConfig(beta=BETA), model, batch, None)
    return float(terms.loss_sum / terms.examples)


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    from benchmarks.dpo_step import make_batch

    rows = run_objective("orpo", BASELINE, _build_trl_orpo_step, device, sizes, warmup, repeats)
    for size in sizes:
        ours = _alignlib_odds_ratio_part(size, make_batch(size, device), device)
        theirs = _TRL_FIRST_ODDS_RATIO_PART.get(size.label)
        for row in rows:
            if row.case == size.label and row.impl.startswith("alignlib"):
                row.extra["first_step_odds_ratio_part"] = ours
                if theirs is not None:
                    row.extra["trl_first_step_odds_ratio_part"] = theirs
                    row.extra["odds_ratio_part_diff_vs_trl"] = abs(ours - theirs)
    return rows
