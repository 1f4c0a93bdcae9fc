"""One optimizer step of DPO with LoRA: alignlib's trainer step vs TRL 1.16's DPOTrainer (vs Unsloth where it runs).

Every implementation trains its own copy of the same seeded Llama-architecture model (built from
a LlamaConfig, no hub), with the same peft LoRA adapter (r=16 on every projection, dropout 0,
A and B both random so the policy already differs from its reference), on the same synthetic
batch of B pairs of length T (a quarter prompt, rejected responses shorter and right-padded).
The reference policy is the same model with its adapter disabled, for both libraries.

One timed call = one optimizer step on that batch:
- alignlib: `pairwise_terms` + backward + gradient clipping + AdamW step, the way
  `alignlib.trainer.train` does a step (bf16 autocast on CUDA, as train() with bf16=True),
  with use_kernels False and True (fused lm_head + log-softmax, and the fused LoRA matmul
  where Triton runs) as two rows;
- TRL: the trainer, built once outside the timed region, runs `trainer.training_step(model,
  inputs)` (its compute_loss + backward), then the same clipping and its own AdamW step;
- Unsloth's patched trainer where unsloth imports (it needs CUDA).

Tokens/s (all non-padding tokens of chosen and rejected) goes in row.extra["tokens_per_s"], and
the first step's loss of each implementation (from the same weights, so alignlib's and TRL's
must agree) in row.extra["first_step_loss"]. The baseline is TRL.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import NotAvailable, Row, measure

BASELINE = "TRL 1.16 DPOTrainer"
MODE = "optimizer step"
LEARNING_RATE = 1e-5
BETA = 0.1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class StepSize:
    """The model (a Llama built from a config) and the batch: B pairs of T tokens."""

    hidden: int
    layers: int
    vocab: int
    seq: int
    pairs: int
    rank: int = 16

    @property
    def label(self) -> str:
        return f"h={self.hidden} L={self.layers} V={self.vocab} T={self.seq} B={self.pairs} r={self.rank}"


SIZES = {
    "tiny": [StepSize(hidden=64, layers=2, vocab=512, seq=64, pairs=4, rank=8)],
    "cpu": [StepSize(hidden=256, layers=4, vocab=32000, seq=256, pairs=4)],
    "gpu": [StepSize(hidden=2048, layers=16, vocab=32000, seq=1024, pairs=4)],
}


# ----------------------------------------------------------------------------------------------
# Model and batch
# ----------------------------------------------------------------------------------------------


def make_policy(size: StepSize, device: str) -> torch.nn.Module:
    """The seeded Llama with a LoRA adapter (peft); identical weights on every call."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, size.hidden // 64)
    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.hidden * 8 // 3 // 64 * 64
                         or 4 * size.hidden, num_hidden_layers=size.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4), max_position_embeddings=max(size.seq, 128),
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    model = model.to(device)
    # init_lora_weights=False: B is random too, so policy != reference and the first loss is not log 2.
    lora = LoraConfig(r=size.rank, lora_alpha=2 * size.rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    return get_peft_model(model, lora)


def make_batch(size: StepSize, device: str) -> dict[str, torch.Tensor]:
    """alignlib's batch layout: input_ids, attention_mask, labels (2B, T); rows 0..B-1 chosen, B..2B-1 rejected."""
    g = torch.Generator().manual_seed(0)
    rows = 2 * size.pairs
    input_ids = torch.randint(3, size.vocab, (rows, size.seq), generator=g)
    prompt = size.seq // 4
    lengths = torch.full((rows,), size.seq)
    lengths[size.pairs:] = torch.randint(prompt + 1, size.seq + 1, (size.pairs,), generator=g)
    positions = torch.arange(size.seq).expand(rows, size.seq)
    attention_mask = (positions < lengths.unsqueeze(1)).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill((positions < prompt) | (attention_mask == 0), -100)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def trl_dpo_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch as DPOTrainer's collator lays it out (completion_mask instead of labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != -100).long()}


def tiny_tokenizer():
    """The tests' tiny tokenizer: TRL's trainers want one (and a dataset) to be built at all."""
    tests_dir = str(Path(__file__).resolve().parents[1] / "tests")
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)
    from helpers.tiny_tokenizer import tiny_tokenizer as make

    return make()


PLACEHOLDER_ROWS = [{"prompt": "Hello world!", "chosen": " Hello!", "rejected": " The sky is green."}] * 2


# ----------------------------------------------------------------------------------------------
# One step through each library
# ----------------------------------------------------------------------------------------------


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def alignlib_step_fn(objective: str, model: torch.nn.Module, batch: dict, device: str, *, use_kernels: bool,
                     losses: list[float]) -> Callable[[], None]:
    """One optimizer step as alignlib.trainer.train does it (one micro-batch = the whole step)."""
    from alignlib.configs import TrainConfig
    from alignlib.fused_lora import enable_fused_lora
    from alignlib.models import ReferenceForward
    from alignlib.objectives import nll_weight, pairwise_terms
    from alignlib.training import make_optimizer

    cfg = TrainConfig(beta=BETA, learning_rate=LEARNING_RATE, use_kernels=use_kernels, bf16=device == "cuda")
    if use_kernels:  # as the trainer does: LoRA layers through the Triton matmul where it runs
        enable_fused_lora(model)
    reference = ReferenceForward("adapter_disabled", model, disable_adapter=True) if objective == "dpo" else None
    optimizer = make_optimizer(model, cfg.optim, lr=cfg.learning_rate)
    trainable = _trainable(model)
    alpha = nll_weight(objective, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16)

    def step() -> None:
        model.train()
        with autocast:
            terms = pairwise_terms(objective, cfg, model, batch, reference)
            loss = terms.loss_sum / terms.examples
            if alpha:
                loss = loss + alpha * terms.nll_sum / max(terms.nll_tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def trl_step_fn(trainer, inputs: dict, losses: list[float]) -> Callable[[], None]:
    """TRL's training_step (compute_loss + backward), clipping, then the trainer's own optimizer step."""
    model = trainer.model
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop, read by training_step
    trainable = _trainable(model)

    def step() -> None:
        loss = trainer.training_step(model, inputs)
        torch.nn.utils.clip_grad_norm_(trainable, trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    return step


def trl_common_args(device: str, output_dir: str, pairs: int) -> dict:
    return dict(output_dir=output_dir, report_to="none", use_cpu=device == "cpu", bf16=device == "cuda",
                per_device_train_batch_size=pairs, learning_rate=LEARNING_RATE, beta=BETA, max_grad_norm=1.0,
                gradient_checkpointing=False, logging_steps=10**9, save_strategy="no")


def build_trl_dpo(model: torch.nn.Module, device: str, output_dir: str, size: StepSize, trainer_cls=None):
    """DPOTrainer on the same LoRA policy, its reference the base model with the adapter disabled.

    Handed a peft model, DPOTrainer would add a frozen copy of the adapter as the reference
    (a "ref" adapter); the base model and the adapter's config go in instead, so that TRL
    wraps it and disables the adapter for the reference, as alignlib does. The adapter's
    weights are then copied in, so both libraries start from the same policy.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    lora_config = model.peft_config["default"]
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    base = model.unload()
    args = DPOConfig(**trl_common_args(device, output_dir, size.pairs), loss_type="sigmoid", max_length=None,
                     precompute_ref_log_probs=False)
    trainer = (trainer_cls or DPOTrainer)(model=base, ref_model=None, args=args, peft_config=lora_config,
                                          train_dataset=Dataset.from_list(PLACEHOLDER_ROWS),
                                          processing_class=tiny_tokenizer())
    params = dict(trainer.model.named_parameters())
    missing = sorted(set(adapter) - set(params))
    if missing or "ref" in trainer.model.peft_config:
        raise RuntimeError(f"TRL's LoRA model differs from alignlib's (missing {missing[:3]})")
    with torch.no_grad():
        for name, value in adapter.items():
            params[name].copy_(value)
    return trainer


def unsloth_trainer(objective: str, size: StepSize, device: str, output_dir: str):
    """Unsloth's patched TRL trainer on the same model, where unsloth imports (CUDA only)."""
    if device != "cuda":
        raise NotAvailable("unsloth needs CUDA")
    try:
        from unsloth import FastLanguageModel, PatchDPOTrainer
    except ImportError as error:
        raise NotAvailable(f"unsloth does not import: {error}") from error
    if objective == "dpo":
        PatchDPOTrainer()
    base_dir = Path(output_dir) / "base"
    make_policy(size, "cpu").get_base_model().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model, _ = FastLanguageModel.from_pretrained(str(base_dir), max_seq_length=size.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=size.rank, lora_alpha=2 * size.rank, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, use_gradient_checkpointing=False)
    return model


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


def _row(case: str, impl: str, make_step: Callable[[list[float]], Callable[[], None]], tokens: int, device: str,
         warmup: int, repeats: int) -> Row:
    """Build the implementation's step (untimed), then time it; the first step's loss goes in extra."""
    losses: list[float] = []
    try:
        step = make_step(losses)
    except NotAvailable as error:
        return Row(case, impl, MODE, note=f"not run: {error}")
    except Exception as error:  # a peer that cannot be built here is reported, not fatal
        return Row(case, impl, MODE, note=f"failed to build: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    row = measure(case, impl, MODE, step, device, warmup=warmup, repeats=repeats)
    if row.median_ms:
        row.extra["tokens_per_s"] = tokens / (row.median_ms / 1e3)
    if losses:
        row.extra["first_step_loss"] = losses[0]
    return row


def run_objective(objective: str, baseline: str, build_trl, device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    """Rows for one objective ("dpo" or "orpo"): alignlib (kernels off/on), TRL, Unsloth."""
    rows = []
    for size in sizes:
        batch = make_batch(size, device)
        tokens = int(batch["attention_mask"].sum())
        with tempfile.TemporaryDirectory() as output_dir:
            impls = _implementations(objective, baseline, build_trl, size, batch, device, output_dir)
            for impl, make_step in impls.items():
                row = _row(size.label, impl, make_step, tokens, device, warmup, repeats)
                rows.append(row)
                print(f"  {size.label} | {impl}: {row.median_ms and round(row.median_ms, 1)} ms "
                      f"{row.extra} {row.note}", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
        _add_loss_agreement(rows[-len(impls):], baseline)
    return rows


def _implementations(objective, baseline, build_trl, size, batch, device, output_dir) -> dict:
    """impl name -> a function of the loss list that builds that implementation's step (untimed)."""

    def alignlib(use_kernels: bool):
        return lambda losses: alignlib_step_fn(objective, make_policy(size, device), batch, device,
                                               use_kernels=use_kernels, losses=losses)

    def trl(losses):
        return build_trl(make_policy(size, device), batch, device, output_dir, size, losses)

    def unsloth(losses):
        return build_trl(unsloth_trainer(objective, size, device, output_dir), batch, device, output_dir, size, losses)

    return {"alignlib": alignlib(False), "alignlib use_kernels": alignlib(True), baseline: trl,
            f"Unsloth {baseline.split()[-1]}": unsloth}


def _add_loss_agreement(rows: list[Row], baseline: str) -> None:
    """|first-step loss - TRL's| on each row: from identical weights and batch they must agree."""
    base = next((r for r in rows if r.impl == baseline and "first_step_loss" in r.extra), None)
    for row in rows:
        if base is not None and row is not base and "first_step_loss" in row.extra:
            row.extra["first_step_loss_diff_vs_trl"] = abs(row.extra["first_step_loss"] - base.extra["first_step_loss"])


def _build_trl_dpo_step(model, batch, device, output_dir, size, losses):
    trainer = build_trl_dpo(model, device, output_dir, size)
    inputs = trl_dpo_inputs(batch)
    return trl_step_fn(trainer, inputs, losses)


def run(device: str, sizes, warmup: int, repeats: int) -> list[Row]:
    return run_objective("dpo", BASELINE, _build_trl_dpo_step, device, sizes, warmup, repeats)

