"""enable_fused_lora on a tiny peft Llama: same loss and LoRA gradients as peft, and peft's own
forward wherever the fused math would differ (disabled or merged adapters, dropout, ...).

Without a GPU the kernel runs through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the model is tiny.
"""

import copy
import os

import bitsandbytes as bnb
import pytest
import torch
from helpers.tiny_llama import tiny_llama
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

import alignlib.fused_lora as fused_module
from alignlib.fused_lora import disable_fused_lora, enable_fused_lora, fused_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
)
ALL_LINEAR_PER_LAYER = 7  # q, k, v, o, gate, up, down


def tiny_peft_llama(target_modules="all-linear", lora_dropout=0.0, seed=0, dtype=torch.float32):
    model = tiny_llama(seed=seed, dtype=dtype, vocab_size=64, intermediate_size=48, max_position_embeddings=32,
                       pad_token_id=None)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=lora_dropout,
        init_lora_weights=False,  # lora_B random, not zero: the LoRA branch changes the output
    )
    return get_peft_model(model.to(DEVICE), lora)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the fused kernel (so a test can tell fused from fallen-back)."""
    calls = []
    kernel = fused_module.lora_linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fused_module, "lora_linear", counting)
    return calls


def loss_and_lora_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    return loss.detach(), grads


def input_ids(batch=2, length=6, seed=1):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_swap_counts_and_restore():
    model = tiny_peft_llama()
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2 * ALL_LINEAR_PER_LAYER
    assert enable_fused_lora(model) == 2 * ALL_LINEAR_PER_LAYER
    assert all(layer.forward.__func__ is fused_module._fused_forward for layer in layers)
    assert enable_fused_lora(model) == 0  # already swapped
    assert disable_fused_lora(model) == 2 * ALL_LINEAR_PER_LAYER
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert all(layer.forward.__func__ is LoraLinear.forward for layer in layers)
    assert disable_fused_lora(model) == 0
    assert enable_fused_lora(tiny_peft_llama(target_modules=["q_proj", "v_proj"])) == 2 * 2


def test_loss_and_lora_gradients_match_peft(kernel_calls):
    model = tiny_peft_llama().train()
    ids = input_ids()
    ref_loss, ref_grads = loss_and_lora_grads(model, ids)
    assert not kernel_calls
    with fused_lora(model) as swapped:
        assert swapped == 2 * ALL_LINEAR_PER_LAYER
        loss, grads = loss_and_lora_grads(model, ids)
    assert len(kernel_calls) == 2 * ALL_LINEAR_PER_LAYER  # every LoRA layer took the kernel
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * ALL_LINEAR_PER_LAYER
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in grads:
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_disable_adapter_inside_fused_mode_gives_the_base_model(kernel_calls):
    model = tiny_peft_llama().eval()
    ids = input_ids()
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        adapted_logits = model(input_ids=ids).logits
        with fused_lora(model):
            with model.disable_adapter():
                fused_base_logits = model(input_ids=ids).logits
            assert not kernel_calls
            fused_adapted_logits = model(input_ids=ids).logits
            assert len(kernel_calls) == 2 * ALL_LINEAR_PER_LAYER
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter matters here
    torch.testing.assert_close(fused_base_logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(fused_adapted_logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_dropout_in_training_falls_back_to_peft(kernel_calls):
    model = tiny_peft_llama(lora_dropout=0.3).train()
    ids = input_ids()
    torch.manual_seed(7)
    ref_loss, ref_grads = loss_and_lora_grads(model, ids)
    with fused_lora(model):
        torch.manual_seed(7)
        loss, grads = loss_and_lora_grads(model, ids)
        assert not kernel_calls
        model.eval()  # dropout off: the kernel is exact again
        with torch.no_grad():
            model(input_ids=ids)
        assert len(kernel_calls) == 2 * ALL_LINEAR_PER_LAYER
    assert loss == ref_loss
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_merged_multiple_adapters_and_unsupported_devices_fall_back(kernel_calls, monkeypatch):
    model = tiny_peft_llama(target_modules=["q_proj", "v_proj"]).eval()
    ids = input_ids()
    with torch.no_grad(), fused_lora(model):
        model.merge_adapter()
        model(input_ids=ids)
        model.unmerge_adapter()
        assert not kernel_calls
        second = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model.add_adapter("second", second)
        model.base_model.set_adapter(["default", "second"])
        enable_fused_lora(model)  # the new adapter lives in the same layers: nothing new to swap
        model(input_ids=ids)
        assert not kernel_calls
        model.base_model.set_adapter("default")
        # as on a CPU without the interpreter
        monkeypatch.setattr(fused_module, "triton_available_for", lambda tensor: False)
        model(input_ids=ids)
        assert not kernel_calls


def test_frozen_base_is_required_and_deepcopy_rebinds():
    model = tiny_peft_llama(target_modules=["q_proj"])
    enable_fused_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, device=DEVICE)
    layer.base_layer.weight.requires_grad_(True)  # the kernel would give W no gradient: peft's path
    assert fused_module._fusable_adapter(layer, x) is None
    layer.base_layer.weight.requires_grad_(False)
    assert fused_module._fusable_adapter(layer, x) == "default"
    clone = copy.deepcopy(model)
    clone_layer = clone.base_model.model.model.layers[0].self_attn.q_proj
    assert clone_layer.forward.__self__ is clone_layer
    assert getattr(clone_layer, fused_module._UNFUSED_FORWARD).__self__ is clone_layer
    assert disable_fused_lora(clone) == 2 and "forward" not in clone_layer.__dict__


class _Quantized(torch.nn.Module):
    """Two bitsandbytes 4-bit layers (quantised on .to(device)); nested absmax on the second.

    in_features 45 and 64: bitsandbytes 0.50's CPU dequantisation disagrees with its own
    quantiser when in_features is even but not a multiple of the 64 blocksize (e.g. 32),
    so the peft side of the comparison would be wrong on a CPU at such sizes.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = bnb.nn.Linear4bit(45, 64, bias=True, quant_type="nf4", compute_dtype=torch.float32)
        self.down = bnb.nn.Linear4bit(64, 45, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        for layer, nested in ((self.up, False), (self.down, True)):
            weight = torch.randn(layer.out_features, layer.in_features) / 6
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", compress_statistics=nested
            )
        self.to(DEVICE)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("peft_bnb_layer", [False, True])
def test_4bit_base_layers_fuse_and_match_peft(kernel_calls, peft_bnb_layer):
    base = _Quantized()
    base.is_loaded_in_4bit = peft_bnb_layer  # how peft picks its bitsandbytes LoRA layer class
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    model = get_peft_model(base, config)
    expected_class = fused_module.peft_lora_bnb.Linear4bit if peft_bnb_layer else LoraLinear
    assert type(model.base_model.model.up) is expected_class
    assert model.base_model.model.down.get_base_layer().weight.quant_state.nested
    x = torch.randn(3, 5, 45, device=DEVICE)

    def run():
        model.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_(True)
        y = model(x_leaf)
        (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).reshape(y.shape)).sum().backward()
        return [y, x_leaf.grad] + [p.grad for name, p in model.named_parameters() if "lora_" in name]

    expected = run()
    with fused_lora(model) as swapped:
        assert swapped == 2
        fused = run()
    assert len(kernel_calls) == 2 and len(fused) == 2 + 4
    for ours, theirs in zip(fused, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bf16_model_with_float32_adapters_uses_the_kernel(kernel_calls):
    model = tiny_peft_llama(dtype=torch.bfloat16)
    lora_dtypes = {p.dtype for name, p in model.named_parameters() if "lora_" in name}
    assert lora_dtypes == {torch.float32}  # peft's default upcast of the adapters
    ids = input_ids()
    exact_loss, exact_grads = loss_and_lora_grads(copy.deepcopy(model).double(), ids)
    peft_loss, peft_grads = loss_and_lora_grads(model, ids)
    with fused_lora(model):
        loss, grads = loss_and_lora_grads(model, ids)
    assert len(kernel_calls) == 2 * ALL_LINEAR_PER_LAYER
    assert all(grad.dtype == torch.float32 for grad in grads.values())
    # Both round to bf16, at different places (the fused layer casts the adapters to bf16 and
    # rounds once; peft rounds the base and LoRA outputs apart): each is compared with the
    # same model in float64, and the fused gradients must be about as close as peft's.
    assert abs(loss - exact_loss) < 1e-2

    def relative_errors(candidate):
        return torch.stack([(candidate[n].double() - g).norm() / g.norm() for n, g in exact_grads.items()])

    fused_errors, peft_errors = relative_errors(grads), relative_errors(peft_grads)
    assert peft_errors.max() < 0.1  # the float64 comparison itself is sound
    assert fused_errors.max() < 1.5 * peft_errors.max() and fused_errors.mean() < 1.5 * peft_errors.mean()


def test_gpus_before_sm80_keep_peft_forward(kernel_calls, monkeypatch):
    # On sm_7x (T4) Triton emits no tensor-core instructions for the LoRA GEMMs: peft's own forward
    # (cuBLAS, bitsandbytes) serves them (docs/kernels.md, "Which kernel each GPU gets").
    import alignlib.kernels.lora_tiles as kernel_tiles

    model = tiny_peft_llama(target_modules=["q_proj", "v_proj"]).eval()
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    monkeypatch.setattr(kernel_tiles, "capability", lambda tensor: (7, 5))
    with torch.no_grad(), fused_lora(model) as swapped:
        got = model(input_ids=ids).logits
    assert swapped == 2 * model.config.num_hidden_layers and not kernel_calls
    assert torch.equal(got, expected)
