"""Packing: several tokenized sequences in one row of at most max_length tokens, kept apart.

`pack_sequences` places the sequences best-fit decreasing (longest first, each into the row
whose free room it fills best; TRL's "bfd" strategy), so rows come out nearly full and no
sequence is split. Each packed row keeps `seq_lengths`, the lengths of its sequences in order;
the collator restarts position ids at every sequence, and the model must keep them apart in
attention (transformers does for position ids that restart and no attention mask; the trainer
checks the model before it packs, `alignlib.objectives.check_packing_isolated`).

The label of each sequence's first token is IGNORE_INDEX: it would be predicted from the last
token of the sequence before it. Unpacked, the first token is never predicted either, so a
packed row trains on exactly the tokens its sequences train on alone.
"""

from __future__ import annotations

import bisect

from datasets import Dataset

from alignlib.logprobs import IGNORE_INDEX

__all__ = ["PACKED_COLUMNS", "best_fit_decreasing", "pack_sequences"]

PACKED_COLUMNS = ("input_ids", "labels", "seq_lengths")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity, best-fit decreasing.

    Longest first, each goes into the open bin with the least free room that still holds it (a new
    bin if none does). Ties are broken by index, so the result is deterministic. O(n log n).
    """
    too_long = [length for length in lengths if length > capacity or length < 1]
    if too_long:
        raise ValueError(f"every length must lie in [1, {capacity}], got {too_long[0]}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free room, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def pack_sequences(dataset: Dataset, max_length: int) -> Dataset:
    """Tokenized sequences (columns input_ids, labels) -> packed rows (input_ids, labels, seq_lengths).

    Every sequence must already fit max_length (tokenize with the same max_length). The rows come
    in the order their bins were opened (longest sequences first); the trainer shuffles them.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"packing needs max_length, an int >= 2, got {max_length!r}")
    ids_column, labels_column = dataset["input_ids"], dataset["labels"]
    bins = best_fit_decreasing([len(ids) for ids in ids_column], max_length)
    rows: dict[str, list] = {name: [] for name in PACKED_COLUMNS}
    for members in bins:
        input_ids, labels, lengths = [], [], []
        for i in members:
            input_ids += ids_column[i]
            labels += [IGNORE_INDEX] + labels_column[i][1:]
            lengths.append(len(ids_column[i]))
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["seq_lengths"].append(lengths)
    return Dataset.from_dict(rows)
