"""Reading a dataset from wherever it is, and naming what is wrong with a broken file.

`read_source` takes a local JSON/JSONL/Parquet/CSV file, a `datasets` directory
(`save_to_disk` of a Dataset or DatasetDict), a directory of data files, a Hub name
(`datasets.load_dataset`, from the local cache only when offline), or a Dataset/DatasetDict.

A broken file fails with a one-line ValueError naming the file and the line: text that is not
UTF-8, a JSON Lines line that is not JSON or not an object. The file is scanned only after the
reader fails (`file_problem`), so good files are read once; `blame_the_file` does the same for a
row error raised while the rows are normalised (a `null` line reads as a row of missing fields).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import Dataset, DatasetDict

__all__ = ["DATA_FILE_BUILDERS", "DataSource", "blame_the_file", "file_problem", "read_source"]

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class DataSource:
    """A dataset folder or Hub name with the sub-dataset to read: `config` (the dataset's named
    configuration, `datasets.load_dataset(path, name=config)`) and/or `data_dir` (a sub-folder of its
    data files, as `load_dataset(path, data_dir=...)`; e.g. stack-exchange-paired's data/finetune).
    Neither applies to a single data file or a `save_to_disk` folder."""

    path: str | os.PathLike
    config: str | None = None
    data_dir: str | None = None

    def __str__(self) -> str:
        parts = [f"config {self.config!r}" if self.config else "", f"data_dir {self.data_dir!r}" if self.data_dir else ""]
        return f"{self.path} ({', '.join(part for part in parts if part)})"


def read_source(source: str | os.PathLike | DataSource | Dataset | DatasetDict, split: str) -> Dataset:
    """The raw rows of `split` from a file, a directory, a Hub name (a DataSource for one of their
    configs or sub-folders) or a Dataset(Dict)."""
    if isinstance(source, DataSource):
        return _read_sub_dataset(source, split)
    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        return _pick_split(source, split, "the DatasetDict")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source must be a path, a Hub name or a datasets.Dataset, got {type(source).__name__}"
        )
    path = Path(source).expanduser()
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{str(path)!r}: unknown data file type {path.suffix!r}; known: {sorted(DATA_FILE_BUILDERS)}"
            )
        # A single file is one split: `split` is not used for it.
        return _load_local(path, builder, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # save_to_disk output
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, str(path)) if isinstance(loaded, DatasetDict) else loaded
        # A folder of data files, read like a Hub repo.
        return _load_local(path, str(path), split=split)
    name = str(source)
    if path.suffix.lower() in DATA_FILE_BUILDERS or not _HUB_NAME.match(name):
        raise FileNotFoundError(f"dataset file or directory not found: {name!r}")
    try:
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError) as err:
        raise FileNotFoundError(
            f"{name!r} is not a local file or directory, and loading it from the Hugging Face Hub "
            f"failed: {err}"
        ) from err


def _read_sub_dataset(source: DataSource, split: str) -> Dataset:
    if not source.config and not source.data_dir:
        return read_source(source.path, split)
    path = Path(source.path).expanduser()
    given = "dataset_config" if source.config else "data_dir"
    if path.is_file():
        raise ValueError(f"{given}: {str(path)!r} is a single data file, which has no configs or sub-folders; "
                         f"drop --{given} or give the dataset's folder")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        raise ValueError(f"{given}: {str(path)!r} is a save_to_disk folder, which has no configs or sub-folders; "
                         f"drop --{given}")
    if source.data_dir and path.is_dir() and not (path / source.data_dir).is_dir():
        subfolders = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        raise FileNotFoundError(f"data_dir: {str(path)!r} has no sub-folder {source.data_dir!r}; "
                                f"its sub-folders: {subfolders[:20]}")
    options = {"name": source.config, "data_dir": source.data_dir}
    if path.is_dir():
        return _load_local(path, str(path), split=split, **options)
    try:
        return datasets.load_dataset(str(source.path), split=split, **options)
    except (FileNotFoundError, ConnectionError) as err:
        raise FileNotFoundError(f"{str(source)!r} is not a local folder, and loading it from the Hugging Face Hub "
                                f"failed: {err}") from err


def _load_local(path: Path, *args: Any, **kwargs: Any) -> Dataset:
    """datasets.load_dataset on a local file or folder, with a clear error for no rows or a broken file.

    When datasets fails, the file (or the folder's JSON/JSONL/CSV files) is scanned for the first
    line that is not UTF-8 or not a JSON object, and that line is named; the scan runs only then,
    so a good file is read once.
    """
    where = str(path)
    try:
        with _builder_logs_silenced():
            return datasets.load_dataset(*args, **kwargs)
    except StopIteration as err:  # the json reader finding no record at all
        raise ValueError(f"dataset {where!r} is empty (no rows)") from err
    except Exception as err:
        if isinstance(err, ValueError) and "corresponds to no data" in str(err):  # a split with no rows
            raise ValueError(f"dataset {where!r} is empty (no rows)") from err
        if isinstance(err, ValueError) and str(err).startswith("Unknown split"):
            raise ValueError(f"{where!r}: {err} (the split is dataset_train_split, or dataset_test_split for the "
                             "eval dataset)") from err
        files = [path] if path.is_file() else _text_data_files(path)
        problem = next((found for found in map(file_problem, files) if found), None)
        if problem is not None:
            raise ValueError(problem) from err
        # DatasetGenerationError says nothing of the cause, and Arrow's errors do not name the file.
        if isinstance(err, (datasets.exceptions.DatasetGenerationError, pa.ArrowException)):
            raise ValueError(f"cannot read {where!r}: {_root_cause(err)}") from err
        raise


@contextlib.contextmanager
def _builder_logs_silenced() -> Any:
    """Mute datasets' file readers (packaged_modules), which log an error before raising it: the
    error raised here names the problem instead, in one line (the original stays chained)."""
    readers = logging.getLogger("datasets.packaged_modules")
    level = readers.level
    readers.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        readers.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """'Type: first line' of the innermost exception in the chain of causes."""
    for _ in range(20):  # a chain is short; the bound only guards against a cycle
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ------------------------------------------------------------------ broken data files

_SCANNED_SUFFIXES = (".json", ".jsonl", ".csv")
_JSON_WHITESPACE = " \t\r\n"


def _text_data_files(folder: Path) -> list[Path]:
    """The JSON/JSONL/CSV files under a folder (not hidden ones), in name order."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in _SCANNED_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def file_problem(path: Path) -> str | None:
    """The first problem of a local JSON/JSONL/CSV file as a message naming the file and line, or None.

    Finds text that is not UTF-8 (any of the three) and, in JSON files, a line that is not valid
    JSON or not an object ("line 17: ..."; 1-based, counting every line, blank ones included).
    A .jsonl file, or a .json file whose first line is a whole object, is read as JSON Lines;
    any other .json file as one JSON document (an array of objects).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SCANNED_SUFFIXES:
        return None
    if suffix == ".csv":
        with path.open("rb") as file:
            return next(filter(None, (_utf8_problem(path, *line) for line in _numbered_lines(file))), None)
    if suffix == ".json" and not _starts_like_json_lines(path):
        return _json_document_problem(path)
    return _json_lines_problem(path)


def _starts_like_json_lines(path: Path) -> bool:
    """Whether a .json file reads as JSON Lines: its first non-blank line is a whole JSON object."""
    with path.open("rb") as file:
        for raw, _, _ in _numbered_lines(file):
            text = raw.decode("utf-8", errors="replace").strip(_JSON_WHITESPACE)
            if text:
                try:
                    return isinstance(json.loads(text), dict)
                except json.JSONDecodeError:
                    return False
    return True


def _numbered_lines(file: Any) -> Any:
    """(raw line without a leading BOM, 1-based line number, byte offset of the line) for a binary file."""
    offset = 0
    for number, raw in enumerate(file, start=1):  # a binary file splits on b"\n" only, as JSON Lines does
        bom = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        yield raw[bom:], number, offset + bom
        offset += len(raw)


def _utf8_problem(path: Path, data: bytes, line: int, offset: int) -> str | None:
    """Where `data` (starting at `line`, byte `offset` of the file) is not UTF-8, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line += data.count(b"\n", 0, err.start)
        return (
            f"{path} line {line} (byte offset {offset + err.start}): not UTF-8 text (byte "
            f"0x{data[err.start]:02x}: {err.reason}); save the file as UTF-8"
        )
    return None


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _json_error(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at")  # "Invalid control character at" is followed by a position in str(err)


def _json_lines_problem(path: Path) -> str | None:
    with path.open("rb") as file:
        for raw, number, offset in _numbered_lines(file):
            problem = _utf8_problem(path, raw, number, offset)
            if problem is not None:
                return problem
            text = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")  # columns count within the line
            if not text.strip(_JSON_WHITESPACE):  # blank lines are skipped by the reader
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                return f"{path} line {number} column {err.colno}: not valid JSON: {_json_error(err)}"
            if not isinstance(value, dict):
                return (
                    f"{path} line {number}: each line must be a JSON object {{...}} (one row), "
                    f"got {_json_kind(value)}"
                )
    return None


def _json_document_problem(path: Path) -> str | None:
    """A .json file holding one array of row objects."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    problem = _utf8_problem(path, data, 1, 0)
    if problem is not None:
        return problem
    try:
        rows = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        return f"{path} line {err.lineno} column {err.colno}: not valid JSON: {_json_error(err)}"
    if isinstance(rows, list):
        for position, row in enumerate(rows):
            if not isinstance(row, dict):
                return (
                    f"{path}: item {position} of the JSON array must be an object {{...}} (one row), "
                    f"got {_json_kind(row)}"
                )
    return None


@contextlib.contextmanager
def blame_the_file(source: Any) -> Any:
    """On a row error from a local file, name the file's broken line instead when it has one.

    The JSON reader takes a `null` line as a row of missing fields; the scan names the line.
    """
    try:
        yield
    except ValueError as err:
        if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_file():
            problem = file_problem(Path(source).expanduser())
            if problem is not None:
                raise ValueError(problem) from err
        raise


def _pick_split(dataset_dict: DatasetDict, split: str, where: str) -> Dataset:
    if split not in dataset_dict:
        raise ValueError(f"split {split!r} not found in {where}; splits: {sorted(dataset_dict)}")
    return dataset_dict[split]

