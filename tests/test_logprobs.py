"""alignlib.logprobs: the torch reference for per-token and per-sequence log-probs."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alignlib.logprobs import sequence_logprobs, token_logprobs


def plain(logits, labels):
    """The textbook computation, for comparison."""
    return logits.double().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@given(st.integers(1, 4), st.integers(1, 7), st.integers(1, 50), st.sampled_from([torch.float32, torch.float64]))
def test_token_logprobs_equal_log_softmax_gather(batch, length, vocab, dtype):
    g = torch.Generator().manual_seed(batch * 100 + length * 10 + vocab)
    logits = (3 * torch.randn(batch, length, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, 0] = -100
    out = token_logprobs(logits, labels)
    expected = torch.where(labels == -100, 0.0, plain(logits, labels))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
    assert out.dtype == dtype


def test_bfloat16_logits_are_scored_in_float32():
    logits = torch.randn(3, 5, 1000).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (3, 5))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), plain(logits.float(), labels), rtol=1e-6, atol=1e-5)


def test_ignored_positions_give_zero_and_no_gradient():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    out = token_logprobs(logits, labels)
    out.sum().backward()
    assert bool((out[labels == -100] == 0).all())
    assert bool((logits.grad[labels == -100] == 0).all())
    assert bool((logits.grad[0, 0] != 0).any())


def test_custom_ignore_index():
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[0, 4, 4]])
    out = token_logprobs(logits, labels, ignore_index=4)
    assert out[0, 1] == 0 and out[0, 2] == 0 and out[0, 0] != 0


def test_sequence_logprobs_shift_convention_by_hand():
    # logits at position t score the token at t+1: with labels [-100, 2, 1], the sum is
    # log_softmax(logits[0])[2] + log_softmax(logits[1])[1]; logits[2] predicts nothing.
    logits = torch.randn(1, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[-100, 2, 1]])
    lsm = logits.log_softmax(-1)
    expected = lsm[0, 0, 2] + lsm[0, 1, 1]
    assert sequence_logprobs(logits, labels).item() == pytest.approx(expected.item())
    assert sequence_logprobs(logits, labels, average=True).item() == pytest.approx(expected.item() / 2)


def test_fully_masked_row_gives_zero_not_nan():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[5, 1, 2, 3], [-100, -100, -100, -100]])
    for average in (False, True):
        out = sequence_logprobs(logits, labels, average=average)
        assert out[1].item() == 0.0 and bool(torch.isfinite(out).all())


def test_errors():
    with pytest.raises(ValueError, match="must agree on the leading dims"):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 5\\)"):
        token_logprobs(torch.randn(2, 5), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="integer token ids"):
        token_logprobs(torch.randn(2, 5), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="expected logits \\(B, T, V\\)"):
        sequence_logprobs(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("entry", ["token_logprobs", "sequence_logprobs", "linear_token_logprobs",
                                   "sequence_logprobs_from_hidden"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_labels_are_range_checked_once_per_call(entry, backend, monkeypatch):
    """A label check is a bool() of a tensor, a device sync on a GPU: the public function checks
    once, and the kernel under it does not check again."""
    from alignlib import logprobs

    logits, hidden, weight = torch.randn(2, 4, 8), torch.randn(2, 4, 3), torch.randn(8, 3)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 7, 0]])
    call = {
        "token_logprobs": lambda: logprobs.token_logprobs(logits, labels, backend=backend),
        "sequence_logprobs": lambda: logprobs.sequence_logprobs(logits, labels, backend=backend),
        "linear_token_logprobs": lambda: logprobs.linear_token_logprobs(hidden, weight, labels, backend=backend),
        "sequence_logprobs_from_hidden": lambda: logprobs.sequence_logprobs_from_hidden(hidden, weight, labels,
                                                                                         backend=backend),
    }[entry]
    syncs = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: syncs.append(self.shape) or real_bool(self))
    out = call()
    monkeypatch.undo()
    assert torch.isfinite(out).all()
    assert len(syncs) == 1, f"{len(syncs)} bool() syncs: {syncs}"
