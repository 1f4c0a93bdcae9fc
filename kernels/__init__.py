"""alignlib.kernels: fused Triton kernels (installed from the top-level kernels/ folder).

The kernels (token log-probs, fused linear log-probs, LoRA matmul) are the subject of
the kernels issue; until they land this package exports nothing, and
alignlib.logprobs uses its torch reference everywhere.
"""

__all__: list[str] = []
