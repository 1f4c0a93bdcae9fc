"""Learning parity: alignlib's DPO trainer and TRL 1.16's DPOTrainer, same task, same hyperparameters.

    python scripts/learning_parity.py                      # seeds 0 1 2, results table on stdout
    python scripts/learning_parity.py --seeds 0 --steps 50 # a quick look
    python scripts/learning_parity.py --json results.json  # also the raw numbers

The task is alignlib's embedded demo (alignlib/demo): a tiny Llama warm-started to answer
mostly rudely (`prepare_base_model`), train.jsonl's 1000 preference pairs, and
heldout.jsonl's 200 pairs with (verb, thing) combinations and a question template that
training never shows. Both libraries fine-tune every weight with DPO's sigmoid loss from
the same base model, with the same learning rate, batch size, steps, beta, scheduler,
optimizer, gradient clipping and seed, each with a frozen copy of the base model as the
reference. The data order is the same too: alignlib's SeededSampler and accelerate's
SeedableRandomSampler (under TRL's Trainer) both shuffle with torch.randperm seeded by
seed + epoch. So the two runs follow the same trajectory up to float32 round-off, and the
script also reports the largest difference between the two trained models' weights, next
to the largest change training made to any weight.

Both trained models are then scored by the same function (`heldout_accuracy`): the
fraction of held-out pairs whose implicit reward margin
    (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
is positive (ties count half), with the base model as the reference and summed log-probs
of the response tokens (the prompt masked), on alignlib's tokenization of the pairs (the
script checks that TRL's tokenization of the training pairs is token for token the same).

Time is measured end to end for each library, from the base model's path to the trained
model saved on disk (loading policy and reference, tokenizing, training, saving), in this
one process, the two runs of a seed back to back, the order alternating with the seed (even
seeds: alignlib first). Two clocks: wall time, and this process's CPU time over the same
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM

from alignlib import demo
from alignlib.data import (
    PreferenceCollator,
    load_preference_dataset,
    pad_token_id_for,
    tokenize_preference_dataset,
)
from alignlib.logprobs import sequence_logprobs
from alignlib.models import ModelConfig, load_tokenizer
from alignlib.trainer import TrainConfig, train

MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32  # the demo's; every demo pair fits, so nothing is truncated


@dataclass
class Settings:
    """The hyperparameters both libraries get (names as in TrainConfig and DPOConfig)."""

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
    heldout_accuracy: float
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time over the run: less sensitive than wall time to other processes
    load_average_before: float
    position: int  # 1: ran first for this seed, 2: second
    model_dir: str


# ----------------------------------------------------------------------------------------------
# The two runs
# ----------------------------------------------------------------------------------------------


def run_alignlib(base: Path, output_dir: Path, settings: Settings, seed: int) -> tuple[Path, None]:
    cfg = TrainConfig(output_dir=str(output_dir), dataset_name=str(demo.TRAIN_FILE), max_length=MAX_LENGTH,
                      max_prompt_length=MAX_PROMPT_LENGTH, loss_type="sigmoid", seed=seed, save_steps=0,
                      plot=False, disable_tqdm=True, reference_strategy="model", **asdict(settings))
    result = train("dpo", cfg, ModelConfig(model_name_or_path=str(base), dtype="float32"))
    return result.model_dir, None


def run_trl(base: Path, output_dir: Path, settings: Settings, seed: int):
    """The trained model's directory, and TRL's processed training set (for `check_same_tokens`)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(output_dir), loss_type="sigmoid", seed=seed, max_length=MAX_LENGTH,
                     gradient_accumulation_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                     use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
                     dataloader_num_workers=0, **asdict(settings))  # TRL defaults bf16 and checkpointing to True
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(demo.TRAIN_FILE),
                         split="train"), processing_class=load_tokenizer(str(base)))  # ref: loaded from `base`
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


def heldout_accuracy(model_dir: Path, base: Path) -> float:
    """Held-out implicit-reward accuracy of the model in model_dir against the base model (ties count half)."""
    tokenizer = load_tokenizer(str(base))
    tokenized = _tokenized(demo.HELDOUT_FILE, tokenizer)
    pad = pad_token_id_for(tokenizer)
    policy, reference = response_logps(model_dir, tokenized, pad), response_logps(base, tokenized, pad)
    margins = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return ((margins > 0).double().mean() + 0.5 * (margins == 0).double().mean()).item()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def timed_run(library: str, base: Path, workdir: Path, settings: Settings, seed: int, position: int) -> RunResult:
    load = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    runner = run_alignlib if library == "alignlib" else run_trl
    model_dir, trl_dataset = runner(base, workdir / f"{library}-seed{seed}", settings, seed)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if trl_dataset is not None:
        check_same_tokens(trl_dataset, base)
    accuracy = heldout_accuracy(model_dir, base)
    print(f"seed {seed} {library:8s} held-out accuracy {accuracy:.3f}  wall {seconds:.1f} s  CPU {cpu_seconds:.1f} s  "
          f"(load average before {load:.2f})", flush=True)
    return RunResult(library, seed, accuracy, seconds, cpu_seconds, load, position, str(model_dir))


def weight_differences(ours: Path, theirs: Path, base: Path) -> tuple[float, float]:
    """(max |w_alignlib - w_TRL|, max |w_alignlib - w_base|) over every weight entry."""
    def weights(path: Path) -> dict[str, torch.Tensor]:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()

    a, b, w0 = weights(ours), weights(theirs), weights(base)
    return (max((a[k] - b[k]).abs().max().item() for k in a), max((a[k] - w0[k]).abs().max().item() for k in a))


def table(results: list[RunResult], base_accuracy: float, weights: dict[int, tuple[float, float]]) -> str:
    lines = ["| seed | alignlib acc. | TRL acc. | difference | alignlib wall (s) | TRL wall (s) | alignlib CPU (s) "
             "| TRL CPU (s) | ran first | max weight diff. | max weight change |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    seeds = sorted({r.seed for r in results})
    for seed in seeds:
        ours = next(r for r in results if r.seed == seed and r.library == "alignlib")
        theirs = next(r for r in results if r.seed == seed and r.library == "trl")
        first = "alignlib" if ours.position == 1 else "TRL"
        lines.append(f"| {seed} | {ours.heldout_accuracy:.3f} | {theirs.heldout_accuracy:.3f} | "
                     f"{ours.heldout_accuracy - theirs.heldout_accuracy:+.3f} | {ours.wall_seconds:.1f} | "
                     f"{theirs.wall_seconds:.1f} | {ours.cpu_seconds:.1f} | {theirs.cpu_seconds:.1f} | {first} | "
                     f"{weights[seed][0]:.1e} | {weights[seed][1]:.1e} |")
    mean = {lib: sum(r.heldout_accuracy for r in results if r.library == lib) / len(seeds) for lib in ("alignlib", "trl")}
    wall = {lib: sum(r.wall_seconds for r in results if r.library == lib) / len(seeds) for lib in ("alignlib", "trl")}
    cpu = {lib: sum(r.cpu_seconds for r in results if r.library == lib) / len(seeds) for lib in ("alignlib", "trl")}
    lines.append(f"| mean | {mean['alignlib']:.3f} | {mean['trl']:.3f} | {mean['alignlib'] - mean['trl']:+.3f} | "
                 f"{wall['alignlib']:.1f} | {wall['trl']:.1f} | {cpu['alignlib']:.1f} | {cpu['trl']:.1f} | | | |")
    lines.append(f"\nBase model (before training) held-out accuracy: {base_accuracy:.3f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=Settings.max_steps)
    parser.add_argument("--batch-size", type=int, default=Settings.per_device_train_batch_size)
    parser.add_argument("--lr", type=float, default=Settings.learning_rate)
    parser.add_argument("--beta", type=float, default=Settings.beta)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for both runs")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0 or args.beta <= 0 or args.threads < 1:
        parser.error("--steps, --batch-size and --threads must be >= 1, --lr and --beta > 0")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    settings = Settings(max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                        beta=args.beta)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="learning-parity-"))
    base = demo.prepare_base_model(workdir / "base")
    base_accuracy = heldout_accuracy(base, base)
    print(f"settings: {asdict(settings)}; threads {args.threads}; workdir {workdir}", flush=True)

    results, weights = [], {}
    for seed in args.seeds:
        order = ("alignlib", "trl") if seed % 2 == 0 else ("trl", "alignlib")
        runs = {library: timed_run(library, base, workdir, settings, seed, position)
                for position, library in enumerate(order, start=1)}
        results += runs.values()
        weights[seed] = weight_differences(Path(runs["alignlib"].model_dir), Path(runs["trl"].model_dir), base)
        print(f"seed {seed} max |w_alignlib - w_TRL| {weights[seed][0]:.2e}; "
              f"max |w_alignlib - w_base| {weights[seed][1]:.2e}", flush=True)
    print()
    print(table(results, base_accuracy, weights))
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(settings), "threads": args.threads,
                                         "base_accuracy": base_accuracy,
                                         "runs": [asdict(r) for r in results],
                                         "weight_differences": weights}, indent=2))


if __name__ == "__main__":
    main()
