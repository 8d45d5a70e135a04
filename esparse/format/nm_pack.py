"""The compressed N:M layout: kept values plus packed in-group indices (docs/format.md has the bytes).

For a weight W [rows, K] (torch layout: groups of M consecutive input channels along each row) with at
most N non-zeros per group:
* values [rows, K*N/M], same dtype: the N kept entries of each group in ascending in-group position;
* indices: for each kept entry its in-group position, b = ceil(log2 M) bits each (2 for 2:4, 3 for 4:8),
  packed per row LSB-first: entry e of a row occupies bits [e*b, (e+1)*b) of the row's bit string, bit 0
  being the least significant bit of the row's first byte; each row is padded with zero bits to whole
  bytes, so a row takes ceil(K*N/M*b/8) bytes. For 2:4 that is K/8 bytes, and values+indices take
  0.5625x the bytes of a dense fp16 row.
A group with fewer than N non-zeros stores zeros at its lowest unused positions, so packing never fails on
a weight that happens to hold exact zeros.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from esparse.errors import EsparseError


def index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def row_meta_bytes(k: int, n: int, m: int) -> int:
    return math.ceil(k // m * n * index_bits(m) / 8)


def rows_are_whole_bytes(k: int, n: int, m: int) -> bool:
    """Whether a row's index bit string fills its bytes exactly (no padding bits): then rows split along K
    concatenate byte-wise, and a byte table can check them."""
    return (k // m * n * index_bits(m)) % 8 == 0


@dataclass
class PackedNM:
    values: torch.Tensor  # [rows, K*N/M]
    meta: torch.Tensor  # uint8 [rows, row_meta_bytes]
    n: int
    m: int
    k: int

    def to_dense(self) -> torch.Tensor:
        return unpack_nm(self)

    def to(self, device: torch.device | str) -> PackedNM:
        """The same packed tensor on ``device`` (the runtime moves 0.5625x the bytes, then unpacks there)."""
        return PackedNM(self.values.to(device), self.meta.to(device), self.n, self.m, self.k)


def _positions(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In-group positions [rows, K/M, N] of the kept entries, ascending; refuses more than N non-zeros."""
    rows, k = w.shape
    if k % m:
        raise EsparseError(f"cannot pack a tensor with {k} columns as {n}:{m}: {k} is not divisible by {m}")
    nz = (w.reshape(rows, k // m, m) != 0)
    counts = nz.sum(-1)
    if bool((counts > n).any()):
        r, g = (counts > n).nonzero()[0].tolist()
        raise EsparseError(
            f"tensor is not {n}:{m} sparse: row {r}, group {g} has {int(counts[r, g])} non-zeros; "
            "prune it first (esparse prune) or export it dense"
        )
    # non-zeros first, then the lowest positions; then sort the chosen N ascending
    key = nz.to(torch.int32) * (2 * m) + (m - torch.arange(m, device=w.device))
    chosen = key.topk(n, dim=-1).indices
    return chosen.sort(-1).values


def pack_nm(w: torch.Tensor, n: int, m: int) -> PackedNM:
    """Pack a [rows, K] weight with at most N non-zeros per group of M."""
    rows, k = w.shape
    pos = _positions(w, n, m)
    values = torch.gather(w.reshape(rows, k // m, m), 2, pos).reshape(rows, -1)
    return PackedNM(values.contiguous(), pack_indices(pos.reshape(rows, -1), k, n, m), n, m, k)


def pack_indices(idx: torch.Tensor, k: int, n: int, m: int) -> torch.Tensor:
    """Pack in-group positions [rows, K*N/M] into uint8 metadata [rows, row_meta_bytes] (LSB-first)."""
    rows = idx.shape[0]
    bits = index_bits(m)
    # bit string per row: entry e, bit j -> position e*bits + j
    bitplanes = ((idx.to(torch.int64)[:, :, None] >> torch.arange(bits, device=idx.device)) & 1).reshape(rows, -1)
    nbytes = row_meta_bytes(k, n, m)
    bitplanes = torch.nn.functional.pad(bitplanes, (0, nbytes * 8 - bitplanes.shape[1]))
    weights = (1 << torch.arange(8, device=idx.device)).to(torch.int64)
    return (bitplanes.reshape(rows, nbytes, 8) * weights).sum(-1).to(torch.uint8).contiguous()


def unpack_indices(meta: torch.Tensor, k: int, n: int, m: int) -> torch.Tensor:
    """In-group positions [rows, K*N/M] (int64) from packed metadata (on the metadata's device)."""
    rows = meta.shape[0]
    bits = index_bits(m)
    count = k // m * n
    dev = meta.device
    bitplanes = ((meta.to(torch.int64)[:, :, None] >> torch.arange(8, device=dev)) & 1).reshape(rows, -1)
    bitplanes = bitplanes[:, : count * bits].reshape(rows, count, bits)
    return (bitplanes << torch.arange(bits, device=dev)).sum(-1)


@functools.cache
def _valid_bytes(n: int, m: int) -> torch.Tensor | None:
    """bool [256]: which metadata bytes hold only valid groups, when groups tile a byte exactly (2:4: two
    groups of two 2-bit positions per byte); None otherwise."""
    group_bits = n * index_bits(m)
    if 8 % group_bits:
        return None
    byte = torch.arange(256)
    pos = ((byte[:, None] >> torch.arange(0, 8, index_bits(m))) & (2 ** index_bits(m) - 1)).reshape(256, -1, n)
    ok = (pos < m).all(-1)
    if n > 1:
        ok &= (pos[..., 1:] > pos[..., :-1]).all(-1)
    return ok.all(-1)


def check_packed(meta: torch.Tensor, k: int, n: int, m: int, where: str = "packed indices") -> None:
    """Refuse metadata [rows, bytes] holding a position that is out of its group or not strictly ascending,
    without unpacking it when the groups tile whole bytes (a table lookup per byte); else by unpacking."""
    table = _valid_bytes(n, m)
    if table is None or not rows_are_whole_bytes(k, n, m):
        check_positions(unpack_indices(meta, k, n, m).reshape(meta.shape[0], k // m, n), m, where)
        return
    bad_rows = (~table.to(meta.device)[meta.long()]).any(-1)
    if bool(bad_rows.any()):
        r = int(bad_rows.nonzero()[0])
        try:
            check_positions(unpack_indices(meta[r : r + 1], k, n, m).reshape(1, k // m, n), m, where)
        except EsparseError as e:  # name the row in the whole tensor, not in the one-row slice
            raise EsparseError(str(e).replace(f"{where}: row 0,", f"{where}: row {r},", 1)) from None


def check_positions(pos: torch.Tensor, m: int, where: str = "packed indices") -> None:
    """In-group positions [..., N] must be strictly ascending and below M: anything else (a repeat, a position
    past the group) would silently drop or misplace weights, so it is refused."""
    bad = (pos >= m) | (pos < 0)
    if pos.shape[-1] > 1:
        bad[..., 1:] |= pos[..., 1:] <= pos[..., :-1]
    if bool(bad.any()):
        r, g = bad.any(-1).nonzero()[0].tolist()[:2]
        raise EsparseError(f"{where}: row {r}, group {g} has positions {pos[r, g].tolist()} (need strictly ascending "
                           f"values below {m}); the file is corrupt, re-run esparse export")


def unpack_nm(p: PackedNM, where: str = "packed indices") -> torch.Tensor:
    rows = p.values.shape[0]
    pos = unpack_indices(p.meta, p.k, p.n, p.m).reshape(rows, p.k // p.m, p.n)
    check_positions(pos, p.m, where)
    dense = torch.zeros(rows, p.k // p.m, p.m, dtype=p.values.dtype, device=p.values.device)
    dense.scatter_(2, pos, p.values.reshape(rows, p.k // p.m, p.n))
    return dense.reshape(rows, p.k)
