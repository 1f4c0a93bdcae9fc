"""The reference policy of DPO-style losses and of the KL penalty, by one of four strategies."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from alignlib.models.adapters import (
    adapter_misfit,
    peft_deprecations_silenced,
    require_matching_adapter_keys,
    resize_embeddings,
    vocabulary_size,
)
from alignlib.models.config import ModelConfig, check_adapter_name
from alignlib.models.files import (
    ADAPTER_CONFIG_FILE,
    adapter_dir,
    adapter_settings,
    base_recipe_of,
    continued_adapter_of,
    local_dir,
    saved_base_recipe,
)
from alignlib.models.loading import is_peft_model, load_frozen_causal_lm
from alignlib.models.quantization import is_quantized

REFERENCE_STRATEGIES = ("model", "adapter_disabled", "precomputed", "ref_adapter")


DEFAULT_REF_ADAPTER = "reference"  # TRL's ref_adapter_name in its docs


@contextlib.contextmanager

def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) inside; each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _param_versions(model: torch.nn.Module) -> int:
    """Sum of the parameters' in-place version counters: changes whenever an optimizer steps."""
    return sum(p._version for p in model.parameters())


class ReferenceForward:
    """The reference policy as a callable: `ref(input_ids, attention_mask) -> logits (B, T, V)`.

    Runs under torch.no_grad with every module in eval mode (no dropout), restoring the
    model's modes after. Extra keyword arguments go to the model's forward.

    Attributes:
        strategy: the REFERENCE_STRATEGIES entry it was made for.
        model: the module it runs (a frozen copy, or the policy itself).
        adapter_name: "ref_adapter": the frozen adapter made active for the reference forward
            (the policy's own adapter is made active again after, trainable as it was).
        precompute_only: True for "precomputed": the trainer must call it over the data
            before the first optimizer step, and use the stored
            values afterwards. On a policy whose own weights make the reference (full
            fine-tuning, a continued adapter) a call after the policy changed raises RuntimeError.
    """

    def __init__(self, strategy: str, model: torch.nn.Module, *, disable_adapter: bool,
                 precompute_only: bool = False, adapter_name: str | None = None) -> None:
        self.strategy, self.model, self.adapter_name = strategy, model, adapter_name
        self.disable_adapter, self.precompute_only = disable_adapter, precompute_only
        self._versions = _param_versions(model) if precompute_only and not disable_adapter else None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **model_kwargs: Any) -> torch.Tensor:
        if self._versions is not None and _param_versions(self.model) != self._versions:
            raise RuntimeError("the policy has been updated since the 'precomputed' reference was made: reference "
                               "log-probs must be computed before the first optimizer step")
        if self.disable_adapter:
            switched = self.model.disable_adapter()
        elif self.adapter_name is not None:
            switched = _active_adapter(self.model, self.adapter_name)
        else:
            switched = contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(self.model), switched:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits


@contextlib.contextmanager

def _active_adapter(model: Any, name: str) -> Iterator[None]:
    """Adapter `name` active (and frozen) inside; the adapter that was active before is made active
    again after, trainable if it was (peft's set_adapter sets requires_grad of the active adapter)."""
    previous = model.active_adapter
    was_trainable = any(param.requires_grad for param in model.parameters())
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=not was_trainable)


def auto_reference_strategy(cfg: ModelConfig, *, ref_model: str | None = None,
                            ref_adapter_name: str | None = None) -> str:
    """What reference_strategy "auto" means for a run: a ref_adapter_name gives "ref_adapter"; a
    ref_model is loaded as a model ("model"); a start adapter that training continues gives
    "ref_adapter" (the start model, not the base under it); any other LoRA policy
    "adapter_disabled"; full fine-tuning "model"."""
    if ref_adapter_name is not None:
        return "ref_adapter"
    if ref_model is not None:
        return "model"
    if cfg.start_adapter == "continue" and adapter_dir(cfg.model_name_or_path) is not None:
        return "ref_adapter"
    return "adapter_disabled" if cfg.use_peft else "model"


def make_reference(strategy: str, policy: torch.nn.Module, cfg: ModelConfig | None = None, *,
                   ref_model_name_or_path: str | os.PathLike | None = None,
                   ref_adapter_name: str | None = None) -> ReferenceForward:
    """Build the reference policy for `policy`.

    Strategies:
        "model": a separate frozen model loaded from `ref_model_name_or_path` (default
            cfg.model_name_or_path, i.e. the policy's starting point) with cfg's dtype and
            quantisation, placed on the policy's device. A LoRA adapter directory is loaded
            over its base. Costs one more model in memory.
        "adapter_disabled": the policy itself with its LoRA adapter switched off
            (peft's `disable_adapter()`): the base model, at no extra memory. Needs a peft
            policy. The usual choice with a new LoRA (a continued adapter's base is the model
            *before* that adapter, e.g. before SFT: see "ref_adapter").
        "precomputed": reference log-probs computed once before training and stored; this
            returns the callable that computes them (the adapter-disabled policy for a new
            adapter, else the policy as it is now), which the trainer runs once over the data.
        "ref_adapter": the policy's start adapter (or the adapter directory
            `ref_model_name_or_path`) loaded a second time into the policy as adapter
            `ref_adapter_name` (default "reference"), frozen: the reference forward makes it the
            active adapter, then makes the trained one active again. One base in memory, two
            adapters; the frozen one never requires grad, so it is in no optimizer and no checkpoint.

    A reference whose vocabulary differs from the policy's is refused, except one that lacks
    exactly the rows a chat format (cfg.chat_template) added to the policy: it is resized the same
    way (`resize_embeddings`).
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise ValueError(f"unknown reference strategy {strategy!r}; known: {', '.join(REFERENCE_STRATEGIES)}")
    if ref_adapter_name is not None and strategy != "ref_adapter":
        raise ValueError(f"--ref_adapter_name {ref_adapter_name} names the frozen adapter of reference strategy "
                         f"'ref_adapter'; the strategy here is {strategy!r}")
    if ref_model_name_or_path is not None and strategy in ("adapter_disabled", "precomputed"):
        raise ValueError(f"--ref_model {ref_model_name_or_path} is not read by reference strategy {strategy!r}, which "
                         "uses the policy itself: use reference strategy 'model' (or 'ref_adapter' for an adapter)")
    is_peft = is_peft_model(policy)
    continued = continued_adapter_of(policy) if is_peft else None
    if strategy == "adapter_disabled":
        if not is_peft:
            raise ValueError("reference strategy 'adapter_disabled' needs a LoRA (peft) policy; this policy has no "
                             "adapter: load it with use_peft=True or use strategy 'model' or 'precomputed'")
        return ReferenceForward(strategy, policy, disable_adapter=True)
    if strategy == "precomputed":
        return ReferenceForward(strategy, policy, disable_adapter=is_peft and continued is None, precompute_only=True)
    if strategy == "ref_adapter":
        return _adapter_reference(policy, ref_model_name_or_path or continued, ref_adapter_name or DEFAULT_REF_ADAPTER,
                                  given=ref_model_name_or_path is not None)
    if cfg is None and ref_model_name_or_path is None:
        raise ValueError("reference strategy 'model' needs cfg or ref_model_name_or_path to load the model from")
    cfg = cfg or ModelConfig(model_name_or_path=str(ref_model_name_or_path))
    reference = load_frozen_causal_lm(cfg, ref_model_name_or_path,
                                      what="--ref_model" if ref_model_name_or_path is not None else "reference model")
    _match_vocabulary(reference, policy, cfg, ref_model_name_or_path or cfg.model_name_or_path)
    if not is_quantized(reference):
        reference.to(next(policy.parameters()).device)
    return ReferenceForward(strategy, reference, disable_adapter=False)


def _match_vocabulary(reference: torch.nn.Module, policy: torch.nn.Module, cfg: ModelConfig, path: Any) -> None:
    rows, wanted = vocabulary_size(reference), vocabulary_size(policy)
    if rows == wanted:
        return
    grown_by_chat = base_recipe_of(policy).get("num_embeddings") == wanted and cfg.chat_template is not None
    if rows < wanted and grown_by_chat and str(path) == str(cfg.model_name_or_path):
        base = reference.get_base_model() if is_peft_model(reference) else reference
        resize_embeddings(base, wanted)
        reference.requires_grad_(False)
        return
    raise ValueError(f"--ref_model {path}: its vocabulary has {rows} ids and the policy's {wanted}: the losses compare "
                     "the two models' log-probs token by token, so they need one vocabulary")


def _adapter_reference(policy: torch.nn.Module, path: Any, name: str, *, given: bool) -> ReferenceForward:
    """Reference strategy "ref_adapter": the adapter in `path` loaded into the policy as `name`, frozen."""
    if not is_peft_model(policy):
        raise ValueError("reference strategy 'ref_adapter' needs a LoRA (peft) policy: give --model a LoRA adapter "
                         "directory with --use_peft true")
    if path is None:
        raise ValueError("reference strategy 'ref_adapter' loads the start adapter a second time, frozen: give --model "
                         "a LoRA adapter directory (--start_adapter continue), or --ref_model an adapter directory")
    flag = "--ref_model" if given else "--model"
    adapter = adapter_dir(path)
    if adapter is None:
        local_dir(path, "reference adapter", need_config=False)  # a one-line error for a missing path
        raise ValueError(f"{flag} {path} is not a LoRA adapter directory (no {ADAPTER_CONFIG_FILE}): reference strategy "
                         "'ref_adapter' loads an adapter onto the policy's base; use reference strategy 'model' for a "
                         "full model")
    check_adapter_name("--ref_adapter_name", name)
    if name in policy.peft_config:
        raise ValueError(f"--ref_adapter_name {name} is already the name of the policy's adapter: choose another name")
    trained = policy.peft_config[policy.active_adapter]
    own_base, policy_base = adapter_settings(adapter).get("base_model_name_or_path"), trained.base_model_name_or_path
    if (_real(own_base) != _real(policy_base)
            or saved_base_recipe(adapter).get("merged_start") != base_recipe_of(policy).get("merged_start")):
        raise ValueError(f"{flag} {path} is an adapter for the base {own_base}, and the policy's base is {policy_base}: "
                         "reference strategy 'ref_adapter' needs both on one base; use reference strategy 'model'")
    try:
        with peft_deprecations_silenced():
            policy.load_adapter(adapter, adapter_name=name, is_trainable=False)
    except RuntimeError as exc:
        raise adapter_misfit(exc, f"{flag} {path}: the reference adapter", policy.get_base_model()) from None
    require_matching_adapter_keys(policy, adapter, what=f"{flag} {path}: the reference adapter", adapter_name=name)
    for param_name, param in policy.named_parameters():
        if f".{name}." in param_name or param_name.endswith(f".{name}"):
            param.requires_grad_(False)
    return ReferenceForward("ref_adapter", policy, disable_adapter=False, adapter_name=name)


def _real(path: Any) -> Any:
    return os.path.realpath(path) if path and os.path.exists(path) else path
