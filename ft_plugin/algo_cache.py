"""Persistent per-shape algorithm choices for cuSPARSELt, like FasterTransformer's gemm config files.

One plain-text file, one row per shape:

    # esparse spgemm algorithms v2
    # gpu cusparselt dtype m_bucket n k alg_id split_k
    NVIDIA_H100_80GB_HBM3 0.10.0 fp16 16 12288 4096 3 1

The first use of a (GPU, cuSPARSELt version, dtype, M bucket, N, K) runs cusparseLtMatmulSearch and adds its
row; a later process reads the file and does not search again. Algorithm ids mean nothing across cuSPARSELt
versions, hence the version column. Rows that do not parse are skipped with a warning (the rest is kept); a
file of another format is ignored and rewritten. The cache never breaks a run: a failed write warns and keeps
the rows in memory; writers take a lock file and merge with what another process wrote meanwhile.
Location: $ESPARSE_GEMM_CACHE, else $XDG_CACHE_HOME/esparse/spgemm_algos.txt (~/.cache/esparse/...).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = "# esparse spgemm algorithms v2\n# gpu cusparselt dtype m_bucket n k alg_id split_k\n"
ROW_ALIGN = 16

Key = tuple[str, str, str, int, int, int]


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


def parse(text: str, where: str = "gemm cache") -> dict[Key, tuple[int, int]]:
    """Rows of a v2 file; a malformed row is skipped with a warning, another format gives {}."""
    if not text.startswith(HEADER.splitlines()[0]):
        if text.strip():
            log.warning("ignoring %s: not an esparse v2 algorithm file; it will be rewritten", where)
        return {}
    rows: dict[Key, tuple[int, int]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 8 or parts[2] not in ("fp16", "bf16"):
                raise ValueError
            gpu, version, dtype = parts[:3]
            mb, n, k, alg, split = map(int, parts[3:])
            if min(mb, n, k) < 1 or alg < 0 or split < -1:  # split-k 0 or -1: the search used none
                raise ValueError
        except ValueError:
            log.warning("skipping malformed row %d of %s: %r", i, where, line[:120])
            continue
        rows[(gpu, version, dtype, mb, n, k)] = (alg, split)
    return rows


class AlgoCache:
    """Thread- and process-safe view of the cache file; ``get`` / ``put`` by shape key."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_path()
        self._lock = threading.Lock()
        self.rows: dict[Key, tuple[int, int]] = self._read()

    def _read(self) -> dict[Key, tuple[int, int]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            log.warning("ignoring unreadable gemm cache %s (%s); it will be rewritten", self.path, e)
            return {}
        return parse(text, str(self.path))

    def get(self, key: Key) -> tuple[int, int] | None:
        return self.rows.get(key)

    def put(self, key: Key, alg: int, split_k: int) -> None:
        with self._lock:
            self.rows[key] = (int(alg), int(split_k))
            try:
                self._write()
            except OSError as e:
                log.warning("could not write the gemm cache %s (%s); keeping its rows in memory for this process",
                            self.path, e)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be writing: merge under the lock
            merged = {**self._read(), **self.rows}
            self.rows = merged
            body = HEADER + "".join(f"{g} {v} {d} {mb} {n} {k} {a} {s}\n"
                                    for (g, v, d, mb, n, k), (a, s) in sorted(merged.items()))
            fd, tmp = tempfile.mkstemp(prefix=".spgemm-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(body)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the cache gets the modes any file gets
                os.replace(tmp, self.path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
