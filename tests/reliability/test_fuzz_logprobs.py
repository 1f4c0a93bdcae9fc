"""Fuzzing alignlib.logprobs with extreme finite logits and with labels outside the vocabulary.

What a result must be, for finite logits (float32, bfloat16; float64 on the torch path):

- never NaN, and exactly 0 where the label is ignore_index;
- <= 0, and within a few float32 ulps of max|logit| of the float64 log-softmax of the same
  (already rounded) logits;
- -inf only where that float64 value lies below -float32 max, i.e. where the true log-prob
  is not representable in the float32 result (a dominant logit near +3.4e38 against a label
  logit near -3.4e38): the result underflows, it does not wrap or turn NaN;
- a finite gradient (g * (onehot - softmax) is bounded by |g|).

And a label outside [0, V) that is not ignore_index is a ValueError naming that id, its
position and V, from all four entry points, whatever the backend.

The Triton kernel runs through the interpreter (TRITON_INTERPRET=1, set in tests/conftest.py)
at tiny sizes and a few examples.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignlib.logprobs import (
    linear_token_logprobs,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
    token_logprobs,
)

F32_MAX = torch.finfo(torch.float32).max
IGNORE = -100


def extreme_logits(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Finite logits at the edges of `dtype` (its own max, so bf16 rounding never makes them inf)."""
    top = torch.finfo(dtype).max
    edges = [
        top,
        -top,
        top / 2,
        1e38,
        -1e38,
        1e30,
        -1e30,
        1e4,
        -1e4,
        88.0,
        -104.0,
        1.0,
        0.0,
        -0.0,
        1e-45,
        -1e-45,
    ]
    return st.one_of(st.sampled_from(edges), st.floats(-top, top, allow_nan=False, allow_infinity=False))


@st.composite
def logits_rows(draw, dtype: torch.dtype, max_rows: int = 4, max_vocab: int = 40):
    """(N, V) logits in one of four shapes of extremity, drawn as float64 then cast to dtype."""
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(1, max_vocab))
    values = extreme_logits(dtype)
    pattern = draw(st.sampled_from(["all_equal", "one_dominant", "two_levels", "anything"]))
    if pattern == "all_equal":
        grid = [[draw(values)] * vocab for _ in range(rows)]
    elif pattern == "one_dominant":
        grid = []
        for _ in range(rows):
            row = [draw(values)] * vocab
            row[draw(st.integers(0, vocab - 1))] = draw(values)
            grid.append(row)
    elif pattern == "two_levels":
        high, low = draw(values), draw(values)
        grid = [
            draw(st.lists(st.sampled_from([high, low]), min_size=vocab, max_size=vocab)) for _ in range(rows)
        ]
    else:
        grid = [draw(st.lists(values, min_size=vocab, max_size=vocab)) for _ in range(rows)]
    logits = torch.tensor(grid, dtype=torch.float64).to(dtype)
    labels = torch.tensor(
        draw(st.lists(st.one_of(st.integers(0, vocab - 1), st.just(IGNORE)), min_size=rows, max_size=rows))
    )
    return logits, labels


def reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax of the (already rounded) logits, gathered; 0 on ignored rows."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE, 0.0, picked)


def check_against_reference(
    logits: torch.Tensor, labels: torch.Tensor, backend: str, check_ignored_grad=True
) -> None:
    leaf = logits.clone().requires_grad_(True)
    out = token_logprobs(leaf, labels, backend=backend)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype
    assert not bool(out.isnan().any()), out
    assert bool((out <= 0).all()), out
    assert bool((out[labels == IGNORE] == 0).all()), out

    ref = reference_logprobs(logits, labels)
    limit = torch.finfo(expected_dtype).max
    eps = torch.finfo(expected_dtype).eps
    scale = (
        logits.double().abs().amax(dim=-1) + torch.log(torch.tensor(float(logits.shape[-1]))).double() + 1.0
    )
    tolerance = 8 * eps * scale
    representable = ref >= -limit
    assert bool(out[representable].isfinite().all()), (
        out,
        ref,
    )  # -inf only where the true value is not representable
    err = (out.double() - ref).abs()
    assert bool((err[representable] <= tolerance[representable]).all()), (out, ref, err)
    # Below -max the result underflows: -inf, or (rounding at the edge) the most negative finite values.
    assert bool((out.double()[~representable] <= -limit + tolerance[~representable]).all()), (out, ref)

    upstream = torch.linspace(-2.0, 2.0, labels.numel(), dtype=torch.float64).to(expected_dtype)
    (out * upstream).sum().backward()
    rows = labels != IGNORE if not check_ignored_grad else torch.ones_like(labels, dtype=torch.bool)
    grad = leaf.grad.double()[rows]
    assert bool(grad.isfinite().all()), grad
    bound = upstream.double().abs()[rows].unsqueeze(-1) * (1 + 1e-2)
    assert bool((grad.abs() <= bound).all()), grad  # |g * (onehot - softmax)| <= |g|
    if check_ignored_grad:
        assert bool((leaf.grad[labels == IGNORE] == 0).all()), leaf.grad


@given(data=st.data())
def test_torch_backend_on_extreme_logits(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    logits, labels = data.draw(logits_rows(dtype))
    check_against_reference(logits, labels, backend="torch")


@settings(max_examples=12)
@given(data=st.data())
def test_triton_backend_on_extreme_logits(data):
    """The Triton kernel (interpreted on CPU) under the same rules; float64 would take the torch path."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    logits, labels = data.draw(logits_rows(dtype, max_rows=3, max_vocab=20))
    # Ignored rows' gradient: see test_triton_gradient_of_ignored_rows_with_logits_above_88 below.
    check_against_reference(logits, labels, backend="triton", check_ignored_grad=False)


# An ignored row's stored normaliser is +inf, so backward's exp(x - lse) is 0 even for huge logits.
@pytest.mark.parametrize("value", [89.0, 1e4])
def test_triton_gradient_of_ignored_rows_with_logits_above_88(value):
    logits = torch.full((2, 4), value, requires_grad=True)
    token_logprobs(logits, torch.tensor([IGNORE, 1]), backend="triton").sum().backward()
    assert bool((logits.grad[0] == 0).all()), logits.grad  # an ignored row gets no gradient, never NaN


def test_triton_and_torch_agree_where_a_row_spans_the_whole_float32_range():
    """A hand-picked row: the online logsumexp must not turn fmax - (-fmax) into NaN."""
    logits = torch.tensor([[F32_MAX, -F32_MAX, 0.0], [-F32_MAX, -F32_MAX, -F32_MAX], [1e-45, 0.0, -1e-45]])
    labels = torch.tensor([1, 2, 0])
    for backend in ("torch", "triton"):
        out = token_logprobs(logits, labels, backend=backend)
        assert out[0].item() == -float("inf")  # the true value, -6.8e38, is below -F32_MAX
        assert (
            -1.0987 <= out[1].item() <= 0.0
        )  # true -log 3; ulp(3.4e38) = 2e31 may swallow it, but never NaN
        assert out[2].item() == pytest.approx(-torch.log(torch.tensor(3.0)).item(), abs=1e-6)


# --- labels outside the vocabulary ------------------------------------------------------------

LABEL_VALUES = st.one_of(st.integers(-3, 12), st.just(IGNORE), st.sampled_from([-(2**62), 2**31, 2**62]))


def first_bad(labels: torch.Tensor, vocab: int, shift: int) -> tuple[int, tuple[int, ...]] | None:
    """The first (row-major) label outside [0, vocab) other than IGNORE, and its position (+ shift)."""
    for index in range(labels.numel()):
        position = list(torch.unravel_index(torch.tensor(index), labels.shape))
        value = int(labels[tuple(position)])
        if value != IGNORE and not 0 <= value < vocab:
            position = [int(p) for p in position]
            position[-1] += shift
            return value, tuple(position)
    return None


@given(data=st.data())
def test_labels_outside_the_vocabulary_name_id_position_and_v(data):
    vocab = data.draw(st.integers(1, 8))
    rows, cols = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 4))
    label_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    values = LABEL_VALUES if label_dtype == torch.int64 else st.one_of(st.integers(-3, 12), st.just(IGNORE))
    labels = torch.tensor(data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))).view(
        rows, cols
    )
    labels = labels.to(label_dtype)
    backend = data.draw(st.sampled_from(["torch", "triton"]))
    hidden_size = 3
    logits = torch.randn(rows, cols, vocab)
    hidden, weight = torch.randn(rows, cols, hidden_size), torch.randn(vocab, hidden_size)

    calls = [
        (lambda: token_logprobs(logits, labels, backend=backend), labels, 0),
        (lambda: linear_token_logprobs(hidden, weight, labels, backend=backend), labels, 0),
        (lambda: sequence_logprobs(logits, labels, backend=backend), labels[:, 1:], 1),
        (lambda: sequence_logprobs_from_hidden(hidden, weight, labels, backend=backend), labels[:, 1:], 1),
    ]
    for call, scored, shift in calls:
        bad = first_bad(scored, vocab, shift)
        if bad is None:
            out = call()
            assert bool(out.isfinite().all()) and bool((out <= 0).all()), out
            continue
        value, position = bad
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert f"[0, {vocab})" in message and f"V = {vocab}" in message, message
        assert f"got {value} at position {position}" in message, message


@pytest.mark.parametrize("ignore_index", [-1, 0, 7])
def test_ignore_index_is_exempt_whatever_its_value(ignore_index):
    """ignore_index need not be -100, nor outside the vocabulary; only the other labels are checked."""
    logits = torch.randn(4, 5)
    labels = torch.tensor([ignore_index, 1, ignore_index, 4])
    out = token_logprobs(logits, labels, ignore_index=ignore_index)
    assert bool((out[labels == ignore_index] == 0).all())
    with pytest.raises(ValueError, match=re.escape("got 5 at position (1,)")):
        token_logprobs(logits, torch.tensor([ignore_index, 5, 1, 2]), ignore_index=ignore_index)
