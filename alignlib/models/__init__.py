"""Load the models a preference run needs: policy, reference, reward model.

The package's modules, from the bottom up:

- `config`: `ModelConfig` and its checks.
- `files`: local folders and cached Hub snapshots (`local_dir`), the files saved beside an adapter,
  the origin remembered on a loaded model.
- `quantization`: bitsandbytes load settings, `is_quantized`, `dequantized_copy`.
- `adapters`: the base an adapter sits on, attaching and merging adapters, resized embeddings.
- `loading`: tokenizer, policy, reward model, frozen models.
- `reference`: the reference policy (`make_reference`, `ReferenceForward`).

What each does:

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

from alignlib.models.adapters import (
    DEFAULT_ADAPTER,
    attach_adapter,
    load_adapter_base,
    merged_adapter_model,
    require_matching_adapter_keys,
    resize_embeddings,
    save_embedding_layers,
    vocabulary_size,
)
from alignlib.models.config import (
    DTYPES,
    START_ADAPTER_MODES,
    ModelConfig,
    check_adapter_name,
)
from alignlib.models.files import (
    ADAPTER_BASE_FILE,
    ADAPTER_CONFIG_FILE,
    BASE_QUANTIZATION_FILE,
    adapter_dir,
    base_recipe_of,
    continued_adapter_of,
    local_dir,
)
from alignlib.models.loading import (
    decoder_of,
    is_peft_model,
    lm_head_fusable,
    load_causal_lm,
    load_frozen_causal_lm,
    load_model_tokenizer,
    load_reward_model,
    load_tokenizer,
    lora_config,
)
from alignlib.models.quantization import (
    dequantized_copy,
    is_quantized,
    keep_4bit_weights_trainable_on_cpu,
)
from alignlib.models.reference import (
    DEFAULT_REF_ADAPTER,
    REFERENCE_STRATEGIES,
    ReferenceForward,
    auto_reference_strategy,
    make_reference,
)

__all__ = [
    "ADAPTER_BASE_FILE",
    "ADAPTER_CONFIG_FILE",
    "BASE_QUANTIZATION_FILE",
    "DEFAULT_ADAPTER",
    "DEFAULT_REF_ADAPTER",
    "DTYPES",
    "REFERENCE_STRATEGIES",
    "START_ADAPTER_MODES",
    "ModelConfig",
    "ReferenceForward",
    "adapter_dir",
    "attach_adapter",
    "auto_reference_strategy",
    "base_recipe_of",
    "check_adapter_name",
    "continued_adapter_of",
    "decoder_of",
    "dequantized_copy",
    "is_peft_model",
    "is_quantized",
    "keep_4bit_weights_trainable_on_cpu",
    "lm_head_fusable",
    "load_adapter_base",
    "load_causal_lm",
    "load_frozen_causal_lm",
    "load_model_tokenizer",
    "load_reward_model",
    "load_tokenizer",
    "local_dir",
    "lora_config",
    "make_reference",
    "merged_adapter_model",
    "require_matching_adapter_keys",
    "resize_embeddings",
    "save_embedding_layers",
    "vocabulary_size",
]
