"""Log-probs straight from hidden states, chunked over tokens: the torch reference against
plain `log_softmax(hidden @ W^T).gather(...)`, then the Triton version against the reference.

Without a GPU the Triton version runs through the interpreter (tests/conftest.py), at small sizes.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from alignlib.kernels import linear_token_logprobs, linear_token_logprobs_torch
from alignlib.kernels import reference as reference_module
from hypothesis import given, settings
from hypothesis import strategies as st

from alignlib.logprobs import sequence_logprobs, sequence_logprobs_from_hidden

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
can_run_triton = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)


def plain_logprobs(hidden, weight, labels, ignore_index=-100):
    """The textbook computation: full logits, log_softmax, gather, zero on ignored tokens."""
    logits = hidden @ weight.T
    logp = F.log_softmax(logits.double(), dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def make_inputs(tokens, hidden_size, vocab, dtype=torch.float32, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < ignored] = -100
    return hidden, weight, labels


def value_and_grads(fn, hidden, weight, labels, *, weight_trainable=True, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight_trainable)
    out = fn(h, w, labels, **kwargs)
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    (out * upstream).sum().backward()
    return out, h.grad, w.grad


# --- the torch reference against the textbook formula ---


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_reference_matches_full_logits_in_float64(chunk_size):
    hidden, weight, labels = make_inputs(13, 8, 11, torch.float64)
    out, gh, gw = value_and_grads(linear_token_logprobs_torch, hidden, weight, labels, chunk_size=chunk_size)
    ref, ref_gh, ref_gw = value_and_grads(plain_logprobs, hidden, weight, labels)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-12, atol=1e-12)


def test_reference_passes_gradcheck():
    hidden, weight, labels = make_inputs(5, 4, 6, torch.float64)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: linear_token_logprobs_torch(a, b, labels, chunk_size=2), (h, w))


def test_frozen_weight_path_gives_the_same_hidden_gradient():
    # With the weight frozen, d logp / d hidden is computed in the forward pass instead.
    hidden, weight, labels = make_inputs(10, 6, 9, torch.float64)
    _, frozen_gh, frozen_gw = value_and_grads(
        linear_token_logprobs_torch, hidden, weight, labels, weight_trainable=False, chunk_size=4
    )
    _, gh, _ = value_and_grads(linear_token_logprobs_torch, hidden, weight, labels, chunk_size=4)
    assert frozen_gw is None
    torch.testing.assert_close(frozen_gh, gh, rtol=1e-12, atol=1e-12)


def test_weight_only_gradient():
    hidden, weight, labels = make_inputs(9, 5, 7, torch.float64)
    w = weight.clone().requires_grad_(True)
    linear_token_logprobs_torch(hidden, w, labels, chunk_size=2).sum().backward()
    w_ref = weight.clone().requires_grad_(True)
    plain_logprobs(hidden, w_ref, labels).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_leading_dims_and_all_ignored_rows():
    hidden, weight, labels = make_inputs(12, 4, 5, torch.float64)
    hidden, labels = hidden.reshape(3, 4, 4), labels.reshape(3, 4)
    labels[1] = -100
    out, gh, gw = value_and_grads(linear_token_logprobs_torch, hidden, weight, labels, chunk_size=5)
    ref, ref_gh, ref_gw = value_and_grads(plain_logprobs, hidden, weight, labels)
    assert out.shape == (3, 4)
    assert bool((out[1] == 0).all()) and bool((gh[1] == 0).all())
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)


def test_no_chunk_holds_more_than_chunk_size_tokens_of_logits(monkeypatch):
    # The memory claim, checked structurally: every logits block the row operations see
    # has at most chunk_size rows, forward and backward, and ignored tokens never get there.
    seen = []
    row_ops = reference_module.RowOps
    original_forward, original_grad = row_ops.forward, row_ops.grad_into

    def recording_forward(logits, labels):
        seen.append(logits.shape)
        return original_forward(logits, labels)

    def recording_grad(logits, labels, lse, g):
        seen.append(logits.shape)
        return original_grad(logits, labels, lse, g)

    monkeypatch.setattr(row_ops, "forward", staticmethod(recording_forward))
    monkeypatch.setattr(row_ops, "grad_into", staticmethod(recording_grad))
    hidden, weight, labels = make_inputs(50, 4, 7, ignored=0.0)
    labels[:20] = -100  # a prompt: 30 tokens remain
    value_and_grads(linear_token_logprobs_torch, hidden, weight, labels, chunk_size=8)
    assert seen and max(shape[0] for shape in seen) == 8
    assert all(shape[1] == 7 for shape in seen)
    assert sum(shape[0] for shape in seen) == 2 * 30  # each kept token once forward, once backward


def test_weight_gradient_accumulates_in_float32_across_chunks():
    # bf16 inputs, many chunks: the summed weight gradient must be as accurate as one bf16
    # rounding of the exact value, not the drift of summing bf16 partials chunk by chunk.
    hidden, weight, labels = make_inputs(512, 16, 32, torch.bfloat16, ignored=0.0)
    _, _, gw = value_and_grads(linear_token_logprobs_torch, hidden, weight, labels, chunk_size=8)
    _, _, exact = value_and_grads(plain_logprobs, hidden.double(), weight.double(), labels)
    error = (gw.double() - exact).abs().max().item()
    bf16_accumulated = torch.zeros_like(weight)
    upstream = torch.linspace(-1, 1, 512)
    for start in range(0, 512, 8):  # what a bf16 accumulator would hold
        h, y, u = hidden[start : start + 8].double(), labels[start : start + 8], upstream[start : start + 8].double()
        p = torch.softmax(h @ weight.double().T, dim=-1)
        grad_logits = u[:, None] * (F.one_hot(y, 32).double() - p)
        bf16_accumulated += (grad_logits.T @ h).to(torch.bfloat16)
    bf16_error = (bf16_accumulated.double() - exact).abs().max().item()
    assert error < bf16_error / 2
    assert error <= 2**-8 * exact.abs().max().item()  # about one bf16 rounding of the exact value


def test_sequence_logprobs_from_hidden_equals_the_logits_route():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(10, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (2, 6), generator=g)
    labels[:, :2] = -100
    for average in (False, True):
        from_hidden = sequence_logprobs_from_hidden(hidden, weight, labels, average=average, chunk_size=3)
        from_logits = sequence_logprobs(hidden @ weight.T, labels, average=average)
        torch.testing.assert_close(from_hidden, from_logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden": torch.zeros(3, 4), "lm_head_weight": torch.zeros(5, 3)}, "lm_head_weight"),
        ({"labels": torch.zeros(2, dtype=torch.long)}, "labels"),
        ({"labels": torch.tensor([0, 1, 5])}, r"\[0, 5\)"),
        ({"lm_head_weight": torch.zeros(5, 4, dtype=torch.float64)}, "dtype|float64"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    args = {"hidden": torch.zeros(3, 4), "lm_head_weight": torch.zeros(5, 4), "labels": torch.tensor([0, 1, 2])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        linear_token_logprobs_torch(args["hidden"], args["lm_head_weight"], args["labels"], chunk_size=args.get("chunk_size"))


# --- the Triton version against the torch reference (interpreter on CPU) ---

TRITON_TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-6, "atol": 2**-6},
}


def check_triton_against_reference(tokens, hidden_size, vocab, dtype, chunk_size, seed=0, weight_trainable=True):
    hidden, weight, labels = make_inputs(tokens, hidden_size, vocab, dtype, seed)
    hidden, weight, labels = hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)
    kw = {"chunk_size": chunk_size, "weight_trainable": weight_trainable}
    out, gh, gw = value_and_grads(linear_token_logprobs, hidden, weight, labels, **kw)
    ref, ref_gh, ref_gw = value_and_grads(linear_token_logprobs_torch, hidden, weight, labels, **kw)
    assert out.dtype == torch.float32 and gh.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.float(), ref_gh.float(), **TRITON_TOL[dtype])
    if weight_trainable:
        torch.testing.assert_close(gw.float(), ref_gw.float(), **TRITON_TOL[dtype])
    else:
        assert gw is None


@can_run_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trainable", [True, False])
def test_triton_matches_reference(dtype, weight_trainable):
    check_triton_against_reference(19, 16, 37, dtype, chunk_size=4, weight_trainable=weight_trainable)


@can_run_triton
@settings(max_examples=8)
@given(
    tokens=st.integers(1, 12),
    hidden_size=st.integers(1, 12),
    vocab=st.integers(1, 70),
    chunk_size=st.integers(1, 16),
    seed=st.integers(0, 100),
)
def test_triton_matches_reference_for_drawn_shapes(tokens, hidden_size, vocab, chunk_size, seed):
    check_triton_against_reference(tokens, hidden_size, vocab, torch.float32, chunk_size, seed)


def test_chunk_launches_refused_for_resources_fall_back_to_torch(monkeypatch):
    import alignlib.kernels.launch as launch_module
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(launch_module, "_refused", set())
    monkeypatch.setattr(launch_module, "_warned", set())

    def refusing(name, kernel, grid, *args, **kwargs):
        raise OutOfResources(1 << 20, 232448, "shared memory")

    monkeypatch.setattr(launch_module, "launch", refusing)
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, 30, (2, 9))
    labels[0, :3] = -100
    results = []
    with pytest.warns(RuntimeWarning, match="could not launch"):
        for fn in (linear_token_logprobs, linear_token_logprobs_torch):
            h = hidden.clone().requires_grad_(True)
            w = torch.randn(30, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            out = fn(h, w, labels, chunk_size=4)
            out.sum().backward()
            results.append((out, h.grad, w.grad))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)
