"""Trained models on disk: save them, merge an adapter, load them back to generate.

- `save_model`: a Hugging Face / peft directory, written atomically; an adapter records beside
  it what its base is beyond base_model_name_or_path (a quantisation, a start adapter merged into
  it, embeddings resized for a chat format's tokens), so it reloads over the same base;
  `merge_adapter=True` saves the adapter merged into (a dequantised copy of) the base.
- `load_for_generation`: (model, tokenizer) from a full model, an adapter or a checkpoint
  directory, refusing an adapter saved for another base.
- `merge_saved_adapter`: `alignlib merge`: an adapter directory merged into its base, saved as a
  full model in the dtype asked for (a 4-bit base dequantised).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from alignlib.checkpoint import MANIFEST_FILE, atomic_directory, trainable_state_dict, validate_checkpoint
from alignlib.models import (
    ADAPTER_BASE_FILE,
    BASE_QUANTIZATION_FILE,
    DTYPES,
    ModelConfig,
    attach_adapter,
    base_recipe_of,
    dequantized_copy,
    is_peft_model,
    is_quantized,
    keep_4bit_weights_trainable_on_cpu,
    load_adapter_base,
    load_causal_lm,
    load_model_tokenizer,
    load_tokenizer,
    local_dir,
    save_embedding_layers,
)

__all__ = ["BASE_QUANTIZATION_FILE", "load_for_generation", "merge_saved_adapter", "save_model"]


def save_model(model: Any, tokenizer: Any, output_dir: str | os.PathLike, *, merge_adapter: bool = False) -> Path:
    """Save in a form `from_pretrained` loads, atomically (a hidden temp dir renamed into place).

    - a peft model: adapter_model.safetensors + adapter_config.json (load with
      `load_for_generation` or peft.PeftModel.from_pretrained over the base model);
    - merge_adapter=True: the adapter merged into a copy of the base weights, saved as a full
      model (the training model is not modified). A 4-bit/8-bit base is dequantised first: the
      base is reloaded in the compute dtype from the adapter's base_model_name_or_path and its
      quantised layers replaced by their dequantised weights, so the merged model computes
      what the trained QLoRA model computed;
    - any other model: save_pretrained.
    `tokenizer` (or None) is saved beside it. Returns the output directory.
    """
    output_dir = Path(output_dir)
    is_peft = is_peft_model(model)
    if merge_adapter and not is_peft:
        raise ValueError("merge_adapter=True needs a peft model; this model has no adapter to merge")
    from safetensors import SafetensorError

    try:
        with atomic_directory(output_dir) as tmp:
            if merge_adapter:
                _merged_copy(model, tmp).save_pretrained(tmp)
            elif is_peft:
                _save_adapter(model, tmp)
            else:
                model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except SafetensorError as exc:  # e.g. a full disk: safetensors reports "... (os error 28)", not an OSError
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO,
                      f"could not save the model in {output_dir}: {exc}") from exc
    return output_dir


def _save_adapter(model: Any, directory: Path) -> None:
    """The trained (active) adapter alone, at the top of `directory` whatever its name (peft puts an
    adapter not named "default" in a subfolder; a frozen reference adapter is left out), with what
    its base is beyond base_model_name_or_path."""
    name = model.active_adapter
    scratch = Path(tempfile.mkdtemp(prefix="adapter-", dir=directory))
    model.save_pretrained(scratch, selected_adapters=[name], save_embedding_layers=save_embedding_layers(model, name))
    saved = scratch / name if name != "default" else scratch
    for entry in saved.iterdir():
        if entry.is_file():
            os.replace(entry, directory / entry.name)
    shutil.rmtree(scratch)
    _record_base_as_absolute_path(directory / "adapter_config.json")
    base = model.get_base_model()
    if is_quantized(base):
        (directory / BASE_QUANTIZATION_FILE).write_text(json.dumps(_quantization_dict(base)))
    recipe = base_recipe_of(model)
    if recipe:
        (directory / ADAPTER_BASE_FILE).write_text(json.dumps(recipe, indent=2))


def _record_base_as_absolute_path(adapter_config: Path) -> None:
    """peft records the base model's path as it was typed (--model ../tiny): make a local one
    absolute, so the adapter loads from any working directory. A Hub id stays as it is."""
    if not adapter_config.is_file():
        return
    config = json.loads(adapter_config.read_text())
    base = config.get("base_model_name_or_path")
    if base and os.path.isdir(base) and not os.path.isabs(base):
        config["base_model_name_or_path"] = os.path.abspath(base)
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))


def _quantization_dict(model: torch.nn.Module) -> dict:
    """The bitsandbytes quantization config the model was loaded with, as a JSON-ready dict."""
    quantization = model.config.quantization_config
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def _merged_copy(peft_model: Any, scratch_dir: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The trained (active) adapter of `peft_model` merged into a full-precision copy of its base
    model; a 4-bit/8-bit base is dequantised first (`dequantized_copy`, in `dtype`, default its
    compute dtype), so the merged model computes what the trained QLoRA model computed. The
    training model is not modified."""
    name = peft_model.active_adapter
    if not is_quantized(peft_model.get_base_model()):
        merged = copy.deepcopy(peft_model).merge_and_unload(adapter_names=[name])
        return merged if dtype is None else merged.to(dtype)
    base = dequantized_copy(peft_model.get_base_model(), dtype)
    adapter_dir = Path(tempfile.mkdtemp(prefix="adapter-", dir=scratch_dir))
    try:
        peft_model.save_pretrained(adapter_dir, selected_adapters=[name],
                                   save_embedding_layers=save_embedding_layers(peft_model, name))
        saved = adapter_dir / name if name != "default" else adapter_dir
        return attach_adapter(base, str(saved), what="the trained adapter").merge_and_unload()
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)


def load_for_generation(path: str | os.PathLike, *, dtype: str = "auto",
                        base_model_name_or_path: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a full model directory, a LoRA adapter directory or a checkpoint
    folder (output_dir/checkpoint-N of a run), in eval mode.

    An adapter directory (adapter_config.json) is loaded over its base model, read from
    adapter_config.json's base_model_name_or_path unless `base_model_name_or_path` is given.
    An adapter trained on a different base (other shapes) raises ValueError. A checkpoint is
    loaded into the model its run started from (the run's config.json). The tokenizer is
    taken from `path` when saved there, else from the base model; None when neither has one.
    A reward model (a sequence classifier) is refused: it scores text, it does not write any.
    """
    from transformers import AutoModelForCausalLM

    path = str(path)
    if os.path.isfile(path):
        raise NotADirectoryError(f"model path {path} is a file: give the folder of a model, adapter or checkpoint")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if (Path(path) / MANIFEST_FILE).is_file():
        return _load_checkpoint_for_generation(Path(path))
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        _refuse_reward_model(local_dir(path), path)
        model = AutoModelForCausalLM.from_pretrained(local_dir(path), dtype=DTYPES[dtype])
        return model.eval(), load_tokenizer(path) if _has_tokenizer(path) else None
    if json.loads(adapter_config.read_text()).get("task_type") == "SEQ_CLS":
        raise ValueError(f"{path} holds a reward model's adapter (task SEQ_CLS): it scores text and cannot generate")

    load_kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    quantization_file = Path(path) / BASE_QUANTIZATION_FILE
    if quantization_file.is_file():  # trained as QLoRA: the adapter belongs over the same quantised base
        from transformers import BitsAndBytesConfig

        load_kwargs = {"quantization_config": BitsAndBytesConfig.from_dict(json.loads(quantization_file.read_text()))}
        if torch.cuda.is_available():
            load_kwargs["device_map"] = {"": torch.cuda.current_device()}
    if base_model_name_or_path is not None:  # another base than the one recorded: load over it as given
        base_path = local_dir(base_model_name_or_path, f"base model of the adapter in {path}")
        base = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
        if is_quantized(base):
            keep_4bit_weights_trainable_on_cpu(base)
    else:
        base = load_adapter_base(path, load_kwargs)
        base_path = base.name_or_path
    model = attach_adapter(base, path, what=f"the adapter in {path}")
    tokenizer_path = path if _has_tokenizer(path) else base_path
    return model.eval(), load_tokenizer(tokenizer_path) if _has_tokenizer(tokenizer_path) else None


def _refuse_reward_model(model_dir: str, given: str) -> None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or []):
        raise ValueError(f"{given} holds a reward model (a sequence classifier): it scores text and cannot generate")


def _load_checkpoint_for_generation(path: Path) -> tuple[Any, Any]:
    """A checkpoint-N folder of a run: the run's starting model (its config.json), with the
    checkpoint's trained weights (the adapter, or all weights) loaded into it."""
    run_config_file = path.parent / "config.json"
    if not run_config_file.is_file():
        raise FileNotFoundError(f"checkpoint {path}: its run's config.json ({run_config_file}) is missing, so the model "
                                "it was trained from is unknown")
    run_config = json.loads(run_config_file.read_text())
    if run_config.get("objective") == "reward":
        raise ValueError(f"{path} is a checkpoint of a reward model: it scores text and cannot generate")
    model_cfg = ModelConfig(**run_config["model"])
    model = load_causal_lm(model_cfg)
    problem = validate_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is incomplete or corrupt: {problem}")
    saved = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    if run_config.get("objective") == "ppo":  # the policy beside its value head
        saved = {key.removeprefix("policy."): value for key, value in saved.items() if key.startswith("policy.")}
    expected = trainable_state_dict(model)
    if set(saved) != set(expected):
        raise ValueError(f"checkpoint {path} does not fit the model of its run's config.json "
                         f"({model_cfg.model_name_or_path})")
    model.load_state_dict(saved, strict=False)
    return model.eval(), load_model_tokenizer(model_cfg)


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        (Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )


def merge_saved_adapter(path: str | os.PathLike, output_dir: str | os.PathLike, *, dtype: str = "auto") -> Path:
    """`alignlib merge`: the adapter in `path` (an adapter directory, or a checkpoint folder of a
    LoRA run) merged into its base and saved in `output_dir` as a full model with its tokenizer.

    A base the adapter was trained over in 4 or 8 bit is dequantised and the merge done in `dtype`
    ("auto": that base's compute dtype, else the base checkpoint's dtype), so the merged model
    computes what the trained QLoRA model computed. `output_dir` must not exist yet (or be an
    empty folder): it is written whole, atomically, or not at all.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        what = "is a file" if not output_dir.is_dir() else "already exists and is not empty"
        raise FileExistsError(f"--output {output_dir} {what}: give a new folder for the merged model")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    model, tokenizer = load_for_generation(path, dtype=dtype)
    if not is_peft_model(model):
        raise ValueError(f"--model {path} holds a full model, not a LoRA adapter: there is nothing to merge")
    wanted = None if dtype == "auto" else DTYPES[dtype]
    created = [parent for parent in [output_dir.parent, *output_dir.parent.parents] if not parent.exists()]
    try:
        with atomic_directory(output_dir) as tmp:
            merged = _merged_copy(model, tmp, wanted)
            merged.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except BaseException:
        for parent in created:  # leave no empty folders made for the output behind
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return output_dir
