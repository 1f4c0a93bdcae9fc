"""Route a peft model's LoRA Linear layers through the fused LoRA kernel, and back.

    from alignlib.fused_lora import fused_lora
    with fused_lora(policy):               # or enable_fused_lora(policy) ... disable_fused_lora(policy)
        loss = compute_loss(policy(input_ids).logits)
        loss.backward()

`enable_fused_lora` replaces the `forward` of each peft LoRA Linear layer (`lora.Linear`, and
peft's bitsandbytes `lora.Linear4bit`) whose base layer is a plain `torch.nn.Linear` or a
bitsandbytes 4-bit `Linear4bit`, with one that computes x W^T + s (x A^T) B^T (+ bias)
through `alignlib.kernels.lora.lora_linear`: one GEMM over an extended K, W frozen, a
4-bit W dequantised tile by tile inside the kernel. Only the instance attribute changes:
the original bound forward is kept on the layer and put back by `disable_fused_lora`, and
`copy.deepcopy` of the model rebinds both to the copy.

Precision. peft keeps adapter weights in float32 on a bf16/fp16 model (its default
autocast_adapter_dtype) and runs the LoRA branch in float32. The fused layer casts
lora_A and lora_B to x's dtype (the gradients still reach the float32 parameters) and
accumulates everything in float32, rounding once at the end; it differs from peft by
bf16/fp16 round-off. With x and the adapters in one dtype it computes what peft does.

On every call the fused forward hands over to peft's own forward where the fused math
would be wrong or is unsupported:
- adapters disabled (`with model.disable_adapter():`, e.g. for DPO's reference pass),
  merged adapters, or not exactly one active adapter on this layer;
- a LoRA variant (DoRA and the others peft keeps in `lora_variant`), a bias on lora_B
  (`lora_bias=True`), a base weight that requires grad (the kernel keeps W frozen);
- dropout that is active (training mode with lora_dropout > 0);
- autocast, a base weight or bias (a 4-bit base: its compute dtype) in another dtype
  than x, extra forward arguments (peft's `adapter_names` mixed batches), forward hooks
  on the wrapped modules, a 4-bit weight without its quant_state or repacked for
  bitsandbytes' CPU kernel, or a device the kernel cannot run on (CPU without
  TRITON_INTERPRET=1) or does not serve (a GPU older than sm_80, where Triton emits no
  tensor-core instructions: `alignlib.kernels.lora.lora_kernel_serves`, docs/kernels.md).
Other base layers (bitsandbytes 8-bit, Conv1D with fan_in_fan_out) are not swapped at all.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import bitsandbytes as bnb
import torch
from peft.tuners.lora import bnb as peft_lora_bnb
from peft.tuners.lora.layer import Linear as LoraLinear

try:  # triton is a Linux-only dependency
    from alignlib.kernels.logprobs import triton_available_for
    from alignlib.kernels.lora import SUPPORTED_DTYPES, lora_linear
    from alignlib.kernels.lora_tiles import lora_kernel_serves
except ImportError:  # pragma: no cover - exercised only where triton is absent
    lora_linear = None

# peft's LoRA layer classes whose forward is "base_layer(x) + lora_B(lora_A(dropout(x))) * scaling".
LORA_LINEAR_CLASSES: tuple[type, ...] = (LoraLinear,)
if hasattr(peft_lora_bnb, "Linear4bit"):  # defined where peft sees a usable bitsandbytes
    LORA_LINEAR_CLASSES += (peft_lora_bnb.Linear4bit,)

# Attribute names set on a swapped layer.
_UNFUSED_FORWARD = "_alignlib_unfused_forward"
_HAD_INSTANCE_FORWARD = "_alignlib_had_instance_forward"


def _is_4bit_base(base: torch.nn.Module) -> bool:
    return isinstance(base, bnb.nn.Linear4bit)


def _swappable(layer: torch.nn.Module) -> bool:
    """Static eligibility: a plain nn.Linear (in (out, in) layout) or a bitsandbytes 4-bit base."""
    base = layer.get_base_layer()
    plain = type(base) is torch.nn.Linear and not getattr(layer, "fan_in_fan_out", False)
    return plain or _is_4bit_base(base)


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _base_matches(base: torch.nn.Module, x: torch.Tensor) -> bool:
    """The base layer computes x W^T + bias in x's dtype on x's device, as the kernel would."""
    weight, bias = base.weight, base.bias
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return False
    if torch.is_grad_enabled() and weight.requires_grad:
        return False  # the kernel would give W no gradient
    if weight.device != x.device:
        return False
    if not _is_4bit_base(base):
        return weight.dtype == x.dtype
    state = getattr(weight, "quant_state", None)
    return (
        state is not None
        and state.quant_type in ("nf4", "fp4")
        and not getattr(state, "packing_format_for_cpu", False)
        and base.compute_dtype == x.dtype  # bitsandbytes computes in compute_dtype, returns x's dtype
    )


def _fusable_adapter(layer: torch.nn.Module, x: torch.Tensor) -> str | None:
    """The one active adapter whose forward the kernel computes as peft does, or None."""
    if lora_linear is None or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    adapter = active[0]
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    dropout = layer.lora_dropout[adapter]
    base = layer.get_base_layer()
    if adapter in layer.lora_variant or layer.use_dora.get(adapter, False):
        return None
    plain_factors = isinstance(lora_A, torch.nn.Linear) and isinstance(lora_B, torch.nn.Linear)
    if not plain_factors or lora_B.bias is not None:
        return None
    dropout_off = isinstance(dropout, torch.nn.Dropout) and (not dropout.training or dropout.p == 0)
    if not (isinstance(dropout, torch.nn.Identity) or dropout_off):
        return None
    if any(_has_hooks(module) for module in (base, lora_A, lora_B, dropout)):
        return None
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES or not triton_available_for(x):
        return None
    if not lora_kernel_serves(x):  # sm_7x: peft's own forward (cuBLAS, bitsandbytes), docs/kernels.md
        return None
    if torch.is_autocast_enabled(x.device.type) or not _base_matches(base, x):
        return None
    if any(not f.weight.is_floating_point() or f.weight.device != x.device for f in (lora_A, lora_B)):
        return None
    return adapter


def _fused_forward(layer: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear forward, through the fused kernel where it applies (see the module docstring)."""
    adapter = None if (args or kwargs) else _fusable_adapter(layer, x)
    if adapter is None:
        return getattr(layer, _UNFUSED_FORWARD)(x, *args, **kwargs)
    base = layer.get_base_layer()
    lora_A = layer.lora_A[adapter].weight.to(x.dtype)  # no-op unless the adapter is kept in float32
    lora_B = layer.lora_B[adapter].weight.to(x.dtype)
    return lora_linear(x, base.weight, lora_A, lora_B, float(layer.scaling[adapter]), base.bias)


def _lora_linear_layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    return (module for module in model.modules() if isinstance(module, LORA_LINEAR_CLASSES))


def enable_fused_lora(model: torch.nn.Module) -> int:
    """Swap the forward of every peft LoRA Linear layer with a plain or 4-bit Linear base for the fused one.

    Returns how many layers were swapped by this call (layers already swapped are left as
    they are and not counted). Undo with `disable_fused_lora`.
    """
    swapped = 0
    for layer in _lora_linear_layers(model):
        if hasattr(layer, _UNFUSED_FORWARD) or not _swappable(layer):
            continue
        object.__setattr__(layer, _HAD_INSTANCE_FORWARD, "forward" in layer.__dict__)
        object.__setattr__(layer, _UNFUSED_FORWARD, layer.forward)
        object.__setattr__(layer, "forward", types.MethodType(_fused_forward, layer))
        swapped += 1
    return swapped


def disable_fused_lora(model: torch.nn.Module) -> int:
    """Put back the forward each swapped layer had before `enable_fused_lora`; returns how many."""
    restored = 0
    for layer in _lora_linear_layers(model):
        if not hasattr(layer, _UNFUSED_FORWARD):
            continue
        original = layer.__dict__.pop(_UNFUSED_FORWARD)
        if layer.__dict__.pop(_HAD_INSTANCE_FORWARD):
            object.__setattr__(layer, "forward", original)
        else:
            del layer.__dict__["forward"]
        restored += 1
    return restored


@contextlib.contextmanager
def fused_lora(model: torch.nn.Module) -> Iterator[int]:
    """Context manager: the fused LoRA forward inside the block (yields the swapped count), peft's after."""
    swapped = enable_fused_lora(model)
    try:
        yield swapped
    finally:
        disable_fused_lora(model)
