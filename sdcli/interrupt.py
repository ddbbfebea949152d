"""Ctrl-C that answers at once, even inside one long torch operation.

Python raises KeyboardInterrupt only between bytecodes, so a single long kernel (one huge attention call on a
CPU) holds Ctrl-C for as long as it runs: minutes. `install()` (the `sdcli` command does it; the Python API
leaves the caller's signals alone) lets a watcher thread hear SIGINT the moment it arrives, through
`signal.set_wakeup_fd`. When the main thread takes the interrupt within GRACE seconds, the command stops as it
always did and says what it kept. When it doesn't, it is inside such an operation. A command that registered
its last word (`on_force`: generate, whose images are on disk already; bench, which saves its rows from here)
gets it said, and the process ends with status 130. Any other command (compare, doctor --probe) saves what it
finished when the operation ends, so the watcher says so at once, and a second Ctrl-C quits without waiting.
Images are written whole or not at all, so nothing half-written is left.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

GRACE = 3.0  # seconds the main thread gets to take a Ctrl-C before the watcher steps in

_taken = threading.Event()
_last_words = None  # () -> text: what the running command kept, and how to go on


def on_force(last_words) -> None:
    """What to do and say if a Ctrl-C has to end the process without the main thread: `last_words()` returns the
    text (and may save what the command has). None: the command saves what it finished once the operation ends,
    so a Ctrl-C waits for that (saying so) unless pressed again."""
    global _last_words
    _last_words = last_words


def install() -> None:
    """Watch for Ctrl-C (main thread only; once per process)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is _take:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)  # the C-level handler writes the signal's number here at once
    signal.signal(signal.SIGINT, _take)
    threading.Thread(target=_watch, args=(read,), name="sdcli-ctrl-c", daemon=True).start()


def _take(signum, frame):
    """Python's own behaviour (KeyboardInterrupt), and a sign for the watcher that the main thread has it."""
    _taken.set()
    raise KeyboardInterrupt


def _watch(fd: int) -> None:
    waiting = False  # a Ctrl-C is waiting for a long operation to end
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if signal.SIGINT not in data:
            continue
        if waiting:  # Ctrl-C again: the user won't wait
            _quit("stopped without waiting for it, as asked (a second Ctrl-C); what was not saved yet is lost")
        if _taken.wait(GRACE):
            _taken.clear()  # the main thread has it: the command stops and says what it kept
            continue
        if _last_words is None:  # this command saves what it finished only once the operation ends: let it
            waiting = True
            _say("interrupted inside a long torch operation, which can't stop half-way: what was finished is saved "
                 "when it ends; Ctrl-C again quits now without saving")
            continue
        try:
            said = _last_words()
        except Exception as exc:  # the last word must not keep the process alive
            said = f"({type(exc).__name__} while saving: {exc})"
        _quit(f"stopped without waiting for it{'; ' + said if said else ''}")


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _quit(why: str) -> None:
    _say(f"interrupted inside a long torch operation, which can't stop half-way: {why}")
    os._exit(130)
