"""sdcli: Stable Diffusion with the fastest attention kernel that is correct on this GPU.

The public API (see api.py and the README): `load`, `route`, `unroute`, `compile`, `doctor`, `compare` and `Plan`.
Importing the package is cheap on purpose: they load on first use, and torch and diffusers only inside them.
"""

__version__ = "0.1.0"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def plural(n: int, word: str) -> str:
    """`1 call`, `2 calls`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def error_line(exc: BaseException) -> str:
    """An exception as one short line for reports and messages: its type and the first line of its text."""
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


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
    import sys

    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in OUT_OF_MEMORY)


class SdcliError(Exception):
    """Bad input or an impossible request: the CLI prints the message as one line and exits non-zero."""

    exit_code = 2


API = ("load", "route", "unroute", "compile", "doctor", "compare", "Plan")
MODULE_AND_FUNCTION = ("doctor", "compare")  # modules whose package attribute is callable as the API function


def __getattr__(name: str):
    import importlib

    if name in MODULE_AND_FUNCTION:
        return importlib.import_module(f"sdcli.{name}")  # the module, which answers calls (callable_module)
    if name in API:
        return getattr(importlib.import_module("sdcli.api"), name)
    raise AttributeError(f"module 'sdcli' has no attribute {name!r}")


def callable_module(module_name: str, function_name: str) -> None:
    """`sdcli.doctor` and `sdcli.compare` are module names and API functions at once: the package attribute is
    the module (Python binds it so on import), and the module answers calls as the API function does."""
    import sys
    import types

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            from sdcli import api

            return getattr(api, function_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
