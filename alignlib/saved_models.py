"""Trained models on disk: save them, merge an adapter, load them back to generate.

- `save_model`: a Hugging Face / peft directory, written atomically; an adapter trained over a
  quantised base records that base's quantisation beside it, so it reloads over the same base;
  `merge_adapter=True` saves the adapter merged into (a dequantised copy of) the base.
- `load_for_generation`: (model, tokenizer) from a full model or an adapter directory, refusing
  an adapter saved for another base.
"""

from __future__ import annotations

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
    DTYPES,
    ModelConfig,
    is_peft_model,
    is_quantized,
    keep_4bit_weights_trainable_on_cpu,
    load_causal_lm,
    load_tokenizer,
    local_dir,
)

__all__ = ["BASE_QUANTIZATION_FILE", "load_for_generation", "save_model"]


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
            else:
                model.save_pretrained(tmp)
                if is_peft:
                    _record_base_as_absolute_path(tmp / "adapter_config.json")
                if is_peft and is_quantized(model.get_base_model()):
                    (tmp / BASE_QUANTIZATION_FILE).write_text(json.dumps(_quantization_dict(model.get_base_model())))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except SafetensorError as exc:  # e.g. a full disk: safetensors reports "... (os error 28)", not an OSError
        code = re.search(r"os error (\d+)", str(exc))
        raise OSError(int(code.group(1)) if code else errno.EIO,
                      f"could not save the model in {output_dir}: {exc}") from exc
    return output_dir


# Saved beside an adapter trained over a quantised base, so it is reloaded over the same base.
BASE_QUANTIZATION_FILE = "base_quantization_config.json"


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


def _merged_copy(peft_model: Any, scratch_dir: Path) -> torch.nn.Module:
    """The adapter of `peft_model` merged into a full-precision copy of its base model."""
    if not is_quantized(peft_model.get_base_model()):
        return copy.deepcopy(peft_model).merge_and_unload()
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_cfg = peft_model.peft_config[peft_model.active_adapter]
    try:
        base_path = local_dir(adapter_cfg.base_model_name_or_path, "base model")
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"merging into a quantised base reloads the base model's weights: {exc}; "
                         "or save the adapter alone (merge_adapter=False)") from None
    quantized = peft_model.get_base_model()
    compute_dtype = _bnb_compute_dtype(quantized)
    is_seq_cls = adapter_cfg.task_type == "SEQ_CLS"
    auto_class = AutoModelForSequenceClassification if is_seq_cls else AutoModelForCausalLM
    kwargs = {"num_labels": quantized.config.num_labels} if is_seq_cls else {}
    base = auto_class.from_pretrained(base_path, dtype=compute_dtype, **kwargs)
    float_modules = dict(base.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                float_name = name.removesuffix(".base_layer")
                float_modules[float_name].weight.copy_(_dequantized_weight(module).to(compute_dtype))
    adapter_dir = Path(tempfile.mkdtemp(prefix="adapter-", dir=scratch_dir))
    try:
        peft_model.save_pretrained(adapter_dir)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)


def _bnb_compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a bitsandbytes-quantised model computes in (float32 when not recorded)."""
    quantization = getattr(model.config, "quantization_config", None)
    if isinstance(quantization, dict):
        dtype = quantization.get("bnb_4bit_compute_dtype")
    else:
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The float weight of a bitsandbytes 4-bit or 8-bit linear layer (peft's helper)."""
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))


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

    from peft import PeftModel

    base_path = str(base_model_name_or_path or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
                    or "")
    base_path = local_dir(base_path, f"base model of the adapter in {path}")
    quantization_file = Path(path) / BASE_QUANTIZATION_FILE
    if quantization_file.is_file():  # trained as QLoRA: the adapter belongs over the same quantised base
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig.from_dict(json.loads(quantization_file.read_text()))
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization,
                                                    device_map=device_map)
        keep_4bit_weights_trainable_on_cpu(base)
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=DTYPES[dtype])
    try:
        model = PeftModel.from_pretrained(base, path)
    except RuntimeError as exc:
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise ValueError(f"the adapter in {path} was saved for a different base model than {base_path}: "
                         f"{mismatch}") from None
    _require_matching_adapter_keys(model, Path(path), base_path)
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
    return model.eval(), load_tokenizer(model_cfg.model_name_or_path)


def _require_matching_adapter_keys(model: Any, adapter_dir: Path, base_path: str) -> None:
    """peft loads adapter weights non-strictly: weights for layers the base lacks are dropped and
    layers the file lacks keep a fresh adapter. Refuse both (the model would not be the one trained)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():  # an older .bin adapter: peft's own checks only
        return
    with safe_open(str(weights_file), framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(get_peft_model_state_dict(model))
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise ValueError(f"the adapter in {adapter_dir} was saved for a different base model than {base_path}: "
                         f"{len(extra)} adapter weights have no place in this base (e.g. {extra[:1]}), "
                         f"{len(missing)} of its adapter weights are not in the file (e.g. {missing[:1]})")


def _has_tokenizer(path: str) -> bool:
    return os.path.isdir(path) and any(
        (Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
