"""bitsandbytes: the 4-/8-bit load settings of a ModelConfig, loading through from_pretrained, and a
full-precision copy of a quantised model."""

from __future__ import annotations

import contextlib
import copy
import importlib
from typing import Any

import torch

from alignlib.models.config import ModelConfig
from alignlib.models.files import base_recipe_of, set_origin


def _require_bitsandbytes(cfg: ModelConfig) -> None:
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as exc:
        bits = "4" if cfg.load_in_4bit else "8"
        raise ValueError(f"load_in_{bits}bit needs bitsandbytes, which could not be imported ({exc}); "
                         "pip install bitsandbytes") from None


def bnb_config_for(cfg: ModelConfig) -> Any:
    """BitsAndBytesConfig for load_in_4bit / load_in_8bit, else None."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    _require_bitsandbytes(cfg)
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = cfg.torch_dtype_value if cfg.dtype != "auto" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=cfg.bnb_4bit_quant_storage,
    )


def from_pretrained_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": cfg.torch_dtype_value,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = bnb_config_for(cfg)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs.update(device_map_for(quantization))
    return kwargs


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether bitsandbytes loaded the model's weights in 4 or 8 bit (they sit where it put them)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def keep_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit weight in place the
    first time the layer runs in eval mode without grad, and from then on computes through a
    kernel with no backward: LoRA gradients after any eval-mode forward (a reference pass, an
    evaluation, a generation) are silently wrong. It also fails for in_features < 64. With the
    repacking off, the layers always use the ordinary dequantise-and-matmul path.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - only quantised models get here
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_pretrained(auto_class: Any, path: str, cfg: ModelConfig, **kwargs: Any) -> Any:
    """auto_class.from_pretrained(path) with cfg's dtype, revision and quantisation."""
    model = auto_class.from_pretrained(path, **from_pretrained_kwargs(cfg), **kwargs)
    if is_quantized(model):
        keep_4bit_weights_trainable_on_cpu(model)
    return model


def device_map_for(quantization: Any) -> dict[str, Any]:
    if quantization is not None and torch.cuda.is_available():  # bitsandbytes quantises as the weights reach the GPU
        return {"device_map": {"": torch.cuda.current_device()}}
    return {}


def from_pretrained(path: str, load_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    if is_quantized(model):
        keep_4bit_weights_trainable_on_cpu(model)
    return model


def bnb_compute_dtype_of(quantization: Any) -> torch.dtype:
    """The dtype a bitsandbytes config computes in (float32 when not recorded)."""
    if isinstance(quantization, dict):
        dtype = quantization.get("bnb_4bit_compute_dtype")
    else:
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def dequantized_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Any:
    """A full-precision copy of a bitsandbytes 4-bit/8-bit transformers model: each quantised
    linear layer's weight dequantised, every other weight and buffer copied, in `dtype` (default:
    the compute dtype). The quantised model is left as it is."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    config = copy.deepcopy(model.config)
    dtype = dtype or bnb_compute_dtype_of(getattr(config, "quantization_config", None))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        copied = type(model)(config).to(dtype)  # the same class: a causal LM, or a reward model's classifier
    if getattr(model, "generation_config", None) is not None:
        copied.generation_config = copy.deepcopy(model.generation_config)
    copied.name_or_path = copied.config._name_or_path = model.name_or_path
    with torch.no_grad():
        for name, target in copied.named_modules():
            module = _unwrapped(model.get_submodule(name))
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
                target.weight.copy_(weight.to(dtype))
                if module.bias is not None:
                    target.bias.copy_(module.bias)
                continue
            for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                getattr(target, key).copy_(tensor)
    set_origin(copied, recipe=base_recipe_of(model))
    return copied.eval()


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module peft wrapped (a LoRA layer's base layer, the original of modules_to_save or of
    trained token rows), or `module` itself: the weights a copy without the adapter starts from."""
    while True:
        if hasattr(module, "get_base_layer") and module.get_base_layer() is not module:
            module = module.get_base_layer()
        elif isinstance(getattr(module, "original_module", None), torch.nn.Module):
            module = module.original_module
        else:
            return module
