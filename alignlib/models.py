"""Load the models a preference run needs: policy, reference, reward model.

- `ModelConfig`: TRL's field names (model_name_or_path, dtype, use_peft, lora_r, load_in_4bit...),
  parsed by transformers.HfArgumentParser like any dataclass.
- `load_tokenizer`, `load_model_tokenizer`, `load_causal_lm`, `load_reward_model`: transformers +
  peft (LoRA) + bitsandbytes (QLoRA: 4-bit NF4 base weights, LoRA adapters on top).
- Adapters carried from one stage to the next: `--model` may be a LoRA adapter directory (an SFT
  stage's output). `start_adapter="continue"` trains that adapter, loaded trainable over its
  base (4-bit when load_in_4bit); `"merge"` merges it into its base first (a base it was trained
  over in 4 bit is dequantised for the merge) and puts a fresh LoRA on the result
  (`load_adapter_base`, `merged_adapter_model`).
- Chat formats (`chat_template`, alignlib.chat): the format's tokens are added to the tokenizer,
  the embeddings resized (new rows: the mean of the old ones) and, with LoRA, exactly those rows
  trained through peft's `trainable_token_indices` on the input embedding and the lm_head.
- `make_reference`: the reference policy of DPO-style losses and of PPO's KL, by one of four
  strategies (see REFERENCE_STRATEGIES), as a callable `(input_ids, attention_mask) -> logits`.

Saving a trained model and loading it back for generation is alignlib.saved_models'. What a
saved adapter needs of its base beyond adapter_config.json (a start adapter merged into it, its
embeddings resized, its 4-bit quantisation) is written beside it (ADAPTER_BASE_FILE,
BASE_QUANTIZATION_FILE) and read back by `load_adapter_base`.

Models are loaded from local directories (or Hub ids "org/name" already in the local Hugging
Face cache); nothing is downloaded. Bad settings fail early with a one-line ValueError or
FileNotFoundError.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlib.chat import CHAT_FORMATS, setup_chat_format

__all__ = [
    "ADAPTER_BASE_FILE",
    "BASE_QUANTIZATION_FILE",
    "DTYPES",
    "REFERENCE_STRATEGIES",
    "START_ADAPTER_MODES",
    "ModelConfig",
    "ReferenceForward",
    "adapter_dir",
    "auto_reference_strategy",
    "attach_adapter",
    "base_recipe_of",
    "check_adapter_name",
    "continued_adapter_of",
    "decoder_of",
    "dequantized_copy",
    "is_peft_model",
    "is_quantized",
    "lm_head_fusable",
    "load_adapter_base",
    "load_causal_lm",
    "load_frozen_causal_lm",
    "load_model_tokenizer",
    "load_reward_model",
    "load_tokenizer",
    "lora_config",
    "make_reference",
    "merged_adapter_model",
    "require_matching_adapter_keys",
    "resize_embeddings",
    "save_embedding_layers",
    "vocabulary_size",
]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
ALL_LINEAR = "all-linear"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")

_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                "use_rslora", "use_dora", "model_adapter_name")
START_ADAPTER_MODES = ("continue", "merge")
DEFAULT_ADAPTER = "default"  # peft's name for a model's one adapter

ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_QUANTIZATION_FILE = "base_quantization_config.json"
"""Saved beside an adapter trained over a quantised base: that base's bitsandbytes config, so the
adapter is reloaded over the same base."""
ADAPTER_BASE_FILE = "adapter_base.json"
"""Saved beside an adapter whose base is more than adapter_config.json's base_model_name_or_path:
{"merged_start": the adapter directory merged into that base first, "num_embeddings": the
embedding rows after a chat format's tokens were added}."""


@dataclass
class ModelConfig:
    """Which model to load and how: dtype, LoRA, 4-bit/8-bit quantisation.

    Field names and defaults follow TRL's ModelConfig, so a TRL YAML's model section works.
    One deliberate difference: `use_bnb_nested_quant` (double quantisation, the QLoRA recipe)
    defaults to True here. `torch_dtype` is accepted as the older name of `dtype`.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory of a causal LM (or a Hub id 'org/name' already downloaded).",
                                "aliases": ["--model"]}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Revision of a cached Hub model (ignored for local directories)."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "dtype the weights are loaded in ('auto' keeps the checkpoint's).", "choices": list(DTYPES)},
    )
    torch_dtype: str | None = field(
        default=None, metadata={"help": "Deprecated name of --dtype; overrides it when given.", "choices": list(DTYPES)}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation ('eager', 'sdpa', 'flash_attention_2')."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code shipped with the checkpoint to run."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names that get adapters, or 'all-linear' (every linear layer but the output "
                  "head). Default: peft's choice for the architecture (e.g. q_proj, v_proj)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. score)."}
    )
    lora_task_type: str = field(
        default="CAUSAL_LM",
        metadata={"help": "peft task type: CAUSAL_LM for policies, SEQ_CLS for reward models.", "choices": TASK_TYPES},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale by alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base weights in 8 bit (bitsandbytes); "
                                                                 "needs use_peft."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base weights in 4 bit (bitsandbytes, "
                                                                 "QLoRA); needs use_peft."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]}
    )
    use_bnb_nested_quant: bool = field(
        default=True, metadata={"help": "Double quantisation: quantise the 4-bit block scales too (QLoRA)."}
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None, metadata={"help": "dtype the packed 4-bit weights are stored in (default uint8)."}
    )
    start_adapter: str = field(
        default="continue",
        metadata={"help": "When --model is a LoRA adapter directory: 'continue' trains that adapter (loaded "
                  "trainable over its base; needs use_peft), 'merge' merges it into its base (dequantising a base "
                  "it was trained over in 4 bit) and trains a new adapter (lora_*) or, without use_peft, every "
                  "weight.", "choices": list(START_ADAPTER_MODES)},
    )
    model_adapter_name: str | None = field(
        default=None, metadata={"help": "Name of the trained adapter inside the peft model (TRL's "
                                        "model_adapter_name; default 'default'). Saved adapters load under any name."}
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Put a chat format on a tokenizer that has none: 'chatml'. Its tokens are added, the "
                  "embeddings resized and those rows trained (LoRA: peft trainable_token_indices) and saved with "
                  "the model or adapter.", "choices": list(CHAT_FORMATS)},
    )
    force_chat_template: bool = field(
        default=False, metadata={"help": "Let --chat_template replace a chat template the tokenizer already has."}
    )

    def __post_init__(self) -> None:
        if self.torch_dtype is not None:
            self.dtype = self.torch_dtype
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive: choose one")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}")
        if self.lora_task_type not in TASK_TYPES:
            raise ValueError(f"lora_task_type must be one of {', '.join(TASK_TYPES)}; got {self.lora_task_type!r}")
        if not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise ValueError(f"lora_r must be a positive int, got {self.lora_r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        # The command line gives ["all-linear"]; a YAML may give "q_proj,v_proj".
        targets = self.lora_target_modules
        if isinstance(targets, str):
            targets = [name.strip() for name in targets.split(",") if name.strip()]
        if targets is not None and ALL_LINEAR in targets:
            if len(targets) > 1:
                raise ValueError(f"lora_target_modules: 'all-linear' cannot be combined with names, got {targets}")
            targets = ALL_LINEAR
        self.lora_target_modules = targets
        if self.start_adapter not in START_ADAPTER_MODES:
            raise ValueError(f"start_adapter must be one of {', '.join(START_ADAPTER_MODES)}; got {self.start_adapter!r}")
        if self.chat_template is not None and self.chat_template not in CHAT_FORMATS:
            raise ValueError(f"chat_template {self.chat_template!r} is not a known chat format; known: "
                             f"{', '.join(CHAT_FORMATS)}")
        if self.force_chat_template and self.chat_template is None:
            raise ValueError("force_chat_template is given without chat_template: name the format to put on the "
                             "tokenizer (--chat_template chatml)")
        if self.model_adapter_name is not None:
            check_adapter_name("model_adapter_name", self.model_adapter_name)
        if not self.use_peft:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [name for name in _LORA_FIELDS if getattr(self, name) != defaults[name]]
            if changed:
                raise ValueError(f"LoRA settings {', '.join(changed)} are given but use_peft is False: "
                                 "set use_peft=True or remove them")

    @property
    def torch_dtype_value(self) -> torch.dtype | str:
        """The dtype as transformers takes it: a torch.dtype, or "auto"."""
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------------------------
# Checks with one-line errors
# ----------------------------------------------------------------------------------------------


def check_adapter_name(flag: str, name: Any) -> None:
    """A name peft can give an adapter: it becomes a key of torch ModuleDicts, so it cannot contain '.'
    nor be an attribute torch modules already have ('train', 'eval', 'forward'...)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{flag} must be a non-empty name without '.', got {name!r}")
    if hasattr(torch.nn.ModuleDict(), name):
        raise ValueError(f"{flag} {name!r} cannot name a peft adapter: torch modules already have an attribute "
                         f"{name!r}; choose another name (e.g. 'policy')")


def local_dir(path: str | os.PathLike | None, what: str = "model", *, revision: str = "main",
               need_config: bool = True) -> str:
    """The local directory to load from, or a one-line FileNotFoundError / ValueError.

    `path` is a local directory, or a Hub id ("org/name") already downloaded into the Hugging
    Face cache (resolved without the network). Nothing is downloaded: an unknown path fails at
    once instead of after the Hub client's retries.
    """
    if path is None or str(path) == "":
        raise ValueError(f"no {what} path given (model_name_or_path is empty)")
    path = str(path)
    if os.path.isfile(path):
        raise NotADirectoryError(f"{what} path {path} is a file: give the folder that holds the model's files")
    if not os.path.isdir(path):
        first = path.split("/")[0]
        looks_like_hub_id = (path.count("/") == 1 and not path.startswith((".", "/", "~"))
                             and not os.path.isdir(first))  # models/tiny is a local path, not org/name
        cached = _cached_hub_snapshot(path, revision) if looks_like_hub_id else None
        if cached is None:
            hint = (f" (no such local folder; if it is a Hugging Face Hub id, download it first: "
                    f"huggingface-cli download {path})" if looks_like_hub_id else "")
            raise FileNotFoundError(f"{what} path {path} does not exist{hint}")
        path = cached
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{what} directory {path} has no config.json: it holds a LoRA adapter; "
                                    "load it with alignlib.saved_models.load_for_generation")
        raise FileNotFoundError(f"{what} directory {path} has no config.json: not a model directory")
    return path


def _cached_hub_snapshot(repo_id: str, revision: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not in the cache, or not a valid repo id
        return None


def _require_bitsandbytes(cfg: ModelConfig) -> None:
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as exc:
        bits = "4" if cfg.load_in_4bit else "8"
        raise ValueError(f"load_in_{bits}bit needs bitsandbytes, which could not be imported ({exc}); "
                         "pip install bitsandbytes") from None


def _quantization_config(cfg: ModelConfig) -> Any:
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


def _load_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": cfg.torch_dtype_value,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    quantization = _quantization_config(cfg)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs.update(_device_map_for(quantization))
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


def _load(auto_class: Any, path: str, cfg: ModelConfig, **kwargs: Any) -> Any:
    """auto_class.from_pretrained(path) with cfg's dtype, revision and quantisation."""
    model = auto_class.from_pretrained(path, **_load_kwargs(cfg), **kwargs)
    if is_quantized(model):
        keep_4bit_weights_trainable_on_cpu(model)
    return model


# ----------------------------------------------------------------------------------------------
# Tokenizer, policy, reward model
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, *, padding_side: str | None = None,
                   trust_remote_code: bool = False, revision: str = "main", what: str = "tokenizer") -> Any:
    """AutoTokenizer from `path`, with a pad token.

    A tokenizer without a pad token gets its eos token as pad (the common choice for causal
    LMs). This is safe in alignlib because padding is found through the attention mask and
    labels (-100), never by comparing token ids with pad_token_id. Without an eos token either,
    a ValueError asks for a pad token. `padding_side` ("left" for generation) overrides the
    tokenizer's when given.
    """
    from transformers import AutoTokenizer

    path = local_dir(path, what, revision=revision, need_config=False)
    if not _has_tokenizer_files(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE)):
        path = _adapter_base_path(path)  # an adapter saved without its tokenizer: its base model's
    if not _has_tokenizer_files(path):
        raise FileNotFoundError(f"{what} folder {path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                                "is it a model folder?")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"could not load the tokenizer in {path}: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    return tokenizer


def _has_tokenizer_files(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def load_model_tokenizer(cfg: ModelConfig, *, padding_side: str | None = None) -> Any:
    """The tokenizer of cfg.model_name_or_path (an adapter's own, else its base's), with
    cfg.chat_template put on it (alignlib.chat.setup_chat_format): the tokenizer a run trains with."""
    return _tokenizer_and_chat_tokens(cfg, padding_side)[0]


def _tokenizer_and_chat_tokens(cfg: ModelConfig, padding_side: str | None = None) -> tuple[Any, list[int] | None]:
    """The run's tokenizer and the ids of its chat format's tokens (None without chat_template)."""
    tokenizer = load_tokenizer(cfg.model_name_or_path, padding_side=padding_side,
                               trust_remote_code=cfg.trust_remote_code, revision=cfg.model_revision, what="model")
    if cfg.chat_template is None:
        return tokenizer, None
    token_ids = setup_chat_format(tokenizer, cfg.chat_template, force=cfg.force_chat_template,
                                  what=f"the tokenizer of {cfg.model_name_or_path}")
    return tokenizer, token_ids


# ----------------------------------------------------------------------------------------------
# Adapters as starting points, resized embeddings, dequantised copies
# ----------------------------------------------------------------------------------------------


def adapter_dir(path: str | os.PathLike | None, *, revision: str = "main") -> str | None:
    """The local directory of `path` if it holds a LoRA adapter (adapter_config.json), else None."""
    if path is None or not str(path):
        return None
    try:
        resolved = local_dir(path, revision=revision, need_config=False)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return resolved if os.path.isfile(os.path.join(resolved, ADAPTER_CONFIG_FILE)) else None


def _read_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _adapter_settings(path: str) -> dict:
    return _read_json(os.path.join(path, ADAPTER_CONFIG_FILE))


def _adapter_base_path(path: str) -> str:
    """The base model directory an adapter's adapter_config.json names (a one-line error if it is gone)."""
    return local_dir(_adapter_settings(path).get("base_model_name_or_path") or "",
                     f"base model of the adapter in {path}")


def _base_recipe(path: str) -> dict:
    """ADAPTER_BASE_FILE of an adapter directory ({} when its base is just base_model_name_or_path)."""
    recipe_file = os.path.join(path, ADAPTER_BASE_FILE)
    return _read_json(recipe_file) if os.path.isfile(recipe_file) else {}


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


def _set_origin(model: torch.nn.Module, *, recipe: dict | None = None, continued: str | None = None) -> None:
    """Remember on the transformers model how its base was built (saved beside its adapter as
    ADAPTER_BASE_FILE) and which adapter directory it continues; read by save_model and make_reference."""
    if recipe is not None:
        model.alignlib_base_recipe = {key: value for key, value in recipe.items() if value is not None}
    if continued is not None:
        model.alignlib_continued_adapter = continued


def base_recipe_of(model: torch.nn.Module) -> dict:
    """How the base of a (peft) model was built: {} for a base loaded as it is on disk."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(getattr(base, "alignlib_base_recipe", {}))


def continued_adapter_of(model: torch.nn.Module) -> str | None:
    """The adapter directory a policy's adapter was loaded from (start_adapter continue), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "alignlib_continued_adapter", None)


def _device_map_for(quantization: Any) -> dict[str, Any]:
    if quantization is not None and torch.cuda.is_available():  # bitsandbytes quantises as the weights reach the GPU
        return {"device_map": {"": torch.cuda.current_device()}}
    return {}


def _from_pretrained(path: str, load_kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    if is_quantized(model):
        keep_4bit_weights_trainable_on_cpu(model)
    return model


def _quantized(model: torch.nn.Module, load_kwargs: dict[str, Any]) -> Any:
    """`model` (full precision, in memory) reloaded with load_kwargs' quantization: saved to a
    temporary folder and read back through from_pretrained, the one path bitsandbytes quantises on."""
    base_path = model.name_or_path
    scratch = tempfile.mkdtemp(prefix="alignlib-merged-base-")
    try:
        model.save_pretrained(scratch)
        quantized = _from_pretrained(scratch, load_kwargs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    quantized.name_or_path = quantized.config._name_or_path = base_path  # adapters record the real base
    return quantized


def load_adapter_base(path: str, load_kwargs: dict[str, Any]) -> Any:
    """The transformers model the adapter in `path` sits on, loaded with from_pretrained's
    `load_kwargs` (dtype, quantization_config...): base_model_name_or_path, with the adapter that
    ADAPTER_BASE_FILE says was merged into it first (built the same way, recursively), its
    embeddings resized as recorded."""
    recipe = _base_recipe(path)
    if recipe.get("merged_start"):
        float_kwargs = {key: value for key, value in load_kwargs.items()
                        if key not in ("quantization_config", "device_map")}
        dtype = float_kwargs.get("dtype", "auto")
        if "quantization_config" in load_kwargs and dtype == "auto":
            float_kwargs["dtype"] = _bnb_compute_dtype_of(load_kwargs["quantization_config"])
        model = merged_adapter_model(recipe["merged_start"], float_kwargs)
        if "quantization_config" in load_kwargs:
            model = _quantized(model, load_kwargs)
    else:
        model = _from_pretrained(_adapter_base_path(path), load_kwargs)
    if recipe.get("num_embeddings"):
        resize_embeddings(model, int(recipe["num_embeddings"]))
    _set_origin(model, recipe=recipe)
    return model


def merged_adapter_model(path: str, load_kwargs: dict[str, Any] | None = None) -> Any:
    """The full-precision model that the adapter in `path` and its base compute, as one transformers
    model (the adapter merged in). An adapter trained over a 4-bit base (BASE_QUANTIZATION_FILE) is
    merged into that base's dequantised weights, so the result computes what the QLoRA model did."""
    load_kwargs = dict(load_kwargs or {})
    quantization_file = os.path.join(path, BASE_QUANTIZATION_FILE)
    if _adapter_settings(path).get("task_type") == "SEQ_CLS":
        raise ValueError(f"{path} holds a reward model's adapter (task SEQ_CLS), not a causal LM's")
    if os.path.isfile(quantization_file):
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig.from_dict(_read_json(quantization_file))
        quantized = load_adapter_base(path, {"quantization_config": quantization, **_device_map_for(quantization),
                                             "trust_remote_code": load_kwargs.get("trust_remote_code", False)})
        dtype = load_kwargs.get("dtype", "auto")
        base = dequantized_copy(quantized, None if dtype == "auto" else dtype)
        del quantized
    else:
        base = load_adapter_base(path, load_kwargs)
    model = attach_adapter(base, path, what=f"the adapter in {path}")
    return model.merge_and_unload()


def _bnb_compute_dtype_of(quantization: Any) -> torch.dtype:
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
    dtype = dtype or _bnb_compute_dtype_of(getattr(config, "quantization_config", None))
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
    _set_origin(copied, recipe=base_recipe_of(model))
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


def attach_adapter(base: Any, path: str, *, what: str, trainable: bool = False,
                   adapter_name: str = DEFAULT_ADAPTER) -> Any:
    """peft.PeftModel over `base` with the adapter in `path`; an adapter that does not fit the base
    (other shapes, other layers) is a one-line ValueError."""
    from peft import PeftModel

    try:
        with _peft_deprecations_silenced():
            model = PeftModel.from_pretrained(base, path, adapter_name=adapter_name, is_trainable=trainable)
    except RuntimeError as exc:
        raise _misfit(exc, what, base) from None
    require_matching_adapter_keys(model, path, what=what, adapter_name=adapter_name)
    return model


def _misfit(exc: Exception, what: str, base: Any) -> Exception:
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


def lora_config(cfg: ModelConfig, task_type: str | None = None, *,
                trainable_token_indices: dict[str, list[int]] | None = None) -> Any:
    """peft.LoraConfig from the lora_* fields (`task_type` overrides cfg.lora_task_type);
    `trainable_token_indices`: embedding rows trained in full, by module name (a chat format's tokens)."""
    from peft import LoraConfig

    return LoraConfig(
        trainable_token_indices=trainable_token_indices,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        modules_to_save=cfg.lora_modules_to_save,
        task_type=task_type or cfg.lora_task_type,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
    )


@contextlib.contextmanager
def _peft_deprecations_silenced() -> Iterator[None]:
    """peft (0.21) calls transformers' (5.x) old names gradient_checkpointing_enable and
    is_gradient_checkpointing, which warn on every run; alignlib itself uses the new ones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`(is_gradient_checkpointing|gradient_checkpointing_enable)` is "
                                r"deprecated", category=FutureWarning)
        yield


def _prepare_for_training(model: Any, cfg: ModelConfig, gradient_checkpointing: bool, task_type: str, *,
                          continued: str | None = None, token_ids: list[int] | None = None) -> Any:
    """Gradient checkpointing, k-bit preparation and the LoRA adapter, in that order: the adapter
    in `continued` loaded trainable, or a new one (training the embedding rows `token_ids` too)."""
    with _peft_deprecations_silenced():
        return _prepare(model, cfg, gradient_checkpointing, task_type, continued, token_ids)


def _prepare(model: Any, cfg: ModelConfig, gradient_checkpointing: bool, task_type: str, continued: str | None,
             token_ids: list[int] | None) -> Any:
    checkpointing_kwargs = {"use_reentrant": False}
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        if cfg.use_peft:  # the frozen embeddings' output must carry grad into the checkpointed blocks
            model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    name = cfg.model_adapter_name or DEFAULT_ADAPTER
    if continued is not None:
        model = attach_adapter(model, continued, what=f"--model {continued}: the adapter", trainable=True,
                               adapter_name=name)
        _set_origin(model.get_base_model(), continued=continued)
    elif cfg.use_peft:
        from peft import get_peft_model

        tokens = _token_rows(model, token_ids) if token_ids else None
        try:
            model = get_peft_model(model, lora_config(cfg, task_type, trainable_token_indices=tokens),
                                   adapter_name=name)
        except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
            raise ValueError(f"LoRA could not be applied to {cfg.model_name_or_path}: "
                             f"{str(exc).splitlines()[0]}") from None
    return model


def _token_rows(model: torch.nn.Module, token_ids: list[int]) -> dict[str, list[int]]:
    """peft's trainable_token_indices for rows `token_ids` of the input embedding and, unless it is
    tied to it (peft then follows the embedding), of the lm_head."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[id(embedding)]: sorted(set(token_ids))}
    if head is not None and head.weight is not embedding.weight:
        rows[names[id(head)]] = sorted(set(token_ids))
    return rows


def load_causal_lm(cfg: ModelConfig, *, gradient_checkpointing: bool = False) -> Any:
    """The policy to train: a causal LM from cfg.model_name_or_path, with LoRA if cfg.use_peft.

    - dtype: cfg.dtype. load_in_4bit: NF4 (cfg.bnb_4bit_quant_type) base weights with double
      quantisation (cfg.use_bnb_nested_quant), computing in cfg.dtype, prepared with
      peft.prepare_model_for_kbit_training (QLoRA); needs use_peft.
    - use_peft: a peft LoRA adapter (cfg.lora_*; "all-linear" supported); only it trains.
    - cfg.model_name_or_path a LoRA adapter directory: start_adapter "continue" loads that adapter
      trainable over its base (load_adapter_base; 4-bit as cfg asks); "merge" merges it into its
      base (merged_adapter_model: a 4-bit-trained adapter into the dequantised weights), quantises
      the result again for load_in_4bit, and a new adapter (or full fine-tuning) starts from it.
    - chat_template: the format's tokens added to the tokenizer (alignlib.chat), the embeddings
      resized (resize_embeddings) and, with LoRA, those rows trained (trainable_token_indices).
    - gradient_checkpointing: non-reentrant activation checkpointing (use_cache off).

    Returns a transformers PreTrainedModel, or a peft PeftModel around one; the mode (train or
    eval) is left to the caller. Quantised models are placed on the current CUDA device when
    there is one; others stay on CPU.
    """
    from transformers import AutoModelForCausalLM

    start = adapter_dir(cfg.model_name_or_path, revision=cfg.model_revision)
    path = start or local_dir(cfg.model_name_or_path, revision=cfg.model_revision)
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        raise ValueError("load_in_4bit / load_in_8bit weights cannot be trained directly: set use_peft=True (QLoRA)")
    token_ids = None
    if cfg.chat_template is not None:
        if start is not None and cfg.start_adapter == "continue":
            raise ValueError(f"--chat_template {cfg.chat_template} with --model {start}, an adapter that training "
                             "continues: a loaded adapter cannot take new token rows; use --start_adapter merge")
        tokenizer, token_ids = _tokenizer_and_chat_tokens(cfg)
    if start is not None:
        _check_start_adapter(cfg, start)
        if cfg.start_adapter == "continue":
            model = load_adapter_base(start, _load_kwargs(cfg))
            return _prepare_for_training(model, cfg, gradient_checkpointing, "CAUSAL_LM", continued=start)
        float_kwargs = {key: value for key, value in _load_kwargs(cfg).items()
                        if key not in ("quantization_config", "device_map")}
        model = merged_adapter_model(start, float_kwargs)
        if cfg.load_in_4bit or cfg.load_in_8bit:
            model = _quantized(model, _load_kwargs(cfg))
        _set_origin(model, recipe={"merged_start": os.path.abspath(start)})
    else:
        model = _load(AutoModelForCausalLM, path, cfg)
    if token_ids is not None:
        if resize_embeddings(model, len(tokenizer)):
            _set_origin(model, recipe={**base_recipe_of(model), "num_embeddings": len(tokenizer)})
        _use_chat_eos(model, tokenizer)
    return _prepare_for_training(model, cfg, gradient_checkpointing, "CAUSAL_LM", token_ids=token_ids)


def _use_chat_eos(model: torch.nn.Module, tokenizer: Any) -> None:
    """Generation stops at the chat format's end of turn as well as at the model's own eos."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    model.generation_config.eos_token_id = list(dict.fromkeys([*eos, tokenizer.eos_token_id]))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# LoRA settings that a continued adapter keeps from its adapter_config.json (ModelConfig name -> peft name).
_CONTINUED_SETTINGS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_target_modules": "target_modules",
                       "lora_modules_to_save": "modules_to_save", "use_rslora": "use_rslora", "use_dora": "use_dora"}


def _check_start_adapter(cfg: ModelConfig, path: str) -> None:
    """One-line errors for an adapter given as --model that cannot start this run."""
    settings = _adapter_settings(path)
    if settings.get("task_type") == "SEQ_CLS":
        raise ValueError(f"--model {path} holds a reward model's adapter (task SEQ_CLS), not a causal LM's")
    if settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"--model {path} holds a {settings.get('peft_type')} adapter; alignlib continues or merges "
                         "LoRA adapters")
    if cfg.start_adapter == "merge":
        return
    if not cfg.use_peft:
        raise ValueError(f"--model {path} is a LoRA adapter: --start_adapter continue trains it, which needs "
                         "--use_peft true; or --start_adapter merge to merge it into its base first")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, key in _CONTINUED_SETTINGS.items():
        given, saved = getattr(cfg, name), settings.get(key)
        if given == defaults[name] or given == ALL_LINEAR:
            continue
        same = (sorted(given) == sorted(saved or [])) if isinstance(given, list) else given == saved
        if not same:
            raise ValueError(f"{name}={given!r} is given, but --model {path} is an adapter that training continues "
                             f"with its own {key}={saved!r}: remove {name}, or use --start_adapter merge to train a "
                             "new adapter with it")


def load_reward_model(cfg: ModelConfig, num_labels: int = 1, *, tokenizer: Any = None,
                      gradient_checkpointing: bool = False) -> Any:
    """A sequence-classification model (a scalar score per sequence for num_labels=1).

    With use_peft the LoRA adapter has task SEQ_CLS, so peft trains and saves the new score
    head in full (modules_to_save) beside the adapters. config.pad_token_id is set from
    `tokenizer` (loaded from the model path if None): the model reads the score at the last
    non-pad token, which it finds through pad_token_id. (When pad is eos, a trailing eos counts
    as padding, so the score is read at the token before it.)
    """
    from transformers import AutoModelForSequenceClassification

    adapter = adapter_dir(cfg.model_name_or_path, revision=cfg.model_revision)
    if adapter is not None:
        raise ValueError(f"--model {adapter} is a LoRA adapter: a reward model starts from a full model; merge it "
                         f"into its base first (alignlib merge --model {adapter} --output DIR)")
    path = local_dir(cfg.model_name_or_path, revision=cfg.model_revision)
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        raise ValueError("load_in_4bit / load_in_8bit weights cannot be trained directly: set use_peft=True (QLoRA)")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    model = _load(AutoModelForSequenceClassification, path, cfg, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    return _prepare_for_training(model, cfg, gradient_checkpointing, "SEQ_CLS")


def load_frozen_causal_lm(cfg: ModelConfig, path: str | os.PathLike | None = None, *,
                          what: str = "reference model") -> Any:
    """A causal LM for inference only (eval mode, requires_grad False), with cfg's dtype and
    quantisation; `path` defaults to cfg.model_name_or_path. A LoRA adapter directory is loaded
    over its base (built as load_adapter_base builds it) and kept as a frozen peft model."""
    from transformers import AutoModelForCausalLM

    path = path or cfg.model_name_or_path
    adapter = adapter_dir(path, revision=cfg.model_revision)
    if adapter is not None:
        model = attach_adapter(load_adapter_base(adapter, _load_kwargs(cfg)), adapter,
                               what=f"the reference adapter in {adapter}")
    else:
        model = _load(AutoModelForCausalLM, local_dir(path, what, revision=cfg.model_revision), cfg)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# The reference policy
# ----------------------------------------------------------------------------------------------

REFERENCE_STRATEGIES = ("model", "adapter_disabled", "precomputed", "ref_adapter")
DEFAULT_REF_ADAPTER = "reference"  # TRL's ref_adapter_name in its docs


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) inside; each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body of a causal LM (or of its peft wrapper): the forward that ends in the
    last hidden states, before the lm_head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def lm_head_fusable(model: torch.nn.Module) -> bool:
    """Whether the logits are plain hidden @ W^T (no final softcapping, scale or bias on the lm_head),
    so a fused lm_head + log-softmax may replace the model's own head."""
    config = model.config
    head = model.get_output_embeddings()
    return (getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
            and head is not None and getattr(head, "bias", None) is None)


def _param_versions(model: torch.nn.Module) -> int:
    """Sum of the parameters' in-place version counters: changes whenever an optimizer steps."""
    return sum(p._version for p in model.parameters())


class ReferenceForward:
    """The reference policy as a callable: `ref(input_ids, attention_mask) -> logits (B, T, V)`.

    Runs under torch.no_grad with every module in eval mode (no dropout), restoring the
    model's modes after. Extra keyword arguments go to the model's forward.

    Attributes:
        strategy: the REFERENCE_STRATEGIES entry it was made for.
        model: the module it runs (a frozen copy, or the policy itself).
        adapter_name: "ref_adapter": the frozen adapter made active for the reference forward
            (the policy's own adapter is made active again after, trainable as it was).
        precompute_only: True for "precomputed": the trainer must call it over the data
            before the first optimizer step, and use the stored
            values afterwards. On a policy whose own weights make the reference (full
            fine-tuning, a continued adapter) a call after the policy changed raises RuntimeError.
    """

    def __init__(self, strategy: str, model: torch.nn.Module, *, disable_adapter: bool,
                 precompute_only: bool = False, adapter_name: str | None = None) -> None:
        self.strategy, self.model, self.adapter_name = strategy, model, adapter_name
        self.disable_adapter, self.precompute_only = disable_adapter, precompute_only
        self._versions = _param_versions(model) if precompute_only and not disable_adapter else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **model_kwargs: Any) -> torch.Tensor:
        if self._versions is not None and _param_versions(self.model) != self._versions:
            raise RuntimeError("the policy has been updated since the 'precomputed' reference was made: reference "
                               "log-probs must be computed before the first optimizer step")
        if self.disable_adapter:
            switched = self.model.disable_adapter()
        elif self.adapter_name is not None:
            switched = _active_adapter(self.model, self.adapter_name)
        else:
            switched = contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(self.model), switched:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits


@contextlib.contextmanager
def _active_adapter(model: Any, name: str) -> Iterator[None]:
    """Adapter `name` active (and frozen) inside; the adapter that was active before is made active
    again after, trainable if it was (peft's set_adapter sets requires_grad of the active adapter)."""
    previous = model.active_adapter
    was_trainable = any(param.requires_grad for param in model.parameters())
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=not was_trainable)


def auto_reference_strategy(cfg: ModelConfig, *, ref_model: str | None = None,
                            ref_adapter_name: str | None = None) -> str:
    """What reference_strategy "auto" means for a run: a ref_adapter_name gives "ref_adapter"; a
    ref_model is loaded as a model ("model"); a start adapter that training continues gives
    "ref_adapter" (the start model, not the base under it); any other LoRA policy
    "adapter_disabled"; full fine-tuning "model"."""
    if ref_adapter_name is not None:
        return "ref_adapter"
    if ref_model is not None:
        return "model"
    if cfg.start_adapter == "continue" and adapter_dir(cfg.model_name_or_path) is not None:
        return "ref_adapter"
    return "adapter_disabled" if cfg.use_peft else "model"


def make_reference(strategy: str, policy: torch.nn.Module, cfg: ModelConfig | None = None, *,
                   ref_model_name_or_path: str | os.PathLike | None = None,
                   ref_adapter_name: str | None = None) -> ReferenceForward:
    """Build the reference policy for `policy`.

    Strategies:
        "model": a separate frozen model loaded from `ref_model_name_or_path` (default
            cfg.model_name_or_path, i.e. the policy's starting point) with cfg's dtype and
            quantisation, placed on the policy's device. A LoRA adapter directory is loaded
            over its base. Costs one more model in memory.
        "adapter_disabled": the policy itself with its LoRA adapter switched off
            (peft's `disable_adapter()`): the base model, at no extra memory. Needs a peft
            policy. The usual choice with a new LoRA (a continued adapter's base is the model
            *before* that adapter, e.g. before SFT: see "ref_adapter").
        "precomputed": reference log-probs computed once before training and stored; this
            returns the callable that computes them (the adapter-disabled policy for a new
            adapter, else the policy as it is now), which the trainer runs once over the data.
        "ref_adapter": the policy's start adapter (or the adapter directory
            `ref_model_name_or_path`) loaded a second time into the policy as adapter
            `ref_adapter_name` (default "reference"), frozen: the reference forward makes it the
            active adapter, then makes the trained one active again. One base in memory, two
            adapters; the frozen one never requires grad, so it is in no optimizer and no checkpoint.

    A reference whose vocabulary differs from the policy's is refused, except one that lacks
    exactly the rows a chat format (cfg.chat_template) added to the policy: it is resized the same
    way (`resize_embeddings`).
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(f"unknown reference strategy {strategy!r}; known: {', '.join(REFERENCE_STRATEGIES)}")
    if ref_adapter_name is not None and strategy != "ref_adapter":
        raise ValueError(f"--ref_adapter_name {ref_adapter_name} names the frozen adapter of reference strategy "
                         f"'ref_adapter'; the strategy here is {strategy!r}")
    if ref_model_name_or_path is not None and strategy in ("adapter_disabled", "precomputed"):
        raise ValueError(f"--ref_model {ref_model_name_or_path} is not read by reference strategy {strategy!r}, which "
                         "uses the policy itself: use reference strategy 'model' (or 'ref_adapter' for an adapter)")
    is_peft = is_peft_model(policy)
    continued = continued_adapter_of(policy) if is_peft else None
    if strategy == "adapter_disabled":
        if not is_peft:
            raise ValueError("reference strategy 'adapter_disabled' needs a LoRA (peft) policy; this policy has no "
                             "adapter: load it with use_peft=True or use strategy 'model' or 'precomputed'")
        return ReferenceForward(strategy, policy, disable_adapter=True)
    if strategy == "precomputed":
        return ReferenceForward(strategy, policy, disable_adapter=is_peft and continued is None, precompute_only=True)
    if strategy == "ref_adapter":
        return _adapter_reference(policy, ref_model_name_or_path or continued, ref_adapter_name or DEFAULT_REF_ADAPTER,
                                  given=ref_model_name_or_path is not None)
    if cfg is None and ref_model_name_or_path is None:
        raise ValueError("reference strategy 'model' needs cfg or ref_model_name_or_path to load the model from")
    cfg = cfg or ModelConfig(model_name_or_path=str(ref_model_name_or_path))
    reference = load_frozen_causal_lm(cfg, ref_model_name_or_path,
                                      what="--ref_model" if ref_model_name_or_path is not None else "reference model")
    _match_vocabulary(reference, policy, cfg, ref_model_name_or_path or cfg.model_name_or_path)
    if not is_quantized(reference):
        reference.to(next(policy.parameters()).device)
    return ReferenceForward(strategy, reference, disable_adapter=False)


def _match_vocabulary(reference: torch.nn.Module, policy: torch.nn.Module, cfg: ModelConfig, path: Any) -> None:
    rows, wanted = vocabulary_size(reference), vocabulary_size(policy)
    if rows == wanted:
        return
    grown_by_chat = base_recipe_of(policy).get("num_embeddings") == wanted and cfg.chat_template is not None
    if rows < wanted and grown_by_chat and str(path) == str(cfg.model_name_or_path):
        base = reference.get_base_model() if is_peft_model(reference) else reference
        resize_embeddings(base, wanted)
        reference.requires_grad_(False)
        return
    raise ValueError(f"--ref_model {path}: its vocabulary has {rows} ids and the policy's {wanted}: the losses compare "
                     "the two models' log-probs token by token, so they need one vocabulary")


def _adapter_reference(policy: torch.nn.Module, path: Any, name: str, *, given: bool) -> ReferenceForward:
    """Reference strategy "ref_adapter": the adapter in `path` loaded into the policy as `name`, frozen."""
    if not is_peft_model(policy):
        raise ValueError("reference strategy 'ref_adapter' needs a LoRA (peft) policy: give --model a LoRA adapter "
                         "directory with --use_peft true")
    if path is None:
        raise ValueError("reference strategy 'ref_adapter' loads the start adapter a second time, frozen: give --model "
                         "a LoRA adapter directory (--start_adapter continue), or --ref_model an adapter directory")
    flag = "--ref_model" if given else "--model"
    adapter = adapter_dir(path)
    if adapter is None:
        local_dir(path, "reference adapter", need_config=False)  # a one-line error for a missing path
        raise ValueError(f"{flag} {path} is not a LoRA adapter directory (no {ADAPTER_CONFIG_FILE}): reference strategy "
                         "'ref_adapter' loads an adapter onto the policy's base; use reference strategy 'model' for a "
                         "full model")
    check_adapter_name("--ref_adapter_name", name)
    if name in policy.peft_config:
        raise ValueError(f"--ref_adapter_name {name} is already the name of the policy's adapter: choose another name")
    trained = policy.peft_config[policy.active_adapter]
    own_base, policy_base = _adapter_settings(adapter).get("base_model_name_or_path"), trained.base_model_name_or_path
    if (_real(own_base) != _real(policy_base)
            or _base_recipe(adapter).get("merged_start") != base_recipe_of(policy).get("merged_start")):
        raise ValueError(f"{flag} {path} is an adapter for the base {own_base}, and the policy's base is {policy_base}: "
                         "reference strategy 'ref_adapter' needs both on one base; use reference strategy 'model'")
    try:
        with _peft_deprecations_silenced():
            policy.load_adapter(adapter, adapter_name=name, is_trainable=False)
    except RuntimeError as exc:
        raise _misfit(exc, f"{flag} {path}: the reference adapter", policy.get_base_model()) from None
    require_matching_adapter_keys(policy, adapter, what=f"{flag} {path}: the reference adapter", adapter_name=name)
    for param_name, param in policy.named_parameters():
        if f".{name}." in param_name or param_name.endswith(f".{name}"):
            param.requires_grad_(False)
    return ReferenceForward("ref_adapter", policy, disable_adapter=False, adapter_name=name)


def _real(path: Any) -> Any:
    return os.path.realpath(path) if path and os.path.exists(path) else path
