"""The token log-prob Triton kernel against its torch reference, forward and backward.

On a machine without a GPU these run through the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), at small sizes.
"""

import os

import alignlib.kernels.logprobs as kernel_module
import pytest
import torch
from alignlib.kernels import token_logprobs, token_logprobs_torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignlib.logprobs import sequence_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
# Outputs are float32 either way. Gradients come back in the logits' dtype, where both
# sides round a float32 value: in bf16 they may land one unit in the last place apart
# (2^-8 relative), so the tolerance there is one bf16 ulp.
OUT_TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 2**-7, "atol": 2**-8}}


def forward_backward(fn, logits, labels, ignore_index=-100):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, labels, ignore_index)
    g = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * g).sum().backward()
    return out, leaf.grad


def check_against_reference(logits, labels, ignore_index=-100):
    out, grad = forward_backward(token_logprobs, logits, labels, ignore_index)
    ref_out, ref_grad = forward_backward(token_logprobs_torch, logits, labels, ignore_index)
    assert out.dtype == torch.float32 and grad.dtype == logits.dtype
    torch.testing.assert_close(out, ref_out, **OUT_TOL)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOL[logits.dtype])
    ignored = labels == ignore_index
    assert bool((out[ignored] == 0).all()) and bool((grad[ignored] == 0).all())


@settings(max_examples=15)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(1, 300),
    block=st.sampled_from([16, 64, 4096]),  # several blocks per row, or one
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_matches_reference_for_drawn_shapes(rows, vocab, block, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    old = kernel_module.MAX_BLOCK_V
    kernel_module.MAX_BLOCK_V = block
    try:
        check_against_reference(logits, labels.to(DEVICE))
    finally:
        kernel_module.MAX_BLOCK_V = old


@pytest.mark.parametrize("vocab", [1, 7, 33, 1000, 5003])  # odd sizes; 5003 > one 4096 block
def test_odd_vocab_sizes(vocab):
    logits = torch.randn(3, vocab, device=DEVICE) * 3
    labels = torch.tensor([0, vocab - 1, vocab // 2], device=DEVICE)
    check_against_reference(logits, labels)


def test_all_ignored_rows_and_a_single_token():
    logits = torch.randn(2, 4, 50, device=DEVICE)
    labels = torch.full((2, 4), -100, device=DEVICE)
    labels[1, 3] = 7
    check_against_reference(logits, labels)
    check_against_reference(torch.randn(1, 1, 50, device=DEVICE), torch.tensor([[3]], device=DEVICE))


def test_custom_ignore_index_and_strided_logits():
    wide = torch.randn(3, 5, 64, device=DEVICE)
    logits = wide[:, :, :40]  # rows not contiguous in memory
    labels = torch.randint(0, 40, (3, 5), device=DEVICE)
    labels[0] = 39
    check_against_reference(logits, labels, ignore_index=39)


def test_sequence_logprobs_same_with_either_backend():
    logits = torch.randn(2, 6, 90, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, 90, (2, 6), device=DEVICE)
    labels[:, :2] = -100
    for average in (False, True):
        a = sequence_logprobs(logits, labels, average=average, backend="triton")
        b = sequence_logprobs(logits, labels, average=average, backend="torch")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\)"):
        token_logprobs(torch.randn(2, 10, device=DEVICE), torch.tensor([3, 10], device=DEVICE))
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs(torch.randn(2, 10, device=DEVICE), torch.tensor([3], device=DEVICE))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        sequence_logprobs(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), backend="cuda")
