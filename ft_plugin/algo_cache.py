"""Persistent per-shape algorithm choices for cuSPARSELt, like FasterTransformer's gemm config files.

One plain-text file, one row per shape:

    # esparse spgemm algorithms v1
    # gpu dtype m_bucket n k alg_id split_k
    NVIDIA_H100_80GB_HBM3 fp16 16 12288 4096 3 1

The first use of a (GPU, dtype, M bucket, N, K) runs cusparseLtMatmulSearch and appends its row; a later
process reads the file and does not search again. A file that does not parse (corrupt, truncated, another
version) is ignored with a warning and rewritten. Location: $ESPARSE_GEMM_CACHE, else
$XDG_CACHE_HOME/esparse/spgemm_algos.txt (~/.cache/esparse/...).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = "# esparse spgemm algorithms v1\n# gpu dtype m_bucket n k alg_id split_k\n"
ROW_ALIGN = 16

Key = tuple[str, str, int, int, int]


def pad_rows(m: int) -> int:
    """Rows padded to what cuSPARSELt needs (a multiple of 16, at least 16)."""
    return max(ROW_ALIGN, (m + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN)


def search_bucket(m: int) -> int:
    """The M bucket an algorithm is searched for: the next power of two of the padded rows."""
    b = ROW_ALIGN
    while b < pad_rows(m):
        b <<= 1
    return b


def default_path() -> Path:
    env = os.environ.get("ESPARSE_GEMM_CACHE")
    if env:
        return Path(env)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "esparse" / "spgemm_algos.txt"


def gpu_key(name: str) -> str:
    return "_".join(name.split()) or "unknown"


class AlgoCache:
    """Thread-safe view of the cache file; ``get`` / ``put`` by shape key."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_path()
        self._lock = threading.Lock()
        self.rows: dict[Key, tuple[int, int]] = self._read()

    def _read(self) -> dict[Key, tuple[int, int]]:
        if not self.path.is_file():
            return {}
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("ignoring unreadable gemm cache %s (%s); it will be rewritten", self.path, e)
            return {}
        if not text.startswith(HEADER.splitlines()[0]):
            log.warning("ignoring gemm cache %s: not an esparse v1 file; it will be rewritten", self.path)
            return {}
        rows: dict[Key, tuple[int, int]] = {}
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            try:
                if len(parts) != 7 or parts[1] not in ("fp16", "bf16"):
                    raise ValueError(line)
                gpu, dtype, mb, n, k, alg, split = parts[0], parts[1], *map(int, parts[2:])
                if min(mb, n, k, split) < 1 or alg < 0:
                    raise ValueError(line)
            except ValueError:
                log.warning("ignoring corrupt gemm cache %s (line %d: %r); it will be rewritten", self.path, i, line)
                return {}
            rows[(gpu, dtype, mb, n, k)] = (alg, split)
        return rows

    def get(self, key: Key) -> tuple[int, int] | None:
        return self.rows.get(key)

    def put(self, key: Key, alg: int, split_k: int) -> None:
        with self._lock:
            self.rows[key] = (int(alg), int(split_k))
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = sorted(self.rows.items())
        body = HEADER + "".join(f"{g} {d} {mb} {n} {k} {a} {s}\n" for (g, d, mb, n, k), (a, s) in rows)
        fd, tmp = tempfile.mkstemp(prefix=".spgemm-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, self.path)
