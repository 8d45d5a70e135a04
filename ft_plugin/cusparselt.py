"""Which cuSPARSELt the sparse ops run on, and how users get a good one.

torch loads its pinned cuSPARSELt (0.8.x for torch 2.11-2.14) at import. On 0.8.x a searched algorithm
only runs on the plan the weight was compressed under, so the plugin can only use the default algorithm
there ("safe"); 0.10 runs searched algorithms on every plan ("tuned"). The plugin dlopens cuSPARSELt
itself, so it can run on a private 0.10 beside torch's copy. Order of choice:

1. ``$ESPARSE_CUSPARSELT``: a libcusparseLt.so.0, or a folder holding one (searched below it);
2. the process's own copy when it is 0.10 or newer (e.g. torch built with it, or LD_PRELOAD);
3. the private folder ``esparse install-cusparselt`` fills (``$ESPARSE_DATA`` or ~/.local/share/esparse);
4. the process's copy (or the dynamic linker's) as it is: safe design on 0.8.x.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from pathlib import Path

from esparse.errors import EsparseError

log = logging.getLogger(__name__)

SONAME = "libcusparseLt.so.0"
TUNED_MIN = (0, 10, 0)
WHEEL = "nvidia-cusparselt-cu13==0.10.0"


def private_dir() -> Path:
    root = Path(os.environ.get("ESPARSE_DATA") or Path.home() / ".local" / "share" / "esparse")
    return root / "cusparselt"


def install_command() -> str:
    pip = f"{sys.executable} -m pip install --no-deps --target {private_dir()} {WHEEL}"
    return f"esparse install-cusparselt   (= {pip})"


def find_library(root: Path) -> Path | None:
    """root itself if it is the library, else the first libcusparseLt.so.0 below it (sorted, newest wheel layout
    nvidia/cu13/lib before nvidia/cusparselt/lib)."""
    if root.is_file():
        return root
    if not root.is_dir():
        return None
    found = sorted(root.rglob(SONAME))
    return found[0] if found else None


def mapped_copies() -> list[Path]:
    """Every cuSPARSELt file this process has mapped (torch's, and a private one once loaded), from
    /proc/self/maps, in first-mapped order."""
    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if "libcusparseLt.so" in line]
    except OSError:
        return []
    return [Path(p) for p in dict.fromkeys(paths)]


def loaded_in_process() -> Path | None:
    """The cuSPARSELt the process had before esparse chose one (torch's), if any."""
    copies = mapped_copies()
    return copies[0] if copies else None


def library_version(path: Path) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a cuSPARSELt file via its cusparseLtGetProperty; None if it does not load."""
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0))
        get = lib.cusparseLtGetProperty
    except (OSError, AttributeError):
        return None
    out = []
    for prop in (0, 1, 2):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL
        v = ctypes.c_int(-1)
        if get(prop, ctypes.byref(v)) != 0:
            return None
        out.append(v.value)
    return tuple(out)  # type: ignore[return-value]


def choose() -> str:
    """The path to hand the plugin ('' = the process's own copy), by the order in the module docstring."""
    env = os.environ.get("ESPARSE_CUSPARSELT")
    if env:
        lib = find_library(Path(env).expanduser())
        if lib is None:
            raise EsparseError(f"ESPARSE_CUSPARSELT={env} is not a {SONAME} nor a folder holding one; fix the path "
                               "or unset it")
        return str(lib)
    own = loaded_in_process()
    if own is not None and (library_version(own) or (0, 0, 0)) >= TUNED_MIN:
        return ""
    private = find_library(private_dir())
    if private is not None and (library_version(private) or (0, 0, 0)) >= TUNED_MIN:
        return str(private)
    return ""


def install(target: Path | None = None) -> Path:
    """pip-install the tuned-capable cuSPARSELt into esparse's private folder (not beside torch's pin)."""
    target = target or private_dir()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target), WHEEL]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EsparseError(f"pip could not install {WHEEL} into {target}: {proc.stderr.strip()[-400:]}")
    lib = find_library(target)
    if lib is None:
        raise EsparseError(f"{WHEEL} installed into {target} but holds no {SONAME}")
    return lib
