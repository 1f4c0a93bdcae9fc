r"""Training data: load, normalise (pairs to prompt/chosen/rejected), tokenize, collate.

The package's modules, in the order data flows through them:

- `files`: read a file, directory, Hub name or Dataset; name the broken line of a bad file.
- `formats`: rows in a known format -> string columns prompt, chosen, rejected (or, unpaired
  for KTO, prompt, completion, label).
- `tokenize`: -> token ids with the prompt masked, truncated; checked against a model.
- `collate`: -> one right-padded batch, chosen and rejected stacked.
- `sequences`: SFT rows (text, prompt-completion, conversations, or preference pairs' chosen
  side) -> one text and the character spans the loss covers -> token ids and labels.
- `packing`: several SFT sequences per row of max_length tokens, kept apart.

In: a local JSON/JSONL/Parquet/CSV file, a `datasets` directory (`save_to_disk` of a
Dataset or DatasetDict), a directory of data files or a Hub name (`datasets.load_dataset`),
or a Dataset/DatasetDict object; rows in one of `PREFERENCE_FORMATS`.

A broken file fails with a one-line ValueError naming the file and the line: text that is not
UTF-8, a JSON Lines line that is not JSON or not an object (the file is scanned only after the
reader fails, so good files are read once).

Normalised (`load_preference_dataset`): string columns `prompt`, `chosen`, `rejected`
(responses only; chat templates already applied), plus a float `margin` if the data has one.

Tokenized (`tokenize_preference_dataset`): per pair, lists of ints `chosen_input_ids`,
`chosen_labels`, `rejected_input_ids`, `rejected_labels` and the int `prompt_length`
(+ `margin`). Labels equal input_ids with -100 on the prompt (the shift convention of
`alignlib.logprobs`). Each response ends with EOS (appended unless already there).
Truncation: the prompt is cut from the LEFT to `max_prompt_length` tokens (a leading BOS
is kept), then each response from the RIGHT so prompt + response <= `max_length`. A pair
left without a response token on either side is dropped and counted in `TokenizeStats`.

Collated (`PreferenceCollator`): one batch for one forward pass, rows
[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}], right-padded: input_ids,
attention_mask, labels (2B, T) (+ margin (B,)).

Checked against a model (`check_token_ids`): every id below the model's vocabulary size.
"""

from alignlib.data.collate import PreferenceCollator, SequenceCollator, UnpairedCollator
from alignlib.data.files import DATA_FILE_BUILDERS, DataSource, read_source
from alignlib.data.formats import (
    PREFERENCE_FORMATS,
    PROMPT_FORMATS,
    UNPAIRED_FORMATS,
    load_preference_dataset,
    load_prompt_dataset,
    load_unpaired_dataset,
)
from alignlib.data.packing import PACKED_COLUMNS, best_fit_decreasing, pack_sequences
from alignlib.data.sequences import (
    SEQUENCE_COLUMNS,
    SFT_FORMATS,
    SequenceStats,
    load_sft_dataset,
    tokenize_sft_dataset,
)
from alignlib.data.tokenize import (
    TOKENIZED_COLUMNS,
    UNPAIRED_COLUMNS,
    TokenizeStats,
    UnpairedStats,
    check_token_ids,
    pad_token_id_for,
    tokenize_preference_dataset,
    tokenize_unpaired_dataset,
)

__all__ = [
    "DATA_FILE_BUILDERS",
    "DataSource",
    "PACKED_COLUMNS",
    "SEQUENCE_COLUMNS",
    "SFT_FORMATS",
    "PREFERENCE_FORMATS",
    "PROMPT_FORMATS",
    "TOKENIZED_COLUMNS",
    "UNPAIRED_COLUMNS",
    "UNPAIRED_FORMATS",
    "PreferenceCollator",
    "SequenceCollator",
    "SequenceStats",
    "TokenizeStats",
    "UnpairedCollator",
    "UnpairedStats",
    "best_fit_decreasing",
    "check_token_ids",
    "load_preference_dataset",
    "load_prompt_dataset",
    "load_sft_dataset",
    "load_unpaired_dataset",
    "pack_sequences",
    "pad_token_id_for",
    "read_source",
    "tokenize_preference_dataset",
    "tokenize_sft_dataset",
    "tokenize_unpaired_dataset",
]
