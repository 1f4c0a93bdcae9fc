"""alignlib.kernels: fused Triton kernels (installed from the top-level kernels/ folder).

Each kernel sits beside a torch reference of the same math (`reference.py`):

- token_logprobs(logits, labels, ignore_index=-100): log softmax(logits)[labels] in one
  pass over the vocabulary (online logsumexp), backward g * (onehot - softmax).

The kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before triton was imported (how the tests check them without a GPU). alignlib.logprobs
picks them on CUDA and the torch reference elsewhere. Still to come (kernels issue):
linear_token_logprobs (fused lm_head) and lora_linear.
"""

from .reference import token_logprobs_torch

try:  # triton is a Linux-only dependency; the references work without it
    from .logprobs import token_logprobs
except ImportError:  # pragma: no cover
    token_logprobs = None

__all__ = ["token_logprobs", "token_logprobs_torch"]
