"""The embedded default: a tiny model, its tokenizer and a preference dataset where learning shows.

What is shipped here (regenerate the data with `python scripts/make_demo_data.py`):
- config.json: a 4-layer Llama with hidden size 128 over a 105-word vocabulary (~1M parameters);
- tokenizer.json: a word-level tokenizer over the demo's words;
- train.jsonl (1000 pairs) and heldout.jsonl (200 pairs): "how do i <verb> a <thing> ?" with a
  helpful chosen and a dismissive rejected answer, and "what colour is the <thing> ?" with
  the right and a wrong colour. Held-out pairs use (verb, thing) combinations and a question
  template that training never shows.

No weights are shipped. `prepare_base_model` builds the model from config.json (seeded) and
gives it a short supervised warm start on the demo prompts, answered dismissively 70% of the
time: a base model that knows the words, mostly answers rudely, and has something for
preference training to fix. `alignlib generate` on the base and on the trained output shows
the difference. The settings the embedded default trains with are in `alignlib.demo.settings`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from alignlib.demo.settings import (
    GRPO_SETTINGS,
    ONLINE_LORA_LEARNING_RATES,
    ONLINE_SETTINGS,
    OUTPUT_ROOT,
    PPO_LORA_LEARNING_RATE,
    PPO_SETTINGS,
    RLOO_SETTINGS,
    SAMPLE_PROMPTS,
    TRAIN_COMMON,
    TRAIN_SETTINGS,
    demo_prompts,
    demo_reward,
    online_defaults,
    online_demo_config,
    online_embedded_default,
    ppo_defaults,
    ppo_demo_config,
    ppo_embedded_default,
    train_defaults,
)

__all__ = [
    "CONFIG_FILE",
    "GRPO_SETTINGS",
    "HELDOUT_FILE",
    "ONLINE_LORA_LEARNING_RATES",
    "ONLINE_SETTINGS",
    "OUTPUT_ROOT",
    "PPO_LORA_LEARNING_RATE",
    "PPO_SETTINGS",
    "RLOO_SETTINGS",
    "SAMPLE_PROMPTS",
    "TOKENIZER_FILE",
    "TRAIN_COMMON",
    "TRAIN_FILE",
    "TRAIN_SETTINGS",
    "build_model",
    "demo_prompts",
    "demo_reward",
    "is_helpful",
    "load_tokenizer",
    "online_defaults",
    "online_demo_config",
    "online_embedded_default",
    "ppo_defaults",
    "ppo_demo_config",
    "ppo_embedded_default",
    "prepare_base_model",
    "read_pairs",
    "train_defaults",
]

DEMO_DIR = Path(__file__).resolve().parent
CONFIG_FILE = DEMO_DIR / "config.json"
TOKENIZER_FILE = DEMO_DIR / "tokenizer.json"
TRAIN_FILE = DEMO_DIR / "train.jsonl"
HELDOUT_FILE = DEMO_DIR / "heldout.jsonl"
# Words whose presence marks a helpful "how do i ..." answer (every chosen template has one).
HELPFUL_WORDS = ("helps", "step", "carefully")


def load_tokenizer():
    """The demo's word-level tokenizer as a transformers tokenizer (<s> added in front of each text)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def read_pairs(path: Path = TRAIN_FILE) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def build_model(seed: int = 0):
    """The tiny Llama of config.json with freshly initialised (seeded) weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(DEMO_DIR)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def is_helpful(response: str) -> bool:
    """The demo's programmatic judgement of a "how do i ..." answer."""
    return any(word in response.split() for word in HELPFUL_WORDS)


def prepare_base_model(output_dir: str | Path, *, seed: int = 0, steps: int = 300, batch_size: int = 32,
                       learning_rate: float = 2e-3, helpful_fraction: float = 0.3, show_progress: bool = True) -> Path:
    """Write the demo's base model (and tokenizer) to output_dir, once; return its path.

    Supervised warm start: `steps` AdamW steps of next-token loss on the response tokens of
    train.jsonl's prompts, each answered with its chosen response with probability
    `helpful_fraction` and with its rejected one otherwise. Deterministic for a given seed.
    An existing complete output_dir (it holds demo_base.json) is reused. `show_progress`: a
    progress bar of the warm start's steps (on stderr).
    """
    from alignlib.logprobs import IGNORE_INDEX, sequence_logprobs
    from alignlib.metrics import Progress
    from alignlib.saved_models import save_model

    output_dir = Path(output_dir)
    recipe = {"seed": seed, "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
              "helpful_fraction": helpful_fraction}
    marker = output_dir / "demo_base.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return output_dir
    tokenizer = load_tokenizer()
    model = build_model(seed)
    rng = random.Random(seed)
    pairs = read_pairs(TRAIN_FILE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    with Progress(steps, desc="alignlib demo: warm start", disable=not show_progress) as bar:
        for _ in range(steps):
            rows = rng.sample(pairs, batch_size)
            texts = [(r["prompt"], r["chosen"] if rng.random() < helpful_fraction else r["rejected"]) for r in rows]
            input_ids, attention_mask, labels = _encode(tokenizer, texts)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = -sequence_logprobs(logits, labels).sum() / (labels[:, 1:] != IGNORE_INDEX).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(loss=loss.item())
    model.eval()
    save_model(model, tokenizer, output_dir)
    marker.write_text(json.dumps(recipe))
    return output_dir


def _encode(tokenizer, texts: list[tuple[str, str]]):
    """(prompt, response) pairs -> right-padded input_ids, attention_mask, labels (IGNORE_INDEX on prompt/pad)."""
    from alignlib.logprobs import IGNORE_INDEX

    rows, labels = [], []
    for prompt, response in texts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + response_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + response_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return input_ids, attention_mask, label_ids
