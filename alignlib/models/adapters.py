"""LoRA adapters as starting points: the base an adapter sits on (rebuilt as it was trained: merged start,
resized embeddings, 4-bit), attaching an adapter with its keys checked, merging one into its base."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from alignlib.models.files import (
    BASE_QUANTIZATION_FILE,
    adapter_base_path,
    adapter_settings,
    read_json,
    saved_base_recipe,
    set_origin,
)
from alignlib.models.quantization import (
    bnb_compute_dtype_of,
    dequantized_copy,
    device_map_for,
    from_pretrained,
)

DEFAULT_ADAPTER = "default"  # peft's name for a model's one adapter


def vocabulary_size(model: torch.nn.Module) -> int:
    """The rows of the model's input embedding (also when peft wraps it to train some of its rows,
    a wrapper without `num_embeddings`)."""
    return int(model.get_input_embeddings().weight.shape[0])


def resize_embeddings(model: torch.nn.Module, num_embeddings: int) -> bool:
    """Grow the input (and an untied output) embedding to `num_embeddings` rows, each new row the
    mean of the old rows: deterministic, so a reference model or a reloaded base resized the same
    way gets the same rows. Never shrinks; returns whether it resized."""
    old = vocabulary_size(model)
    if num_embeddings <= old:
        return False
    model.resize_token_embeddings(num_embeddings, mean_resizing=False)
    weights = {id(module.weight): module.weight for module in (model.get_input_embeddings(),
                                                                model.get_output_embeddings()) if module is not None}
    with torch.no_grad():
        for weight in weights.values():
            weight[old:] = weight[:old].float().mean(0).to(weight.dtype)
    return True


def requantized(model: torch.nn.Module, load_kwargs: dict[str, Any]) -> Any:
    """`model` (full precision, in memory) reloaded with load_kwargs' quantization: saved to a
    temporary folder and read back through from_pretrained, the one path bitsandbytes quantises on."""
    base_path = model.name_or_path
    scratch = tempfile.mkdtemp(prefix="alignlib-merged-base-")
    try:
        model.save_pretrained(scratch)
        quantized = from_pretrained(scratch, load_kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    quantized.name_or_path = quantized.config._name_or_path = base_path  # adapters record the real base
    return quantized


def load_adapter_base(path: str, load_kwargs: dict[str, Any]) -> Any:
    """The transformers model the adapter in `path` sits on, loaded with from_pretrained's
    `load_kwargs` (dtype, quantization_config...): base_model_name_or_path, with the adapter that
    ADAPTER_BASE_FILE says was merged into it first (built the same way, recursively), its
    embeddings resized as recorded."""
    recipe = saved_base_recipe(path)
    if recipe.get("merged_start"):
        float_kwargs = {key: value for key, value in load_kwargs.items()
                        if key not in ("quantization_config", "device_map")}
        dtype = float_kwargs.get("dtype", "auto")
        if "quantization_config" in load_kwargs and dtype == "auto":
            float_kwargs["dtype"] = bnb_compute_dtype_of(load_kwargs["quantization_config"])
        model = merged_adapter_model(recipe["merged_start"], float_kwargs)
        if "quantization_config" in load_kwargs:
            model = requantized(model, load_kwargs)
    else:
        model = from_pretrained(adapter_base_path(path), load_kwargs)
    if recipe.get("num_embeddings"):
        resize_embeddings(model, int(recipe["num_embeddings"]))
    set_origin(model, recipe=recipe)
    return model


def merged_adapter_model(path: str, load_kwargs: dict[str, Any] | None = None) -> Any:
    """The full-precision model that the adapter in `path` and its base compute, as one transformers
    model (the adapter merged in). An adapter trained over a 4-bit base (BASE_QUANTIZATION_FILE) is
    merged into that base's dequantised weights, so the result computes what the QLoRA model did."""
    load_kwargs = dict(load_kwargs or {})
    quantization_file = os.path.join(path, BASE_QUANTIZATION_FILE)
    if adapter_settings(path).get("task_type") == "SEQ_CLS":
        raise ValueError(f"{path} holds a reward model's adapter (task SEQ_CLS), not a causal LM's")
    if os.path.isfile(quantization_file):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig.from_dict(read_json(quantization_file))
        quantized = load_adapter_base(path, {"quantization_config": quantization, **device_map_for(quantization),
                                             "trust_remote_code": load_kwargs.get("trust_remote_code", False)})
        dtype = load_kwargs.get("dtype", "auto")
        base = dequantized_copy(quantized, None if dtype == "auto" else dtype)
        del quantized
    else:
        base = load_adapter_base(path, load_kwargs)
    model = attach_adapter(base, path, what=f"the adapter in {path}")
    return model.merge_and_unload()


def attach_adapter(base: Any, path: str, *, what: str, trainable: bool = False,
                   adapter_name: str = DEFAULT_ADAPTER) -> Any:
    """peft.PeftModel over `base` with the adapter in `path`; an adapter that does not fit the base
    (other shapes, other layers) is a one-line ValueError."""
    from peft import PeftModel

    try:
        with peft_deprecations_silenced():
            model = PeftModel.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=trainable)
    except RuntimeError as exc:
        raise adapter_misfit(exc, what, base) from None
    require_matching_adapter_keys(model, path, what=what, adapter_name=adapter_name)
    return model


def adapter_misfit(exc: Exception, what: str, base: Any) -> Exception:
    mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
    if mismatch is None:
        return exc
    return ValueError(f"{what} was saved for a different base model than {base.name_or_path}: {mismatch}")


def save_embedding_layers(model: Any, adapter_name: str) -> bool | str:
    """peft's save_embedding_layers for an adapter: False when it trains token rows (trainable_token_indices:
    the trained rows are its own weights, the base's rows are rebuilt by resize_embeddings), else peft's "auto"."""
    return False if getattr(model.peft_config[adapter_name], "trainable_token_indices", None) else "auto"


def require_matching_adapter_keys(model: Any, path: str, *, what: str, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """peft loads adapter weights non-strictly: weights for layers the base lacks are dropped and
    layers the file lacks keep a fresh adapter. Refuse both (the model would not be the one trained)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):  # an older .bin adapter: peft's own checks only
        return
    with safe_open(weights_file, framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name,
                                             save_embedding_layers=save_embedding_layers(model, adapter_name)))
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise ValueError(f"{what} was saved for a different base model than {model.get_base_model().name_or_path}: "
                         f"{len(extra)} adapter weights have no place in this base (e.g. {extra[:1]}), "
                         f"{len(missing)} of its adapter weights are not in the file (e.g. {missing[:1]})")


@contextlib.contextmanager

def peft_deprecations_silenced() -> Iterator[None]:
    """peft (0.21) calls transformers' (5.x) old names gradient_checkpointing_enable and
    is_gradient_checkpointing, which warn on every run; alignlib itself uses the new ones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`(is_gradient_checkpointing|gradient_checkpointing_enable)` is "
                                r"deprecated", category=FutureWarning)
        yield
