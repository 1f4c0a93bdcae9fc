"""A tiny byte-level BPE tokenizer for tests: no hub, trained in milliseconds.

`tiny_tokenizer()` returns a `PreTrainedTokenizerFast` that behaves like a real
Llama/GPT-2 style tokenizer where it matters for data pipelines:

- byte-level BPE, so any unicode text encodes (no unknown token) and tokens can
  merge across a prompt/response boundary ("Hello wor" + "ld");
- special tokens `<pad>` (id 0), `<s>` BOS (id 1), `</s>` EOS (id 2) and the chat
  markers `<|system|>`, `<|user|>`, `<|assistant|>`;
- a post-processor that puts BOS in front of every encoded text (`add_bos=True`),
  like Llama's tokenizers;
- a Zephyr-like chat template that starts with BOS and ends every turn with
  `</s>` and a newline.

Each call returns a fresh object, so a test may mutate it freely.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = [
    "The sky is blue. The sun is in the sky. The sea is green and the grass is green.",
    "Hello world! What color is the sky? Where is the sun? It is in the sea.",
    "Question: how do I sort a list in Python? Answer: use sorted(items) or items.sort().",
    "You are a helpful assistant. Answer the question truthfully and briefly.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
]


@lru_cache(maxsize=4)
def _trained_json(vocab_size: int, add_bos: bool) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos:
        bos_id = tokenizer.token_to_id(BOS)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    return tokenizer.to_str()


def tiny_tokenizer(
    *, with_pad: bool = True, add_bos: bool = True, chat_template: bool = True, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer.

    Args:
        with_pad: register `<pad>` as the pad token; False leaves `pad_token` None
            (the token still exists in the vocabulary, unused).
        add_bos: encoding a text puts BOS (id 1) in front, as Llama tokenizers do.
        chat_template: attach `CHAT_TEMPLATE`; False leaves `chat_template` None.
        vocab_size: BPE vocabulary size, special tokens and the 256 bytes included.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size, add_bos)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD if with_pad else None,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
