"""The `alignlib` command.

    alignlib train {dpo,orpo,simpo,cpo,reward} --model PATH --dataset PATH [--config FILE.yaml] [--KEY VALUE ...]
    alignlib train ppo [--model PATH] [--reward_model PATH | --reward module:function] [--dataset PROMPTS] [...]
    alignlib generate --model PATH --prompt TEXT [--max_new_tokens N] [--temperature T]

Flags are the fields of TrainConfig and PPOConfig (alignlib.configs) and ModelConfig
(alignlib.models), parsed by transformers.HfArgumentParser; their names are TRL's, so a TRL
YAML mostly works as --config. Flags given on the command line override the YAML.

With neither --model nor --dataset, `alignlib train OBJECTIVE` runs the embedded demo
(alignlib.demo): a tiny model warm-started in a few seconds, trained on the shipped pairs,
evaluated on held-out pairs before and after, with sample answers printed.

Errors in what the user gave (paths, keys, values) end the command with one line on stderr
and exit status 1 (2 for flags the parser rejects); ALIGNLIB_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    _quiet_libraries()
    try:
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


def parse_config(dataclass_types: tuple, args: list[str], *, prog: str, demo_defaults: dict | None = None):
    """HfArgumentParser over the dataclasses, with --config FILE.yaml as defaults under the flags."""
    from transformers import HfArgumentParser

    parser = _one_line_errors(HfArgumentParser(dataclass_types, prog=prog))
    parser.add_argument("--config", type=Path, default=None, help="YAML file of settings (flags override it).")
    known = {action.dest for action in parser._actions}
    config_path = _config_path(args)
    defaults = dict(demo_defaults or {})
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
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    path = pre.parse_known_args(args)[0].config
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"--config: no file at {path}")
    return path


def _read_yaml(path: Path, known: set[str], parser) -> dict:
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of setting: value, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"unknown keys in {path}: {', '.join(unknown)}")
    return values


def _wants_demo(args: list[str]) -> bool:
    given = {a.split("=")[0] for a in args if a.startswith("--")}
    config_path = _config_path(args)
    if config_path is not None:
        import yaml

        given |= {f"--{key}" for key in (yaml.safe_load(config_path.read_text()) or {})}
    return not given & {"--model", "--model_name_or_path", "--dataset", "--dataset_name"}


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

    demo = _wants_demo(rest)
    demo_defaults = embedded.train_defaults(objective) if demo else None
    cfg, model_cfg = parse_config((TrainConfig, ModelConfig), rest, prog=f"alignlib train {objective}",
                                  demo_defaults=demo_defaults)
    if demo:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("the embedded demo runs in one process: under torchrun give --model and --dataset")
        _use_demo_data(cfg, model_cfg)
    elif not model_cfg.model_name_or_path or not cfg.dataset_name:
        missing = "--model" if not model_cfg.model_name_or_path else "--dataset"
        raise ValueError(f"{missing} is missing (give both --model and --dataset, or neither for the embedded demo)")
    result = train(objective, cfg, model_cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        _report(objective, result, demo, model_cfg)
    return 0


def _use_demo_data(cfg, model_cfg) -> None:
    from alignlib import demo

    base = Path(cfg.output_dir) / "base-model"
    print(f"alignlib demo: preparing the tiny base model in {base} ...", flush=True)
    model_cfg.model_name_or_path = str(demo.prepare_base_model(base))
    cfg.dataset_name = str(demo.TRAIN_FILE)
    cfg.eval_dataset_name = cfg.eval_dataset_name or str(demo.HELDOUT_FILE)
    cfg.dataset_test_split = "train"  # a JSON file's only split


def _report(objective: str, result, demo: bool, model_cfg) -> None:
    key = "accuracy_ties_half"
    what = "reward-model accuracy" if objective == "reward" else "implicit-reward accuracy"
    print(f"\ntrained {result.steps} steps in {result.seconds:.0f} s; model saved in {result.model_dir}")
    if result.eval_after:
        before = f"{result.eval_before[key]:.3f} -> " if result.eval_before else ""
        print(f"held-out {what}: {before}{result.eval_after[key]:.3f}  (a tie counts 1/2)")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    if demo and objective != "reward":
        print("\nanswers (greedy) before -> after:")
        from alignlib.demo import SAMPLE_PROMPTS

        for prompt in SAMPLE_PROMPTS:
            before = complete(model_cfg.model_name_or_path, prompt)
            after = complete(str(result.model_dir), prompt)
            print(f"  {prompt}\n    before: {before}\n    after:  {after}")
        print(f"\ntry: alignlib generate --model {result.model_dir} --prompt \"how do i paint a chair ?\"")


def ppo_command(args: list[str]) -> int:
    """`alignlib train ppo`: alignlib.rl.train_ppo over (PPOConfig, ModelConfig) flags."""
    from alignlib import demo as embedded
    from alignlib import rl
    from alignlib.models import ModelConfig

    given = {a.split("=")[0] for a in args if a.startswith("--")}
    demo = not given & {"--model", "--model_name_or_path"}
    # The embedded default: the demo's settings become the flags' defaults, so any flag given wins.
    demo_defaults = embedded.ppo_defaults() if demo else None
    cfg, model_cfg = parse_config((rl.PPOConfig, ModelConfig), args, prog="alignlib train ppo",
                                  demo_defaults=demo_defaults)
    stats = rl.train_ppo(cfg, model_cfg)
    print(f"\ntrained {cfg.max_steps} PPO steps; model saved in {Path(cfg.output_dir) / 'final'}")
    print(f"held-out mean reward: {stats['eval/reward_before']:.3f} -> {stats['eval/reward_after']:.3f} "
          f"on {stats['eval/num_prompts']} prompts; KL to the reference {stats['eval/kl_after']:.2f} nats")
    print(f"metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


def complete(model_path: str, prompt: str, *, max_new_tokens: int = 24, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> str:
    """The model's completion of prompt (greedy when temperature is 0)."""
    import torch

    from alignlib.saved_models import load_for_generation

    model, tokenizer = load_for_generation(model_path)
    if tokenizer is None:
        raise ValueError(f"no tokenizer saved with {model_path} or its base model")
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="alignlib generate", description="Print a completion from a trained model.")
    parser.add_argument("--model", required=True, help="A model or adapter directory (e.g. OUTPUT_DIR/final).")
    parser.add_argument("--prompt", required=True, action="append", help="Prompt text (repeat for several).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy.")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    for prompt in options.prompt:
        text = complete(options.model, prompt, max_new_tokens=options.max_new_tokens,
                        temperature=options.temperature, top_p=options.top_p, seed=options.seed)
        print(f"{prompt} {text}" if len(options.prompt) == 1 else f"> {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
