"""Where a model is on disk: local folders and cached Hub snapshots, the files saved beside an adapter, and
the origin (merged start adapter, resized embeddings, continued adapter) remembered on a loaded model."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

ADAPTER_CONFIG_FILE = "adapter_config.json"


BASE_QUANTIZATION_FILE = "base_quantization_config.json"
"""Saved beside an adapter trained over a quantised base: that base's bitsandbytes config, so the
adapter is reloaded over the same base."""


ADAPTER_BASE_FILE = "adapter_base.json"
"""Saved beside an adapter whose base is more than adapter_config.json's base_model_name_or_path:
{"merged_start": the adapter directory merged into that base first, "num_embeddings": the
embedding rows after a chat format's tokens were added}."""


def local_dir(path: str | os.PathLike | None, what: str = "model", *, revision: str = "main",
               need_config: bool = True) -> str:
    """The local directory to load from, or a one-line FileNotFoundError / ValueError.

    `path` is a local directory, or a Hub id ("org/name") already downloaded into the Hugging
    Face cache (resolved without the network). Nothing is downloaded: an unknown path fails at
    once instead of after the Hub client's retries.
    """
    if path is None or str(path) == "":
        raise ValueError(f"no {what} path given (model_name_or_path is empty)")
    path = str(path)
    if os.path.isfile(path):
        raise NotADirectoryError(f"{what} path {path} is a file: give the folder that holds the model's files")
    if not os.path.isdir(path):
        first = path.split("/")[0]
        looks_like_hub_id = (path.count("/") == 1 and not path.startswith((".", "/", "~"))
                             and not os.path.isdir(first))  # models/tiny is a local path, not org/name
        cached = _cached_hub_snapshot(path, revision) if looks_like_hub_id else None
        if cached is None:
            hint = (f" (no such local folder; if it is a Hugging Face Hub id, download it first: "
                    f"huggingface-cli download {path})" if looks_like_hub_id else "")
            raise FileNotFoundError(f"{what} path {path} does not exist{hint}")
        path = cached
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{what} directory {path} has no config.json: it holds a LoRA adapter; "
                                    "load it with alignlib.saved_models.load_for_generation")
        raise FileNotFoundError(f"{what} directory {path} has no config.json: not a model directory")
    return path


def _cached_hub_snapshot(repo_id: str, revision: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not in the cache, or not a valid repo id
        return None


def adapter_dir(path: str | os.PathLike | None, *, revision: str = "main") -> str | None:
    """The local directory of `path` if it holds a LoRA adapter (adapter_config.json), else None."""
    if path is None or not str(path):
        return None
    try:
        resolved = local_dir(path, revision=revision, need_config=False)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return resolved if os.path.isfile(os.path.join(resolved, ADAPTER_CONFIG_FILE)) else None


def read_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def adapter_settings(path: str) -> dict:
    return read_json(os.path.join(path, ADAPTER_CONFIG_FILE))


def adapter_base_path(path: str) -> str:
    """The base model directory an adapter's adapter_config.json names (a one-line error if it is gone)."""
    return local_dir(adapter_settings(path).get("base_model_name_or_path") or "",
                     f"base model of the adapter in {path}")


def saved_base_recipe(path: str) -> dict:
    """ADAPTER_BASE_FILE of an adapter directory ({} when its base is just base_model_name_or_path)."""
    recipe_file = os.path.join(path, ADAPTER_BASE_FILE)
    return read_json(recipe_file) if os.path.isfile(recipe_file) else {}


def set_origin(model: torch.nn.Module, *, recipe: dict | None = None, continued: str | None = None) -> None:
    """Remember on the transformers model how its base was built (saved beside its adapter as
    ADAPTER_BASE_FILE) and which adapter directory it continues; read by save_model and make_reference."""
    if recipe is not None:
        model.alignlib_base_recipe = {key: value for key, value in recipe.items() if value is not None}
    if continued is not None:
        model.alignlib_continued_adapter = continued


def base_recipe_of(model: torch.nn.Module) -> dict:
    """How the base of a (peft) model was built: {} for a base loaded as it is on disk."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return dict(getattr(base, "alignlib_base_recipe", {}))


def continued_adapter_of(model: torch.nn.Module) -> str | None:
    """The adapter directory a policy's adapter was loaded from (start_adapter continue), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "alignlib_continued_adapter", None)
