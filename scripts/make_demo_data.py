"""Writes the embedded demo's preference data and tokenizer into alignlib/demo/.

    python scripts/make_demo_data.py

The data is synthetic and deterministic (seeded), built so a tiny model learns something
visible within a minute or two of DPO on a CPU:
- "how to" prompts, where the chosen answer is a helpful step-by-step reply that mentions
  the prompt's object and the rejected one is a dismissive reply;
- "colour" questions about things with a fixed colour, where the chosen answer names the
  right colour and the rejected one a wrong colour (the model must learn the facts).
The held-out split asks about (verb, object) pairs never seen in training, and phrases the
colour questions with a template never seen in training.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "alignlib" / "demo"

VERBS = ["clean", "fix", "paint", "move", "open", "close", "fold", "wash", "check", "build", "sell", "find"]
OBJECTS = ["door", "window", "table", "chair", "bike", "car", "shirt", "box", "lamp", "fence", "boat", "clock"]
HELPFUL = [
    "first , {verb} the {obj} slowly . then check the {obj} again . hope this helps !",
    "sure ! to {verb} a {obj} , take your time and {verb} it step by step .",
    "good question . get the right tools , then {verb} the {obj} carefully .",
]
DISMISSIVE = [
    "no . figure it out yourself .",
    "i do not care about your {obj} .",
    "why would anyone {verb} a {obj} ? stop asking .",
]
HOW_TO_PROMPTS = ["how do i {verb} a {obj} ?", "can you tell me how to {verb} the {obj} ?"]

COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "banana": "yellow",
    "tomato": "red", "orange": "orange", "plum": "purple", "sea": "blue", "leaf": "green",
    "milk": "white", "night": "black", "lemon": "yellow", "blood": "red", "carrot": "orange",
    "grape": "purple",
}
COLOUR_NAMES = sorted(set(COLOURS.values()))
COLOUR_PROMPTS_TRAIN = ["what colour is the {thing} ?", "tell me the colour of the {thing} ."]
COLOUR_PROMPT_HELDOUT = "which colour does the {thing} have ?"
COLOUR_ANSWER = "the {thing} is {colour} ."


def how_to_pairs(rng: random.Random, verb_objects, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        verb, obj = rng.choice(verb_objects)
        rows.append({
            "prompt": rng.choice(HOW_TO_PROMPTS).format(verb=verb, obj=obj),
            "chosen": rng.choice(HELPFUL).format(verb=verb, obj=obj),
            "rejected": rng.choice(DISMISSIVE).format(verb=verb, obj=obj),
        })
    return rows


def colour_pairs(rng: random.Random, templates, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        thing = rng.choice(sorted(COLOURS))
        wrong = rng.choice([c for c in COLOUR_NAMES if c != COLOURS[thing]])
        rows.append({
            "prompt": rng.choice(templates).format(thing=thing),
            "chosen": COLOUR_ANSWER.format(thing=thing, colour=COLOURS[thing]),
            "rejected": COLOUR_ANSWER.format(thing=thing, colour=wrong),
        })
    return rows


def main() -> None:
    rng = random.Random(1234)
    pairs = list(itertools.product(VERBS, OBJECTS))
    rng.shuffle(pairs)
    heldout_pairs, train_pairs = pairs[:24], pairs[24:]
    train = how_to_pairs(rng, train_pairs, 600) + colour_pairs(rng, COLOUR_PROMPTS_TRAIN, 400)
    heldout = how_to_pairs(rng, heldout_pairs, 120) + colour_pairs(rng, [COLOUR_PROMPT_HELDOUT], 80)
    rng.shuffle(train)
    rng.shuffle(heldout)
    for row in train + heldout:  # responses continue the prompt's text: "... ?" + " the sky is blue ."
        row["chosen"], row["rejected"] = " " + row["chosen"], " " + row["rejected"]
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(DEMO / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    words = sorted({w for row in train + heldout for text in row.values() for w in text.split()})
    build_tokenizer(words).save(str(DEMO / "tokenizer.json"))
    print(f"wrote {len(train)} train and {len(heldout)} held-out pairs, {len(words)} words, to {DEMO}")


def build_tokenizer(words: list[str]):
    """A word-level tokenizer over the demo's words, with <pad>, <s>, </s> and <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


if __name__ == "__main__":
    main()
