"""Tiny Llamas for the tests (every test builds its models here), and preference pairs as JSON lines.

tiny_llama_config(**overrides) -> LlamaConfig, tiny_llama(**overrides) -> a seeded model in memory,
save_tiny_llama(path, **overrides) -> the model and a tokenizer on disk. The defaults (TINY_LLAMA,
hidden 32) are a 2-layer Llama over the demo vocabulary; a test that needs another shape passes its
fields as overrides, any LlamaConfig field (num_labels=1, attention_dropout=0.1, pad_token_id=None...).
"""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from alignlib import demo

TINY_LLAMA = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=105,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
"""The default fields: the demo tokenizer's 105 ids, with <pad> 0, <s> 1 and </s> 2."""


def tiny_llama_config(*, hidden: int = 32, **overrides) -> LlamaConfig:
    """TINY_LLAMA with hidden size `hidden` and an MLP of 2 * hidden, then `overrides` (LlamaConfig fields)."""
    return LlamaConfig(**{"hidden_size": hidden, "intermediate_size": 2 * hidden, **TINY_LLAMA, **overrides})


def tiny_llama(*, hidden: int = 32, dtype: torch.dtype = torch.float32, seed: int | None = 0,
               model_class: type[PreTrainedModel] = LlamaForCausalLM, **overrides) -> PreTrainedModel:
    """A tiny Llama in memory: `model_class` (e.g. LlamaForSequenceClassification with num_labels=1) over
    tiny_llama_config(hidden=hidden, **overrides), initialised after torch.manual_seed(seed) (seed None:
    from torch's RNG as it stands, for a caller that seeds once for several models), cast to `dtype`."""
    config = tiny_llama_config(hidden=hidden, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return model_class(config).to(dtype)


def save_tiny_llama(path, *, hidden: int = 32, dtype: torch.dtype = torch.float32, seed: int | None = 0,
                    tokenizer: PreTrainedTokenizerBase | None = None, **config_overrides) -> str:
    """tiny_llama(hidden=hidden, dtype=dtype, seed=seed, **config_overrides) saved to `path`, with
    `tokenizer` (default: the demo tokenizer) beside it; returns the path as a string."""
    tiny_llama(hidden=hidden, dtype=dtype, seed=seed, **config_overrides).save_pretrained(path)
    (tokenizer if tokenizer is not None else demo.load_tokenizer()).save_pretrained(path)
    return str(path)


def write_pairs(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
