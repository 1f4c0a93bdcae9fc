"""Learning parity: alignlib's DPO, KTO and SFT trainers against TRL 1.16's DPOTrainer, KTOTrainer and
SFTTrainer, same task, same hyperparameters.

    python scripts/learning_parity.py                      # DPO, seeds 0 1 2, results table on stdout
    python scripts/learning_parity.py --seeds 0 --steps 50 # a quick look
    python scripts/learning_parity.py --objective kto      # KTO
    python scripts/learning_parity.py --objective sft      # SFT (--packing: packed rows, both libraries)
    python scripts/learning_parity.py --json results.json  # also the raw numbers

The task is alignlib's embedded demo (alignlib/demo): a tiny Llama warm-started to answer
mostly rudely (`prepare_base_model`), train.jsonl's 1000 preference pairs, and
heldout.jsonl's 200 pairs with (verb, thing) combinations and a question template that
training never shows. Both libraries fine-tune every weight from the same base model, with
the same learning rate, batch size, steps, beta, scheduler, optimizer, gradient clipping and
seed, each with a frozen copy of the base model as the reference.

DPO (sigmoid loss): the data order is the same too: alignlib's SeededSampler and accelerate's
SeedableRandomSampler (under TRL's Trainer) both shuffle with torch.randperm seeded by
seed + epoch. So the two runs follow the same trajectory up to float32 round-off, and the
script also reports the largest difference between the two trained models' weights, next
to the largest change training made to any weight.

KTO (loss_type "kto"): the pairs are read as 2000 unpaired rows (alignlib's
`load_unpaired_dataset`: each pair's chosen row, label True, then its rejected row, False).
alignlib shuffles them as for DPO and estimates the reference point z0 on each step's
mismatched pairs (step example j's prompt with example j-1's completion, the first taking
the last's). TRL 1.16's KTOTrainer does not shuffle (it requires
train_sampling_strategy="sequential") and fixes the mismatched pairs when it prepares the
data: it rotates the completions by one within each consecutive block of
per_device_train_batch_size rows (row j gets row j-1's completion, the first the last's), so
each batch's KL pairs are those of that batch. With one micro-batch per step, that is
alignlib's rule exactly, and z0 is the same mean over the same 16 pairs on both sides. So
that the two see the same rows in the same batches, TRL is given the rows in the order
alignlib's trainer visits them (`alignlib.training.Schedule`, the trainer's own sampler: 150
steps x 16 rows, one after the other; a TRL user shuffles before training, since TRL will
not); the script checks that TRL then builds, token for token, alignlib's rows and alignlib's
mismatched pairs. `--trl-order file` gives TRL the pairs file itself instead (TRL unpairs it
into all chosen rows, then all rejected rows, and reads them in that order), for comparison.

Both trained models are then scored by the same function (`heldout_scores`): the fraction of
held-out pairs whose implicit reward margin
    (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
is positive (ties count half), with the base model as the reference and summed log-probs of
the response tokens (the prompt masked), on alignlib's tokenization of the pairs (the script
checks that TRL's tokenization of the training data is token for token the same). For KTO
also the held-out reward margin: beta times that margin, averaged over the held-out pairs,
which is the mean reward of the desirable completions minus that of the undesirable ones
(KTO's rewards/margins on the held-out pairs read as unpaired rows).

SFT: both libraries start from the *untrained* demo model (`prepare_base_model(..., steps=0)`, as
`alignlib train sft` does) and train on train.jsonl's prompts with their chosen answers, written once
as prompt/completion rows (the same file for both), loss on the completion only (its EOS included),
the loss of a step the NLL of its trained tokens over their count. TRL's SFTTrainer does not shuffle
the prepared rows (shuffle_dataset False) and its Trainer samples them like DPO's, so both see the same
batches in the same order; the script records the batches TRL's training_step gets and checks them,
token for token, against alignlib's (`alignlib.training.Schedule` over alignlib's tokenized rows), and
checks TRL's prepared rows against alignlib's (packed too, with --packing: TRL packs best-fit
decreasing into the same rows in the same order, and runs each batch padding-free as one row with
restarting position ids; alignlib keeps the rows and restarts the position ids in each). The learning
rate defaults to 1e-3, not the demo's 3e-3: at 3e-3 training is unstable enough (loss spikes with
gradient norms up to ~9) that float32 round-off grows into different trajectories, between alignlib
and TRL as between alignlib and itself with use_kernels (`--also-alignlib-kernels` runs that
control). Scores (`sft_heldout_scores`, one function for every model): the held-out mean NLL per
trained token of heldout.jsonl's prompts + chosen answers; the share of held-out answers that greedy
decoding reproduces exactly, EOS included (computed teacher-forced: greedy decoding follows the answer
exactly when the argmax at every answer position is the answer's token); and the share of greedy
answers (at most 32 new tokens) to the held-out "how do i ..." prompts that the demo's judge
`demo.is_helpful` calls helpful.

Time is measured end to end for each library, from the base model's path to the trained
model saved on disk (loading policy and reference, tokenizing, training, saving), in this
one process, the two runs of a seed back to back, the order alternating with the seed (even
seeds: alignlib first). Before the first seed, each library makes an untimed 2-step run, so
that no timed run pays the process's one-time costs (importing TRL alone takes ~2 s of CPU
time). For KTO, putting the rows in alignlib's order for TRL is done before TRL's clock
starts. Two clocks: wall time, and this process's CPU time over the same
span, which with one torch thread is the work done and is much less affected than wall time
by other processes on the machine. Both runs use the same torch thread count (--threads,
default 1: on a small shared CPU machine, two intra-op threads contending with other
processes slow tiny matmuls down by orders of magnitude). The load average before each run
is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset, disable_progress_bars, load_dataset
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from alignlib import demo
from alignlib.data import (
    PreferenceCollator,
    SequenceCollator,
    UnpairedCollator,
    load_preference_dataset,
    load_sft_dataset,
    load_unpaired_dataset,
    pack_sequences,
    pad_token_id_for,
    tokenize_preference_dataset,
    tokenize_sft_dataset,
    tokenize_unpaired_dataset,
)
from alignlib.logprobs import IGNORE_INDEX, sequence_logprobs
from alignlib.models import ModelConfig, load_tokenizer
from alignlib.trainer import TrainConfig, train
from alignlib.training import Schedule

MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32  # the demo's; every demo pair fits, so nothing is truncated
LOSS_TYPES = {"dpo": "sigmoid", "kto": "kto"}
TRL_ORDERS = ("alignlib", "file")


@dataclass
class Settings:
    """The hyperparameters both libraries get (names as in TrainConfig, DPOConfig and KTOConfig)."""

    max_steps: int = 150
    per_device_train_batch_size: int = 16
    learning_rate: float = 5e-5
    beta: float = 0.1
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 10


@dataclass
class RunResult:
    library: str
    seed: int
    heldout_accuracy: float | None  # None for SFT (its scores are the last three fields)
    heldout_margin: float | None  # beta x the mean held-out implicit-reward margin (KTO's rewards/margins)
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time over the run: less sensitive than wall time to other processes
    load_average_before: float
    position: int  # 1: ran first for this seed, 2: second
    model_dir: str
    heldout_nll: float | None = None  # SFT: held-out mean NLL per trained token
    exact_match: float | None = None  # SFT: share of held-out answers greedy decoding reproduces exactly
    helpful: float | None = None  # SFT: share of greedy answers to held-out "how do i" prompts that demo.is_helpful passes


# ----------------------------------------------------------------------------------------------
# The two runs
# ----------------------------------------------------------------------------------------------


def run_alignlib(objective: str, base: Path, output_dir: Path, settings: Settings, seed: int, prepared=None):
    cfg = TrainConfig(output_dir=str(output_dir), dataset_name=str(demo.TRAIN_FILE), max_length=MAX_LENGTH,
                      max_prompt_length=MAX_PROMPT_LENGTH, loss_type=LOSS_TYPES[objective], seed=seed, save_steps=0,
                      plot=False, disable_tqdm=True, reference_strategy="model", **asdict(settings))
    result = train(objective, cfg, ModelConfig(model_name_or_path=str(base), dtype="float32"))
    return result.model_dir, None


def trl_args(config_cls, output_dir: Path, settings: Settings, seed: int, objective: str):
    return config_cls(output_dir=str(output_dir), loss_type=LOSS_TYPES[objective], seed=seed, max_length=MAX_LENGTH,
                      gradient_accumulation_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                      use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
                      dataloader_num_workers=0, **asdict(settings))  # TRL defaults bf16 and checkpointing to True


def run_trl(objective: str, base: Path, output_dir: Path, settings: Settings, seed: int, prepared=None):
    """The trained model's directory, and TRL's processed training set (for the token checks).

    `prepared`: KTO's training rows as TRL gets them (`kto_rows_for_trl`), built before the clock starts."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if objective == "dpo":
        trainer = DPOTrainer(model=model, args=trl_args(DPOConfig, output_dir, settings, seed, objective),
                             train_dataset=load_dataset("json", data_files=str(demo.TRAIN_FILE), split="train"),
                             processing_class=load_tokenizer(str(base)))  # ref: loaded from `base`
    else:
        trainer = KTOTrainer(model=model, args=trl_args(KTOConfig, output_dir, settings, seed, objective),
                             train_dataset=prepared, processing_class=load_tokenizer(str(base)))  # ref: from `base`
    trainer.train()
    final = output_dir / "final"
    trainer.save_model(str(final))
    return final, trainer.train_dataset


def check_same_tokens(trl_dataset, base: Path) -> None:
    """TRL's tokenization of the training pairs equals alignlib's, token for token (else the runs differ in data)."""
    ours = _tokenized(demo.TRAIN_FILE, load_tokenizer(str(base)))
    theirs_chosen = [p + c for p, c in zip(trl_dataset["prompt_ids"], trl_dataset["chosen_ids"], strict=True)]
    theirs_rejected = [p + r for p, r in zip(trl_dataset["prompt_ids"], trl_dataset["rejected_ids"], strict=True)]
    if ours["chosen_input_ids"] != theirs_chosen or ours["rejected_input_ids"] != theirs_rejected:
        raise RuntimeError("TRL and alignlib tokenize the demo pairs differently; the comparison would be unfair")


# ----------------------------------------------------------------------------------------------
# KTO: the same rows in the same batches, and the same mismatched pairs
# ----------------------------------------------------------------------------------------------


def alignlib_kto_order(n_rows: int, settings: Settings, seed: int) -> list[int]:
    """The unpaired rows alignlib's trainer uses, step after step (its own Schedule, as train() builds it)."""
    batch = settings.per_device_train_batch_size
    schedule = Schedule(n_rows, batch, batch, seed)
    return [index for step in range(settings.max_steps) for index in schedule.step_indices(step)]


def kto_rows_for_trl(base: Path, settings: Settings, seed: int, trl_order: str) -> tuple[Dataset, list[int] | None]:
    """KTO's training data as TRL is given it, and the order of alignlib's rows it follows (None: the file's).

    "alignlib": alignlib's normalised unpaired rows (strings prompt, completion, label), in the order
    alignlib's trainer visits them. "file": the pairs file itself, which TRL unpairs on its own."""
    if trl_order == "file":
        return load_dataset("json", data_files=str(demo.TRAIN_FILE), split="train"), None
    rows = load_unpaired_dataset(str(demo.TRAIN_FILE), tokenizer=load_tokenizer(str(base)))
    order = alignlib_kto_order(len(rows), settings, seed)
    return rows.select(order), order


def _tokenized_rows(base: Path):
    tokenizer = load_tokenizer(str(base))
    rows, stats = tokenize_unpaired_dataset(load_unpaired_dataset(str(demo.TRAIN_FILE), tokenizer=tokenizer),
                                            tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    if stats.dropped_empty_response or stats.prompts_truncated or stats.responses_truncated:
        raise RuntimeError(f"the demo rows were truncated or dropped ({stats}); the order check assumes none are")
    return rows, pad_token_id_for(tokenizer)


def check_same_kto_batches(trl_dataset, base: Path, order: list[int] | None, batch_size: int) -> None:
    """TRL's processed KTO rows are alignlib's tokenized rows, in alignlib's order (or, for the file's
    order, TRL's unpairing: every chosen row, then every rejected row), and each batch's KL sequences are
    alignlib's mismatched pairs of that step (UnpairedCollator.mismatched), token for token."""
    ours, pad = _tokenized_rows(base)
    if order is None:  # TRL unpaired the file: pair i's chosen row at i, its rejected row at n_pairs + i
        pairs = len(ours) // 2
        order = [2 * i for i in range(pairs)] + [2 * i + 1 for i in range(pairs)]
        order = order[: len(trl_dataset)]
    theirs = [p + c for p, c in zip(trl_dataset["prompt_ids"], trl_dataset["completion_ids"], strict=True)]
    if len(theirs) != len(order) or any(ours[i]["input_ids"] != t for i, t in zip(order, theirs, strict=True)) \
            or [bool(ours[i]["label"]) for i in order] != [bool(label) for label in trl_dataset["label"]]:
        raise RuntimeError("TRL's KTO rows are not alignlib's rows in the expected order; the comparison would be unfair")
    collator = UnpairedCollator(pad, max_length=MAX_LENGTH)
    kl_theirs = [p + c for p, c in zip(trl_dataset["prompt_ids"], trl_dataset["KL_completion_ids"], strict=True)]
    for start in range(0, len(order), batch_size):
        step = order[start: start + batch_size]
        mismatched = collator.mismatched([ours[i] for i in step], [ours[step[j - 1]] for j in range(len(step))])
        for row, ids in enumerate(kl_theirs[start: start + batch_size]):
            n = int(mismatched["attention_mask"][row].sum())
            if mismatched["input_ids"][row, :n].tolist() != ids:
                raise RuntimeError(f"TRL's KL pair {start + row} differs from alignlib's mismatched pair")


# ----------------------------------------------------------------------------------------------
# SFT: the untrained model, trained on the prompts with their chosen answers
# ----------------------------------------------------------------------------------------------

SFT_LEARNING_RATE = 1e-3  # not the demo's 3e-3: see the module docstring
SFT_MAX_NEW_TOKENS = 32  # greedy answers to the held-out prompts (a chosen answer has at most 18 tokens with EOS)


@dataclass(frozen=True)
class SFTOptions:
    data: Path  # the prompt/completion rows both libraries read (sft_rows_file)
    packing: bool = False


def sft_rows_file(workdir: Path) -> Path:
    """train.jsonl's prompts with their chosen answers as prompt/completion rows, in a JSON Lines file that
    both libraries read (written before any clock starts)."""
    path = workdir / "sft_train.jsonl"
    rows = [{"prompt": pair["prompt"], "completion": pair["chosen"]} for pair in demo.read_pairs(demo.TRAIN_FILE)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_settings(settings: Settings) -> dict:
    """The settings SFT takes: all but beta."""
    return {key: value for key, value in asdict(settings).items() if key != "beta"}


def run_alignlib_sft(base: Path, output_dir: Path, settings: Settings, seed: int, options: SFTOptions,
                     use_kernels: bool = False) -> Path:
    cfg = TrainConfig(output_dir=str(output_dir), dataset_name=str(options.data), max_length=MAX_LENGTH, seed=seed,
                      packing=options.packing, use_kernels=use_kernels, save_steps=0, plot=False, disable_tqdm=True,
                      **sft_settings(settings))
    return train("sft", cfg, ModelConfig(model_name_or_path=str(base), dtype="float32")).model_dir


def run_trl_sft(base: Path, output_dir: Path, settings: Settings, seed: int, options: SFTOptions):
    """The trained model's directory, TRL's prepared training set, and the batches its training_step got, in
    order (copies of input_ids, labels and, unpacked, the attention mask), for the checks."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(output_dir), seed=seed, max_length=MAX_LENGTH, packing=options.packing,
                     completion_only_loss=True, shuffle_dataset=False, gradient_accumulation_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                     bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, **sft_settings(settings))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), args=args,
                         train_dataset=load_dataset("json", data_files=str(options.data), split="train"),
                         processing_class=load_tokenizer(str(base)))
    batches, training_step = [], trainer.training_step

    def recording_step(model, inputs, *rest, **kwargs):
        batches.append({key: inputs[key].clone() for key in ("input_ids", "labels", "attention_mask") if key in inputs})
        return training_step(model, inputs, *rest, **kwargs)

    trainer.training_step = recording_step
    trainer.train()
    final = output_dir / "final"
    trainer.save_model(str(final))
    return final, trainer.train_dataset, batches


def alignlib_sft_rows(base: Path, source: Path, packing: bool):
    """alignlib's tokenized training rows of `source` (packed with `packing`), as its trainer builds them."""
    tokenizer = load_tokenizer(str(base))
    rows, stats = tokenize_sft_dataset(load_sft_dataset(str(source), tokenizer), tokenizer, max_length=MAX_LENGTH)
    if stats.truncated or stats.dropped_no_trained_token:
        raise RuntimeError(f"the demo's SFT rows were truncated or dropped ({stats}); the checks assume none are")
    return pack_sequences(rows, MAX_LENGTH) if packing else rows


def check_same_sft_batches(trl_dataset, batches: list[dict], base: Path, settings: Settings, seed: int,
                           options: SFTOptions) -> None:
    """TRL's prepared rows are alignlib's, token for token (ids, labels, packed sequence lengths; alignlib reading
    the pairs file itself, as the demo does, builds the same rows), and the batch of each step TRL trained on
    holds alignlib's rows of that step in the same order (its real tokens and their labels, row after row)."""
    ours = alignlib_sft_rows(base, options.data, options.packing)
    columns = ("input_ids", "labels", "seq_lengths") if options.packing else ("input_ids", "labels")
    if any(ours[column] != trl_dataset[column] for column in columns):
        raise RuntimeError("TRL's prepared SFT rows are not alignlib's; the comparison would be unfair")
    from_pairs = alignlib_sft_rows(base, demo.TRAIN_FILE, options.packing)
    if any(from_pairs[column] != ours[column] for column in columns):
        raise RuntimeError("alignlib builds other rows from the pairs file than from its prompt/completion rows")
    size = settings.per_device_train_batch_size
    schedule = Schedule(len(ours), size, size, seed)
    if len(batches) != settings.max_steps:
        raise RuntimeError(f"TRL ran {len(batches)} training steps, not {settings.max_steps}")
    for step, theirs in enumerate(batches):
        rows = [ours[i] for i in schedule.step_indices(step)]
        real = theirs["attention_mask"].bool() if "attention_mask" in theirs else torch.ones_like(theirs["input_ids"],
                                                                                                  dtype=torch.bool)
        for column in ("input_ids", "labels"):
            if theirs[column][real].tolist() != [token for row in rows for token in row[column]]:
                raise RuntimeError(f"step {step + 1}: TRL's batch ({column}) is not alignlib's rows of that step")


@torch.no_grad()
def sft_heldout_scores(model_dir: Path, base: Path) -> tuple[float, float, float]:
    """The model in model_dir on the held-out pairs' prompts + chosen answers: (mean NLL per trained token,
    the share of answers that greedy decoding reproduces exactly, EOS included), and the share of its greedy
    answers to the held-out "how do i ..." prompts that demo.is_helpful passes.

    Exact match is computed teacher-forced: greedy decoding reproduces an answer exactly if and only if, at
    every position of the answer, the most likely next token given the answer so far is the answer's token."""
    from transformers import GenerationConfig

    tokenizer = load_tokenizer(str(base))
    rows, stats = tokenize_sft_dataset(load_sft_dataset(str(demo.HELDOUT_FILE), tokenizer), tokenizer,
                                       max_length=MAX_LENGTH)
    if stats.truncated or stats.dropped_no_trained_token:
        raise RuntimeError(f"the held-out SFT rows were truncated or dropped ({stats})")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = SequenceCollator(pad_token_id_for(tokenizer))
    nll, tokens, exact = 0.0, 0, 0
    for start in range(0, len(rows), 50):
        batch = collate([rows[i] for i in range(start, min(start + 50, len(rows)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll -= sequence_logprobs(logits, batch["labels"]).double().sum().item()
        labels = batch["labels"][:, 1:]
        trained = labels != IGNORE_INDEX
        tokens += int(trained.sum())
        exact += int(((logits[:, :-1].argmax(-1) == labels) | ~trained).all(-1).sum())
    prompts = demo.demo_prompts(demo.HELDOUT_FILE)
    left = load_tokenizer(str(base), padding_side="left")
    encoded = left(prompts, return_tensors="pt", padding=True)
    config = GenerationConfig(do_sample=False, max_new_tokens=SFT_MAX_NEW_TOKENS, pad_token_id=left.pad_token_id,
                              eos_token_id=left.eos_token_id, bos_token_id=None)
    generated = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                               generation_config=config)
    answers = left.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    return nll / tokens, exact / len(rows), sum(map(demo.is_helpful, answers)) / len(answers)


def timed_sft_run(library: str, base: Path, workdir: Path, settings: Settings, seed: int, position: int,
                  options: SFTOptions, name: str | None = None) -> RunResult:
    """One timed SFT run (base model path to saved model), its checks (TRL), and its held-out scores.
    name "alignlib-kernels": alignlib with use_kernels, the round-off control."""
    output_dir = workdir / f"sft{'-packed' if options.packing else ''}-{name or library}-seed{seed}"
    load = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    if library == "trl":
        model_dir, trl_dataset, batches = run_trl_sft(base, output_dir, settings, seed, options)
    else:
        model_dir = run_alignlib_sft(base, output_dir, settings, seed, options, use_kernels=name == "alignlib-kernels")
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if library == "trl":
        check_same_sft_batches(trl_dataset, batches, base, settings, seed, options)
    nll, exact, helpful = sft_heldout_scores(model_dir, base)
    print(f"seed {seed} {name or library:8s} held-out NLL {nll:.4f}  exact {exact:.3f}  helpful {helpful:.3f}  "
          f"wall {seconds:.1f} s  CPU {cpu_seconds:.1f} s  (load average before {load:.2f})", flush=True)
    return RunResult(name or library, seed, None, None, seconds, cpu_seconds, load, position, str(model_dir),
                     heldout_nll=nll, exact_match=exact, helpful=helpful)


def sft_table(results: list[RunResult], base_scores: tuple[float, float, float],
              weights: dict[int, tuple[float, float]]) -> str:
    """The per-seed SFT table and the mean row."""
    lines = ["| seed | alignlib NLL | TRL NLL | difference | alignlib exact | TRL exact | alignlib helpful "
             "| TRL helpful | alignlib wall (s) | TRL wall (s) | alignlib CPU (s) | TRL CPU (s) | ran first "
             "| max weight diff. | max weight change |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    seeds = sorted({r.seed for r in results})
    for seed in seeds:
        ours = next(r for r in results if r.seed == seed and r.library == "alignlib")
        theirs = next(r for r in results if r.seed == seed and r.library == "trl")
        lines.append(f"| {seed} | {ours.heldout_nll:.4f} | {theirs.heldout_nll:.4f} | "
                     f"{ours.heldout_nll - theirs.heldout_nll:+.4f} | {ours.exact_match:.3f} | {theirs.exact_match:.3f} | "
                     f"{ours.helpful:.3f} | {theirs.helpful:.3f} | {ours.wall_seconds:.1f} | {theirs.wall_seconds:.1f} | "
                     f"{ours.cpu_seconds:.1f} | {theirs.cpu_seconds:.1f} | "
                     f"{'alignlib' if ours.position == 1 else 'TRL'} | {weights[seed][0]:.1e} | {weights[seed][1]:.1e} |")

    def mean(library: str, field: str) -> float:
        return sum(getattr(r, field) for r in results if r.library == library) / len(seeds)

    cells = [f"{mean('alignlib', 'heldout_nll'):.4f}", f"{mean('trl', 'heldout_nll'):.4f}",
             f"{mean('alignlib', 'heldout_nll') - mean('trl', 'heldout_nll'):+.4f}"]
    cells += [f"{mean(lib, field):{fmt}}" for field, fmt in (("exact_match", ".3f"), ("helpful", ".3f"),
                                                             ("wall_seconds", ".1f"), ("cpu_seconds", ".1f"))
              for lib in ("alignlib", "trl")]
    lines.append(f"| mean | {' | '.join(cells)} | | | |")
    lines.append(f"\nUntrained model: held-out NLL {base_scores[0]:.4f}, exact {base_scores[1]:.3f}, "
                 f"helpful {base_scores[2]:.3f}.")
    return "\n".join(lines)


def main_sft(args: argparse.Namespace, settings: Settings, workdir: Path) -> None:
    """The SFT comparison: the untrained demo model, then per seed the two runs (and the control), the table."""
    base = demo.prepare_base_model(workdir / "untrained", steps=0, show_progress=False)
    options = SFTOptions(sft_rows_file(workdir), packing=args.packing)
    base_scores = sft_heldout_scores(base, base)
    print(f"objective sft{' (packed)' if args.packing else ''}; settings: {sft_settings(settings)}; "
          f"threads {args.threads}; workdir {workdir}", flush=True)
    short = replace(settings, max_steps=2, logging_steps=1)  # the untimed warm-up runs
    run_alignlib_sft(base, workdir / "sft-warmup-alignlib", short, args.seeds[0], options)
    run_trl_sft(base, workdir / "sft-warmup-trl", short, args.seeds[0], options)

    results, weights, controls = [], {}, []
    for seed in args.seeds:
        order = ("alignlib", "trl") if seed % 2 == 0 else ("trl", "alignlib")
        runs = {library: timed_sft_run(library, base, workdir, settings, seed, position, options)
                for position, library in enumerate(order, start=1)}
        results += runs.values()
        weights[seed] = weight_differences(Path(runs["alignlib"].model_dir), Path(runs["trl"].model_dir), base)
        print(f"seed {seed} max |w_alignlib - w_TRL| {weights[seed][0]:.2e}; "
              f"max |w_alignlib - w_base| {weights[seed][1]:.2e}", flush=True)
        if args.also_alignlib_kernels:
            control = timed_sft_run("alignlib", base, workdir, settings, seed, 3, options, name="alignlib-kernels")
            difference = weight_differences(Path(runs["alignlib"].model_dir), Path(control.model_dir), base)[0]
            controls.append((control, difference))
            print(f"seed {seed} max |w_alignlib - w_alignlib_kernels| {difference:.2e}", flush=True)
    print()
    print(sft_table(results, base_scores, weights))
    for control, difference in controls:
        print(f"\nalignlib use_kernels (seed {control.seed}): held-out NLL {control.heldout_nll:.4f}, exact "
              f"{control.exact_match:.3f}, helpful {control.helpful:.3f}, max |w - w_alignlib| {difference:.1e}, "
              f"wall {control.wall_seconds:.1f} s, CPU {control.cpu_seconds:.1f} s.")
    if args.json:
        args.json.write_text(json.dumps({"objective": "sft", "packing": args.packing,
                                         "settings": sft_settings(settings), "threads": args.threads,
                                         "base_scores": base_scores, "runs": [asdict(r) for r in results],
                                         "weight_differences": weights,
                                         "controls": [{**asdict(c), "max_weight_diff_vs_alignlib": d}
                                                      for c, d in controls]}, indent=2))


# ----------------------------------------------------------------------------------------------
# The one evaluation both models get
# ----------------------------------------------------------------------------------------------


def _tokenized(path: Path, tokenizer):
    pairs = load_preference_dataset(str(path), tokenizer=tokenizer)
    tokenized, _ = tokenize_preference_dataset(pairs, tokenizer, max_length=MAX_LENGTH,
                                               max_prompt_length=MAX_PROMPT_LENGTH)
    return tokenized


@torch.no_grad()
def response_logps(model_dir: Path, tokenized, pad_token_id: int, batch_size: int = 50) -> torch.Tensor:
    """(N, 2) summed response log-probs (chosen, rejected) of every pair under the model in model_dir."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = PreferenceCollator(pad_token_id)
    rows = []
    for start in range(0, len(tokenized), batch_size):
        batch = collate([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logprobs(logits, batch["labels"])
        pairs = logps.shape[0] // 2
        rows.append(torch.stack([logps[:pairs], logps[pairs:]], dim=-1))
    return torch.cat(rows)


def heldout_scores(model_dir: Path, base: Path, beta: float) -> tuple[float, float]:
    """Held-out implicit-reward accuracy of the model in model_dir against the base model (ties count half),
    and the held-out reward margin: beta x the mean of the pairs' implicit-reward margins."""
    tokenizer = load_tokenizer(str(base))
    tokenized = _tokenized(demo.HELDOUT_FILE, tokenizer)
    pad = pad_token_id_for(tokenizer)
    policy, reference = response_logps(model_dir, tokenized, pad), response_logps(base, tokenized, pad)
    margins = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    accuracy = ((margins > 0).double().mean() + 0.5 * (margins == 0).double().mean()).item()
    return accuracy, beta * margins.double().mean().item()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def timed_run(objective: str, library: str, base: Path, workdir: Path, settings: Settings, seed: int, position: int,
              trl_order: str = "alignlib", name: str | None = None) -> RunResult:
    prepared, order = (None, None)
    if library == "trl" and objective == "kto":  # before the clock: putting the rows in alignlib's order
        prepared, order = kto_rows_for_trl(base, settings, seed, trl_order)
    load = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    runner = run_alignlib if library == "alignlib" else run_trl
    model_dir, trl_dataset = runner(objective, base, workdir / f"{objective}-{name or library}-seed{seed}", settings,
                                    seed, prepared)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if trl_dataset is not None and objective == "dpo":
        check_same_tokens(trl_dataset, base)
    elif trl_dataset is not None:
        check_same_kto_batches(trl_dataset, base, order, settings.per_device_train_batch_size)
    accuracy, margin = heldout_scores(model_dir, base, settings.beta)
    print(f"seed {seed} {name or library:8s} held-out accuracy {accuracy:.3f}  margin {margin:.3f}  wall {seconds:.1f} s"
          f"  CPU {cpu_seconds:.1f} s  (load average before {load:.2f})", flush=True)
    return RunResult(name or library, seed, accuracy, margin, seconds, cpu_seconds, load, position, str(model_dir))


def warm_up(objective: str, base: Path, workdir: Path, settings: Settings, seed: int) -> None:
    """A 2-step run of each library, untimed, so that no timed run pays the process's one-time costs
    (importing TRL, first calls into torch, accelerate and datasets)."""
    short = replace(settings, max_steps=2, logging_steps=1)
    for library, runner in (("alignlib", run_alignlib), ("trl", run_trl)):
        prepared = kto_rows_for_trl(base, short, seed, "alignlib")[0] if library == "trl" and objective == "kto" else None
        runner(objective, base, workdir / f"{objective}-warmup-{library}", short, seed, prepared)


def weight_differences(ours: Path, theirs: Path, base: Path) -> tuple[float, float]:
    """(max |w_alignlib - w_TRL|, max |w_alignlib - w_base|) over every weight entry."""
    def weights(path: Path) -> dict[str, torch.Tensor]:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()

    a, b, w0 = weights(ours), weights(theirs), weights(base)
    return (max((a[k] - b[k]).abs().max().item() for k in a), max((a[k] - w0[k]).abs().max().item() for k in a))


def table(results: list[RunResult], base_accuracy: float, weights: dict[int, tuple[float, float]],
          margins: bool = False) -> str:
    """The per-seed table (with the held-out reward margins when `margins`), and the mean row."""
    margin_head, margin_rule = ("alignlib margin | TRL margin | ", "---:|---:|") if margins else ("", "")
    lines = [f"| seed | alignlib acc. | TRL acc. | difference | {margin_head}alignlib wall (s) | TRL wall (s) "
             "| alignlib CPU (s) | TRL CPU (s) | ran first | max weight diff. | max weight change |",
             f"|---:|---:|---:|---:|{margin_rule}---:|---:|---:|---:|---|---:|---:|"]
    seeds = sorted({r.seed for r in results})
    for seed in seeds:
        ours = next(r for r in results if r.seed == seed and r.library == "alignlib")
        theirs = next(r for r in results if r.seed == seed and r.library == "trl")
        first = "alignlib" if ours.position == 1 else "TRL"
        margin_cells = f"{ours.heldout_margin:.3f} | {theirs.heldout_margin:.3f} | " if margins else ""
        lines.append(f"| {seed} | {ours.heldout_accuracy:.3f} | {theirs.heldout_accuracy:.3f} | "
                     f"{ours.heldout_accuracy - theirs.heldout_accuracy:+.3f} | {margin_cells}{ours.wall_seconds:.1f} | "
                     f"{theirs.wall_seconds:.1f} | {ours.cpu_seconds:.1f} | {theirs.cpu_seconds:.1f} | {first} | "
                     f"{weights[seed][0]:.1e} | {weights[seed][1]:.1e} |")

    def mean(library: str, field: str) -> float:
        return sum(getattr(r, field) for r in results if r.library == library) / len(seeds)

    acc = {lib: mean(lib, "heldout_accuracy") for lib in ("alignlib", "trl")}
    margin_cells = (f"{mean('alignlib', 'heldout_margin'):.3f} | {mean('trl', 'heldout_margin'):.3f} | "
                    if margins else "")
    lines.append(f"| mean | {acc['alignlib']:.3f} | {acc['trl']:.3f} | {acc['alignlib'] - acc['trl']:+.3f} | "
                 f"{margin_cells}{mean('alignlib', 'wall_seconds'):.1f} | {mean('trl', 'wall_seconds'):.1f} | "
                 f"{mean('alignlib', 'cpu_seconds'):.1f} | {mean('trl', 'cpu_seconds'):.1f} | | | |")
    lines.append(f"\nBase model (before training) held-out accuracy: {base_accuracy:.3f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objective", choices=[*sorted(LOSS_TYPES), "sft"], default="dpo",
                        help="dpo (sigmoid) against DPOTrainer, kto (kto) against KTOTrainer, or sft against "
                             "SFTTrainer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=Settings.max_steps)
    parser.add_argument("--batch-size", type=int, default=Settings.per_device_train_batch_size)
    parser.add_argument("--lr", type=float, default=None,
                        help=f"default {Settings.learning_rate} (dpo, kto), {SFT_LEARNING_RATE} (sft)")
    parser.add_argument("--beta", type=float, default=Settings.beta)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for both runs")
    parser.add_argument("--trl-order", choices=TRL_ORDERS, default="alignlib",
                        help="KTO: the rows TRL reads, in alignlib's step order (default) or the pairs file as TRL "
                             "unpairs it")
    parser.add_argument("--also-trl-file-order", action="store_true",
                        help="KTO: also one TRL run on the pairs file in TRL's own order (first seed; it does not "
                             "depend on the seed), scored the same way")
    parser.add_argument("--packing", action="store_true",
                        help="SFT: both libraries pack the sequences into rows of max_length (64) tokens; "
                             "--batch-size then counts packed rows")
    parser.add_argument("--also-alignlib-kernels", action="store_true",
                        help="SFT: also an alignlib run with use_kernels per seed (the same math, other round-off), "
                             "and its weights' largest difference from the plain alignlib run's")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()
    if args.lr is None:
        args.lr = SFT_LEARNING_RATE if args.objective == "sft" else Settings.learning_rate
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or args.beta <= 0 or args.threads < 1:
        parser.error("--steps, --batch-size and --threads must be >= 1, --lr and --beta > 0")
    if args.objective == "kto" and args.batch_size < 2:
        parser.error("KTO needs --batch-size >= 2 (TRL's KTOTrainer refuses 1: z0 would be the example's own reward)")
    if args.objective != "kto" and (args.trl_order != "alignlib" or args.also_trl_file_order):
        parser.error("--trl-order and --also-trl-file-order are for --objective kto")
    if args.objective != "sft" and (args.packing or args.also_alignlib_kernels):
        parser.error("--packing and --also-alignlib-kernels are for --objective sft")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    disable_progress_bars()  # datasets' map bars, and transformers' weight-loading bars
    transformers_logging.disable_progress_bar()
    settings = Settings(max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                        beta=args.beta)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="learning-parity-"))
    if args.objective == "sft":
        main_sft(args, settings, workdir)
        return
    base = demo.prepare_base_model(workdir / "base", show_progress=False)
    base_accuracy, _ = heldout_scores(base, base, settings.beta)
    print(f"objective {args.objective}; settings: {asdict(settings)}; threads {args.threads}; workdir {workdir}",
          flush=True)
    warm_up(args.objective, base, workdir, settings, args.seeds[0])

    results, weights = [], {}
    for seed in args.seeds:
        order = ("alignlib", "trl") if seed % 2 == 0 else ("trl", "alignlib")
        runs = {library: timed_run(args.objective, library, base, workdir, settings, seed, position, args.trl_order)
                for position, library in enumerate(order, start=1)}
        results += runs.values()
        weights[seed] = weight_differences(Path(runs["alignlib"].model_dir), Path(runs["trl"].model_dir), base)
        print(f"seed {seed} max |w_alignlib - w_TRL| {weights[seed][0]:.2e}; "
              f"max |w_alignlib - w_base| {weights[seed][1]:.2e}", flush=True)
    extra = []
    if args.also_trl_file_order:
        extra.append(timed_run("kto", "trl", base, workdir, settings, args.seeds[0], 3, "file", name="trl-file-order"))
    print()
    print(table(results, base_accuracy, weights, margins=args.objective == "kto"))
    for run in extra:
        print(f"\nTRL on the pairs file in its own order (seed {run.seed}): held-out accuracy {run.heldout_accuracy:.3f}, "
              f"margin {run.heldout_margin:.3f}, wall {run.wall_seconds:.1f} s, CPU {run.cpu_seconds:.1f} s.")
    if args.json:
        args.json.write_text(json.dumps({"objective": args.objective, "settings": asdict(settings),
                                         "threads": args.threads, "trl_order": args.trl_order,
                                         "base_accuracy": base_accuracy,
                                         "runs": [asdict(r) for r in results + extra],
                                         "weight_differences": weights}, indent=2))


if __name__ == "__main__":
    main()
