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


class UnknownBackend(SdcliError):
    """A backend name that no built-in or plug-in registered."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown attention backend {name!r}; known: {', '.join(known)}")
        self.name = name


class RoutingError(SdcliError):
    """A backend that can't serve a layer it was named for, or no backend that can. `remedy`: what to change, as
    the command line says it and as the Python API does; the message is the command line's."""

    exit_code = 1

    def __init__(self, message: str, remedy: tuple[str, str] | None = None):
        self.problem, self.remedy = message, remedy
        super().__init__(self.said_to("cli"))

    def said_to(self, who: str) -> str:
        """The message with its remedy in the words of `who`: "cli" (options) or "api" (parameters)."""
        return f"{self.problem}. {self.remedy[who == 'api']}" if self.remedy else self.problem


class RunFailed(SdcliError):
    """A run broke off; the message says where, and what was kept."""

    exit_code = 1


class CompareFailed(SdcliError):
    """`sdcli compare`: backends broke their bound or failed."""

    exit_code = 1

    def __init__(self, broken: list[str]):
        super().__init__(f"{plural(len(broken), 'backend')} broke {'its' if len(broken) == 1 else 'their'} bound "
                         f"or failed: {', '.join(broken)}")


class BadImages(SdcliError):
    """`sdcli generate` finished, but some images came out NaN or black (kept; `summary`: the run, as its JSON)."""

    exit_code = 3

    def __init__(self, problems: list[dict], summary: dict | None = None):
        super().__init__(f"{plural(len(problems), 'image')} came out NaN or black (kept, see above): "
                         f"{problems[0]['problem']}")
        self.summary = summary


class Said(SdcliError):
    """A run whose errors were said as they happened (each rank of a launched run says its own): only its exit
    status is left to give."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


class Interrupted(SdcliError):
    """Ctrl-C (or a time limit's SIGINT) during a run: the message says what was kept and how to go on, and is
    said as it is (an interruption is not an error)."""

    exit_code = 130
