"""token_logprobs_lean: the torch path with a hand-written backward, against plain autograd.

Same values and gradients as `token_logprobs_torch` (autograd through logsumexp and gather),
and a backward that allocates no (N, V) temporaries beyond the gradient itself.
"""

import pytest
import torch
from alignlib.kernels.reference import TokenLogprobsFunction, token_logprobs_lean, token_logprobs_torch


def peak_memory_mib(fn, device):
    """benchmarks/harness.py's CPU peak measurement (loaded by path: `benchmarks` is not installed)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "harness.py"
    spec = importlib.util.spec_from_file_location("bench_harness_for_lean", path)
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # its dataclasses look themselves up there
    spec.loader.exec_module(harness)
    return harness.peak_memory_mib(fn, device)


def values_and_grads(fn, logits, labels):
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, labels)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * g).sum().backward()
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_elements", [TokenLogprobsFunction.BLOCK_ELEMENTS, 3 * 50])  # one block; 3 rows each
def test_lean_matches_autograd(dtype, block_elements, monkeypatch):
    monkeypatch.setattr(TokenLogprobsFunction, "BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, 50) * 4).to(dtype)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :4] = -100
    labels[2, -1] = -100
    out, grad = values_and_grads(token_logprobs_lean, logits, labels)
    ref_out, ref_grad = values_and_grads(token_logprobs_torch, logits, labels)
    assert out.dtype == ref_out.dtype and grad.dtype == dtype
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)  # the same forward
    grad_tol = {"rtol": 2**-7, "atol": 2**-8} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(grad.float(), ref_grad.float(), **grad_tol)
    assert bool((grad[labels == -100] == 0).all())


def test_lean_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 9))
    labels[1, 3] = -100
    assert torch.autograd.gradcheck(lambda x: token_logprobs_lean(x, labels), (logits,))


def test_lean_backward_holds_no_logits_sized_temporaries():
    """Peak resident memory of forward + backward, above what was allocated before: autograd keeps
    about two (N, V) float32 temporaries alive in backward; the lean path none beyond the gradient,
    which replaces the one freed at the start of each call."""
    torch.manual_seed(2)
    logits = torch.randn(1024, 8192, requires_grad=True)  # 32 MiB
    labels = torch.randint(0, 8192, (1024,))
    logits_mib = logits.numel() * 4 / 2**20

    def step(fn):
        def call():
            logits.grad = None
            fn(logits, labels).sum().backward()
        call()
        return peak_memory_mib(call, "cpu")

    autograd_peak, lean_peak = step(token_logprobs_torch), step(token_logprobs_lean)
    assert autograd_peak > 1.5 * logits_mib, autograd_peak  # the measurement sees the temporaries
    assert lean_peak < 0.5 * logits_mib, (lean_peak, autograd_peak)
