"""Atomic output folders: write into a temporary sibling, rename when complete.

An interrupted run must never leave a folder that looks finished, so every writer of a model folder goes
through :func:`atomic_output_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from esparse.errors import EsparseError


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite`` (checked before any long work starts)."""
    if out.exists() and not overwrite:
        raise EsparseError(f"output folder {out} already exists: choose another --out or pass --overwrite")


def check_output_location(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is, contains or sits inside one of the inputs: --overwrite would delete it.
    Checked before any work, on resolved paths (links and .. included)."""
    o = Path(out).resolve()
    if o.exists() and not o.is_dir():
        raise EsparseError(f"--out {out} is a file, not a folder: choose a folder path")
    for inp in inputs:
        i = Path(inp).resolve()
        if o == i or o in i.parents or i in o.parents:
            raise EsparseError(f"--out {out} {'is' if o == i else 'overlaps'} the input {inp}: writing there would "
                               "destroy the input; choose an output folder outside it")


_deferring = 0  # depth of _signals_deferred blocks now running
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
def _signals_deferred() -> Iterator[None]:
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


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _signals_deferred():  # a signal between mkdtemp and the try below would leave the folder behind
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets normal permissions
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) make files 0600: give them the umask's modes too
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
    except BaseException:
        with _signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():  # out is replaced whole or not at all
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
