"""Devices: the memory a run holds, given back, and a full device told apart from a kernel's fault.

Nothing here imports torch at module level: it is read where torch is already loaded.
"""

from __future__ import annotations

import sys

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
