"""Read an exported FasterTransformer folder back to CPU tensors, validating every file first.

Before reading a byte, every file config.ini implies must exist with exactly the byte count its shape and
dtype give, and no weight file may be left over (a folder mixing tp sizes or models); the first problem
found is named. Tensor-parallel shards are reassembled, so a tp=4 folder loads to the tp=1 tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from esparse.errors import EsparseError

from .ft_format import (
    CHECKSUMS_FILE,
    FTConfig,
    LinearSpec,
    expected_files,
    linear_specs,
    perm_names,
    rank_k,
    rank_rows,
    read_config,
    replicated_specs,
    verify_checksums,
)
from .nm_pack import PackedNM, check_positions, pack_indices, unpack_indices

log = logging.getLogger(__name__)


@dataclass
class FTWeights:
    cfg: FTConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # replicated, by FT name
    linears: dict[str, torch.Tensor | PackedNM] = field(default_factory=dict)  # torch layout [out, in]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # column-parallel biases, merged
    perms: dict[str, torch.Tensor] = field(default_factory=dict)  # perm stem -> int64 [K]

    def dense(self, name: str) -> torch.Tensor:
        w = self.linears[name]
        return w.to_dense() if isinstance(w, PackedNM) else w


def resolve_folder(path: Path, tp: int | None = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise EsparseError(f"{path} does not exist")
    if (path / "config.ini").is_file():
        return path
    subs = sorted(p for p in path.glob("*-gpu") if (p / "config.ini").is_file())
    if tp is not None:
        want = path / f"{tp}-gpu"
        if want in subs:
            return want
        raise EsparseError(f"{path} has no {tp}-gpu folder (found: {', '.join(p.name for p in subs) or 'none'}): "
                           f"export with --tp {tp}")
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise EsparseError(f"{path} has no config.ini and no <tp>-gpu folder: not an exported model (esparse export)")
    raise EsparseError(f"{path} holds several tp sizes ({', '.join(p.name for p in subs)}): pick one with --tp")


def validate(folder: Path, cfg: FTConfig) -> dict[str, int]:
    want = expected_files(cfg)
    for name, size in want.items():
        f = folder / name
        if not f.is_file():
            raise EsparseError(f"{f} is missing (config.ini with tp={cfg.tp}, {cfg.sparsity or 'dense'} expects it): "
                               "the export is incomplete, re-run esparse export")
        actual = f.stat().st_size
        if actual != size:
            raise EsparseError(f"{f} has {actual} bytes, config.ini implies {size}: the file is truncated or "
                               "belongs to another model; re-run esparse export")
    extra = sorted(p.name for p in folder.glob("*.bin") if p.name not in want)
    if extra:
        raise EsparseError(f"{folder} holds files config.ini does not describe (e.g. {extra[0]}): it mixes "
                           "exports of another tp size or model; export into an empty folder")
    if not verify_checksums(folder, list(want)):
        log.warning("%s has no %s (exported before checksums): its files are not verified", folder, CHECKSUMS_FILE)
    return want


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    return raw.view(dtype).reshape(shape).clone()


def _merge_rows(parts: list[torch.Tensor], spec: LinearSpec, tp: int) -> torch.Tensor:
    """Inverse of the column-parallel split: per segment, concatenate the ranks' slices."""
    out, start = [], 0
    for seg in spec.segments:
        step = seg // tp
        out.extend(p[start : start + step] for p in parts)
        start += step
    return torch.cat(out, 0)


def load_ft(path: Path, tp: int | None = None) -> FTWeights:
    folder = resolve_folder(path, tp)
    cfg = read_config(folder / "config.ini")
    if tp is not None and cfg.tp != tp:
        raise EsparseError(f"{folder} was written for tp={cfg.tp}, not {tp}")
    validate(folder, cfg)
    dt = cfg.torch_dtype
    out = FTWeights(cfg)
    for name, (shape, _) in replicated_specs(cfg).items():
        out.tensors[name] = _read(folder / f"{name}.bin", dt, shape)
    nm = cfg.nm
    for i in range(cfg.n_layers):
        for spec in linear_specs(cfg, i):
            rows, k = rank_rows(spec, cfg.tp), rank_k(spec, cfg.tp)
            if nm:
                vals = [_read(folder / f"{spec.name}.{r}.values.bin", dt, (rows, k * nm[0] // nm[1]))
                        for r in range(cfg.tp)]
                metas = [_read(folder / f"{spec.name}.{r}.meta.bin", torch.uint8, (rows, -1)) for r in range(cfg.tp)]
                idx = [unpack_indices(mt, k, *nm) for mt in metas]
                for r, ix_r in enumerate(idx):  # validated at load: a corrupt index file is never served
                    where = str(folder / f"{spec.name}.{r}.meta.bin")
                    check_positions(ix_r.reshape(rows, k // nm[1], nm[0]), nm[1], where)
                if spec.parallel == "col":
                    v, ix = _merge_rows(vals, spec, cfg.tp), _merge_rows(idx, spec, cfg.tp)
                else:
                    v, ix = torch.cat(vals, 1), torch.cat(idx, 1)
                out.linears[spec.name] = PackedNM(v, pack_indices(ix, spec.k, *nm), nm[0], nm[1], spec.k)
            else:
                parts = [_read(folder / f"{spec.name}.{r}.bin", dt, (k, rows)).t() for r in range(cfg.tp)]
                merged = _merge_rows(parts, spec, cfg.tp) if spec.parallel == "col" else torch.cat(parts, 1)
                out.linears[spec.name] = merged.contiguous()
            if spec.bias and spec.parallel == "col":
                bname = spec.bias_name
                parts = [_read(folder / f"{bname}.{r}.bin", dt, (rows,)) for r in range(cfg.tp)]
                out.biases[bname] = _merge_rows(parts, spec, cfg.tp)
        for group, stem in perm_names(cfg, i).items():
            if group in cfg.permuted:
                out.perms[stem] = _read(folder / f"{stem}.bin", torch.int32, (-1,)).long()
    return out
