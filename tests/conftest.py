"""Shared pytest set-up: the Triton interpreter on GPU-less machines, and hypothesis profiles
sized for a 2-core CI machine."""

import os
import shutil

# Triton reads TRITON_INTERPRET when it is imported, so this must run before anything
# imports triton (alignlib.logprobs does). Without a GPU, the kernels then run on the CPU
# through the interpreter; on a GPU machine they compile as usual.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tests of tiny models: as fast alone, and far faster than two
    threads contending on a busy 2-core machine. Use with pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
