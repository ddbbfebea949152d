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
