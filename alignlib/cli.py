"""The `alignlib` command.

    alignlib train {dpo,orpo,simpo,cpo,kto,reward} --model PATH --dataset PATH [--config FILE.yaml] [--KEY VALUE ...]
    alignlib train ppo [--model PATH] [--reward_model PATH | --reward module:function] [--dataset PROMPTS] [...]
    alignlib generate --model PATH --prompt TEXT [--max_new_tokens N] [--temperature T]

Flags are the fields of TrainConfig and PPOConfig (alignlib.configs) and ModelConfig
(alignlib.models), parsed by transformers.HfArgumentParser; their names are TRL's, so a TRL
YAML mostly works as --config. Flags given on the command line override the YAML. A flag is
spelled out in full (no prefix matching).

With neither --model nor --dataset, `alignlib train OBJECTIVE` runs the embedded demo
(alignlib.demo) in alignlib-demo/OBJECTIVE/: a tiny model warm-started in a few seconds,
trained on the shipped pairs, evaluated on held-out pairs before and after, with sample
answers printed.

An output folder holding another run is never overwritten without --overwrite_output_dir
true (alignlib.run_folder). Errors in what the user gave (paths, keys, values) end the command
with one line on stderr and exit status 1 (2 for flags the parser rejects; 130 for Ctrl-C);
ALIGNLIB_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ImportError, OSError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        _quiet_libraries()
        if command == "train":
            return train_command(rest)
        if command == "generate":
            return generate_command(rest)
    except USER_ERRORS as error:
        if os.environ.get("ALIGNLIB_DEBUG"):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"alignlib: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # training.Interrupted says where the run stands
        print(f"alignlib: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    print(f"alignlib: error: unknown command {command!r}; use 'train' or 'generate'", file=sys.stderr)
    return 2


def _quiet_libraries() -> None:
    """Keep the terminal for alignlib's own progress: no per-map bars, no optional-kernel notices."""
    import logging

    # bitsandbytes warns at import that an optional CPU kernel from the Hub could not be fetched.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Flags and YAML
# ----------------------------------------------------------------------------------------------


def parse_config(dataclass_types: tuple, args: list[str], *, prog: str, demo_defaults: dict | None = None):
    """HfArgumentParser over the dataclasses, with --config FILE.yaml as defaults under the flags.

    `demo_defaults`: the embedded demo's settings, taking the place of the class defaults (flags
    and the YAML still win). `--help` always shows the class defaults, those of a run with
    --model, and lists the demo's apart.
    """
    from transformers import HfArgumentParser

    epilog = None
    if demo_defaults:
        shown = ", ".join(f"--{key} {value}" for key, value in demo_defaults.items())
        epilog = f"Without --model and --dataset (the embedded demo), these defaults change: {shown}."
    parser = _one_line_errors(HfArgumentParser(dataclass_types, prog=prog, allow_abbrev=False, epilog=epilog))
    parser.add_argument("--config", type=Path, default=None, help="YAML file of settings (flags override it).")
    known = {action.dest for action in parser._actions}
    config_path = _config_path(args)
    defaults = {} if {"-h", "--help"} & set(args) else dict(demo_defaults or {})
    if config_path is not None:
        defaults.update(_read_yaml(config_path, known, parser))
    parser.set_defaults(**defaults)
    namespace = parser.parse_args(args)
    values = vars(namespace)
    values.pop("config", None)
    objects = []
    for dataclass_type in dataclass_types:
        names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
        objects.append(dataclass_type(**{k: v for k, v in values.items() if k in names}))
    return objects


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Report a parse error in one line: argparse would first print the whole usage (~60 lines here)."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error
    return parser


def _config_path(args: list[str]) -> Path | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path, default=None)
    path = pre.parse_known_args(args)[0].config
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"--config: no file at {path}")
    return path


def _yaml_settings(path: Path) -> dict:
    """The YAML file's settings, or a one-line ValueError for a file that is not a mapping of settings."""
    import yaml

    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"--config {path} is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not UTF-8 text") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of setting: value, got {type(values).__name__} "
                         f"{str(values)[:40]!r}")
    return values


def _read_yaml(path: Path, known: set[str], parser) -> dict:
    values = _yaml_settings(path)
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"unknown keys in {path}: {', '.join(unknown)}")
    return values


def _given(args: list[str]) -> set[str]:
    """The flags given on the command line or as keys of --config."""
    given = {a.split("=")[0] for a in args if a.startswith("--")}
    config_path = _config_path(args)
    if config_path is not None:
        given |= {f"--{key}" for key in _yaml_settings(config_path)}
    return given


# ----------------------------------------------------------------------------------------------
# alignlib train
# ----------------------------------------------------------------------------------------------


def train_command(args: list[str]) -> int:
    from alignlib.configs import OBJECTIVES

    if not args or args[0] not in OBJECTIVES:
        print(f"alignlib: error: train needs an objective: {', '.join(OBJECTIVES)}", file=sys.stderr)
        return 2
    objective, rest = args[0], args[1:]
    if objective == "ppo":
        return ppo_command(rest)
    from alignlib import demo as embedded
    from alignlib.models import ModelConfig
    from alignlib.trainer import TrainConfig, train

    demo = not _given(rest) & {"--model", "--model_name_or_path", "--dataset", "--dataset_name"}
    cfg, model_cfg = parse_config((TrainConfig, ModelConfig), rest, prog=f"alignlib train {objective}",
                                  demo_defaults=embedded.train_defaults(objective) if demo else None)
    if demo:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("the embedded demo runs in one process: under torchrun give --model and --dataset")
        _use_demo_data(objective, cfg, model_cfg)
    elif not model_cfg.model_name_or_path or not cfg.dataset_name:
        missing = "--model" if not model_cfg.model_name_or_path else "--dataset"
        raise ValueError(f"{missing} is missing (give both --model and --dataset, or neither for the embedded demo)")
    result = train(objective, cfg, model_cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        _report(objective, result, demo, model_cfg)
    return 0


def _use_demo_data(objective: str, cfg, model_cfg) -> None:
    """Point the run at the demo's data and base model; the settings and the output folder are
    checked first, since preparing the base model writes into the output folder."""
    from alignlib import demo
    from alignlib.run_folder import OutputDirLock, check_output_dir
    from alignlib.training import checkpoint_to_resume, resume_requested

    cfg.dataset_name = str(demo.TRAIN_FILE)
    cfg.eval_dataset_name = cfg.eval_dataset_name or str(demo.HELDOUT_FILE)
    cfg.dataset_test_split = "train"  # a JSON file's only split
    cfg.check(objective)
    resuming = checkpoint_to_resume(cfg.resume_from_checkpoint, cfg.output_dir, verbose=False) is not None
    OutputDirLock(cfg.output_dir).check_free()
    check_output_dir(cfg.output_dir, resuming=resuming, overwrite=cfg.overwrite_output_dir,
                     restarting=not resuming and resume_requested(cfg.resume_from_checkpoint))
    base = Path(cfg.output_dir) / "base-model"
    print(f"alignlib demo: preparing the tiny base model in {base} ...", flush=True)
    model_cfg.model_name_or_path = str(demo.prepare_base_model(base))


def _report(objective: str, result, demo: bool, model_cfg) -> None:
    key = "rewards/margins" if objective == "kto" else "accuracy_ties_half"
    what = {"reward": "reward-model accuracy", "kto": "implicit-reward margin, desirable - undesirable"}.get(
        objective, "implicit-reward accuracy")
    note = "" if objective == "kto" else "  (a tie counts 1/2)"
    print(f"\ntrained {result.steps} steps in {result.seconds:.0f} s; model saved in {result.model_dir}")
    if result.eval_after and key in result.eval_after:
        before = f"{result.eval_before[key]:.3f} -> " if key in result.eval_before else ""
        print(f"held-out {what}: {before}{result.eval_after[key]:.3f}{note}")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    if demo and objective != "reward":
        from alignlib.demo import SAMPLE_PROMPTS

        print("\nanswers (greedy) before -> after:")
        before = Generator(model_cfg.model_name_or_path)
        after = Generator(str(result.model_dir))
        for prompt in SAMPLE_PROMPTS:
            print(f"  {prompt}\n    before: {before(prompt)}\n    after:  {after(prompt)}")
        print(f"\ntry: alignlib generate --model {result.model_dir} --prompt \"how do i paint a chair ?\"")


def ppo_command(args: list[str]) -> int:
    """`alignlib train ppo`: alignlib.rl.train_ppo over (PPOConfig, ModelConfig) flags."""
    from alignlib import demo as embedded
    from alignlib import rl
    from alignlib.models import ModelConfig

    demo = not _given(args) & {"--model", "--model_name_or_path"}
    # The embedded default: the demo's settings become the flags' defaults, so any flag given wins.
    cfg, model_cfg = parse_config((rl.PPOConfig, ModelConfig), args, prog="alignlib train ppo",
                                  demo_defaults=embedded.ppo_defaults() if demo else None)
    stats = rl.train_ppo(cfg, model_cfg)
    where = (f"{stats['eval/num_prompts']} held-out prompts" if stats["eval/held_out"]
             else f"the first {stats['eval/num_prompts']} training prompts (no --eval_dataset given)")
    kl = round(stats["eval/kl_after"], 2) + 0.0  # + 0.0: never print -0.00
    print(f"\ntrained {cfg.max_steps} PPO steps; model saved in {Path(cfg.output_dir) / 'final'}")
    print(f"mean reward on {where}: {stats['eval/reward_before']:.3f} -> {stats['eval/reward_after']:.3f}; "
          f"the policy's KL to the reference there: {kl:.2f} nats")
    print(f"metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


# ----------------------------------------------------------------------------------------------
# alignlib generate
# ----------------------------------------------------------------------------------------------


class Generator:
    """A trained model (a model, adapter or checkpoint folder) that completes prompts."""

    def __init__(self, model_path: str) -> None:
        from alignlib.saved_models import load_for_generation

        self.model, self.tokenizer = load_for_generation(model_path)
        if self.tokenizer is None:
            raise ValueError(f"--model {model_path}: no tokenizer saved with it or with its base model")

    def __call__(self, prompt: str, *, max_new_tokens: int = 24, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> str:
        """The model's completion of prompt (greedy when temperature is 0)."""
        import torch

        torch.manual_seed(seed)
        tokenizer = self.tokenizer
        inputs = tokenizer(prompt, return_tensors="pt").to(next(self.model.parameters()).device)
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                    else {"do_sample": False})
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, **sampling)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def complete(model_path: str, prompt: str, **options) -> str:
    """The completion of one prompt by the model in model_path (see Generator)."""
    return Generator(model_path)(prompt, **options)


def generate_command(args: list[str]) -> int:
    parser = _one_line_errors(argparse.ArgumentParser(
        prog="alignlib generate", description="Print a completion from a trained model.", allow_abbrev=False))
    parser.add_argument("--model", required=True,
                        help="A model, adapter or checkpoint directory (e.g. OUTPUT_DIR/final, OUTPUT_DIR/checkpoint-50).")
    parser.add_argument("--prompt", required=True, action="append", help="Prompt text (repeat for several).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="At most this many new tokens (>= 1).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature >= 0; 0: greedy.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling, in (0, 1].")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    if options.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {options.max_new_tokens}")
    if not math.isfinite(options.temperature) or options.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {options.temperature}")
    if not 0 < options.top_p <= 1:  # NaN fails this too
        raise ValueError(f"--top_p must lie in (0, 1], got {options.top_p}")
    generator = Generator(options.model)
    for prompt in options.prompt:
        text = generator(prompt, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                         top_p=options.top_p, seed=options.seed)
        print(f"{prompt} {text}" if len(options.prompt) == 1 else f"> {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
