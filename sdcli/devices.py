"""Devices: their names (`--device`), the memory a run holds and gives back, and a full device told apart from a
kernel's fault.

Nothing here imports torch at module level: the CLI checks `--device` before torch loads.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from sdcli.errors import SdcliError

NAME = re.compile(r"cpu|cuda(?::(\d+))?")


def parse(text: str | None, auto: bool = True) -> str | None:
    """--device as given: cpu, cuda or cuda:N (and None or auto where the command picks one), else one line."""
    if text is None or (auto and text == "auto") or NAME.fullmatch(text):
        return text
    raise SdcliError(f"--device must be {'auto, ' if auto else ''}cpu, cuda or cuda:N, not {text!r}")


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def gpu_index(device: str | None) -> int | None:
    """cuda:N -> N, cuda -> 0; None for the CPU, auto or none given."""
    match = NAME.fullmatch(device or "")
    return int(match.group(1) or 0) if match and is_cuda(device) else None


def choose(report: dict, device: str | None) -> str:
    """The device a run uses: `auto` (or none) is the first GPU torch can use, else the CPU; a GPU asked for must
    be one torch can use (a hardware report says which)."""
    torch = report.get("torch", {})
    if device in (None, "auto"):
        return "cuda:0" if torch.get("cuda_available") else "cpu"
    if parse(device) == "cpu":
        return device
    if not torch.get("cuda_available"):
        raise SdcliError(f"--device {device}: torch sees no usable CUDA GPU here (see sdcli doctor)")
    index, count = gpu_index(device), torch.get("device_count") or 0
    if index >= count:
        raise SdcliError(f"--device {device}: there are only {count} GPUs (cuda:0..cuda:{count - 1})")
    return f"cuda:{index}"


def in_report(device: str | None, report: dict) -> None:
    """A cuda:N that the machine (or a saved report) has: judging a GPU that isn't there would judge nothing."""
    index = gpu_index(device)
    have = [g["index"] for g in report.get("gpus") or []]
    if index is not None and index not in have:
        raise SdcliError(f"--device {device}: there is no GPU {index} (GPUs: {', '.join(map(str, have)) or 'none'})")


# ----- memory ---------------------------------------------------------------------------------------------------

# What the allocators say when memory runs out, besides torch.OutOfMemoryError (the CUDA caching allocator's):
# cuBLAS, cuSPARSE and cuSOLVER ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
# torch's TORCH_CUDABLAS_CHECK), cuDNN ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", AT_CUDNN_CHECK; cuDNN 9 also
# has CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED), a CUDA runtime call ("CUDA error: out of memory") and
# the CPU allocator ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... bytes", or "not enough
# memory" on Windows), all RuntimeErrors, read in torch's ATen/cuda/Exceptions.h and c10's alloc_cpu.cpp.
OUT_OF_MEMORY = ("STATUS_ALLOC_FAILED", "ALLOCATION_FAILED", "CUDA error: out of memory",
                 "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says memory ran out (on the GPU or the CPU), rather than that a kernel is at fault: the one
    test every command uses to treat a full device as "doesn't fit" instead of as a failure."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in OUT_OF_MEMORY)


def release_memory() -> None:
    """Give back what a failed or finished attempt held (after an out-of-memory, before the next try)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def recovered(exc: BaseException) -> bool:
    """The out-of-memory guard: True when `exc` says memory ran out, after giving the memory back (the caller
    carries on: "doesn't fit"); False for any other failure (the caller raises it or reports it)."""
    if not out_of_memory(exc):
        return False
    release_memory()
    return True


@dataclass
class Peak:
    gb: float | None = None  # None on the CPU


@contextmanager
def peak_memory(device: str, above_start: bool = False):
    """`with peak_memory(device) as peak: ...`, then `peak.gb`: the most GPU memory `device` held during the block
    (with `above_start`, beyond what it held when the block began). torch's peak of allocated memory, plus what
    CUDA graphs hold in their private pools beyond their live tensors: a graph's memory is reserved when it is
    captured and reused by every replay without passing through the allocator, so the allocated peak alone
    under-reports a reduce-overhead run by about the graphs' working memory."""
    peak = Peak()
    if not is_cuda(device):
        yield peak
        return
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device) if above_start else 0
    yield peak
    peak.gb = round((torch.cuda.max_memory_allocated(device) + graph_pools(device) - start) / 2**30, 3)


def graph_pools(device: str) -> int:
    """Bytes CUDA graphs' private pools on `device` hold beyond their live blocks."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    try:
        segments = torch.cuda.memory_snapshot(include_traces=False)
    except TypeError:  # a torch without the argument
        segments = torch.cuda.memory_snapshot()
    return sum(seg["total_size"] - seg["allocated_size"] for seg in segments
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id") or (0, 0)) != (0, 0))
