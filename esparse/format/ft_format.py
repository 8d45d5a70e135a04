"""FasterTransformer folder layout: config.ini, tensor names, shapes per tensor-parallel rank, file sizes.

One description serves the writer and the loader, so what is validated is exactly what is written.
Dense linears are stored as FT does, transposed to [in, out]; compressed N:M linears as
``<name>.<rank>.values.bin`` / ``.meta.bin`` in torch layout [out, in] (groups run along the input dim).
Grouped-query attention: the fused qkv holds [q | k | v] and each part is split per rank separately.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esparse.devices import DTYPES
from esparse.errors import EsparseError

from .families import ACTIVATIONS, GROUPS, MAX_POSITIONS, Family, check_rope_scaling, family
from .nm_pack import row_meta_bytes

log = logging.getLogger(__name__)

# 2: config.ini names the activation, the biased linears and the rope scaling, and checksums.sha256 covers
# config.ini too. Version 1 folders (none of these) still load: their config.ini is checked for sane values but
# is not covered by a checksum, which the loader says in a warning.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_M = 32  # the widest N:M group the format takes (5 index bits); sparse tensor cores take 2:4


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
    act: str = ""  # the MLP activation by its transformers name; "" = the family's default
    biases: tuple[str, ...] = ()  # groups whose linears have a bias beyond those the family always has
    rope_scaling: dict = field(default_factory=dict)  # {} or {"rope_type": "linear" | "llama3", "factor": ...}

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def family(self) -> Family:
        """The family description this config's ``arch`` names (checked when the config was built)."""
        return family(self.arch)

    @property
    def activation(self) -> str:
        return self.act or self.family.default_act

    @property
    def bias_groups(self) -> tuple[str, ...]:
        """Every group whose linears have a bias (the family's fixed ones and the config's)."""
        fixed = {f.group for f in self.family.ft_linears if f.bias}
        return tuple(g for g in GROUPS if g in fixed or g in self.biases)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.sparsity)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def section(self) -> str:
        return self.family.ft_section

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
    p = layer_prefix(layer)
    return [LinearSpec(f"{p}{f.stem}.weight", cfg.size(f.k), tuple(cfg.size(x) for x in f.segments), f.parallel,
                       f.group, f.hf, f.bias or f.group in cfg.biases) for f in cfg.family.ft_linears]


LAYERS = "model.layers."  # every per-layer FT name starts with LAYERS + "<i>."


def layer_prefix(i: int) -> str:
    return f"{LAYERS}{i}."


LM_HEAD = "model.lm_head.weight"  # the output projection (every family; HF's lm_head, or the tied embedding)


def runtime_names(cfg: FTConfig) -> dict[str, str]:
    """The tensors outside the decoder layers: FT name -> the runtime parameter it fills."""
    return {**{name: rt for name, (_, _, rt) in cfg.family.ft_tensors.items()}, LM_HEAD: "output.weight"}


def replicated_specs(cfg: FTConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Non-linear tensors: name -> (shape, HF state-dict key)."""
    fam = cfg.family
    shape = lambda dims: tuple(cfg.size(d) for d in dims.split(" x "))
    out = {name: (shape(dims), hf) for name, (dims, hf, _) in fam.ft_tensors.items()}
    for i in range(cfg.n_layers):
        for ft, hf in fam.ft_layer_tensors.items():
            out[layer_prefix(i) + ft] = ((cfg.hidden,), f"{fam.decoder_path}.layers.{i}.{hf}")
        for spec in linear_specs(cfg, i):  # row-parallel biases are added once after the reduction: stored whole
            if spec.bias and spec.parallel == "row":
                out[spec.bias_name] = ((spec.n,), f"{fam.decoder_path}.layers.{i}.{spec.hf[0]}.bias")
    out[LM_HEAD] = ((cfg.vocab, cfg.hidden), "lm_head.weight")
    return out


def perm_names(cfg: FTConfig, layer: int) -> dict[str, str]:
    """group -> the perm file stem, named after the tensor its permutation applies to (the norm that writes
    the group's input, or the row-parallel linear that reads it)."""
    fam, p = cfg.family, layer_prefix(layer)
    return {"attn_in": p + fam.group_norm["attn_in"] + ".perm",
            "attn_out": p + fam.ft_linear("attn_out", "row").stem + ".perm",
            "mlp_in": p + fam.group_norm["mlp_in"] + ".perm",
            "mlp_out": p + fam.ft_linear("mlp_out", "row").stem + ".perm"}


# File names: the only place that spells them (writer, size check, readers and the CLI ask here).
RANK_DIR_GLOB = "*-gpu"


def rank_dir(root: Path, tp: int) -> Path:
    """The folder of a ``tp``-way export inside an export's root (FasterTransformer's ``<tp>-gpu``)."""
    return Path(root) / f"{tp}-gpu"


def is_rank_dir(path: Path) -> bool:
    return Path(path).name.endswith("-gpu")


def tensor_file(name: str) -> str:
    """A replicated tensor's (or a permutation's) file: the FT name + .bin."""
    return f"{name}.bin"


def linear_files(spec: LinearSpec, rank: int, packed: bool) -> dict[str, str]:
    """One rank's files of a linear: {"values", "meta"} for a packed N:M weight (torch layout [out, in]), else
    {"dense"} (FT's transposed [in, out])."""
    stem = f"{spec.name}.{rank}"
    return {"values": f"{stem}.values.bin", "meta": f"{stem}.meta.bin"} if packed else {"dense": f"{stem}.bin"}


def bias_file(spec: LinearSpec, rank: int) -> str:
    """One rank's slice of a column-parallel linear's bias (row-parallel biases are replicated tensors)."""
    return f"{spec.bias_name}.{rank}.bin"


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
        files[tensor_file(name)] = item * _prod(shape)
    nm = cfg.nm
    for i in range(cfg.n_layers):
        for spec in linear_specs(cfg, i):
            for r in range(cfg.tp):
                rows, k = rank_rows(spec, cfg.tp), rank_k(spec, cfg.tp)
                names = linear_files(spec, r, nm is not None)
                if nm:
                    files[names["values"]] = item * rows * k * nm[0] // nm[1]
                    files[names["meta"]] = rows * row_meta_bytes(k, *nm)
                else:
                    files[names["dense"]] = item * rows * k
                if spec.bias and spec.parallel == "col":
                    files[bias_file(spec, r)] = item * rows
        for group, stem in perm_names(cfg, i).items():
            if group in cfg.permuted:
                files[tensor_file(stem)] = 4 * group_width(cfg, group)
    return files


def param_counts(cfg: FTConfig) -> tuple[int, int]:
    """(values of the decoder linears, values of every other tensor) that a config implies, computed from one
    layer (a config of 10^5 layers is sized without listing them)."""
    fam = cfg.family
    other = sum(_prod(tuple(cfg.size(d) for d in dims.split(" x "))) for dims, _, _ in fam.ft_tensors.values())
    other += cfg.vocab * cfg.hidden  # lm_head
    specs = linear_specs(cfg, 0)
    per_layer = len(fam.ft_layer_tensors) * cfg.hidden + sum(s.n for s in specs if s.bias)
    return cfg.n_layers * sum(s.n * s.k for s in specs), other + cfg.n_layers * per_layer


def group_width(cfg: FTConfig, group: str) -> int:
    """Channels of a sharing group's input (the length of its permutation)."""
    return cfg.size(next(f.k for f in cfg.family.ft_linears if f.group == group))


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def parse_nm(text: str, where: str = "sparsity") -> tuple[int, int] | None:
    """"N:M" -> (N, M) with 0 < N < M <= MAX_M; "" or "dense" -> None; anything else is refused, naming ``where``."""
    if text in ("", "dense"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise EsparseError(f"{where} {text!r} is not N:M (e.g. 2:4 or 4:8)")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m <= MAX_M:
        raise EsparseError(f"{where} {text!r} needs 0 < N < M <= {MAX_M} (keep N of every M weights)")
    return n, m


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_config(cfg: FTConfig) -> None:
    """Every value the runtime reads is one it implements and is sane: what config.ini (or a HF config on its way
    to one) says is refused here, by field, before a tensor is allocated."""
    def bad(key: str, value, why: str) -> EsparseError:
        return EsparseError(f"config.ini: {key} = {value!r} {why}; the folder is corrupt or was edited: "
                            "re-run esparse export")

    family(cfg.arch)
    for key in ("hidden", "n_heads", "n_kv", "head_dim", "inter", "n_layers", "vocab", "max_pos"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(key, value, "is not a positive integer")
    if cfg.max_pos > MAX_POSITIONS:
        raise bad("max_pos_seq_len", cfg.max_pos, f"is over esparse's limit of {MAX_POSITIONS} positions")
    if cfg.n_heads % cfg.n_kv:
        raise bad("kv_head_num", cfg.n_kv, f"does not divide head_num = {cfg.n_heads}")
    if cfg.family.rotary and cfg.head_dim % 2:
        raise bad("size_per_head", cfg.head_dim, "is odd (rotary positions rotate pairs of channels)")
    if not (_number(cfg.eps) and 0 < cfg.eps < 1):
        raise bad("layernorm_eps", cfg.eps, "is not a number in (0, 1)")
    if not (_number(cfg.rope_theta) and math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):
        raise bad("rope_theta", cfg.rope_theta, "is not a positive finite number")
    if cfg.dtype not in DTYPES:
        raise bad("weight_data_type", cfg.dtype, f"is not one of {', '.join(DTYPES)}")
    if cfg.tp not in (1, 2, 4, 8):
        raise bad("tensor_para_size", cfg.tp, "is not 1, 2, 4 or 8")
    parse_nm(cfg.sparsity, "config.ini: sparsity")
    for key, groups in (("permuted", cfg.permuted), ("biases", cfg.biases)):
        if not set(groups) <= set(GROUPS):
            raise bad(key, ",".join(groups), f"names a group outside {', '.join(GROUPS)}")
    if cfg.act and cfg.act not in ACTIVATIONS:
        raise bad("activation", cfg.act, f"is not one of {', '.join(ACTIVATIONS)}")
    if cfg.rope_scaling:
        if not cfg.family.rotary:
            raise bad("rope_scaling_type", cfg.rope_scaling.get("rope_type"), f"is set for {cfg.arch} (no rotary)")
        check_rope_scaling(cfg.rope_scaling, "config.ini: rope_scaling")
    for key in ("start_id", "end_id"):
        if getattr(cfg, key) < 0:
            raise bad(key, getattr(cfg, key), "is negative")


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


ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _parser() -> configparser.ConfigParser:
    # no interpolation: a value holding "%" (a model path) is text, never a reference
    return configparser.ConfigParser(interpolation=None)


def write_config(cfg: FTConfig, path: Path) -> None:
    cp = _parser()
    common = {"model_name": cfg.extra.get("model_name", cfg.arch), "head_num": cfg.n_heads,
              "size_per_head": cfg.head_dim, "hidden_size": cfg.hidden, "inter_size": cfg.inter,
              "num_layer": cfg.n_layers,
              "vocab_size": cfg.vocab, "start_id": cfg.start_id, "end_id": cfg.end_id,
              "weight_data_type": cfg.dtype, "tensor_para_size": cfg.tp, "max_pos_seq_len": cfg.max_pos,
              "layernorm_eps": cfg.eps}
    common.update(cfg.family.ft_extra(cfg))
    common.update({f"rope_scaling_{k.removeprefix('rope_')}": cfg.rope_scaling[k] for k in ROPE_KEYS
                   if k in cfg.rope_scaling})
    cp[cfg.section] = {k: str(v) for k, v in common.items()}
    cp["esparse"] = {"format_version": str(FORMAT_VERSION), "arch": cfg.arch,
                     "sparsity": cfg.sparsity or "dense",
                     "method": cfg.method, "permuted": ",".join(cfg.permuted),
                     "sparse_linears": "all" if cfg.sparsity else "none",
                     "activation": cfg.activation, "biases": ",".join(cfg.bias_groups)}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        cp.write(f)
    tmp.rename(path)


def _rope_scaling(sec) -> dict:
    out: dict = {}
    for key in ROPE_KEYS:
        value = sec.get(f"rope_scaling_{key.removeprefix('rope_')}")
        if value is not None:
            out[key] = value if key == "rope_type" else (int(value) if key.startswith("original") else float(value))
    return out


def read_config(path: Path) -> FTConfig:
    """config.ini, its checksum verified first (format 2) and every value checked (:func:`check_config`)."""
    path = Path(path)
    if not path.is_file():
        raise EsparseError(f"{path} is missing: not an esparse/FasterTransformer folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EsparseError(f"cannot read {path} ({e}): re-export the model or fix the file's permissions") from e
    cp = _parser()
    try:
        cp.read_string(text, str(path))
        es = cp["esparse"]
        version = int(es["format_version"])
        if version not in READABLE_VERSIONS:
            raise EsparseError(f"{path} has format_version {es['format_version']}; this esparse reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))}: re-export the model")
        if version >= 2:
            verify_checksums(path.parent, [path.name], required=True)
        else:
            log.warning("%s is format_version 1: config.ini is not covered by a checksum (re-export to cover it)",
                        path)
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
            act=es.get("activation", ""), biases=tuple(b for b in es.get("biases", "").split(",") if b),
            rope_scaling=_rope_scaling(sec),
        )
    except (KeyError, ValueError, configparser.Error) as e:
        raise EsparseError(f"{path} is not a valid esparse config.ini ({type(e).__name__}: {e}): "
                           "re-export the model") from e


CHECKSUMS_FILE = "checksums.sha256"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path, names: list[str], manifest: str = CHECKSUMS_FILE) -> None:
    """One ``<sha256>  <file>`` line per file (sha256sum's format), so a flipped byte is caught at load. An
    exported folder lists every tensor file and config.ini (format 2)."""
    lines = [f"{file_sha256(Path(folder) / n)}  {n}\n" for n in sorted(names)]
    tmp = Path(folder) / f".{manifest}.tmp"
    tmp.write_text("".join(lines))
    tmp.rename(Path(folder) / manifest)


def read_manifest(folder: Path, manifest: str = CHECKSUMS_FILE) -> dict[str, str] | None:
    """name -> sha256 of a checksum file, or None when the folder has none; a malformed one is refused."""
    path = Path(folder) / manifest
    if not path.is_file():
        return None
    sums: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise EsparseError(f"cannot read {path} ({e}): fix its permissions or re-run esparse export") from e
    for i, line in enumerate(text.splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or "/" in name:
            raise EsparseError(f"{path}:{i} is not '<sha256>  <file>': the manifest is corrupt; "
                               "re-run esparse export")
        sums[name] = digest
    return sums


def verify_checksums(folder: Path, names: list[str], manifest: str = CHECKSUMS_FILE, required: bool = False) -> bool:
    """Check every named file against the folder's checksum file; False when the folder has none (older
    exports) unless ``required``. Raises on a mismatch, a file the manifest does not list, or a malformed
    manifest."""
    where = Path(folder) / manifest
    sums = read_manifest(folder, manifest)
    if sums is None:
        if required:
            raise EsparseError(f"{where} is missing: the folder was changed after export; re-run esparse export")
        return False
    for n in names:
        if n not in sums:
            raise EsparseError(f"{where} does not list {n}: the folder was changed after export; "
                               "re-run esparse export")
        try:
            digest = file_sha256(Path(folder) / n)
        except OSError as e:
            raise EsparseError(f"cannot read {Path(folder) / n} ({e.strerror or e}): fix its permissions or "
                               "re-run esparse export") from e
        if digest != sums[n]:
            raise EsparseError(f"{Path(folder) / n} does not match its sha256 in {manifest}: the file is corrupt or "
                               "was edited (a changed byte is never served); re-run esparse export or restore it")
    return True
