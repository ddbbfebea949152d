"""sdcli's errors, each with the exit status the CLI gives it, and how an exception is said in one line."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def error_line(exc: BaseException) -> str:
    """An exception as one short line for reports and messages: its type and the first line of its text."""
    return f"{type(exc).__name__}: {first_line(exc)}"[:300]


def plural(n: int, word: str) -> str:
    """`1 call`, `2 calls`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


class SdcliError(Exception):
    """Bad input or an impossible request: the CLI prints the message as one line and exits non-zero."""

    exit_code = 2
