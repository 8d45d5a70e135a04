"""Atomic output folders: write into a temporary sibling, rename when complete.

An interrupted run must never leave a folder that looks finished, so every writer of a model folder goes
through :func:`atomic_output_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets normal permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
