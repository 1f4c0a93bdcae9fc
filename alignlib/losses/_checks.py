"""The one set of argument checks every loss family uses, and two numeric guards.

Tensors: `check_batch` (per-sequence inputs) and `check_finite`; `check_lengths` for the
length-normalised losses. Scalar options: `check_positive` (> 0, or >= 0 with allow_zero,
never a float32 subnormal, optionally at most `upper`), `check_range` (within an
`Interval`, e.g. UNIT_INTERVAL), `check_real` and `check_coefficient` (finite, within
+-MAX_COEFFICIENT), `check_label_smoothing` (the interval each loss type accepts) and
`check_choice`. Numeric guards: `EXP_MAX` and `clamp_to_finite`.

Every check raises a ValueError that names the offending argument and says what
was seen, so a wrong call fails at the call site instead of as a NaN three
steps later.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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


class Interval(NamedTuple):
    """The interval from low to high; each end closed (the default) or open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


UNIT_INTERVAL = Interval(0.0, 1.0)
COEFFICIENT_RANGE = Interval(-MAX_COEFFICIENT, MAX_COEFFICIENT)


def _is_real(value: object) -> bool:
    """A finite Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: float, *, allow_zero: bool = False, upper: float | None = None) -> None:
    """A finite number > 0 (>= 0 with allow_zero), at least MIN_POSITIVE unless 0, at most upper if given."""
    if not _is_real(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    if 0 < value < MIN_POSITIVE:
        raise ValueError(
            f"{name} must be {'0 or ' if allow_zero else ''}at least {MIN_POSITIVE:.3g} (float32's smallest "
            f"normal number; smaller values are 0 in float32 arithmetic), got {value!r}"
        )
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper:g}, got {value!r}: beyond that the losses overflow float32")


def check_range(name: str, value: float, interval: Interval, context: str = "") -> None:
    """A finite number within interval; context (" for loss_type='ipo'") follows it in the message."""
    if not _is_real(value) or value not in interval:
        raise ValueError(f"{name} must lie in {interval}{context}, got {value!r}")


def check_real(name: str, value: float) -> None:
    """A finite number (an int or a float, not a bool)."""
    if not _is_real(value):
        raise ValueError(f"{name} must be finite (a real number), got {value!r}")


def check_coefficient(name: str, value: float) -> None:
    """A real-valued option (an exponent's coefficient, a target margin), finite, within +-MAX_COEFFICIENT."""
    check_real(name, value)
    check_range(name, value, COEFFICIENT_RANGE)


def check_label_smoothing(
    label_smoothing: float, loss_type: str, ranges: dict[str, Interval], hints: dict[str, str] | None = None
) -> None:
    """label_smoothing within the interval `ranges[loss_type]`, or 0 for a loss type that does not read it.

    ranges: the loss types that read label smoothing, each with the interval it accepts.
    hints: optional advice per loss type, added to the message of a value out of range.
    """
    check_real("label_smoothing", label_smoothing)
    if loss_type not in ranges:
        if label_smoothing != 0:
            raise ValueError(
                f"label_smoothing={label_smoothing!r} has no effect on loss_type={loss_type!r}; "
                f"it is read only by {', '.join(ranges)}"
            )
        return
    hint = (hints or {}).get(loss_type)
    check_range("label_smoothing", label_smoothing, ranges[loss_type],
                f" for loss_type={loss_type!r}" + (f" ({hint})" if hint else ""))


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


# ---------------------------------------------------------------------------
# Per-token (B, T) tensors with a response mask: PPO, GRPO and RLOO share these
# ---------------------------------------------------------------------------


def check_same_shape(**named: torch.Tensor) -> None:
    """Every named value is a floating-point tensor, all of one shape."""
    shape, first = None, None
    for name, value in named.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got {getattr(value, 'dtype', type(value))}")
        if shape is None:
            shape, first = value.shape, name
        elif value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)} but {first} has shape {tuple(shape)}")


def check_mask(name: str, mask: torch.Tensor, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """A mask (or label vector) of like's shape holding only 0/1 or bools; returned as bool."""
    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} like {like_name}, got {tuple(getattr(mask, 'shape', ()))}"
        )
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0/1 (or be bool)")
        mask = mask.bool()
    return mask


def check_rollout(mask: torch.Tensor, require_every_row: bool = True, **named: torch.Tensor) -> torch.Tensor:
    """Check (B, T) tensors against their mask; return the mask as bool. Values must be finite on the mask.

    require_every_row: each row is a response and needs at least one token (not so for whiten).
    """
    check_same_shape(**named)
    like_name, like = next(iter(named.items()))
    if like.dim() != 2:
        raise ValueError(f"{like_name} must have shape (B, T), one row per response; got {tuple(like.shape)}")
    if like.numel() == 0:
        raise ValueError(f"{like_name} is empty (shape {tuple(like.shape)})")
    mask = check_mask("mask", mask, like_name, like)
    if require_every_row and not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"mask rows {empty[:8]} have no response token")
    for name, value in named.items():
        # One reduction; NaN fails the comparison too. Padding may hold anything.
        if not bool(torch.where(mask, value.abs() <= MAX_MAGNITUDE, True).all()):
            if not bool(torch.isfinite(value[mask]).all()):
                raise ValueError(f"{name} has non-finite values on response tokens")
            raise ValueError(
                f"{name} has values of magnitude up to {value[mask].abs().max().item():.3g} on response tokens, "
                f"beyond the losses' domain |x| <= 2^40 = {MAX_MAGNITUDE:.2g}"
            )
    return mask


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the compute dtype: float32, or float64 if any is float64 (bf16/fp16 are upcast)."""
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def on_mask(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors upcast, with padding set to 0 before any arithmetic.

    Zeroing only the result would not do: backward multiplies the zero gradient by the
    local derivative, and 0 * inf filler is NaN (in the padding's gradient, and through a
    mean, in every entry's).
    """
    return tuple(torch.where(mask, t, 0.0) for t in upcast(*tensors))
