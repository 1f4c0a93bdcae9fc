"""One optimizer step of KTO with LoRA: alignlib's trainer step vs TRL 1.16's KTOTrainer (vs Unsloth where it runs).

The model, adapter and sequences are benchmarks/dpo_step.py's (see there): the seeded Llama with
the same peft LoRA adapter (A and B random, so the policy already differs from its reference),
and dpo_step's batch of B pairs of length T read as 2B unpaired rows, the B chosen sequences
desirable and the B shorter rejected ones undesirable (a quarter of each is prompt). The
reference policy is the model with its adapter disabled, for both libraries.

KTO's reference point z0 is estimated on mismatched pairs: row j's prompt with row j-1's
completion (row 0 takes the last row's). Both libraries build those same 2B pairs here, once,
outside the timed region: alignlib with `UnpairedCollator.mismatched`, TRL with its own
`DataCollatorForUnpairedPreference` on rows whose KL completions are rotated by one, as
KTOTrainer's data preparation rotates them within a batch. One step is one micro-batch, so
alignlib's step-wide z0 and TRL's per-micro-batch z0 are the same number, and the first-step
losses of the two must agree.

One timed call = one optimizer step on that batch:
- alignlib: z0 (`kto_kl` on the mismatched pairs, no grad), then `micro_batch_terms` + backward +
  gradient clipping + AdamW step, the way `alignlib.trainer.train_step` does a step (bf16 autocast
  on CUDA), with use_kernels False and True (fused lm_head + log-softmax, and the fused LoRA
  matmul where Triton runs) as two rows;
- TRL: the trainer, built once outside the timed region, runs `trainer.training_step(model,
  inputs)` (its compute_loss, KL forwards included, + backward), then the same clipping and its
  own AdamW step;
- Unsloth's patched trainer where unsloth imports (it needs CUDA).

Tokens/s counts the non-padding tokens of the 2B rows (the mismatched pairs' forwards are work
both libraries do on top) in row.extra["tokens_per_s"]; the first step's loss of each
implementation goes in row.extra["first_step_loss"]. The baseline is TRL.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

from benchmarks.dpo_step import (
    BETA,
    LEARNING_RATE,
    SIZES,
    StepSize,
    _add_loss_agreement,
    _row,
    _trainable,
    make_batch,
    make_policy,
    tiny_tokenizer,
    trl_common_args,
    trl_step_fn,
    unsloth_trainer,
)
from benchmarks.harness import Row

BASELINE = "TRL 1.16 KTOTrainer"
__all__ = ["BASELINE", "SIZES", "run"]
PLACEHOLDER_ROWS = [{"prompt": "Hello world!", "completion": " Hello!", "label": True},
                    {"prompt": "Hello world!", "completion": " The sky is green.", "label": False}]


def case_label(size: StepSize) -> str:
    return size.label.replace(f"B={size.pairs}", f"rows={2 * size.pairs}")


# ----------------------------------------------------------------------------------------------
# The batch: dpo_step's pairs as unpaired rows, and their mismatched pairs
# ----------------------------------------------------------------------------------------------


def unpaired_rows(size: StepSize) -> list[dict]:
    """dpo_step's 2B sequences as alignlib's tokenized unpaired rows: input_ids, labels, prompt_length, label."""
    batch = make_batch(size, "cpu")
    rows = []
    for r in range(2 * size.pairs):
        length = int(batch["attention_mask"][r].sum())
        ids = batch["input_ids"][r, :length].tolist()
        prompt = int((batch["labels"][r, :length] == -100).sum())
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_length": prompt,
                     "label": r < size.pairs})
    return rows


def alignlib_batches(rows: list[dict], device: str) -> tuple[dict, dict]:
    """The step's batch and its mismatched pairs (row j's prompt, row j-1's completion), as alignlib's trainer builds them."""
    from alignlib.data import UnpairedCollator

    collator = UnpairedCollator(pad_token_id=0)
    batch = collator(rows)
    kl_batch = collator.mismatched(rows, [rows[j - 1] for j in range(len(rows))])
    return ({k: v.to(device) for k, v in batch.items()}, {k: v.to(device) for k, v in kl_batch.items()})


def trl_examples(rows: list[dict]) -> list[dict]:
    """The same rows as KTOTrainer's prepared dataset holds them, KL completions rotated by one within the batch."""
    prompts = [row["input_ids"][: row["prompt_length"]] for row in rows]
    completions = [row["input_ids"][row["prompt_length"]:] for row in rows]
    return [{"prompt_ids": prompts[j], "completion_ids": completions[j], "KL_completion_ids": completions[j - 1],
             "label": row["label"]} for j, row in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# One step through each library
# ----------------------------------------------------------------------------------------------


def alignlib_step_fn(model: torch.nn.Module, rows: list[dict], device: str, *, use_kernels: bool,
                     losses: list[float]) -> Callable[[], None]:
    """One optimizer step as alignlib.trainer.train_step does it for KTO (one micro-batch = the whole step)."""
    from alignlib.configs import TrainConfig
    from alignlib.fused_lora import enable_fused_lora
    from alignlib.models import ReferenceForward
    from alignlib.objectives import PolicyOutputs, kto_kl, micro_batch_terms
    from alignlib.training import make_optimizer

    cfg = TrainConfig(beta=BETA, learning_rate=LEARNING_RATE, use_kernels=use_kernels, bf16=device == "cuda")
    if use_kernels:  # as the trainer does: LoRA layers through the Triton matmul where it runs
        enable_fused_lora(model)
    batch, kl_batch = alignlib_batches(rows, device)
    reference = ReferenceForward("adapter_disabled", model, disable_adapter=True)
    policy = PolicyOutputs(model, "kto", use_kernels)
    optimizer = make_optimizer(model, cfg.optim, lr=cfg.learning_rate)
    trainable = _trainable(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16)

    def step() -> None:
        model.train()
        with autocast:
            kl = kto_kl(policy, reference, kl_batch)
            z0 = max(0.0, float(kl.total / kl.count))
            terms = micro_batch_terms("kto", cfg, model, batch, reference, policy=policy, z0=z0)
            loss = terms.loss_sum / terms.examples
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def build_trl_kto(model: torch.nn.Module, device: str, output_dir: str, size: StepSize):
    """KTOTrainer on the same LoRA policy, its reference the base model with the adapter disabled.

    As in dpo_step.build_trl_dpo: the base model and the adapter's config go in (handed a peft
    model, KTOTrainer would add a frozen copy of the adapter as the reference), and the adapter's
    weights are copied in after, so both libraries start from the same policy.
    """
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    lora_config = model.peft_config["default"]
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    base = model.unload()
    common = trl_common_args(device, output_dir, size.pairs)
    common["per_device_train_batch_size"] = 2 * size.pairs
    args = KTOConfig(**common, loss_type="kto", max_length=None, precompute_ref_log_probs=False)
    trainer = KTOTrainer(model=base, ref_model=None, args=args, peft_config=lora_config,
                         train_dataset=Dataset.from_list(PLACEHOLDER_ROWS), processing_class=tiny_tokenizer())
    params = dict(trainer.model.named_parameters())
    missing = sorted(set(adapter) - set(params))
    if missing or "ref" in trainer.model.peft_config:
        raise RuntimeError(f"TRL's LoRA model differs from alignlib's (missing {missing[:3]})")
    with torch.no_grad():
        for name, value in adapter.items():
            params[name].copy_(value)
    return trainer


def _build_trl_kto_step(model, rows: list[dict], device: str, output_dir: str, size: StepSize,
                        losses: list[float]) -> Callable[[], None]:
    trainer = build_trl_kto(model, device, output_dir, size)
    inputs = {k: v.to(device) for k, v in trainer.data_collator(trl_examples(rows)).items()}
    return trl_step_fn(trainer, inputs, losses)


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


def _implementations(size: StepSize, rows: list[dict], device: str, output_dir: str) -> dict:
    """impl name -> a function of the loss list that builds that implementation's step (untimed)."""

    def alignlib(use_kernels: bool):
        return lambda losses: alignlib_step_fn(make_policy(size, device), rows, device, use_kernels=use_kernels,
                                               losses=losses)

    def trl(losses):
        return _build_trl_kto_step(make_policy(size, device), rows, device, output_dir, size, losses)

    def unsloth(losses):
        return _build_trl_kto_step(unsloth_trainer("kto", size, device, output_dir), rows, device, output_dir, size,
                                   losses)

    return {"alignlib": alignlib(False), "alignlib use_kernels": alignlib(True), BASELINE: trl,
            "Unsloth KTOTrainer": unsloth}


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    rows_out = []
    for size in sizes:
        rows = unpaired_rows(size)
        tokens = sum(len(row["input_ids"]) for row in rows)
        case = case_label(size)
        with tempfile.TemporaryDirectory() as output_dir:
            impls = _implementations(size, rows, device, output_dir)
            for impl, make_step in impls.items():
                row = _row(case, impl, make_step, tokens, device, warmup, repeats)
                rows_out.append(row)
                print(f"  {case} | {impl}: {row.median_ms and round(row.median_ms, 1)} ms {row.extra} {row.note}",
                      flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        _add_loss_agreement(rows_out[-len(impls):], BASELINE)
    return rows_out
