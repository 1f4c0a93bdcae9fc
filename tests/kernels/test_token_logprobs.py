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
GRAD_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 2**-7, "atol": 2**-8},
            torch.float16: {"rtol": 2**-10, "atol": 2**-11}}


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab, block", [(50, 16), (16, 16), (5, 8), (3, 4), (130, 32)])
def test_rows_that_start_off_a_16_byte_boundary(vocab, block, dtype, monkeypatch):
    # Each row is read from the 16-byte boundary before its start (the first block masked, full
    # blocks unmasked, a masked tail): row starts at every offset within a vector, a V that is
    # not a multiple of the vector, of the block, or smaller than either.
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_V", block)
    storage = (3 * torch.randn(11 * (vocab + 9) + 8, device=DEVICE)).to(dtype)
    for shift in range(8):
        logits = storage[shift:shift + 11 * (vocab + 9)].reshape(11, vocab + 9)[:, 1:vocab + 1]
        labels = torch.randint(0, vocab, (11,), device=DEVICE)
        labels[3] = -100
        labels[4], labels[5] = 0, vocab - 1
        check_against_reference(logits, labels)


@pytest.fixture
def fresh_fallbacks(monkeypatch):
    """Forget earlier refusals and warnings (module state), for a test of the fallback."""
    import alignlib.kernels.launch as launch_module

    monkeypatch.setattr(launch_module, "_refused", set())
    monkeypatch.setattr(launch_module, "_warned", set())
    return launch_module


@pytest.mark.parametrize("refuse", ["logprobs.fwd", "logprobs.bwd"])
def test_a_launch_refused_for_resources_falls_back_to_torch_with_one_warning(refuse, fresh_fallbacks, monkeypatch):
    from triton.runtime.errors import OutOfResources

    real_launch = fresh_fallbacks.launch

    def refusing(name, kernel, grid, *args, **kwargs):
        if name == refuse:
            raise OutOfResources(1 << 20, 232448, "shared memory")
        return real_launch(name, kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fresh_fallbacks, "launch", refusing)
    logits = torch.randn(4, 3, 70, device=DEVICE)
    labels = torch.randint(0, 70, (4, 3), device=DEVICE)
    labels[0] = -100
    with pytest.warns(RuntimeWarning, match=f"{refuse}.*could not launch") as caught:
        check_against_reference(logits, labels)
        check_against_reference(logits, labels)
    assert sum("could not launch" in str(w.message) for w in caught) == 1
