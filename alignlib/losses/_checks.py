"""Input checks shared by the loss functions.

Every check raises a ValueError that names the offending argument and says what
was seen, so a wrong call fails at the call site instead of as a NaN three
steps later.
"""

from __future__ import annotations

import math

import torch

# exp() arguments above these overflow (float32: e^88.7; float64: e^709.8). Losses clamp
# there, so a score that would be inf stays finite (with zero gradient past the clamp).
EXP_MAX = {torch.float32: 80.0, torch.float64: 700.0}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_batch(**named: torch.Tensor) -> torch.dtype:
    """Check that the named tensors are non-empty, finite, floating, 1-D and of one shape.

    Returns the dtype the loss should compute in.
    """
    shape = None
    first = None
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), one value per sequence; got shape {tuple(value.shape)}")
        if value.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(value.shape)}): the batch needs at least one pair")
        if shape is None:
            shape, first = value.shape, name
        elif value.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but {first} has shape {tuple(shape)}; they must match"
            )
        check_finite(name, value)
    return compute_dtype(*named.values())


def check_finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = value[~torch.isfinite(value)].flatten()[:3].tolist()
        raise ValueError(f"{name} contains non-finite values (e.g. {bad})")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_choice(name: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(known)}")


def check_lengths(name: str, lengths: torch.Tensor | None, like: torch.Tensor, needed_by: str) -> torch.Tensor:
    """Token counts (B,) for a length-normalised loss, as a tensor in like's dtype, clamped to >= 1."""
    if lengths is None:
        raise ValueError(
            f"{needed_by} normalises by response length: pass {name} (B,), the number of response tokens per sequence"
        )
    lengths = torch.as_tensor(lengths, device=like.device)
    if lengths.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(lengths.shape)} but the log-probs have shape {tuple(like.shape)}")
    if bool((lengths < 0).any()) or not bool(torch.isfinite(lengths.double()).all()):
        raise ValueError(f"{name} must hold token counts >= 0, got {lengths.tolist()[:8]}")
    # A response with no tokens has a summed log-prob of 0; dividing by 1 keeps it 0 (as TRL does).
    return lengths.to(like.dtype).clamp(min=1)
