"""ModelConfig: which model to load and how (TRL's field names), checked when it is made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from alignlib.chat import CHAT_FORMATS

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")


ALL_LINEAR = "all-linear"


_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                "use_rslora", "use_dora", "model_adapter_name")


START_ADAPTER_MODES = ("continue", "merge")


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


def check_adapter_name(flag: str, name: Any) -> None:
    """A name peft can give an adapter: it becomes a key of torch ModuleDicts, so it cannot contain '.'
    nor be an attribute torch modules already have ('train', 'eval', 'forward'...)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{flag} must be a non-empty name without '.', got {name!r}")
    if hasattr(torch.nn.ModuleDict(), name):
        raise ValueError(f"{flag} {name!r} cannot name a peft adapter: torch modules already have an attribute "
                         f"{name!r}; choose another name (e.g. 'policy')")
