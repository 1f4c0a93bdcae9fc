"""Tokenized rows to one right-padded batch for one forward pass.

- `PreferenceCollator`: pairs, chosen and rejected stacked.
- `UnpairedCollator`: unpaired rows (KTO) and their mismatched prompt/completion rows, which
  estimate KTO's reference point.
- `SequenceCollator`: SFT sequences, or packed rows of them (with position ids that restart at
  every sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alignlib.logprobs import IGNORE_INDEX

__all__ = ["PreferenceCollator", "SequenceCollator", "UnpairedCollator", "pad_rows"]


def pad_rows(sequences: list[list[int]], label_rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on padding), each (N, T)."""
    lengths = torch.tensor([len(ids) for ids in sequences])
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(zip(sequences, label_rows, strict=True)):
        if len(row_labels) != len(ids):
            raise ValueError(f"row {i + 1}: labels and input_ids differ in length")
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": (torch.arange(width) < lengths[:, None]).long(), "labels": labels}


@dataclass
class PreferenceCollator:
    """Stack chosen and rejected into one right-padded batch for a single forward pass.

    Input rows: dicts from `tokenize_preference_dataset`. Output for B rows, T the longest
    sequence (rounded up to `pad_to_multiple_of`):
        input_ids (2B, T) long, pad_token_id on padding
        attention_mask (2B, T) long, 0 on padding
        labels (2B, T) long, -100 on prompt and padding (causal LM only)
        margin (B,) float32, if the rows have one
    Rows 0..B-1 are the chosen sequences and rows B..2B-1 the rejected ones, pair i at rows
    i and B + i.

    for_reward_model=True drops `labels` (a sequence classifier would read them as class
    targets) and adds last_token_index (2B,) long, the position of each row's last real
    token. Why: Hugging Face sequence classifiers (LlamaForSequenceClassification...) score
    the rightmost token that differs from config.pad_token_id. With pad id == EOS id (a
    tokenizer without a pad token) and responses ending in EOS, that is the token before
    the EOS. It is still consistent, but a reward trainer that wants the score at the last
    real token whatever the pad id should pool the per-token scores at last_token_index.
    """

    pad_token_id: int
    for_reward_model: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PreferenceCollator got an empty list of rows")
        missing = [key for key in ("chosen_input_ids", "rejected_input_ids") if key not in rows[0]]
        if missing:
            raise ValueError(
                f"rows lack {missing} (keys: {sorted(rows[0])}); use tokenize_preference_dataset"
            )
        sequences = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        lengths = torch.tensor([len(ids) for ids in sequences])
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(sequences):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask = (torch.arange(width) < lengths[:, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.for_reward_model:
            batch["last_token_index"] = lengths - 1
        else:
            labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
            label_rows = [row["chosen_labels"] for row in rows] + [row["rejected_labels"] for row in rows]
            for i, row_labels in enumerate(label_rows):
                if len(row_labels) != len(sequences[i]):
                    raise ValueError(f"row {i % len(rows) + 1}: labels and input_ids differ in length")
                labels[i, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
            batch["labels"] = labels
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([float(row["margin"]) for row in rows], dtype=torch.float32)
        return batch


@dataclass
class UnpairedCollator:
    """Unpaired rows (from `tokenize_unpaired_dataset`) as one right-padded batch:
        input_ids, attention_mask, labels (B, T) (IGNORE_INDEX on prompt and padding)
        desirable (B,) bool, the rows' labels

    `mismatched(prompt_rows, completion_rows)`: row i's prompt followed by completion_rows[i]'s
    completion, as one batch (labels on the completion). KTO's reference point z0 is the
    policy's KL to the reference on such pairs, where the completion does not answer the prompt
    (Ethayarajh et al., 2024, section 4.2; TRL pairs each prompt with the completion of the row
    before it). A pair longer than `max_length` loses the end of its completion.
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("UnpairedCollator got an empty list of rows")
        batch = pad_rows([row["input_ids"] for row in rows], [row["labels"] for row in rows], self.pad_token_id)
        batch["desirable"] = torch.tensor([bool(row["label"]) for row in rows])
        return batch

    def mismatched(self, prompt_rows: list[dict[str, Any]], completion_rows: list[dict[str, Any]]) -> dict:
        sequences, label_rows = [], []
        for prompt_row, completion_row in zip(prompt_rows, completion_rows, strict=True):
            prompt = prompt_row["input_ids"][: prompt_row["prompt_length"]]
            completion = completion_row["input_ids"][completion_row["prompt_length"]:]
            if self.max_length is not None:
                completion = completion[: max(1, self.max_length - len(prompt))]
            sequences.append(prompt + completion)
            label_rows.append([IGNORE_INDEX] * len(prompt) + completion)
        return pad_rows(sequences, label_rows, self.pad_token_id)


@dataclass
class SequenceCollator:
    """SFT rows (from `tokenize_sft_dataset`, or packed by `pack_sequences`) as one right-padded batch:
        input_ids, attention_mask, labels (B, T) (IGNORE_INDEX on untrained tokens and padding)
    and, for packed rows (a `seq_lengths` column), position_ids (B, T) that restart at 0 at every
    sequence and at the padding. A packed batch is run with position_ids and no attention mask
    (`alignlib.objectives.response_logps`): attention_mask then only marks the real tokens.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("SequenceCollator got an empty list of rows")
        batch = pad_rows([row["input_ids"] for row in rows], [row["labels"] for row in rows], self.pad_token_id)
        if "seq_lengths" in rows[0]:
            width = batch["input_ids"].shape[1]
            positions = torch.zeros_like(batch["input_ids"])
            for i, row in enumerate(rows):
                lengths = list(row["seq_lengths"]) + [width - sum(row["seq_lengths"])]  # the padding last
                positions[i] = torch.cat([torch.arange(n) for n in lengths])
            batch["position_ids"] = positions
        return batch
