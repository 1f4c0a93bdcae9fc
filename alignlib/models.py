"""Load the models a preference run needs: policy, reference, reward model.

- `ModelConfig`: TRL's field names (model_name_or_path, dtype, use_peft, lora_r, load_in_4bit...),
  parsed by transformers.HfArgumentParser like any dataclass.
- `load_tokenizer`, `load_causal_lm`, `load_reward_model`: transformers + peft (LoRA) +
  bitsandbytes (QLoRA: 4-bit NF4 base weights, LoRA adapters on top).
- `make_reference`: the reference policy of DPO-style losses and of PPO's KL, by one of three
  strategies (see REFERENCE_STRATEGIES), as a callable `(input_ids, attention_mask) -> logits`.

Saving a trained model and loading it back for generation is alignlib.saved_models'.

Models are loaded from local directories (or Hub ids "org/name" already in the local Hugging
Face cache); nothing is downloaded. Bad settings fail early with a one-line ValueError or
FileNotFoundError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "REFERENCE_STRATEGIES",
    "ModelConfig",
    "ReferenceForward",
    "is_peft_model",
    "is_quantized",
    "load_causal_lm",
    "load_frozen_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "lora_config",
    "make_reference",
]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
ALL_LINEAR = "all-linear"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")

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
        if torch.cuda.is_available():  # bitsandbytes quantises as the weights reach the GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
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
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
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


@contextlib.contextmanager
def _peft_deprecations_silenced() -> Iterator[None]:
    """peft (0.21) calls transformers' (5.x) old names gradient_checkpointing_enable and
    is_gradient_checkpointing, which warn on every run; alignlib itself uses the new ones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`(is_gradient_checkpointing|gradient_checkpointing_enable)` is "
                                r"deprecated", category=FutureWarning)
        yield


def _prepare_for_training(model: Any, cfg: ModelConfig, gradient_checkpointing: bool, task_type: str) -> Any:
    """Gradient checkpointing, k-bit preparation and the LoRA adapter, in that order."""
    with _peft_deprecations_silenced():
        return _prepare(model, cfg, gradient_checkpointing, task_type)


def _prepare(model: Any, cfg: ModelConfig, gradient_checkpointing: bool, task_type: str) -> Any:
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

    path = local_dir(cfg.model_name_or_path, revision=cfg.model_revision)
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

    path = local_dir(cfg.model_name_or_path, revision=cfg.model_revision)
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

    path = local_dir(path or cfg.model_name_or_path, "reference model", revision=cfg.model_revision)
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


def is_peft_model(model: Any) -> bool:
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
            before the first optimizer step, and use the stored
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
            policy, else the policy as it is now), which the trainer runs once over the data.
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(f"unknown reference strategy {strategy!r}; known: {', '.join(REFERENCE_STRATEGIES)}")
    is_peft = is_peft_model(policy)
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
    if not is_quantized(reference):
        reference.to(next(policy.parameters()).device)
    return ReferenceForward(strategy, reference, disable_adapter=False)
