"""Load the tokenizer, the policy (full, LoRA, QLoRA, from an adapter), the reward model and frozen models."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from alignlib.chat import setup_chat_format
from alignlib.models.adapters import (
    DEFAULT_ADAPTER,
    attach_adapter,
    load_adapter_base,
    merged_adapter_model,
    peft_deprecations_silenced,
    requantized,
    resize_embeddings,
)
from alignlib.models.config import ALL_LINEAR, ModelConfig
from alignlib.models.files import (
    ADAPTER_CONFIG_FILE,
    adapter_base_path,
    adapter_dir,
    adapter_settings,
    base_recipe_of,
    local_dir,
    set_origin,
)
from alignlib.models.quantization import (
    from_pretrained_kwargs,
    is_quantized,
    load_pretrained,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


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
        path = adapter_base_path(path)  # an adapter saved without its tokenizer: its base model's
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


def _prepare_for_training(model: Any, cfg: ModelConfig, gradient_checkpointing: bool, task_type: str, *,
                          continued: str | None = None, token_ids: list[int] | None = None) -> Any:
    """Gradient checkpointing, k-bit preparation and the LoRA adapter, in that order: the adapter
    in `continued` loaded trainable, or a new one (training the embedding rows `token_ids` too)."""
    with peft_deprecations_silenced():
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
        set_origin(model.get_base_model(), continued=continued)
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
            model = load_adapter_base(start, from_pretrained_kwargs(cfg))
            return _prepare_for_training(model, cfg, gradient_checkpointing, "CAUSAL_LM", continued=start)
        float_kwargs = {key: value for key, value in from_pretrained_kwargs(cfg).items()
                        if key not in ("quantization_config", "device_map")}
        model = merged_adapter_model(start, float_kwargs)
        if cfg.load_in_4bit or cfg.load_in_8bit:
            model = requantized(model, from_pretrained_kwargs(cfg))
        set_origin(model, recipe={"merged_start": os.path.abspath(start)})
    else:
        model = load_pretrained(AutoModelForCausalLM, path, cfg)
    if token_ids is not None:
        if resize_embeddings(model, len(tokenizer)):
            set_origin(model, recipe={**base_recipe_of(model), "num_embeddings": len(tokenizer)})
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
    settings = adapter_settings(path)
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
    model = load_pretrained(AutoModelForSequenceClassification, path, cfg, num_labels=num_labels)
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
        model = attach_adapter(load_adapter_base(adapter, from_pretrained_kwargs(cfg)), adapter,
                               what=f"the reference adapter in {adapter}")
    else:
        model = load_pretrained(AutoModelForCausalLM, local_dir(path, what, revision=cfg.model_revision), cfg)
    model.eval()
    model.requires_grad_(False)
    return model


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
