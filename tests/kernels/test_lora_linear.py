"""The fused LoRA linear kernel against its torch reference and against peft's LoRA Linear.

Forward y = x W^T + s (x A^T) B^T (+ bias) and the gradients for x, lora_A, lora_B (and
bias). On a machine without a GPU these run through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported), at small sizes.
"""

import os
import subprocess
import sys
import textwrap

import alignlib.kernels.lora as kernel_module
import alignlib.kernels.lora_tiles as tiles_module
import bitsandbytes as bnb
import pytest
import torch
from alignlib.kernels.lora import lora_linear
from alignlib.kernels.reference import lora_linear_torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
# Errors are measured element by element against a float64 evaluation of the same rounded
# inputs, relative to the sum of the absolute values of the terms each entry adds up
# (the float64 math run on |inputs|): the classic bound for a dot product, which stays
# meaningful where terms cancel. fp32 accumulates in fp32. bf16 also rounds the thin
# (M, r) factors s x A^T (and s g B in backward) and the result to 8 bits.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2**-9, torch.bfloat16: 2**-7}


def make_inputs(lead, k, n, r, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)

    return {
        "x": draw(*lead, k),
        "weight": draw(n, k, scale=k**-0.5),
        "lora_A": draw(r, k, scale=k**-0.5),
        "lora_B": draw(n, r, scale=r**-0.5),  # nonzero, so the LoRA branch matters
        "bias": draw(n) if bias else None,
    }


def forward_backward(fn, inputs, scaling, *, to=None, magnitude=False):
    """y and the gradients of sum(y * fixed weights) for x, lora_A, lora_B, bias (in dtype `to` if given).

    magnitude=True runs on |inputs|, |scaling| and |weights|: every entry is then the sum of
    the absolute values of the terms of the same entry (the scale of its round-off).
    """
    dtype = inputs["x"].dtype
    leaves = {}
    for name, tensor in inputs.items():
        if tensor is None or hasattr(tensor, "quant_state"):  # absent, or a 4-bit weight
            leaves[name] = tensor
            continue
        tensor = tensor.detach().clone().to(to or dtype)
        leaves[name] = (tensor.abs() if magnitude else tensor).requires_grad_(name != "weight")
    scaling = abs(scaling) if magnitude else scaling
    y = fn(leaves["x"], leaves["weight"], leaves["lora_A"], leaves["lora_B"], scaling, leaves["bias"])
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(dtype).to(y.dtype)
    (y * (weights.abs() if magnitude else weights)).sum().backward()
    differentiable = ("x", "lora_A", "lora_B", "bias")
    grads = {name: leaves[name].grad for name in differentiable if leaves[name] is not None}
    return y, grads


def assert_close_rel(actual, expected, magnitude, dtype, what):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    excess = (actual.double() - expected).abs() - REL_TOL[dtype] * magnitude - 1e-12
    assert not bool((excess > 0).any()), f"{what}: off by up to {excess.max().item():.3g} beyond the bound"


def check_against_reference(inputs, scaling, dense_weight=None):
    """The kernel against float64 math on the same inputs (dense_weight: a 4-bit weight's values)."""
    dtype = inputs["x"].dtype
    y, grads = forward_backward(lora_linear, inputs, scaling)
    dense = inputs if dense_weight is None else {**inputs, "weight": dense_weight}
    exact_y, exact_grads = forward_backward(lora_linear_torch, dense, scaling, to=torch.float64)
    size_y, size_grads = forward_backward(lora_linear_torch, dense, scaling, to=torch.float64, magnitude=True)
    assert_close_rel(y, exact_y, size_y, dtype, "y")
    assert grads.keys() == exact_grads.keys()
    for name in grads:
        assert_close_rel(grads[name], exact_grads[name], size_grads[name], dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lead, k, n, r",
    [
        ((37,), 45, 29, 1),  # nothing a multiple of the 16-wide interpreter tiles
        ((50,), 70, 33, 8),  # several K tiles, dA/dB split over the 50 tokens
        ((2, 3), 20, 17, 8),  # leading dims
        ((9,), 24, 40, 128),  # the largest rank: r spans several K2 tiles
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_odd_sizes_against_reference(lead, k, n, r, dtype, bias):
    check_against_reference(make_inputs(lead, k, n, r, dtype, bias=bias), scaling=1.75)


@settings(max_examples=8)
@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=2).map(tuple),
    k=st.integers(1, 60),
    n=st.integers(1, 40),
    r=st.sampled_from([1, 2, 5, 16, 33]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    scaling=st.sampled_from([0.5, 2.0, -1.0]),
    config=st.sampled_from([
        tiles_module.TileConfig(16, 16, 16, 1, 1),
        tiles_module.TileConfig(32, 16, 32, 1, 1),
    ]),
    seed=st.integers(0, 1000),
)
def test_matches_reference_for_drawn_shapes(lead, k, n, r, dtype, bias, scaling, config, seed):
    old = tiles_module.INTERPRETER_CONFIG
    tiles_module.INTERPRETER_CONFIG = config
    try:
        check_against_reference(make_inputs(lead, k, n, r, dtype, bias=bias, seed=seed), scaling)
    finally:
        tiles_module.INTERPRETER_CONFIG = old


@pytest.mark.parametrize(
    "quant_type, nested, dtype",
    [
        ("nf4", False, torch.float32),
        ("nf4", True, torch.float32),
        ("nf4", True, torch.bfloat16),
        ("nf4", False, torch.bfloat16),
        ("fp4", True, torch.float32),
    ],
)
def test_4bit_weight_against_its_dequantised_values(quant_type, nested, dtype):
    # 29 x 64 weights, whole absmax blocks per row: bf16 reads the packed weight in the kernel, fp32
    # (TF32 off) dequantises it first; the odd sizes of test_4bit_weight_dequantised_first cover the rest
    inputs = make_inputs((2, 7), 64, 29, 4, dtype)
    weight = torch.randn(29, 64, generator=torch.Generator().manual_seed(3))
    quantized = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type=quant_type, compress_statistics=nested
    )
    quantized = quantized.to(DEVICE)  # quantises
    assert quantized.quant_state.nested == nested and quantized.quant_state.blocksize == 64
    dense = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
    assert (dense - weight.to(DEVICE)).abs().max() > 1e-3  # really 4-bit: not the float weight
    # The kernel dequantises to the compute dtype, as bitsandbytes does: so does the reference.
    check_against_reference({**inputs, "weight": quantized}, 1.5, dense_weight=dense.to(dtype))


def test_float16_and_float64():
    check_against_reference(make_inputs((13,), 30, 21, 4, torch.float16), scaling=0.5)
    inputs = make_inputs((5,), 12, 7, 2, torch.float64)  # float64 takes the torch reference
    y, grads = forward_backward(lora_linear, inputs, 0.5)
    ref_y, ref_grads = forward_backward(lora_linear_torch, inputs, 0.5)
    torch.testing.assert_close(y, ref_y)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name])


def test_zero_scaling_is_the_base_layer_and_gives_lora_no_gradient():
    inputs = make_inputs((11,), 18, 19, 3, torch.float32)
    y, grads = forward_backward(lora_linear, inputs, 0.0)
    base = torch.nn.functional.linear(inputs["x"], inputs["weight"], inputs["bias"])
    torch.testing.assert_close(y, base, rtol=1e-5, atol=1e-6)
    assert bool((grads["lora_A"] == 0).all()) and bool((grads["lora_B"] == 0).all())


def test_frozen_bias_and_strided_views():
    inputs = make_inputs((6,), 40, 20, 4, torch.float32)
    x = torch.randn(6, 80, device=DEVICE)[:, ::2]  # x with a column stride of 2
    weight = inputs["weight"].t().contiguous().t()  # (out, in) stored in-major
    bias = inputs["bias"]  # does not require grad: no gradient, and no error
    lora_A = inputs["lora_A"].clone().requires_grad_(True)
    y = lora_linear(x, weight, lora_A, inputs["lora_B"], 2.0, bias)
    y.sum().backward()
    torch.testing.assert_close(y, lora_linear_torch(x, weight, inputs["lora_A"], inputs["lora_B"], 2.0, bias))
    assert bias.grad is None and weight.grad is None and lora_A.grad is not None


def test_empty_batch():
    inputs = make_inputs((0,), 16, 8, 2, torch.float32)
    y, grads = forward_backward(lora_linear, inputs, 1.0)
    assert y.shape == (0, 8)
    assert bool((grads["lora_A"] == 0).all()) and bool((grads["lora_B"] == 0).all())


class _OneLinear(torch.nn.Module):
    def __init__(self, k, n, bias):
        super().__init__()
        self.proj = torch.nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_lora_linear(dtype, bias):
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=12, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False
    )
    model = get_peft_model(_OneLinear(27, 35, bias), config).to(DEVICE, dtype)
    layer = model.base_model.model.proj
    scaling = layer.scaling["default"]
    assert scaling == 12 / 8
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 3, 27, device=DEVICE).to(dtype)

    def through_peft(x_leaf):
        return model(x_leaf)

    def through_kernel(x_leaf):
        base = layer.base_layer
        return lora_linear(x_leaf, base.weight, lora_A, lora_B, scaling, base.bias)

    results = {}
    for name, fn in (("peft", through_peft), ("kernel", through_kernel)):
        model.zero_grad()
        x_leaf = x.clone().requires_grad_(True)
        y = fn(x_leaf)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape).to(dtype)).sum().backward()
        results[name] = (y, x_leaf.grad, lora_A.grad.clone(), lora_B.grad.clone())
    assert layer.base_layer.weight.grad is None
    peft_rel = {torch.float32: 2e-6, torch.bfloat16: 2**-5}[dtype]  # both sides round in bf16
    names = ("y", "dx", "dlora_A", "dlora_B")
    for what, ours, theirs in zip(names, results["kernel"], results["peft"], strict=True):
        err = (ours.double() - theirs.double()).abs().max().item()
        assert ours.dtype == theirs.dtype == dtype
        assert err <= peft_rel * theirs.abs().max().item(), f"{what}: {err:.3g}"


def test_errors():
    inputs = make_inputs((4,), 8, 6, 2, torch.float32)
    x, w, a, b, bias = (inputs[name] for name in ("x", "weight", "lora_A", "lora_B", "bias"))
    cases = [
        ((x[:, :7], w, a, b, 1.0, bias), "x .* and weight .* disagree"),
        ((x, w, a[:, :7], b, 1.0, bias), "lora_A must have shape"),
        ((x, w, a, b[:, :1], 1.0, bias), "lora_B must have shape"),
        ((x, w, a, b, 1.0, bias[:5]), "bias must have shape"),
        ((x, w[0], a, b, 1.0, bias), "weight must be 2-D"),
        ((x, w, a, b, float("nan"), bias), "scaling must be a finite"),
        ((x, w, a, b, torch.tensor(1.0), bias), "scaling must be a finite"),
        ((x, w, a.bfloat16(), b, 1.0, bias), "lora_A has dtype torch.bfloat16 but x has torch.float32"),
        ((x.int(), w, a, b, 1.0, bias), "x must be one of float32, bfloat16, float16, float64"),
        ((x, w.clone().requires_grad_(True), a, b, 1.0, bias), "weight requires grad"),
    ]
    quantized = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4").to(DEVICE)
    cases += [
        ((x.double(), quantized, a.double(), b.double(), 1.0), "with a 4-bit weight"),
        ((x, quantized, a[:, :5], b, 1.0), "lora_A must have shape"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            lora_linear(*args)


def test_cpu_without_interpreter_raises_runtime_error(tmp_path):
    script = textwrap.dedent(
        """
        import torch
        from alignlib.kernels.lora import lora_linear
        x, w, a, b = torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1)
        try:
            lora_linear(x, w, a, b, 1.0)
        except RuntimeError as error:
            print("RuntimeError:", error)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeError:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def quantize(n, k, quant_type="nf4", nested=False, seed=3):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    quantized = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=nested)
    return quantized.to(DEVICE)  # quantises


@pytest.fixture
def launched(monkeypatch):
    """The keyword constants of every LoRA launch (so a test can tell which path ran)."""
    calls = []
    real = kernel_module.try_launch

    def spy(name, kernel, grid, *args, **kwargs):
        calls.append((name, kwargs))
        return real(name, kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kernel_module, "try_launch", spy)
    return calls


@pytest.mark.parametrize("quant_type, nested", [("nf4", False), ("nf4", True), ("fp4", True)])
@pytest.mark.parametrize("config", [tiles_module.TileConfig(16, 16, 16, 1, 1), tiles_module.TileConfig(16, 64, 64, 1, 1)])
def test_4bit_weight_read_packed_by_the_kernel(quant_type, nested, config, launched, monkeypatch):
    # in_features 128: whole quantisation blocks per row, so y reads the packed weight with W^T's
    # in-features along its K tiles and dx with W's in-features along its N tiles, each tile
    # within one 64-wide block (one absmax per tile row or column), tiles of 16 and of 64. bf16, the
    # QLoRA compute dtype (fp32 with TF32 off dequantises first: see the next test).
    monkeypatch.setattr(tiles_module, "INTERPRETER_CONFIG", config)
    dtype = torch.bfloat16
    inputs = make_inputs((3, 7), 128, 40, 4, dtype)
    quantized = quantize(40, 128, quant_type, nested)
    dense = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
    check_against_reference({**inputs, "weight": quantized}, 1.5, dense_weight=dense.to(dtype))
    axes = {name: kwargs["QUANT_AXIS"] for name, kwargs in launched if kwargs["B1_4BIT"]}
    assert axes == {"lora.y": 0, "lora.dx": 1}
    assert all(kwargs["NESTED"] == nested for _, kwargs in launched if kwargs["B1_4BIT"])


@pytest.mark.parametrize("k, dtype", [(45, torch.bfloat16), (64, torch.float32)])
def test_4bit_weight_dequantised_first(k, dtype, launched):
    # 45 in-features: quantisation blocks straddle rows; fp32 with TF32 off (torch's default): the
    # dot is an FMA loop, which runs out of registers with the dequantisation in it (finding 2).
    inputs = make_inputs((5,), k, 29, 4, dtype)
    quantized = quantize(29, k, nested=True)
    dense = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
    check_against_reference({**inputs, "weight": quantized}, 1.5, dense_weight=dense.to(dtype))
    assert launched and not any(kwargs["B1_4BIT"] for _, kwargs in launched)


@pytest.mark.parametrize("shape", [(29, 45), (40, 128), (3, 5)])
@pytest.mark.parametrize("quant_type, nested", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_dequantize_4bit_torch_matches_bitsandbytes(shape, quant_type, nested):
    quantized = quantize(*shape, quant_type, nested)
    expected = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
    weight = kernel_module.as_weight_4bit(quantized)
    for chunk in (128, 1 << 24):  # several chunks, and one
        dense = reference_dequantize(weight, chunk)
        torch.testing.assert_close(dense, expected, rtol=0, atol=0)
    assert weight.dense(torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(weight.t().dense(torch.float32), expected.t(), rtol=0, atol=0)


def reference_dequantize(weight, chunk):
    from alignlib.kernels.reference import dequantize_4bit_torch

    return dequantize_4bit_torch(weight.packed, weight.absmax, weight.code, weight.blocksize, weight.shape,
                                 torch.float32, absmax2=weight.absmax2, code2=weight.code2,
                                 blocksize2=weight.blocksize2, offset=weight.offset, chunk=chunk)


@pytest.fixture
def fresh_fallbacks(monkeypatch):
    """Forget earlier refusals and warnings (module state), for a test of the fallback."""
    import alignlib.kernels.launch as launch_module

    monkeypatch.setattr(launch_module, "_refused", set())
    monkeypatch.setattr(launch_module, "_warned", set())
    return launch_module


def test_a_launch_refused_for_resources_falls_back_to_torch_with_one_warning(fresh_fallbacks, monkeypatch):
    from triton.runtime.errors import OutOfResources

    refused = []
    real_launch = fresh_fallbacks.launch

    def out_of_shared_memory(name, kernel, grid, *args, **kwargs):
        if name in ("lora.y", "lora.dx"):
            refused.append(name)
            raise OutOfResources(262144, 232448, "shared memory")
        return real_launch(name, kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fresh_fallbacks, "launch", out_of_shared_memory)
    inputs = make_inputs((9,), 40, 24, 4, torch.float32)
    with pytest.warns(RuntimeWarning, match="could not launch") as caught:
        for _ in range(2):  # a second step: no new warning, no second attempt
            check_against_reference(inputs, 1.25)
    messages = [str(w.message) for w in caught if "could not launch" in str(w.message)]
    assert len(messages) == 2 and any("lora.y" in m for m in messages) and any("lora.dx" in m for m in messages)
    assert sorted(refused) == ["lora.dx", "lora.y"]
    with pytest.raises(RuntimeError, match="unrelated"):  # any other error is not swallowed
        monkeypatch.setattr(fresh_fallbacks, "launch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("unrelated")))
        lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], 1.0)


@pytest.mark.parametrize("quantized", [False, True])
def test_gpus_before_sm80_take_the_torch_path(quantized, launched, monkeypatch):
    monkeypatch.setattr(tiles_module, "capability", lambda tensor: (7, 5))  # a T4
    inputs = make_inputs((6,), 64, 20, 4, torch.float32)
    weight = quantize(20, 64) if quantized else inputs["weight"]
    dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float() if quantized else weight
    y = lora_linear(inputs["x"], weight, inputs["lora_A"], inputs["lora_B"], 2.0, inputs["bias"])
    expected = lora_linear_torch(inputs["x"], dense, inputs["lora_A"], inputs["lora_B"], 2.0, inputs["bias"])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert not launched


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
def test_tf32_detection_with_both_torch_apis():
    # finding 5: torch.backends.cuda.matmul.allow_tf32 raises a RuntimeError once the new
    # fp32_precision API has been used (transformers' tf32=True does); lora_linear must not.
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    inputs = make_inputs((4,), 16, 8, 2, torch.float32)
    try:
        matmul.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            _ = matmul.allow_tf32  # what the old code read
        assert tiles_module.tf32_enabled() is True
        y = lora_linear(inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], 1.0)
        assert y.shape == (4, 8)
        matmul.fp32_precision = "ieee"
        assert tiles_module.tf32_enabled() is False
        matmul.fp32_precision = "none"
        matmul.allow_tf32 = True  # the legacy API alone
        assert tiles_module.tf32_enabled() is True
        matmul.allow_tf32 = False
        assert tiles_module.tf32_enabled() is False
    finally:
        matmul.fp32_precision = before
