"""Input checks (and two numeric guards) shared by the loss functions.

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

# The numeric domain of every loss. Inputs (log-probs, rewards, values) must satisfy
# |x| <= MAX_MAGNITUDE = 2^40 = 1.1e12, else a ValueError: summed log-probs of real
# sequences are orders of magnitude smaller, and a larger value is nearly always a filler
# such as torch.finfo(dtype).min that leaked through a mask. (A power of two, so the
# comparison is exact in bf16, fp16, float32 and float64 alike.) Within that domain, and
# for beta in [1e-6, 1e6], every loss, reward and gradient is finite in float32: squares
# stay below (4.4e12 + 1/(2 beta))^2 and products below 1e6 * 4.4e12. The exception is a
# loss type that exponentiates its inputs (forward_kl and alpha_divergence scores, AlphaPO
# rewards): past scores of about 1e12 its true value can exceed the dtype, and the result
# is then +inf or saturated at the dtype's largest value (TRL's is inf or NaN there); it is
# never NaN. tests/reliability/test_fuzz_losses.py checks all of this.
MAX_MAGNITUDE = 2.0**40

# Coefficients (beta, alpha, the centering weight, PPO's kl/vf/entropy weights) above this
# are refused: times a margin near 2 * MAX_MAGNITUDE they would overflow float32, and a
# Python float beyond float32's range turns into inf in tensor arithmetic (inf * 0 = NaN).
MAX_COEFFICIENT = 1e6


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_batch(**named: torch.Tensor) -> torch.dtype:
    """Check that the named tensors are non-empty, floating, 1-D, of one shape, finite and within +-MAX_MAGNITUDE.

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
    """Raise unless every entry is finite and within +-MAX_MAGNITUDE (one reduction; NaN fails it too)."""
    if bool((value.abs() <= MAX_MAGNITUDE).all()):
        return
    if not bool(torch.isfinite(value).all()):
        bad = value[~torch.isfinite(value)].flatten()[:3].tolist()
        raise ValueError(f"{name} contains non-finite values (e.g. {bad})")
    raise ValueError(
        f"{name} has values of magnitude up to {value.abs().max().item():.3g}, beyond the losses' domain "
        f"|x| <= 2^40 = {MAX_MAGNITUDE:.2g}; a filler such as torch.finfo(dtype).min that escaped a mask is the usual cause"
    )


def clamp_to_finite(x: torch.Tensor) -> torch.Tensor:
    """x with +-inf pulled back to the dtype's largest finite values (finite values pass unchanged).

    Applied to intermediates that can overflow where the true value exceeds the dtype (an
    exponential score, beta times a huge margin), so that what follows never meets
    inf - inf or 0 * inf = NaN. The gradient past the clamp is 0.
    """
    largest = torch.finfo(x.dtype).max
    return x.clamp(-largest, largest)


# The smallest positive coefficient accepted: float32's smallest normal number. A Python float
# below it becomes 0 (or a subnormal) in float32 tensor arithmetic, and then 0 / 0 = NaN.
MIN_POSITIVE = float(torch.finfo(torch.float32).tiny)


def check_positive(name: str, value: float, upper: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value < MIN_POSITIVE:
        raise ValueError(f"{name} must be at least {MIN_POSITIVE:.3g} (float32's smallest normal number; smaller "
                         f"values are 0 in float32 arithmetic), got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper:g}, got {value!r}: beyond that the losses overflow float32")


def check_coefficient(name: str, value: float) -> None:
    """A real-valued option (an exponent's coefficient): finite and within +-MAX_COEFFICIENT."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if abs(value) > MAX_COEFFICIENT:
        raise ValueError(f"{name} must lie in [-{MAX_COEFFICIENT:g}, {MAX_COEFFICIENT:g}], got {value!r}")


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
