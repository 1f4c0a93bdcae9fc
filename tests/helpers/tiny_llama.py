"""Tiny Llamas over the demo vocabulary, and preference pairs as JSON lines, for trainer tests."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlib import demo


def save_tiny_llama(path, *, hidden: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0,
                    **config_overrides) -> str:
    """A seeded 2-layer Llama over the demo vocabulary, with the demo tokenizer, saved to `path`.

    config_overrides: further LlamaConfig fields (e.g. attention_dropout=0.1)."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=105, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **config_overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    demo.load_tokenizer().save_pretrained(path)
    return str(path)


def write_pairs(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
