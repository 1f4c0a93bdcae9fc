"""alignlib.kernels: fused Triton kernels (installed from the top-level kernels/ folder).

Each kernel sits beside a torch reference of the same math (`reference.py`):

- token_logprobs(logits, labels, ignore_index=IGNORE_INDEX): log softmax(logits)[labels] in one
  pass over the vocabulary (online logsumexp), backward g * (onehot - softmax).

The kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before triton was imported (how the tests check them without a GPU). alignlib.logprobs
picks them on CUDA and the torch reference elsewhere.

- linear_token_logprobs(hidden, lm_head_weight, labels, ignore_index=IGNORE_INDEX, chunk_size=None):
  the same from the last hidden states and the lm_head weight, chunked over tokens so the
  (tokens x V) logits never exist in full; float32 weight-gradient accumulation.
- lora_linear(x, weight, lora_A, lora_B, scaling, bias=None): x W^T + s (x A^T) B^T as one
  GEMM over an extended K (W frozen; dX, dA, dB in backward); W may be a bitsandbytes NF4/FP4
  Params4bit, dequantised tile by tile inside the kernel.

Every launch goes through `launch` (recording, the GPU planned for, the torch fallback when a GPU
refuses a launch for lack of resources); `python -m alignlib.kernels.targets` compiles every launch
for sm_75/80/86/90 without a GPU and checks it (docs/kernels.md).
"""

from .reference import IGNORE_INDEX, linear_token_logprobs_torch, lora_linear_torch, token_logprobs_torch

try:  # triton is a Linux-only dependency; the references work without it
    from .logprobs import linear_token_logprobs, token_logprobs
    from .lora import lora_linear
except ImportError:  # pragma: no cover
    token_logprobs = linear_token_logprobs = lora_linear = None

__all__ = [
    "IGNORE_INDEX",
    "linear_token_logprobs",
    "linear_token_logprobs_torch",
    "lora_linear",
    "lora_linear_torch",
    "token_logprobs",
    "token_logprobs_torch",
]
