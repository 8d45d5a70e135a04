"""Output folders: checked before any work, written into a temporary sibling, renamed into place when complete.

An interrupted run must never leave a folder that looks finished, so every writer of a model folder goes
through :func:`atomic_output_dir`. ``--overwrite`` replaces only a folder esparse wrote (it carries the marker
file :data:`MARKER`, or is an older esparse output: a pruned folder's esparse.json, an export's
``<tp>-gpu/config.ini``) or an empty one, never arbitrary contents. Where the output can go is checked before
the work starts (parent a folder, writable, name short enough, disk space), temporaries of killed runs are
cleaned on the next run, and an output another run finished meanwhile is not silently replaced.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from esparse.errors import EsparseError
from esparse.signals import signals_deferred

MARKER = ".esparse-output"
MARKER_TEXT = "written by esparse; --overwrite replaces this folder whole\n"
_TMP_SUFFIX_BYTES = 40  # ".<name>.partial-<pid>-<random>" / ".<name>.old-<pid>" beyond the name itself


def _abs(path: Path) -> Path:
    """The absolute, normalised path (``.`` and ``..`` resolved, links kept: a link is replaced, not its target)."""
    return Path(os.path.abspath(path))


def written_by_esparse(folder: Path) -> bool:
    """Whether ``folder`` is an esparse output: the marker, or an output of an esparse that wrote none."""
    folder = Path(folder)
    if (folder / MARKER).is_file() or (folder / "esparse.json").is_file():
        return True
    for ini in folder.glob("*-gpu/config.ini"):
        cp = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(OSError, UnicodeDecodeError, configparser.Error):
            cp.read(ini, encoding="utf-8")
            if cp.has_section("esparse"):
                return True
    return False


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite`` and esparse wrote it (checked before any long work
    starts); an empty folder is taken as it is."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise EsparseError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if not written_by_esparse(out):
        raise EsparseError(f"--out {out} holds files esparse did not write (no {MARKER} marker): --overwrite replaces "
                           "only esparse's own outputs; choose another --out, or empty the folder yourself")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_location(out: Path, inputs: list[Path], need_bytes: int | None = None) -> None:
    """Refuse, before any work, an output that cannot be written or would destroy an input: a path that is a
    file, a parent that is a file, a folder without write permission or on a read-only disk, a name too long for
    the file system (with esparse's temporary suffix), too little free space for ``need_bytes``, or an output
    that is, contains or sits inside one of the inputs (--overwrite would delete it; resolved paths)."""
    o_abs = _abs(out)
    try:
        name_max = os.pathconf(o_abs.anchor, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for j, part in enumerate(o_abs.parts[1:]):  # before any stat: a name over the limit makes stat itself fail
        extra = _TMP_SUFFIX_BYTES if j == len(o_abs.parts) - 2 else 0
        if len(part.encode()) + extra > name_max:
            raise EsparseError(f"--out {out}: the name {part[:24]!r}... is {len(part.encode())} bytes, over the "
                               f"file system's limit of {name_max}" + (f" with esparse's temporary suffix ({extra})"
                                                                       if extra else "") + ": choose a shorter name")
    try:
        if o_abs.exists() and not o_abs.is_dir():
            raise EsparseError(f"--out {out} is a file, not a folder: choose a folder path")
        if o_abs == Path(o_abs.anchor):
            raise EsparseError(f"--out {out} is the file system's root: choose a folder inside it")
        anc = _existing_ancestor(o_abs.parent)
        if not anc.is_dir():
            raise EsparseError(f"--out {out}: {anc} is a file, not a folder, so nothing can be created under it; "
                               "choose another --out")
    except OSError as e:
        raise EsparseError(f"--out {out} cannot be inspected ({e.strerror}): choose another --out") from e
    if not os.access(anc, os.W_OK | os.X_OK):
        raise EsparseError(f"--out {out}: {anc} is not writable (read-only disk or no permission); choose another "
                           "--out")
    if need_bytes is not None:
        check_free_space(out, need_bytes)
    o = Path(out).resolve()
    for inp in inputs:
        i = Path(inp).resolve()
        if o == i or o in i.parents or i in o.parents:
            raise EsparseError(f"--out {out} {'is' if o == i else 'overlaps'} the input {inp}: writing there would "
                               "destroy the input; choose an output folder outside it")


def check_free_space(out: Path, need_bytes: int) -> None:
    """Refuse an output of ``need_bytes`` on a disk that has less free (a full disk found before the work)."""
    anc = _existing_ancestor(_abs(out).parent)
    try:
        free = shutil.disk_usage(anc).free
    except OSError:
        return
    if need_bytes > free:
        raise EsparseError(f"--out {out}: the output needs about {need_bytes / 2**30:.2f} GiB and {anc}'s disk has "
                           f"{free / 2**30:.2f} GiB free: free some space or choose another --out")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid we can ask about): leave its folder alone
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove what killed runs (SIGKILL, power loss) left beside ``out``: ``.<name>.partial-<pid>-*`` and
    ``.<name>.old-<pid>`` folders whose process is gone, and an old-style ``.<name>.old``."""
    out = _abs(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)(?:-.*)?")
    for sib in out.parent.iterdir():
        m = pattern.fullmatch(sib.name)
        stale = (m is not None and not _pid_alive(int(m[1]))) or sib.name == f".{out.name}.old"
        if stale and sib.is_dir() and not sib.is_symlink():
            shutil.rmtree(sib, ignore_errors=True)
            removed.append(sib)
    return removed


def _is_cwd(folder: Path) -> bool:
    try:
        return Path(os.getcwd()) == folder
    except OSError:
        return False


def _swap_contents(tmp: Path, out: Path) -> None:
    """Replace the contents of ``out`` by those of ``tmp`` entry by entry (``out`` itself stays: it is the current
    folder), the marker first; on a failure the previous contents are moved back."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    old.mkdir()
    moved = []
    try:
        for entry in list(out.iterdir()):
            entry.rename(old / entry.name)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name != MARKER):
            entry.rename(out / entry.name)
            moved.append(out / entry.name)
    except OSError:
        for entry in moved:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for entry in list(old.iterdir()):
            entry.rename(out / entry.name)
        old.rmdir()
        raise
    tmp.rmdir()
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it gets the esparse marker and replaces ``out``, on
    failure it is removed. A write error (full disk, permissions) becomes one error line.

    Kept in one function: the order of its steps (record the temporary under held signals, swap, clean up on
    every exit path) is the guarantee, and it reads best top to bottom."""
    given = Path(out)
    out = _abs(out)
    check_output_dir(out, overwrite)
    clean_stale_temporaries(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EsparseError(f"cannot create {out.parent} ({e.strerror}): choose another --out") from e
    existed = out.is_dir() and any(out.iterdir())
    with signals_deferred():  # a signal between mkdtemp and the try below would leave the folder behind
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        except OSError as e:
            raise EsparseError(f"cannot create a folder beside {given} ({e.strerror}): choose another --out") from e
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the finished folder gets normal permissions
    try:
        yield tmp
        (tmp / MARKER).write_text(MARKER_TEXT)
        for f in tmp.rglob("*"):  # some writers (safetensors) make files 0600: give them the umask's modes too
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
    except BaseException as e:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            where = e.filename or given
            hint = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the permissions"
            raise EsparseError(f"writing the output failed at {where} ({e.strerror or e}); nothing was written to "
                               f"{given}: {hint} or choose another --out") from e
        raise
    with signals_deferred():  # out is replaced whole or not at all
        try:
            if out.is_dir() and any(out.iterdir()):
                if not existed and not overwrite:  # another run finished this output while this one worked
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise EsparseError(f"{given} was written by another run while this one worked: both cannot "
                                       "own it; choose another --out or pass --overwrite")
            if out.is_dir() and _is_cwd(out):
                _swap_contents(tmp, out)  # --out . : the folder the shell stands in stays that folder
                return
            if out.is_dir() and any(out.iterdir()):
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                try:
                    tmp.rename(out)
                except OSError:
                    old.rename(out)  # the previous output stays where it was
                    raise
                if old.is_symlink():  # --out was a link to the previous output: the link goes, its target stays
                    old.unlink()
                else:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                if out.is_symlink():
                    out.unlink()  # a link to an empty folder: the link is replaced, the folder stays
                elif out.is_dir():
                    out.rmdir()  # an empty folder: rename() replaces only that, and only here
                tmp.rename(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EsparseError(f"cannot move the finished output into {given} ({e.strerror}): nothing was "
                               "replaced; choose another --out") from e
