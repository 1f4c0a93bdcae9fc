"""The kernels at the sizes the library runs them at, compiled for the GPU at hand (skipped without one).

What the compile test (test_compile_targets.py) predicts from the compiled code, checked on the
device: each specialisation launches (no fallback warning: a refused launch would warn and run
torch) and agrees with the torch reference. LoRA M = 2048 tokens, K = N = 4096, r = 16, dense
bf16, NF4 and nested NF4, fp32 with TF32 on and off; log-probs V = 50257 and 128256 over 4096 rows.
scripts/gpu_check.sh runs this first.
"""

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture
def no_fallback():
    """Fails the test if any kernel launch fell back to torch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "could not launch" in str(w.message)]
    assert not fallbacks, fallbacks


def lora_case(dtype, weight_kind, m=2048, k=4096, n=4096, r=16):
    from alignlib.kernels.lora import as_weight_4bit

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    dense = torch.randn(n, k, device="cuda", generator=g) / k**0.5
    if weight_kind == "dense":
        weight = dense.to(dtype)
        reference_weight = weight
    else:
        import bitsandbytes as bnb

        weight = bnb.nn.Params4bit(dense.cpu(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=weight_kind == "nf4-nested", quant_storage=torch.uint8)
        weight = weight.cuda()  # quantises
        reference_weight = as_weight_4bit(weight).dense(dtype)
    lora_A = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).to(dtype)
    lora_B = (torch.randn(n, r, device="cuda", generator=g) / r**0.5).to(dtype)
    return x, weight, reference_weight, lora_A, lora_B


@pytest.mark.parametrize("dtype, tf32", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True),
                                         (torch.float32, False)])
@pytest.mark.parametrize("weight_kind", ["dense", "nf4", "nf4-nested"])
def test_lora_linear_at_real_sizes(dtype, tf32, weight_kind, no_fallback):
    from alignlib.kernels import lora_linear, lora_linear_torch

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        x, weight, reference_weight, lora_A, lora_B = lora_case(dtype, weight_kind)
        results = []
        for fn, w in ((lora_linear, weight), (lora_linear_torch, reference_weight.float())):
            xs, a, b = (t.detach().float().requires_grad_(True) if fn is lora_linear_torch
                        else t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
            y = fn(xs, w, a, b, 2.0)
            (y.float() * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
            torch.cuda.synchronize()
            results.append((y, xs.grad, a.grad, b.grad))
    finally:
        matmul.fp32_precision = before
    bound = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 4e-3 if tf32 else 1e-5}[dtype]
    for name, ours, exact in zip(("y", "dx", "dA", "dB"), *results, strict=True):
        assert ours.dtype == dtype
        assert relative_error(ours, exact) < bound, name


@pytest.mark.parametrize("vocab", [50257, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_logprobs_at_real_sizes(vocab, dtype, no_fallback):
    from alignlib.kernels import token_logprobs, token_logprobs_torch

    logits = (3 * torch.randn(4096, vocab, device="cuda")).to(dtype)
    labels = torch.randint(0, vocab, (4096,), device="cuda")
    labels[::7] = -100
    results = []
    for fn in (token_logprobs, token_logprobs_torch):
        leaf = logits.detach().requires_grad_(True)
        out = fn(leaf, labels)
        out.sum().backward()
        results.append((out, leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=2e-4)
    assert relative_error(results[0][1], results[1][1]) < {torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
