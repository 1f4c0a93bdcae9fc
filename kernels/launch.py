"""Where every Triton kernel of alignlib is launched, and what the launch code knows of the GPU.

All kernels are started through `launch(name, kernel, grid, *args, **kwargs)`, which is
`kernel[grid](*args, **kwargs)`, so that one place can:

- record the launches instead of running them (`recording(capability, sm_count)`). The
  library's own entry points then run on meta tensors, at any shape, on a machine without a
  GPU, and every specialisation they would launch on that GPU is captured: its kernel, its
  arguments (from which Triton's own binder derives the signature and the specialisation),
  its grid and its launch options. `alignlib.kernels.targets` compiles each one for a named
  GPU and checks registers, spills, shared memory and tensor-core instructions. A launch that
  bypasses `launch` (`kernel[grid](...)` written directly) is recorded too, unnamed: the
  recording intercepts Triton's own `run` of every JIT (and interpreted) function.
- tell the launch code which GPU it plans for (`capability`, `multiprocessor_count`): the
  recording's target, else the tensor's CUDA device; None under the interpreter.
- recognise a launch the GPU refuses for lack of resources (`try_launch`, `out_of_resources`),
  so the callers fall back to the torch reference with one warning instead of ending a run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from triton.runtime.errors import OutOfResources


class Launch(NamedTuple):
    """One recorded launch: `kernel[grid](*args, **kwargs)`, which the launch code calls `name`."""

    name: str
    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recording:
    def __init__(self, capability: tuple[int, int], sm_count: int) -> None:
        self.capability = capability
        self.sm_count = sm_count
        self.launches: list[Launch] = []


_recording: _Recording | None = None


@contextlib.contextmanager
def recording(capability: tuple[int, int], sm_count: int = 132) -> Iterator[list[Launch]]:
    """Inside the block launches are recorded, not run, as the launch code plans them for a GPU of
    compute capability `capability` with `sm_count` multiprocessors; meta tensors are accepted
    as device tensors. Yields the list the launches are appended to."""
    global _recording
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    previous, _recording = _recording, _Recording(tuple(capability), sm_count)
    launches = _recording.launches

    def recorded_run(kernel, *args, grid, warmup=False, **kwargs):
        launches.append(Launch(getattr(kernel, "__name__", repr(kernel)), kernel, tuple(grid), args, dict(kwargs)))

    originals = {cls: cls.__dict__["run"] for cls in (JITFunction, InterpretedFunction)}
    try:
        for cls in originals:
            cls.run = recorded_run
        yield launches
    finally:
        for cls, run in originals.items():
            cls.run = run
        _recording = previous


def is_recording() -> bool:
    return _recording is not None


def launch(name: str, kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """kernel[grid](*args, **kwargs), or a record of it (called `name`) inside `recording`."""
    if _recording is not None:
        _recording.launches.append(Launch(name, kernel, tuple(grid), args, dict(kwargs)))
        return
    kernel[grid](*args, **kwargs)


def capability(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability the kernels are planned for: the recording's, the tensor's CUDA
    device's, or None (the interpreter on a CPU tensor)."""
    if _recording is not None:
        return _recording.capability
    if tensor.is_cuda:
        return torch.cuda.get_device_capability(tensor.device)
    return None


def multiprocessor_count(tensor: torch.Tensor) -> int:
    """Streaming multiprocessors of the GPU planned for (132 on an H100 SXM where unknown)."""
    if _recording is not None:
        return _recording.sm_count
    if tensor.is_cuda:
        return torch.cuda.get_device_properties(tensor.device).multi_processor_count
    return 132


def out_of_resources(error: BaseException) -> bool:
    """A launch refused for lack of shared memory, registers or threads (Triton's own check, or
    the driver's "too many resources requested for launch")."""
    if isinstance(error, OutOfResources):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "too many resources requested" in message or "out of resource" in message
    )


_warned: set[str] = set()
_refused: set[tuple] = set()


def _launch_key(name: str, args: tuple, kwargs: dict) -> tuple:
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    device = tensors[0].device if tensors else None
    return (name, device, tuple(t.dtype for t in tensors), tuple(sorted((k, str(v)) for k, v in kwargs.items())))


def try_launch(name: str, kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> bool:
    """`launch`, but a launch the GPU refuses for lack of resources returns False (after one warning
    per `name`) instead of raising, and the same launch (name, device, dtypes, constants) is not
    tried again: the caller computes the result with the torch reference instead."""
    key = _launch_key(name, args, kwargs)
    if key in _refused:
        return False
    try:
        launch(name, kernel, grid, *args, **kwargs)
    except Exception as error:
        if not out_of_resources(error):
            raise
        _refused.add(key)
        warn_fallback(name, error)
        return False
    return True


def warn_fallback(what: str, error: BaseException) -> None:
    """One warning per kind of launch that failed (`what`), naming the error and the fallback."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(
        f"alignlib: the Triton kernel for {what} could not launch on this GPU ({error}); the torch "
        "reference computes it instead from now on (same math, slower). Please report this with the GPU's name.",
        RuntimeWarning,
        stacklevel=3,
    )
