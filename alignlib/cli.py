"""The `alignlib` command.

    alignlib train {dpo,orpo,simpo,cpo,kto,reward} --model PATH --dataset PATH [--config FILE.yaml] [--KEY VALUE ...]
    alignlib train {ppo,grpo,rloo} [--model PATH] [--reward_funcs module:function ... | --reward_model PATH]
                                   [--reward_weights W ...] [--dataset PROMPTS] [...]
    alignlib generate --model PATH --prompt TEXT [--system TEXT] [--stop TEXT ...] [--max_new_tokens N]
                      [--temperature T] [--top_p P] [--top_k K] [--stream] [--raw]
    alignlib merge --model ADAPTER_DIR --output DIR [--dtype {auto,float32,bfloat16,float16}]
    alignlib recipes [--show NAME]      the shipped recipes: `alignlib train OBJECTIVE --config NAME`

Flags are the fields of TrainConfig and of PPOConfig, GRPOConfig, RLOOConfig (alignlib.configs) and ModelConfig
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
        if command == "merge":
            return merge_command(rest)
        if command == "recipes":
            return recipes_command(rest)
    except USER_ERRORS as error:
        if os.environ.get("ALIGNLIB_DEBUG"):
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"alignlib: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # training.Interrupted says where the run stands
        print(f"alignlib: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
    print(f"alignlib: error: unknown command {command!r}; use 'train', 'generate', 'merge' or 'recipes'", file=sys.stderr)
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
        return _recipe_file(path)
    return path


def _recipe_file(name: Path) -> Path:
    """--config NAME that is no file: the shipped recipe of that name (alignlib.recipes), or a one-line error."""
    from alignlib.recipes import find_recipe, load_recipes

    recipe = find_recipe(str(name))
    if recipe is None:
        raise FileNotFoundError(f"--config {name}: no such file, and no recipe of that name; recipes: "
                                f"{', '.join(load_recipes())}")
    return recipe.path


def _check_recipe_objective(objective: str, args: list[str]) -> None:
    """A recipe given to --config is for one objective: another one is refused in one line."""
    from alignlib.recipes import load_recipes

    path = _config_path(args)
    recipe = next((r for r in load_recipes().values() if path is not None and path.resolve() == r.path), None)
    if recipe is not None and recipe.objective != objective:
        raise ValueError(f"--config {recipe.name} is a recipe for `alignlib train {recipe.objective}`, not "
                         f"{objective} ({recipe.tutorial}, stage {recipe.stage}); see `alignlib recipes`")


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
    _check_recipe_objective(objective, rest)
    from alignlib.configs import ONLINE_OBJECTIVES

    if objective in ONLINE_OBJECTIVES:
        return online_command(objective, rest)
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
    # SFT starts from the untrained model (the other objectives' base is itself a short SFT run).
    model_cfg.model_name_or_path = str(demo.prepare_base_model(base, steps=0 if objective == "sft" else 300))


def _report(objective: str, result, demo: bool, model_cfg) -> None:
    key = {"kto": "rewards/margins", "sft": "loss"}.get(objective, "accuracy_ties_half")
    what = {"reward": "reward-model accuracy", "kto": "implicit-reward margin, desirable - undesirable",
            "sft": "loss (mean NLL per trained token)"}.get(objective, "implicit-reward accuracy")
    note = "" if objective in ("kto", "sft") else "  (a tie counts 1/2)"
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


def online_command(objective: str, args: list[str]) -> int:
    """`alignlib train ppo|grpo|rloo`: alignlib.rl.train_online over (the objective's config, ModelConfig) flags."""
    from alignlib import demo as embedded
    from alignlib import rl
    from alignlib.configs import ONLINE_CONFIGS
    from alignlib.models import ModelConfig

    demo = not _given(args) & {"--model", "--model_name_or_path"}
    # The embedded default: the demo's settings become the flags' defaults, so any flag given wins.
    cfg, model_cfg = parse_config((ONLINE_CONFIGS[objective], ModelConfig), args, prog=f"alignlib train {objective}",
                                  demo_defaults=embedded.online_defaults(objective) if demo else None)
    stats = rl.train_online(cfg, model_cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one report
        return 0
    where = (f"{stats['eval/num_prompts']} held-out prompts" if stats["eval/held_out"]
             else f"the first {stats['eval/num_prompts']} training prompts (no --eval_dataset given)")
    kl = stats["eval/kl_after"]
    kl_text = (f"; the policy's KL to the reference there: {round(kl, 2) + 0.0:.2f} nats"  # + 0.0: never -0.00
               if kl is not None and math.isfinite(kl) else "")
    print(f"\ntrained {cfg.max_steps} {objective.upper()} steps; model saved in {Path(cfg.output_dir) / 'final'}")
    print(f"mean reward on {where}: {stats['eval/reward_before']:.3f} -> {stats['eval/reward_after']:.3f}{kl_text}")
    print(f"metrics: {Path(cfg.output_dir) / 'metrics.jsonl'}")
    return 0


# ----------------------------------------------------------------------------------------------
# alignlib generate
# ----------------------------------------------------------------------------------------------


class Generator:
    """A trained model (a model, adapter or checkpoint folder) that completes prompts.

    A prompt is put through the tokenizer's chat template when it has one (as the user's turn,
    after an optional system message); `raw=True`, or a tokenizer without a template, sends it as
    it is. Generation stops at the model's eos tokens (its generation config's and the
    tokenizer's), and at `stop`: each one a single token of the vocabulary (Llama-3's
    `<|eot_id|>`) is an extra eos id, any other text a stop string; the answer is cut before the
    first stop text.
    """

    def __init__(self, model_path: str) -> None:
        from alignlib.saved_models import load_for_generation

        self.model_path = model_path
        self.model, self.tokenizer = load_for_generation(model_path)
        if self.tokenizer is None:
            raise ValueError(f"--model {model_path}: no tokenizer saved with it or with its base model")

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def __call__(self, prompt: str, *, max_new_tokens: int = 24, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, system: str | None = None, stop: tuple[str, ...] = (),
                 raw: bool = False, stream: bool = False) -> str:
        """The model's completion of prompt (greedy when temperature is 0); with `stream`, its
        text is also written to stdout as it is generated."""
        import torch

        torch.manual_seed(seed)
        tokenizer = self.tokenizer
        input_ids = self.prompt_ids(prompt, system=system, raw=raw).to(next(self.model.parameters()).device)
        stop_ids, stop_strings = self.stops(stop)
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
                    if temperature > 0 else {"do_sample": False})
        extra = {"stopping_criteria": _stop_at_text(tokenizer, stop_strings, input_ids.shape[1])} if stop_strings else {}
        if stream:
            extra["streamer"] = _stop_aware_streamer(tokenizer, tuple(stop))
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=self.eos_ids() + stop_ids, **sampling, **extra)
        text = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        return _cut_at_stops(text, stop).strip()

    def prompt_ids(self, prompt: str, *, system: str | None = None, raw: bool = False):
        """(1, L) token ids of the prompt: chat-templated unless `raw` or the tokenizer has no
        template, tokenized as the training data is (special tokens added, a doubled BOS dropped)."""
        import torch

        tokenizer = self.tokenizer
        if system is not None and (raw or not self.has_chat_template):
            why = "--raw sends the prompt as it is" if raw else f"the tokenizer of {self.model_path} has none"
            raise ValueError(f"--system {system!r} needs the chat template, and {why}")
        text = prompt
        if not raw and self.has_chat_template:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            messages.append({"role": "user", "content": prompt})
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # the template's own raise_exception, e.g. no system role
                flag = "--system" if system is not None else "--prompt"
                raise ValueError(f"{flag}: the chat template of {self.model_path} refused the messages: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # the template began with BOS
            ids = ids[1:]
        return torch.tensor([ids])

    def eos_ids(self) -> list[int]:
        """The ids that end an answer: the generation config's eos (several for Llama-3) and the tokenizer's."""
        configured = self.model.generation_config.eos_token_id
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        own = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return list(dict.fromkeys(configured + own))

    def stops(self, stop: tuple[str, ...] | list[str]) -> tuple[list[int], list[str]]:
        """--stop values as (extra eos ids: values that are one token of the vocabulary, stop strings: the rest)."""
        ids, strings = [], []
        unknown = self.tokenizer.unk_token_id
        for value in stop:
            if not value:
                raise ValueError("--stop '' is empty: give the text or the token to stop at")
            token_id = self.tokenizer.convert_tokens_to_ids(value)
            if isinstance(token_id, int) and token_id != unknown and self.tokenizer.convert_ids_to_tokens(token_id) == value:
                ids.append(token_id)
            else:
                strings.append(value)
        return ids, strings


def _stop_at_text(tokenizer, stop_strings: list[str], prompt_length: int):
    """A StoppingCriteriaList that ends generation once the answer's text holds a stop string (decoded
    text, so it works for any tokenizer; transformers' own stop_strings needs a BPE-like vocabulary)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([any(value in text for value in stop_strings) for text in texts],
                                device=input_ids.device)

    return StoppingCriteriaList([StopAtText()])


def _cut_at_stops(text: str, stop) -> str:
    """text up to the first occurrence of any stop text."""
    ends = [text.find(value) for value in stop if value and value in text]
    return text[:min(ends)] if ends else text


def _stop_aware_streamer(tokenizer, stop: tuple[str, ...]):
    """transformers' TextStreamer (the answer only, special tokens skipped) that holds back text
    that may be the start of a stop text, and writes nothing from a stop text on."""
    from transformers import TextStreamer

    class StopAwareStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pending, self.stopped = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.stopped:
                self.pending += text
                shown = _cut_at_stops(self.pending, stop)
                self.stopped = shown != self.pending
                if not self.stopped and not stream_end:  # hold back what may begin a stop text
                    keep = max((n for value in stop for n in range(1, len(value))
                                if self.pending.endswith(value[:n])), default=0)
                    shown = self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(shown):]
                print(shown, end="", flush=True)
            if stream_end:
                print(flush=True)

    return StopAwareStreamer()


def complete(model_path: str, prompt: str, **options) -> str:
    """The completion of one prompt by the model in model_path (see Generator)."""
    return Generator(model_path)(prompt, **options)


def generate_command(args: list[str]) -> int:
    parser = _one_line_errors(argparse.ArgumentParser(
        prog="alignlib generate", description="Print a completion from a trained model.", allow_abbrev=False))
    parser.add_argument("--model", required=True,
                        help="A model, adapter or checkpoint directory (e.g. OUTPUT_DIR/final, OUTPUT_DIR/checkpoint-50).")
    parser.add_argument("--prompt", required=True, action="append", help="Prompt text (repeat for several).")
    parser.add_argument("--system", default=None, help="System message put before each prompt by the chat template.")
    parser.add_argument("--raw", action="store_true", help="Send the prompt as it is, without the chat template.")
    parser.add_argument("--stop", action="append", default=[],
                        help="Stop at this text, or at this token (e.g. <|eot_id|>); repeat for several.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="At most this many new tokens (>= 1).")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature >= 0; 0: greedy.")
    parser.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling, in (0, 1].")
    parser.add_argument("--top_k", type=int, default=0, help="Sample from the k likeliest tokens (0: all).")
    parser.add_argument("--stream", action="store_true", help="Print the answer token by token as it is generated.")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    if options.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {options.max_new_tokens}")
    if not math.isfinite(options.temperature) or options.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {options.temperature}")
    if not 0 < options.top_p <= 1:  # NaN fails this too
        raise ValueError(f"--top_p must lie in (0, 1], got {options.top_p}")
    if options.top_k < 0:
        raise ValueError(f"--top_k must be >= 0 (0: no limit), got {options.top_k}")
    for flag, value, default in (("--top_k", options.top_k, 0), ("--top_p", options.top_p, 1.0)):
        if value != default and options.temperature == 0:
            raise ValueError(f"{flag} {value} acts only when sampling: give --temperature > 0 (0 is greedy)")
    generator = Generator(options.model)
    for prompt in options.prompt:
        generator.prompt_ids(prompt, system=options.system, raw=options.raw)  # refuse a bad --system before any output
        settings = dict(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
                        top_k=options.top_k, seed=options.seed, system=options.system, stop=tuple(options.stop),
                        raw=options.raw)
        if options.stream:
            print(f"{prompt} " if len(options.prompt) == 1 else f"> {prompt}\n", end="", flush=True)
            generator(prompt, stream=True, **settings)
            if len(options.prompt) > 1:
                print()
            continue
        text = generator(prompt, **settings)
        print(f"{prompt} {text}" if len(options.prompt) == 1 else f"> {prompt}\n{text}\n")
    return 0


# ----------------------------------------------------------------------------------------------
# alignlib merge
# ----------------------------------------------------------------------------------------------


def merge_command(args: list[str]) -> int:
    """`alignlib merge --model ADAPTER_DIR --output DIR [--dtype D]`: alignlib.saved_models.merge_saved_adapter."""
    from alignlib.models import DTYPES

    parser = _one_line_errors(argparse.ArgumentParser(
        prog="alignlib merge", allow_abbrev=False,
        description="Merge a LoRA adapter into its base model and save the result as a full model."))
    parser.add_argument("--model", required=True, help="A LoRA adapter directory (e.g. OUTPUT_DIR/final) or a "
                        "checkpoint folder of a LoRA run.")
    parser.add_argument("--output", required=True, help="A new folder for the merged model (with the tokenizer).")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="dtype of the merged weights; auto: a 4-bit base's compute dtype, else the base's.")
    options = parser.parse_args(args)
    from alignlib.saved_models import merge_saved_adapter

    output = merge_saved_adapter(options.model, options.output, dtype=options.dtype)
    print(f"merged {options.model} into its base: {output}")
    return 0


# ----------------------------------------------------------------------------------------------
# alignlib recipes
# ----------------------------------------------------------------------------------------------


def recipes_command(args: list[str]) -> int:
    """`alignlib recipes [--show NAME]`: the shipped recipes, tutorial by tutorial, or one recipe's YAML."""
    from alignlib.recipes import find_recipe, load_recipes

    parser = _one_line_errors(argparse.ArgumentParser(
        prog="alignlib recipes", allow_abbrev=False,
        description="The shipped recipes: one YAML of settings per stage of a tutorial. Run one with "
                    "`alignlib train OBJECTIVE --config NAME`; flags given after it override its values."))
    parser.add_argument("--show", default=None, metavar="NAME", help="Print the recipe's YAML (with where each "
                        "value comes from) and its path.")
    options = parser.parse_args(args)
    recipes = load_recipes()
    if options.show is not None:
        recipe = find_recipe(options.show)
        if recipe is None:
            raise ValueError(f"--show {options.show}: no recipe of that name; recipes: {', '.join(recipes)}")
        print(f"# {recipe.path}\n# alignlib train {recipe.objective} --config {recipe.name}\n")
        print(recipe.path.read_text(), end="")
        return 0
    tutorial = None
    for recipe in recipes.values():
        if recipe.tutorial != tutorial:
            tutorial = recipe.tutorial
            print(f"\n{tutorial}")
        after = f"   (after {recipe.after})" if recipe.after else ""
        if recipe.first:
            print(f"  {'':3}  {recipe.first}")
        print(f"  {recipe.stage}/{recipe.stages}  alignlib train {recipe.objective:<6} --config {recipe.name:<24}"
              f" {recipe.does}{after}")
    print("\nalignlib recipes --show NAME prints a recipe; docs/recipes.md maps each tutorial step to its command.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
