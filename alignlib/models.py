"""Load the models a preference run needs: policy, reference, reward model; save them.

- `ModelConfig`: TRL's field names (model_name_or_path, dtype, use_peft, lora_r, load_in_4bit...),
  parsed by transformers.HfArgumentParser like any dataclass.
- `load_tokenizer`, `load_causal_lm`, `load_reward_model`: transformers + peft (LoRA) +
  bitsandbytes (QLoRA: 4-bit NF4 base weights, LoRA adapters on top).
- `make_reference`: the reference policy of DPO-style losses and of PPO's KL, by one of three
  strategies (see REFERENCE_STRATEGIES), as a callable `(input_ids, attention_mask) -> logits`;
  `precompute_per_example` runs any such callable once over a dataset.
- `save_model`, `load_for_generation`: Hugging Face / peft directories, written atomically.

Models are loaded from local directories (or Hub ids "org/name" already in the local Hugging
Face cache); nothing is downloaded. Bad settings fail early with a one-line ValueError or
FileNotFoundError.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import importlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignlib.training import atomic_directory

__all__ = [
    "DTYPES",
    "REFERENCE_STRATEGIES",
    "ModelConfig",
    "ReferenceForward",
    "load_causal_lm",
    "load_for_generation",
    "load_frozen_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "lora_config",
    "make_reference",
    "precompute_per_example",
    "save_model",
]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
ALL_LINEAR = "all-linear"

_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                "use_rslora", "use_dora")


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


def _local_dir(path: str | os.PathLike | None, what: str = "model", *, revision: str = "main",
               need_config: bool = True) -> str:
    """The local directory to load from, or a one-line FileNotFoundError / ValueError.

    `path` is a local directory, or a Hub id ("org/name") already downloaded into the Hugging
    Face cache (resolved without the network). Nothing is downloaded: an unknown path fails at
    once instead of after the Hub client's retries.
    """
    if path is None or str(path) == "":
        raise ValueError(f"no {what} path given (model_name_or_path is empty)")
    path = str(path)
    if not os.path.isdir(path):
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        cached = _cached_hub_snapshot(path, revision) if looks_like_hub_id else None
        if cached is None:
            hint = f" (to use the Hub model, download it first: huggingface-cli download {path})" \
                if looks_like_hub_id else ""
            raise FileNotFoundError(f"{what} path {path} does not exist{hint}")
        path = cached
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{what} directory {path} has no config.json: it holds a LoRA adapter; "
                                    "load it with load_for_generation")
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
        if torch.cuda.is_available():  # bitsandbytes quantises as the weights reach the GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def _is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _keep_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> None:
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
    if _is_quantized(model):
        _keep_4bit_weights_trainable_on_cpu(model)
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

    path = _local_dir(path, what, revision=revision, need_config=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        tokenizer.padding_side = padding_side
    return tokenizer


def lora_config(cfg: ModelConfig, task_type: str | None = None) -> Any:
    """peft.LoraConfig from the lora_* fields (`task_type` overrides cfg.lora_task_type)."""
    from peft import LoraConfig

    return LoraConfig(
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


def _prepare_for_training(model: Any, cfg: ModelConfig, gradient_checkpointing: bool, task_type: str) -> Any:
    """Gradient checkpointing, k-bit preparation and the LoRA adapter, in that order."""
    checkpointing_kwargs = {"use_reentrant": False}
    if _is_quantized(model):
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
    if cfg.use_peft:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, lora_config(cfg, task_type))
        except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
            raise ValueError(f"LoRA could not be applied to {cfg.model_name_or_path}: "
                             f"{str(exc).splitlines()[0]}") from None
    return model


def load_causal_lm(cfg: ModelConfig, *, gradient_checkpointing: bool = False) -> Any:
    """The policy to train: a causal LM from cfg.model_name_or_path, with LoRA if cfg.use_peft.

    - dtype: cfg.dtype. load_in_4bit: NF4 (cfg.bnb_4bit_quant_type) base weights with double
      quantisation (cfg.use_bnb_nested_quant), computing in cfg.dtype, prepared with
      peft.prepare_model_for_kbit_training (QLoRA); needs use_peft.
    - use_peft: a peft LoRA adapter (cfg.lora_*; "all-linear" supported); only it trains.
    - gradient_checkpointing: non-reentrant activation checkpointing (use_cache off).

    Returns a transformers PreTrainedModel, or a peft PeftModel around one; the mode (train or
    eval) is left to the caller. Quantised models are placed on the current CUDA device when
    there is one; others stay on CPU.
    """
    from transformers import AutoModelForCausalLM

    path = _local_dir(cfg.model_name_or_path, revision=cfg.model_revision)
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        raise ValueError("load_in_4bit / load_in_8bit weights cannot be trained directly: set use_peft=True (QLoRA)")
    model = _load(AutoModelForCausalLM, path, cfg)
    return _prepare_for_training(model, cfg, gradient_checkpointing, "CAUSAL_LM")


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

    path = _local_dir(cfg.model_name_or_path, revision=cfg.model_revision)
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        raise ValueError("load_in_4bit / load_in_8bit weights cannot be trained directly: set use_peft=True (QLoRA)")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    model = _load(AutoModelForSequenceClassification, path, cfg, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    return _prepare_for_training(model, cfg, gradient_checkpointing, "SEQ_CLS")


def load_frozen_causal_lm(cfg: ModelConfig, path: str | os.PathLike | None = None) -> Any:
    """A causal LM for inference only (eval mode, requires_grad False), with cfg's dtype and
    quantisation but no adapter; `path` defaults to cfg.model_name_or_path."""
    from transformers import AutoModelForCausalLM

    path = _local_dir(path or cfg.model_name_or_path, "reference model", revision=cfg.model_revision)
    model = _load(AutoModelForCausalLM, path, cfg)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# The reference policy
# ----------------------------------------------------------------------------------------------

REFERENCE_STRATEGIES = ("model", "adapter_disabled", "precomputed")


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


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


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
        precompute_only: True for "precomputed": the trainer must call it over the data
            (see `precompute_per_example`) before the first optimizer step, and use the stored
            values afterwards. On a fully fine-tuned policy a call after the policy changed
            raises RuntimeError.
    """

    def __init__(self, strategy: str, model: torch.nn.Module, *, disable_adapter: bool,
                 precompute_only: bool = False) -> None:
        self.strategy, self.model = strategy, model
        self.disable_adapter, self.precompute_only = disable_adapter, precompute_only
        self._versions = _param_versions(model) if precompute_only and not disable_adapter else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **model_kwargs: Any) -> torch.Tensor:
        if self._versions is not None and _param_versions(self.model) != self._versions:
            raise RuntimeError("the policy has been updated since the 'precomputed' reference was made: reference "
                               "log-probs must be computed before the first optimizer step")
        adapter_off = self.model.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(self.model), adapter_off:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits


def make_reference(strategy: str, policy: torch.nn.Module, cfg: ModelConfig | None = None, *,
                   ref_model_name_or_path: str | os.PathLike | None = None) -> ReferenceForward:
    """Build the reference policy for `policy`.

    Strategies:
        "model": a separate frozen model loaded from `ref_model_name_or_path` (default
            cfg.model_name_or_path, i.e. the policy's starting point) with cfg's dtype and
            quantisation, placed on the policy's device. Costs one more model in memory.
        "adapter_disabled": the policy itself with its LoRA adapter switched off
            (peft's `disable_adapter()`): the base model, at no extra memory. Needs a peft
            policy. The usual choice with LoRA.
        "precomputed": reference log-probs computed once before training and stored; this
            returns the callable that computes them (the adapter-disabled policy for a peft
            policy, else the policy as it is now), for `precompute_per_example`.
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(f"unknown reference strategy {strategy!r}; known: {', '.join(REFERENCE_STRATEGIES)}")
    is_peft = _is_peft_model(policy)
    if strategy == "adapter_disabled":
        if not is_peft:
            raise ValueError("reference strategy 'adapter_disabled' needs a LoRA (peft) policy; this policy has no "
                             "adapter: load it with use_peft=True or use strategy 'model' or 'precomputed'")
        return ReferenceForward(strategy, policy, disable_adapter=True)
    if strategy == "precomputed":
        return ReferenceForward(strategy, policy, disable_adapter=is_peft, precompute_only=True)
    if cfg is None and ref_model_name_or_path is None:
        raise ValueError("reference strategy 'model' needs cfg or ref_model_name_or_path to load the model from")
    cfg = cfg or ModelConfig(model_name_or_path=str(ref_model_name_or_path))
    reference = load_frozen_causal_lm(cfg, ref_model_name_or_path)
    if not _is_quantized(reference):
        reference.to(next(policy.parameters()).device)
    return ReferenceForward(strategy, reference, disable_adapter=False)


def precompute_per_example(fn: Callable[[dict[str, Any]], torch.Tensor],
                           dataloader: torch.utils.data.DataLoader, *, index_key: str = "index") -> torch.Tensor:
    """Run `fn(batch) -> (B, ...)` over a whole DataLoader under no_grad; return (N, ...) on CPU
    with row i holding example i's value (N = len(dataloader.dataset)).

    Examples are placed by `batch[index_key]` (B,) when the batches carry it; otherwise the
    loader must not shuffle and rows are filled in order. Every example must be seen once.
    """
    from torch.utils.data import SequentialSampler

    num_examples = len(dataloader.dataset)
    result: torch.Tensor | None = None
    seen = torch.zeros(num_examples, dtype=torch.bool)
    position = 0
    with torch.no_grad():
        for batch in dataloader:
            values = fn(batch).detach().cpu()
            if index_key in batch:
                index = torch.as_tensor(batch[index_key]).long().cpu()
            elif isinstance(dataloader.sampler, SequentialSampler):
                index = torch.arange(position, position + values.shape[0])
            else:
                raise ValueError(f"batches carry no {index_key!r} and the DataLoader does not iterate in order: add "
                                 f"the example index to each batch as {index_key!r}, or use shuffle=False")
            if index.shape[0] != values.shape[0]:
                raise ValueError(f"fn returned {values.shape[0]} rows for a batch of {index.shape[0]} examples")
            if result is None:
                result = torch.zeros((num_examples, *values.shape[1:]), dtype=values.dtype)
            result[index] = values
            seen[index] = True
            position += values.shape[0]
    if result is None or not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:5].tolist()
        raise ValueError(f"the DataLoader did not yield every example once (missing e.g. {missing}); "
                         "use drop_last=False and a sampler over the whole dataset")
    return result


# ----------------------------------------------------------------------------------------------
# Saving and loading for generation
# ----------------------------------------------------------------------------------------------


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
    is_peft = _is_peft_model(model)
    if merge_adapter and not is_peft:
        raise ValueError("merge_adapter=True needs a peft model; this model has no adapter to merge")
    from safetensors import SafetensorError

    try:
        with atomic_directory(output_dir) as tmp:
            if merge_adapter:
                _merged_copy(model, tmp).save_pretrained(tmp)
            else:
                model.save_pretrained(tmp)
                if is_peft and _is_quantized(model.get_base_model()):
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


def _quantization_dict(model: torch.nn.Module) -> dict:
    """The bitsandbytes quantization config the model was loaded with, as a JSON-ready dict."""
    quantization = model.config.quantization_config
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def _merged_copy(peft_model: Any, scratch_dir: Path) -> torch.nn.Module:
    """The adapter of `peft_model` merged into a full-precision copy of its base model."""
    if not _is_quantized(peft_model.get_base_model()):
        return copy.deepcopy(peft_model).merge_and_unload()
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    adapter_cfg = peft_model.peft_config[peft_model.active_adapter]
    try:
        base_path = _local_dir(adapter_cfg.base_model_name_or_path, "base model")
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
    """(model, tokenizer) from a full model directory or a LoRA adapter directory, in eval mode.

    An adapter directory (adapter_config.json) is loaded over its base model, read from
    adapter_config.json's base_model_name_or_path unless `base_model_name_or_path` is given.
    An adapter trained on a different base (other shapes) raises ValueError. The tokenizer is
    taken from `path` when saved there, else from the base model; None when neither has one.
    """
    from transformers import AutoModelForCausalLM

    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} does not exist")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    adapter_config = Path(path) / "adapter_config.json"
    if not adapter_config.is_file():
        model = AutoModelForCausalLM.from_pretrained(_local_dir(path), dtype=DTYPES[dtype])
        return model.eval(), load_tokenizer(path) if _has_tokenizer(path) else None

    from peft import PeftModel

    base_path = str(base_model_name_or_path or json.loads(adapter_config.read_text()).get("base_model_name_or_path")
                    or "")
    base_path = _local_dir(base_path, f"base model of the adapter in {path}")
    quantization_file = Path(path) / BASE_QUANTIZATION_FILE
    if quantization_file.is_file():  # trained as QLoRA: the adapter belongs over the same quantised base
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig.from_dict(json.loads(quantization_file.read_text()))
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization,
                                                    device_map=device_map)
        _keep_4bit_weights_trainable_on_cpu(base)
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
