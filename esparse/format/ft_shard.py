"""One tensor-parallel rank's part of an exported ``<tp>-gpu`` folder, read without touching the other ranks' files.

A rank of a ``tp``-way export is itself a small tp=1 model (:func:`local_config`): ``n_heads/tp`` query heads,
``n_kv/tp`` key/value heads and ``inter/tp`` intermediate channels, with the full hidden size. Its
column-parallel linears (qkv, gate/up or fc1) hold, per fused segment, the rank's slice of output rows, which
is the [q | k | v] layout of the rank's own heads; its row-parallel linears (attention output, down or fc2)
hold the rank's slice of input columns, whose partial sums the runtime adds over ranks (an all-reduce). N:M
groups run along the input dimension and the export splits inputs only on whole groups (ft_format.check_tp),
so each rank's compressed shard is a valid N:M weight of its own width and stays compressed.

What a rank reads: the tensors every rank needs (norms, permutations, embeddings) whole, its own linear shards,
and of the output projection (lm_head) only its block of vocabulary rows (the runtime splits the head by
vocabulary; see python_api/distributed.py). Only these files are size-checked and checksummed, so a rank of a
70B model never hashes the other ranks' gigabytes; the other ranks check theirs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from esparse.errors import EsparseError

from .ft_format import (
    CHECKSUMS_FILE,
    LAYERS,
    LM_HEAD,
    FTConfig,
    LinearSpec,
    bias_file,
    check_tp,
    expected_files,
    group_width,
    layer_prefix,
    linear_files,
    linear_specs,
    perm_names,
    rank_k,
    rank_rows,
    read_config,
    replicated_specs,
    tensor_file,
    verify_checksums,
)
from .ft_loader import LayerWeights, check_perm, check_sizes, resolve_folder
from .nm_pack import PackedNM, check_packed

log = logging.getLogger(__name__)



def local_config(cfg: FTConfig) -> FTConfig:
    """The tp=1 config of one rank of ``cfg`` (heads, kv heads and intermediate size divided by ``cfg.tp``).

    Key/value heads are split, never replicated: with grouped-query attention and fewer kv heads than ranks
    a rank would have to hold a copy of a kv head (and its cache) that others hold too, which the export
    format does not store; such a tp is refused here and at export."""
    tp = cfg.tp
    if cfg.n_kv % tp:
        fits = max(d for d in range(1, cfg.n_kv + 1) if cfg.n_kv % d == 0 and cfg.n_heads % d == 0 and d & (d - 1) == 0)
        raise EsparseError(f"tp {tp} does not divide the {cfg.n_kv} key/value heads (grouped-query attention; kv "
                           f"heads are split across ranks, not replicated): use --tp {fits} or fewer")
    check_tp(cfg)
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // tp, n_kv=cfg.n_kv // tp, inter=cfg.inter // tp, tp=1)


def head_rows(vocab: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(first, last + 1, rows held) of ``rank``'s block of lm_head rows: ceil(vocab / tp) rows per rank, the
    last block padded with zero rows when tp does not divide the vocabulary."""
    per = -(-vocab // tp)
    lo = min(vocab, rank * per)
    return lo, min(vocab, lo + per), per


def rank_linear_files(cfg: FTConfig, spec: LinearSpec, rank: int) -> list[str]:
    """The files of ``spec`` that belong to ``rank`` (its weight shard and, column-parallel, its bias)."""
    names = list(linear_files(spec, rank, cfg.nm is not None).values())
    if spec.bias and spec.parallel == "col":
        names.append(bias_file(spec, rank))
    return names


def rank_files(cfg: FTConfig, rank: int) -> dict[str, int]:
    """Every file ``rank`` reads (name -> exact byte count, as :func:`expected_files` gives it): the shared
    tensors and its own shards, none of another rank's."""
    others = {name for i in range(cfg.n_layers) for spec in linear_specs(cfg, i) for r in range(cfg.tp)
              if r != rank for name in rank_linear_files(cfg, spec, r)}
    return {name: size for name, size in expected_files(cfg).items() if name not in others}


class FTShard:
    """Rank ``rank`` of a ``tp``-way exported folder as a weight source (the loader's ``WeightSource``):
    ``cfg`` is the rank's tp=1 config, ``layer(i)`` its shards; ``full_cfg`` the folder's config.

    Row-parallel biases (OPT) are stored whole; rank 0 carries them and the others a zero bias, so the sum over
    ranks adds each bias exactly once."""

    def __init__(self, path: Path, tp: int, rank: int):
        if not 0 <= rank < tp:
            raise EsparseError(f"rank {rank} is outside 0..{tp - 1}")
        self.folder = resolve_folder(Path(path), tp)
        self.full_cfg = read_config(self.folder / "config.ini")
        if self.full_cfg.tp != tp:
            raise EsparseError(f"{self.folder} was written for tp={self.full_cfg.tp}, not {tp}")
        self.cfg = local_config(self.full_cfg)
        self.tp, self.rank = tp, rank
        self._check_files()

    def _check_files(self) -> None:
        mine = rank_files(self.full_cfg, self.rank)
        check_sizes(self.folder, self.full_cfg, mine)
        if not verify_checksums(self.folder, list(mine)) and self.rank == 0:
            log.warning("%s has no %s (exported before checksums): its files are not verified", self.folder,
                        CHECKSUMS_FILE)

    def _read(self, file: str, dtype: torch.dtype, shape: tuple[int, ...], first_row: int = 0) -> torch.Tensor:
        """``shape`` elements of file ``name`` from row ``first_row`` on (rows of shape[1:]), no more."""
        if -1 in shape:  # the whole file, its length giving the unknown dimension
            count, offset = -1, 0
        else:
            row = torch.empty((), dtype=dtype).element_size() * int(np.prod(shape[1:], dtype=np.int64))
            count, offset = row * shape[0], row * first_row
        try:
            raw = np.fromfile(self.folder / file, dtype=np.uint8, count=count, offset=offset)
        except OSError as e:
            raise EsparseError(f"cannot read {self.folder / file} ({e.strerror or e}): fix its permissions or "
                               "re-run esparse export") from e
        return torch.from_numpy(raw).view(dtype).reshape(shape).clone()

    def model_tensors(self) -> dict[str, torch.Tensor]:
        """Embeddings and the final norm whole; of lm_head this rank's block of rows (:func:`head_rows`)."""
        cfg, dt = self.full_cfg, self.full_cfg.torch_dtype
        out = {name: self._read(tensor_file(name), dt, shape) for name, (shape, _) in replicated_specs(cfg).items()
               if not name.startswith(LAYERS) and name != LM_HEAD}
        lo, hi, per = head_rows(cfg.vocab, self.tp, self.rank)
        head = torch.zeros(per, cfg.hidden, dtype=dt)
        if hi > lo:
            head[: hi - lo] = self._read(tensor_file(LM_HEAD), dt, (hi - lo, cfg.hidden), first_row=lo)
        out[LM_HEAD] = head
        return out

    def layer(self, i: int) -> LayerWeights:
        cfg, dt, r = self.full_cfg, self.full_cfg.torch_dtype, self.rank
        out = LayerWeights(i)
        prefix = layer_prefix(i)
        for name, (shape, _) in replicated_specs(cfg).items():
            if name.startswith(prefix):
                out.tensors[name] = self._read(tensor_file(name), dt, shape)
        for spec in linear_specs(cfg, i):
            rows, k = rank_rows(spec, self.tp), rank_k(spec, self.tp)
            if cfg.nm:
                n, m = cfg.nm
                files = linear_files(spec, r, True)
                values = self._read(files["values"], dt, (rows, k * n // m))
                meta = self._read(files["meta"], torch.uint8, (rows, -1))
                check_packed(meta, k, n, m, str(self.folder / files["meta"]))
                out.linears[spec.name] = PackedNM(values, meta, n, m, k)
            else:
                dense = self._read(linear_files(spec, r, False)["dense"], dt, (k, rows))
                out.linears[spec.name] = dense.t().contiguous()
            if spec.bias:
                bname = spec.bias_name
                if spec.parallel == "col":
                    out.biases[bname] = self._read(bias_file(spec, r), dt, (rows,))
                else:  # stored whole: added once, by rank 0, before the sum over ranks
                    whole = out.tensors.pop(bname)
                    out.biases[bname] = whole if r == 0 else torch.zeros_like(whole)
        for group, stem in perm_names(cfg, i).items():
            if group in cfg.permuted:
                perm = self._read(tensor_file(stem), torch.int32, (-1,)).long()
                out.perms[group] = check_perm(perm, group_width(cfg, group), self.folder / tensor_file(stem))
        return out
