"""sdcli: Stable Diffusion with the fastest attention kernel that is correct on this GPU.

Importing the package is cheap on purpose: torch and diffusers load only in the modules that need them.
"""

__version__ = "0.1.0"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def error_line(exc: BaseException) -> str:
    """An exception as one short line for reports and messages: its type and the first line of its text."""
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


class SdcliError(Exception):
    """Bad input or an impossible request: the CLI prints the message as one line and exits non-zero."""

    exit_code = 2
