"""FasterTransformer folder layout: config.ini, tensor names, shapes per tensor-parallel rank, file sizes.

One description serves the writer and the loader, so what is validated is exactly what is written.
Dense linears are stored as FT does, transposed to [in, out]; compressed N:M linears as
``<name>.<rank>.values.bin`` / ``.meta.bin`` in torch layout [out, in] (groups run along the input dim).
Grouped-query attention: the fused qkv holds [q | k | v] and each part is split per rank separately.
"""

from __future__ import annotations

import configparser
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esparse.devices import DTYPES
from esparse.errors import EsparseError

from .families import family
from .nm_pack import row_meta_bytes

FORMAT_VERSION = 1
DTYPE_NAMES = DTYPES  # config.ini's dtype names (one table: esparse/devices.py)


@dataclass(frozen=True)
class FTConfig:
    arch: str  # llama | opt
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    inter: int
    n_layers: int
    vocab: int
    max_pos: int
    eps: float
    tp: int = 1
    dtype: str = "fp16"
    rope_theta: float = 10000.0
    start_id: int = 1
    end_id: int = 2
    sparsity: str = ""  # "" dense, else "N:M"
    method: str = "dense"
    permuted: tuple[str, ...] = ()  # groups whose permutation was applied (attn_in, attn_out, mlp_in, mlp_out)
    extra: dict = field(default_factory=dict)

    @property
    def nm(self) -> tuple[int, int] | None:
        if not self.sparsity:
            return None
        n, m = self.sparsity.split(":")
        return int(n), int(m)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_NAMES[self.dtype]

    @property
    def section(self) -> str:
        return family(self.arch).ft_section

    def size(self, what: str) -> int:
        """A width named in the family descriptions: hidden, inter, q (heads x head_dim), kv, vocab, max_pos."""
        return {"hidden": self.hidden, "inter": self.inter, "q": self.n_heads * self.head_dim,
                "kv": self.n_kv * self.head_dim, "vocab": self.vocab, "max_pos": self.max_pos}[what]


@dataclass(frozen=True)
class LinearSpec:
    name: str  # e.g. model.layers.0.attention.query_key_value.weight
    k: int  # input features
    segments: tuple[int, ...]  # output features per fused part (q, k, v) before the tp split
    parallel: str  # col | row
    group: str  # sharing group of its input (attn_in, attn_out, mlp_in, mlp_out)
    hf: tuple[str, ...]  # HF module paths fused into it, in segment order
    bias: bool = False

    @property
    def n(self) -> int:
        return sum(self.segments)

    @property
    def bias_name(self) -> str:
        """The FT name of its bias (``...query_key_value.bias``)."""
        return self.name[: -len("weight")] + "bias"


def linear_specs(cfg: FTConfig, layer: int) -> list[LinearSpec]:
    p = f"model.layers.{layer}."
    return [LinearSpec(f"{p}{f.stem}.weight", cfg.size(f.k), tuple(cfg.size(x) for x in f.segments), f.parallel,
                       f.group, f.hf, f.bias) for f in family(cfg.arch).ft_linears]


def replicated_specs(cfg: FTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Non-linear tensors: name -> (shape, HF state-dict key)."""
    fam = family(cfg.arch)
    shape = lambda dims: tuple(cfg.size(d) for d in dims.split(" x "))
    out = {name: (shape(dims), hf) for name, (dims, hf) in fam.ft_tensors.items()}
    for i in range(cfg.n_layers):
        for ft, hf in fam.ft_layer_tensors.items():
            out[f"model.layers.{i}.{ft}"] = ((cfg.hidden,), f"{fam.decoder_path}.layers.{i}.{hf}")
    out["model.lm_head.weight"] = ((cfg.vocab, cfg.hidden), "lm_head.weight")
    return out


def perm_names(cfg: FTConfig, layer: int) -> dict[str, str]:
    """group -> the perm file stem, named after the tensor its permutation applies to (the norm that writes
    the group's input, or the row-parallel linear that reads it)."""
    fam, p = family(cfg.arch), f"model.layers.{layer}."
    return {"attn_in": p + fam.group_norm["attn_in"] + ".perm",
            "attn_out": p + fam.ft_linear("attn_out", "row").stem + ".perm",
            "mlp_in": p + fam.group_norm["mlp_in"] + ".perm",
            "mlp_out": p + fam.ft_linear("mlp_out", "row").stem + ".perm"}


def rank_rows(spec: LinearSpec, tp: int) -> int:
    """Output rows of one tensor-parallel rank's shard (the writer's slicing is converter/ft_export.rank_slice)."""
    return sum(s // tp for s in spec.segments) if spec.parallel == "col" else spec.n


def rank_k(spec: LinearSpec, tp: int) -> int:
    return spec.k // tp if spec.parallel == "row" else spec.k


def expected_files(cfg: FTConfig) -> dict[str, int]:
    """Every file of a folder (name -> exact byte count), from config.ini alone."""
    item = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    files: dict[str, int] = {}
    for name, (shape, _) in replicated_specs(cfg).items():
        files[name + ".bin"] = item * _prod(shape)
    nm = cfg.nm
    for i in range(cfg.n_layers):
        for spec in linear_specs(cfg, i):
            for r in range(cfg.tp):
                rows, k = rank_rows(spec, cfg.tp), rank_k(spec, cfg.tp)
                if nm:
                    files[f"{spec.name}.{r}.values.bin"] = item * rows * k * nm[0] // nm[1]
                    files[f"{spec.name}.{r}.meta.bin"] = rows * row_meta_bytes(k, *nm)
                else:
                    files[f"{spec.name}.{r}.bin"] = item * rows * k
                if spec.bias and spec.parallel == "col":
                    files[f"{spec.bias_name}.{r}.bin"] = item * rows
        for group, stem in perm_names(cfg, i).items():
            if group in cfg.permuted:
                files[stem + ".bin"] = 4 * group_width(cfg, group)
    return files


def group_width(cfg: FTConfig, group: str) -> int:
    """Channels of a sharing group's input (the length of its permutation)."""
    return cfg.size(next(f.k for f in family(cfg.arch).ft_linears if f.group == group))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def check_tp(cfg: FTConfig) -> None:
    """tp must divide heads, kv heads and the intermediate size, on whole N:M groups."""
    tp = cfg.tp
    if tp < 1 or tp & (tp - 1):
        raise EsparseError(f"--tp {tp}: use 1, 2, 4 or 8")
    for what, val in (("head_num", cfg.n_heads), ("kv_head_num", cfg.n_kv), ("inter_size", cfg.inter)):
        if val % tp:
            raise EsparseError(f"--tp {tp} does not divide {what} = {val}: choose a tp that divides it")
    if cfg.nm:
        m = cfg.nm[1]
        for what, k in (("attention input", cfg.n_heads * cfg.head_dim), ("mlp input", cfg.inter)):
            if (k // tp) % m:
                raise EsparseError(f"--tp {tp} splits the {what} ({k}) off the {cfg.sparsity} groups")


def write_config(cfg: FTConfig, path: Path) -> None:
    cp = configparser.ConfigParser()
    common = {"model_name": cfg.extra.get("model_name", cfg.arch), "head_num": cfg.n_heads,
              "size_per_head": cfg.head_dim, "hidden_size": cfg.hidden, "inter_size": cfg.inter,
              "num_layer": cfg.n_layers,
              "vocab_size": cfg.vocab, "start_id": cfg.start_id, "end_id": cfg.end_id,
              "weight_data_type": cfg.dtype, "tensor_para_size": cfg.tp, "max_pos_seq_len": cfg.max_pos,
              "layernorm_eps": cfg.eps}
    common.update(family(cfg.arch).ft_extra(cfg))
    cp[cfg.section] = {k: str(v) for k, v in common.items()}
    cp["esparse"] = {"format_version": str(FORMAT_VERSION), "arch": cfg.arch,
                     "sparsity": cfg.sparsity or "dense",
                     "method": cfg.method, "permuted": ",".join(cfg.permuted),
                     "sparse_linears": "all" if cfg.sparsity else "none"}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        cp.write(f)
    tmp.rename(path)


def read_config(path: Path) -> FTConfig:
    if not path.is_file():
        raise EsparseError(f"{path} is missing: not an esparse/FasterTransformer folder")
    cp = configparser.ConfigParser()
    try:
        cp.read(path)
        es = cp["esparse"]
        if int(es["format_version"]) != FORMAT_VERSION:
            raise EsparseError(f"{path} has format_version {es['format_version']}; this esparse reads "
                               f"{FORMAT_VERSION}: re-export the model")
        arch = es["arch"]
        sec = cp[family(arch).ft_section]
        return FTConfig(
            arch=arch, hidden=int(sec.get("hidden_size", int(sec["head_num"]) * int(sec["size_per_head"]))),
            n_heads=int(sec["head_num"]), n_kv=int(sec.get("kv_head_num", sec["head_num"])),
            head_dim=int(sec["size_per_head"]), inter=int(sec["inter_size"]), n_layers=int(sec["num_layer"]),
            vocab=int(sec["vocab_size"]), max_pos=int(sec["max_pos_seq_len"]), eps=float(sec["layernorm_eps"]),
            tp=int(sec["tensor_para_size"]), dtype=sec["weight_data_type"],
            rope_theta=float(sec.get("rope_theta", 10000.0)), start_id=int(sec["start_id"]),
            end_id=int(sec["end_id"]), sparsity="" if es["sparsity"] == "dense" else es["sparsity"],
            method=es["method"], permuted=tuple(p for p in es["permuted"].split(",") if p),
            extra={"model_name": sec.get("model_name", arch)},
        )
    except (KeyError, ValueError, configparser.Error) as e:
        raise EsparseError(f"{path} is not a valid esparse config.ini ({e}): re-export the model") from e


CHECKSUMS_FILE = "checksums.sha256"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path, names: list[str]) -> None:
    """One ``<sha256>  <file>`` line per tensor file (sha256sum's format), so a flipped byte is caught at load."""
    lines = [f"{file_sha256(Path(folder) / n)}  {n}\n" for n in sorted(names)]
    (Path(folder) / CHECKSUMS_FILE).write_text("".join(lines))


def verify_checksums(folder: Path, names: list[str]) -> bool:
    """Check every tensor file against the folder's checksum file; False when the folder has none (older
    exports). Raises on a mismatch, a tensor file the manifest does not list, or a malformed manifest."""
    manifest = Path(folder) / CHECKSUMS_FILE
    if not manifest.is_file():
        return False
    sums: dict[str, str] = {}
    for i, line in enumerate(manifest.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise EsparseError(f"{manifest}:{i} is not '<sha256>  <file>': the manifest is corrupt; "
                               "re-run esparse export")
        sums[name] = digest
    for n in names:
        if n not in sums:
            raise EsparseError(f"{manifest} does not list {n}: the folder was changed after export; "
                               "re-run esparse export")
        if file_sha256(Path(folder) / n) != sums[n]:
            raise EsparseError(f"{Path(folder) / n} does not match its sha256 in {CHECKSUMS_FILE}: the file is corrupt "
                               "(a flipped byte is never served); re-run esparse export or restore the file")
    return True
