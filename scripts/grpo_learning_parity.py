"""Learning parity: alignlib's GRPO (alignlib.rl) and TRL 1.16's GRPOTrainer, same task, same hyperparameters.

    python scripts/grpo_learning_parity.py                       # seeds 0 1 2, a table on stdout
    python scripts/grpo_learning_parity.py --seeds 0 --steps 10  # a quick look
    python scripts/grpo_learning_parity.py --json results.json   # also the raw numbers

The task is alignlib's embedded demo (alignlib/demo): the tiny Llama of config.json (~1M
parameters) after `prepare_base_model`'s supervised warm start (it answers "how do i ..."
helpfully about a quarter of the time), the demo's "how do i ... ?" training prompts, and
the reward `demo_reward` (1 for an answer containing a helpful word, else 0). Both libraries
fine-tune every weight with GRPO from the same base model, with the same settings (Settings
below, names as in both configs): the same loss type, group size, batch, learning rate,
KL weight, clip range, sampling temperature and completion length, a frozen copy of the
base model as the reference, float32, one torch thread. Nothing is downloaded: TRL's
trainer gets the model's folder and the demo's tokenizer.

What differs, by nature of the two loops: the random numbers (which prompts each step draws
and which tokens are sampled), so the two runs are two samples of the same training
process, not the same trajectory. The comparison is therefore statistical: the mean reward
of sampled answers to the 120 held-out prompts (SAMPLES_PER_PROMPT answers each, seeded the
same way for both models, scored by the same `heldout_reward`) after N steps, per seed, with
the spread over seeds as the noise.

Time is measured end to end for each library (model path to trained model on disk), in this
one process, the two runs of a seed back to back, the order alternating with the seed (even
seeds: alignlib first), as wall time and as this process's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from alignlib import demo
from alignlib.configs import GRPOConfig as AlignlibGRPOConfig
from alignlib.models import ModelConfig, load_tokenizer
from alignlib.rl import train_online
from alignlib.rollout import completion_seed, generate_rollout

SAMPLES_PER_PROMPT = 4


@dataclass
class Settings:
    """The hyperparameters both libraries get (names as in alignlib's and TRL's GRPOConfig)."""

    max_steps: int = 30
    per_device_train_batch_size: int = 64  # completions per step: 8 prompts x 8
    num_generations: int = 8
    max_completion_length: int = 24
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "constant"
    beta: float = 0.04
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    num_iterations: int = 1


def helpful(completions, **kwargs):
    """demo_reward in TRL's reward-function form (TRL passes prompts, completions and more as keywords)."""
    return demo.demo_reward(kwargs.get("prompts"), completions)


# ----------------------------------------------------------------------------------------------
# One run of each library
# ----------------------------------------------------------------------------------------------


def run_alignlib(base: str, settings: Settings, seed: int, output_dir: str) -> tuple[str, list[float]]:
    config = AlignlibGRPOConfig(output_dir=output_dir, seed=seed, disable_tqdm=True, num_eval_prompts=1,
                                logging_steps=1, **asdict(settings))
    train_online(config, ModelConfig(model_name_or_path=base), reward_fn=demo.demo_reward,
                 prompts=demo.demo_prompts(demo.TRAIN_FILE))
    from alignlib.metrics import read_metrics

    curve = [r["reward"] for r in read_metrics(Path(output_dir) / "metrics.jsonl") if "reward" in r]
    return str(Path(output_dir) / "final"), curve


def run_trl(base: str, settings: Settings, seed: int, output_dir: str) -> tuple[str, list[float]]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(base, padding_side="left")
    dataset = Dataset.from_dict({"prompt": demo.demo_prompts(demo.TRAIN_FILE)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=output_dir, seed=seed, report_to="none", use_cpu=True, bf16=False,
                          logging_steps=1, save_strategy="no", disable_tqdm=True, log_completions=False,
                          gradient_checkpointing=False, **asdict(settings))  # TRL's default is True
        trainer = GRPOTrainer(model=base, reward_funcs=[helpful], args=args, train_dataset=dataset,
                              processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    trainer.save_model(str(Path(output_dir) / "final"))
    curve = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return str(Path(output_dir) / "final"), curve


# ----------------------------------------------------------------------------------------------
# The one evaluation both models get
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_reward(model_dir: str, base: str, settings: Settings) -> float:
    """Mean demo_reward of SAMPLES_PER_PROMPT sampled answers to each held-out prompt (temperature as
    in training; sample j of prompt i seeded by (i, j), the same for every model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(base, padding_side="left")
    prompts = demo.demo_prompts(demo.HELDOUT_FILE)
    rewards = []
    for j in range(SAMPLES_PER_PROMPT):
        rollout = generate_rollout(model, tokenizer, prompts, max_new_tokens=settings.max_completion_length,
                                   temperature=settings.temperature, top_k=0, top_p=1.0, device=torch.device("cpu"),
                                   seeds=[completion_seed("heldout", i, j) for i in range(len(prompts))])
        texts = tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        rewards += demo.demo_reward(prompts, texts)
    return sum(rewards) / len(rewards)


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(seeds: list[int], settings: Settings, work: Path) -> list[dict]:
    base = str(demo.prepare_base_model(work / "base", show_progress=False))
    before = heldout_reward(base, base, settings)
    print(f"base model: held-out reward {before:.3f}", flush=True)
    rows = []
    for seed in seeds:
        runs = {"alignlib": run_alignlib, "TRL": run_trl}
        order = list(runs) if seed % 2 == 0 else list(runs)[::-1]
        row = {"seed": seed, "first": order[0], "before": before, "load": os.getloadavg()[0]}
        for name in order:
            (model_dir, curve), wall, cpu = timed(runs[name], base, settings, seed, str(work / f"{name}-{seed}"))
            row[name] = {"reward": heldout_reward(model_dir, base, settings), "wall": wall, "cpu": cpu,
                         "train_reward_first": curve[0] if curve else None,
                         "train_reward_last5": statistics.mean(curve[-5:]) if curve else None}
            print(f"seed {seed} {name}: held-out reward {row[name]['reward']:.3f}, {wall:.1f} s wall, {cpu:.1f} s CPU",
                  flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| seed | alignlib reward | TRL reward | difference | alignlib wall (s) | TRL wall (s) | "
             "alignlib CPU (s) | TRL CPU (s) | ran first |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        a, t = row["alignlib"], row["TRL"]
        lines.append(f"| {row['seed']} | {a['reward']:.3f} | {t['reward']:.3f} | {a['reward'] - t['reward']:+.3f} | "
                     f"{a['wall']:.1f} | {t['wall']:.1f} | {a['cpu']:.1f} | {t['cpu']:.1f} | {row['first']} |")

    def mean(lib, key):
        return statistics.mean(r[lib][key] for r in rows)

    def spread(lib):
        return statistics.stdev(r[lib]["reward"] for r in rows) if len(rows) > 1 else 0.0

    lines.append(f"| mean | {mean('alignlib', 'reward'):.3f} (sd {spread('alignlib'):.3f}) | "
                 f"{mean('TRL', 'reward'):.3f} (sd {spread('TRL'):.3f}) | "
                 f"{mean('alignlib', 'reward') - mean('TRL', 'reward'):+.3f} | {mean('alignlib', 'wall'):.1f} | "
                 f"{mean('TRL', 'wall'):.1f} | {mean('alignlib', 'cpu'):.1f} | {mean('TRL', 'cpu'):.1f} | |")
    a, t = [r["alignlib"]["reward"] for r in rows], [r["TRL"]["reward"] for r in rows]
    if len(rows) > 1:  # Welch: the standard error of a difference of two means
        error = (statistics.variance(a) / len(a) + statistics.variance(t) / len(t)) ** 0.5
        lines.append(f"\ndifference of the mean rewards {statistics.mean(a) - statistics.mean(t):+.3f}, its standard "
                     f"error {error:.3f} (over {len(rows)} seeds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=Settings.max_steps)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both libraries")
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(max_steps=args.steps)
    with tempfile.TemporaryDirectory() as work:
        rows = compare(args.seeds, settings, Path(work))
    print(f"\nsettings: {asdict(settings)}\nbefore training: held-out reward {rows[0]['before']:.3f}\n")
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": asdict(settings), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
