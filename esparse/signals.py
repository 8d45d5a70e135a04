"""The process's signal policy: SIGINT and SIGTERM unwind the stack (KeyboardInterrupt, SystemExit(128 + n)), so
every temporary output folder is removed on the way out, except inside the few file operations that must not be
cut in half (creating and recording a temporary folder, swapping a finished one in), which hold the signal until
they end. The command line installs it; library callers keep their own handlers."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

_deferring = 0  # depth of signals_deferred blocks now running
_pending: int | None = None  # a signal that came during one


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def on_signal(signum: int, _frame) -> None:
    """SIGINT/SIGTERM handler of the command line: unwind (KeyboardInterrupt, SystemExit(128 + n)) so every
    temporary folder is removed, unless a folder operation that must not be cut in half is running; then the
    signal acts right after it."""
    global _pending
    if _deferring:
        _pending = signum
        return
    _raise_for(signum)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (as handled by :func:`on_signal`) for a few file operations: creating the temporary
    folder and recording it, swapping the finished folder in, removing a failed one."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)
