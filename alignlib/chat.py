"""Chat formats put on a tokenizer that has none (`--chat_template chatml`).

    format = CHAT_FORMATS["chatml"]
    token_ids = setup_chat_format(tokenizer, "chatml")   # the format's special tokens, added if new

A format is a Jinja chat template and the special tokens it writes. `setup_chat_format` adds
those tokens to the tokenizer as special tokens (so they are never split), sets the template,
and makes the format's end-of-turn token the tokenizer's eos (the data's responses then end
with it, and generation stops on it). It returns the ids of the format's tokens: the model's
embedding rows that must train for the model to learn the format (`alignlib.models` resizes
the embeddings for them and makes exactly those rows trainable).

A tokenizer that already has a chat template is refused unless `force=True`: replacing a
template the model was trained with is rarely what a user means.

Only transformers' tokenizer API is used here; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CHAT_FORMATS", "ChatFormat", "setup_chat_format"]


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and its special tokens; `end_of_turn` becomes the tokenizer's eos."""

    template: str
    special_tokens: tuple[str, ...]
    end_of_turn: str


# ChatML: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n"; a generation prompt opens the
# assistant's turn.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_FORMATS = {
    "chatml": ChatFormat(template=_CHATML, special_tokens=("<|im_start|>", "<|im_end|>"), end_of_turn="<|im_end|>"),
}
"""The formats `--chat_template` knows, by name."""


def setup_chat_format(tokenizer: Any, name: str, *, force: bool = False, what: str = "the tokenizer") -> list[int]:
    """Put chat format `name` on `tokenizer` (in place); return the ids of the format's tokens.

    - Refuses (ValueError) an unknown name, and a tokenizer that already has a chat template
      unless `force`.
    - The format's tokens are added as special tokens when the vocabulary lacks them.
    - eos becomes the format's end-of-turn token; a pad token that was the old eos follows it
      (a distinct pad token is kept). bos is left as it is.
    """
    if name not in CHAT_FORMATS:
        raise ValueError(f"--chat_template {name!r} is not a known chat format; known: {', '.join(CHAT_FORMATS)}")
    if getattr(tokenizer, "chat_template", None) and not force:
        raise ValueError(f"--chat_template {name}: {what} already has a chat template; add --force_chat_template true "
                         "to replace it")
    chat_format = CHAT_FORMATS[name]
    pad_was_eos = tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": list(chat_format.special_tokens)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = chat_format.template
    tokenizer.eos_token = chat_format.end_of_turn
    if pad_was_eos:
        tokenizer.pad_token = chat_format.end_of_turn
    return [tokenizer.convert_tokens_to_ids(token) for token in chat_format.special_tokens]
