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
    LAYERS,
    RANK_DIR_GLOB,
    FTConfig,
    LinearSpec,
    bias_file,
    expected_files,
    group_width,
    layer_prefix,
    linear_files,
    linear_specs,
    perm_names,
    rank_dir,
    rank_k,
    rank_rows,
    read_config,
    replicated_specs,
    tensor_file,
    verify_checksums,
)
from .nm_pack import PackedNM, check_packed, pack_indices, rows_are_whole_bytes, unpack_indices

log = logging.getLogger(__name__)


def resolve_folder(path: Path, tp: int | None = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise EsparseError(f"{path} does not exist")
    if (path / "config.ini").is_file():
        return path
    subs = sorted(p for p in path.glob(RANK_DIR_GLOB) if (p / "config.ini").is_file())
    if tp is not None:
        want = rank_dir(path, tp)
        if want in subs:
            return want
        raise EsparseError(f"{path} has no {want.name} folder (found: {', '.join(p.name for p in subs) or 'none'}): "
                           f"export with --tp {tp}")
    if len(subs) == 1:
        return subs[0]
    if not subs:
        raise EsparseError(f"{path} has no config.ini and no <tp>-gpu folder: not an exported model (esparse export)")
    raise EsparseError(f"{path} holds several tp sizes ({', '.join(p.name for p in subs)}): pick one with --tp")


def check_sizes(folder: Path, cfg: FTConfig, want: dict[str, int]) -> None:
    """Every file of ``want`` (name -> bytes) is there with the size config.ini implies."""
    for name, size in want.items():
        f = folder / name
        if not f.is_file():
            raise EsparseError(f"{f} is missing (config.ini with tp={cfg.tp}, {cfg.sparsity or 'dense'} expects it): "
                               "the export is incomplete, re-run esparse export")
        actual = f.stat().st_size
        if actual != size:
            raise EsparseError(f"{f} has {actual} bytes, config.ini implies {size}: the file is truncated or "
                               "belongs to another model; re-run esparse export")


def validate(folder: Path, cfg: FTConfig) -> dict[str, int]:
    want = expected_files(cfg)
    check_sizes(folder, cfg, want)
    extra = sorted(p.name for p in folder.glob(tensor_file("*")) if p.name not in want)
    if extra:
        raise EsparseError(f"{folder} holds files config.ini does not describe (e.g. {extra[0]}): it mixes "
                           "exports of another tp size or model; export into an empty folder")
    if not verify_checksums(folder, list(want)):
        log.warning("%s has no %s (exported before checksums): its files are not verified", folder, CHECKSUMS_FILE)
    return want


def _read(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as e:
        raise EsparseError(f"cannot read {path} ({e.strerror or e}): fix its permissions or re-run esparse "
                           "export") from e
    return raw.view(dtype).reshape(shape).clone()


def check_perm(perm: torch.Tensor, width: int, where: Path) -> torch.Tensor:
    """A stored channel permutation must hold each of 0..width-1 exactly once: a repeated, negative or too large
    entry would make a norm gather the wrong channels (a silently different model) or index out of range."""
    if perm.numel() != width or not torch.equal(perm.sort().values, torch.arange(width, dtype=perm.dtype)):
        bad = "out-of-range" if bool(((perm < 0) | (perm >= width)).any()) else "repeated"
        raise EsparseError(f"{where} is not a permutation of {width} channels ({bad} entries): the file is corrupt "
                           "or was edited; re-run esparse export")
    return perm


def _merge_rows(parts: list[torch.Tensor], spec: LinearSpec, tp: int) -> torch.Tensor:
    """Inverse of the column-parallel split: per segment, concatenate the ranks' slices (any tensor whose rows
    are the output rows: dense weights, N:M values, N:M metadata, biases)."""
    out, start = [], 0
    for seg in spec.segments:
        step = seg // tp
        out.extend(p[start : start + step] for p in parts)
        start += step
    return torch.cat(out, 0)


@dataclass
class LayerWeights:
    """One decoder layer as stored: linears by FT name (dense [out, in] or compressed :class:`PackedNM`, shards
    merged), the biases of its linears by FT name, its per-layer norm tensors and its permutations by group."""

    index: int
    linears: dict[str, torch.Tensor | PackedNM] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # by FT name (model.layers.0.input_layernorm...)
    perms: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> int64 [K]


class FTFolder:
    """A validated exported folder, read a layer at a time: a loader holds one layer's tensors at once, and
    compressed linears stay compressed (tensor-parallel shards are merged on the packed bytes)."""

    def __init__(self, path: Path, tp: int | None = None):
        self.folder = resolve_folder(path, tp)
        self.cfg = read_config(self.folder / "config.ini")
        if tp is not None and self.cfg.tp != tp:
            raise EsparseError(f"{self.folder} was written for tp={self.cfg.tp}, not {tp}")
        validate(self.folder, self.cfg)

    def _file(self, file: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return _read(self.folder / file, dtype, shape)

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the decoder layers (embeddings, final norm, lm_head), by FT name."""
        return {name: self._file(tensor_file(name), self.cfg.torch_dtype, shape)
                for name, (shape, _) in replicated_specs(self.cfg).items() if not name.startswith(LAYERS)}

    def layer(self, i: int) -> LayerWeights:
        cfg, dt, nm = self.cfg, self.cfg.torch_dtype, self.cfg.nm
        out = LayerWeights(i)
        prefix = layer_prefix(i)
        for name, (shape, _) in replicated_specs(cfg).items():
            if name.startswith(prefix):
                out.tensors[name] = self._file(tensor_file(name), dt, shape)
        for spec in linear_specs(cfg, i):
            out.linears[spec.name] = self._packed(spec) if nm else self._dense(spec)
            if spec.bias:  # column-parallel biases are split per rank, row-parallel ones stored whole
                bname = spec.bias_name
                if spec.parallel == "col":
                    parts = [self._file(bias_file(spec, r), dt, (rank_rows(spec, cfg.tp),)) for r in range(cfg.tp)]
                    out.biases[bname] = _merge_rows(parts, spec, cfg.tp)
                else:
                    out.biases[bname] = out.tensors.pop(bname)
        for group, stem in perm_names(cfg, i).items():
            if group in cfg.permuted:
                perm = self._file(tensor_file(stem), torch.int32, (-1,)).long()
                out.perms[group] = check_perm(perm, group_width(cfg, group), self.folder / tensor_file(stem))
        return out

    def _dense(self, spec: LinearSpec) -> torch.Tensor:
        cfg = self.cfg
        rows, k = rank_rows(spec, cfg.tp), rank_k(spec, cfg.tp)
        files = [linear_files(spec, r, False)["dense"] for r in range(cfg.tp)]
        parts = [self._file(f, cfg.torch_dtype, (k, rows)).t() for f in files]
        merged = _merge_rows(parts, spec, cfg.tp) if spec.parallel == "col" else torch.cat(parts, 1)
        return merged.contiguous()

    def _packed(self, spec: LinearSpec) -> PackedNM:
        """Values and metadata of every rank, checked, merged without unpacking: rows of a column-parallel
        split are rows of both; a row-parallel split concatenates each row's values and its metadata bytes
        (every rank's bit string is whole bytes when K/tp is a multiple of 8 groups' worth; else it is
        re-packed once)."""
        cfg = self.cfg
        n, m = cfg.nm
        rows, k = rank_rows(spec, cfg.tp), rank_k(spec, cfg.tp)
        vals, metas = [], []
        for r in range(cfg.tp):
            names = linear_files(spec, r, True)
            vals.append(self._file(names["values"], cfg.torch_dtype, (rows, k * n // m)))
            meta = self._file(names["meta"], torch.uint8, (rows, -1))
            check_packed(meta, k, n, m, str(self.folder / names["meta"]))
            metas.append(meta)
        if spec.parallel == "col":
            return PackedNM(_merge_rows(vals, spec, cfg.tp), _merge_rows(metas, spec, cfg.tp), n, m, spec.k)
        values = torch.cat(vals, 1)
        if rows_are_whole_bytes(k, n, m):
            meta = torch.cat(metas, 1)
        else:
            meta = pack_indices(torch.cat([unpack_indices(mt, k, n, m) for mt in metas], 1), spec.k, n, m)
        return PackedNM(values, meta.contiguous(), n, m, spec.k)
