"""ft_plugin: cuSPARSELt Sparse-GEMM and cuBLASLt dense GEMM as torch ops (C++/CUDA in this folder).

``build_info()`` says whether the compiled library is present and loadable here, and if not, why; the
ops themselves live in :mod:`esparse.ft_plugin.ops`, which loads the library on import. Which cuSPARSELt
the ops run on is chosen in :mod:`esparse.ft_plugin.cusparselt` (docs/gpu_path.md says why that matters).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

LIB_NAME = "libesparse_ft_plugin.so"


@dataclass(frozen=True)
class BuildInfo:
    built: bool
    path: Path | None
    reason: str


def library_candidates() -> list[Path]:
    """Where a build may have put the library, most explicit first.

    An editable install compiles into site-packages/esparse/ft_plugin/ while this package is imported from
    the source tree, so every ``sys.path`` entry is searched as well as this folder and ./build.
    """
    cands = []
    if os.environ.get("ESPARSE_PLUGIN"):
        cands.append(Path(os.environ["ESPARSE_PLUGIN"]))
    here = Path(__file__).resolve().parent
    cands.append(here / LIB_NAME)
    for entry in sys.path:
        if entry:
            cands.append(Path(entry) / "esparse" / "ft_plugin" / LIB_NAME)
    cands.append(here.parent / "build" / "ft_plugin" / LIB_NAME)
    return cands


def library_path() -> Path | None:
    for cand in library_candidates():
        if cand.is_file():
            return cand
    return None


def build_info() -> BuildInfo:
    """Whether this install has the compiled plugin (built where nvcc and a CUDA torch existed)."""
    import torch

    path = library_path()
    if path is None:
        return BuildInfo(False, None, "this install has the pure-Python package only (no nvcc or no CUDA torch "
                                      "at build time); reinstall with pip install --no-build-isolation . on a "
                                      "CUDA machine")
    if not torch.cuda.is_available():
        return BuildInfo(False, path, "no CUDA device is visible to torch")
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return BuildInfo(False, path, f"{torch.cuda.get_device_name()} (sm_{major}x) has no sparse tensor cores; "
                                      "use the dense path (--dense)")
    return BuildInfo(True, path, "ok")
