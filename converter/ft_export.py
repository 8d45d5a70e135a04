"""``esparse export``: a pruned (or dense) HF folder -> FasterTransformer weight files, per tp rank.

Pruned linears are written in serving channel order (converter/serving_order.py) with the compressed N:M layout;
norms stay in the original order and their output gathers are written as ``*.perm.bin``. Tensors are made
and written one layer at a time, into a temporary folder renamed when complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from esparse.devices import DTYPES
from esparse.errors import EsparseError
from esparse.format.families import GROUPS, family
from esparse.format.ft_format import (
    LM_HEAD,
    FTConfig,
    LinearSpec,
    bias_file,
    check_tp,
    expected_files,
    linear_files,
    linear_specs,
    perm_names,
    rank_dir,
    replicated_specs,
    runtime_names,
    tensor_file,
    write_checksums,
    write_config,
)
from esparse.format.nm_pack import pack_nm
from esparse.format.pruned import PERMS_FILE, read_prune_meta
from esparse.format.tokenizer import copy_tokenizer_files, write_tokenizer_manifest

from .arch import decoder_base, get_linear, groups_of, head_shape
from .fsutil import atomic_output_dir, check_free_space, check_output_dir, check_output_location
from .model_io import check_model_path, is_gguf, load_model, load_tokenizer, read_model_config
from .serving_order import serving_layer

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    folder: Path
    dense_linear_bytes: int
    written_linear_bytes: int
    dense_total_bytes: int
    written_total_bytes: int

    def summary(self) -> str:
        ratio = self.written_linear_bytes / self.dense_linear_bytes
        return (f"linears: dense {self.dense_linear_bytes / 2**20:.1f} MiB -> written "
                f"{self.written_linear_bytes / 2**20:.1f} MiB ({ratio:.4f}x); "
                f"whole model: {self.dense_total_bytes / 2**20:.1f} MiB -> {self.written_total_bytes / 2**20:.1f} MiB "
                f"({self.written_total_bytes / self.dense_total_bytes:.4f}x)")


def check_perms(perms: dict[str, torch.Tensor], model, src: Path) -> None:
    """Every stored permutation is a permutation of its group's input channels, for a layer that exists."""
    layers = decoder_base(model).layers
    width = {g.name: get_linear(layers[0], g.linears[0]).in_features for g in groups_of(model)}
    where = Path(src) / PERMS_FILE
    for key, p in perms.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in width \
                or int(parts[1]) >= len(layers):
            raise EsparseError(f"{where}: unexpected entry {key!r} (layers.<i>.<group> with i < {len(layers)}, "
                               f"group one of {sorted(width)}); re-run esparse prune")
        k = width[parts[2]]
        if p.dim() != 1 or p.numel() != k or p.is_floating_point() or \
                not torch.equal(p.long().sort().values, torch.arange(k)):
            raise EsparseError(f"{where}: {key} is not a permutation of {k} channels; re-run esparse prune")


def ft_config_from_hf(config, tp: int, dtype: str, sparsity: str, method: str, permuted) -> FTConfig:
    arch = config.model_type
    heads = head_shape(config)
    shape = family(arch).hf_shape(config)
    inter, eps, theta = shape["inter"], shape["eps"], shape["rope_theta"]
    # the source folder's name, not its path: config.ini is covered by the checksums, and the same model exported
    # from another place must give the same bytes
    name = Path(str(getattr(config, "_name_or_path", "") or arch)).name or arch
    return FTConfig(arch=arch, hidden=config.hidden_size, n_heads=heads.n_heads, n_kv=heads.n_kv,
                    head_dim=heads.head_dim, inter=inter, n_layers=config.num_hidden_layers,
                    vocab=config.vocab_size, max_pos=config.max_position_embeddings, eps=float(eps), tp=tp,
                    dtype=dtype, rope_theta=float(theta), start_id=config.bos_token_id or 0,
                    end_id=config.eos_token_id if isinstance(config.eos_token_id, int) else 2,
                    sparsity=sparsity, method=method, permuted=tuple(permuted), extra={"model_name": name},
                    act=shape["act"], biases=tuple(shape["biases"]), rope_scaling=shape["rope_scaling"])


def write_tensor(t: torch.Tensor, path: Path) -> int:
    """Raw little-endian, C order, no header (numpy ``tofile``); returns bytes written."""
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy()
    data.tofile(path)
    return data.nbytes


def rank_slice(w: torch.Tensor, spec: LinearSpec, tp: int, r: int) -> torch.Tensor:
    """Rank r's part of a column-parallel [N, ...] tensor: each fused segment split separately."""
    parts, start = [], 0
    for seg in spec.segments:
        step = seg // tp
        parts.append(w[start + r * step : start + (r + 1) * step])
        start += seg
    return torch.cat(parts, 0)


def _write_linear(folder: Path, spec: LinearSpec, w: torch.Tensor, b: torch.Tensor | None, cfg: FTConfig
                  ) -> tuple[int, int]:
    """Every rank's shard of one linear (packed N:M or dense) and of its column-parallel bias; returns (bytes
    of the weight shards, bytes of the bias shards)."""
    nm, tp = cfg.nm, cfg.tp
    weight_bytes = bias_bytes = 0
    for r in range(tp):
        wr = rank_slice(w, spec, tp, r) if spec.parallel == "col" else w.chunk(tp, 1)[r]
        names = linear_files(spec, r, nm is not None)
        if nm:
            packed = pack_nm(wr, *nm)
            weight_bytes += write_tensor(packed.values, folder / names["values"])
            weight_bytes += write_tensor(packed.meta, folder / names["meta"])
        else:
            weight_bytes += write_tensor(wr.t(), folder / names["dense"])
        if b is not None and spec.parallel == "col":
            bias_bytes += write_tensor(rank_slice(b, spec, tp, r), folder / bias_file(spec, r))
    return weight_bytes, bias_bytes


def _write_replicated(folder: Path, cfg: FTConfig, model: nn.Module, dtype: torch.dtype, src: Path) -> int:
    """The tensors every rank reads whole (embeddings, norms, row-parallel biases, lm_head); returns bytes."""
    fam, state, written = cfg.family, model.state_dict(), 0
    runtime = runtime_names(cfg)
    for name, (_, hf_key) in replicated_specs(cfg).items():
        t = state.get(hf_key)
        if name == LM_HEAD and t is None and model.config.tie_word_embeddings:
            t = state[fam.hf_embed]  # tied embeddings
        if t is None:  # load_model refuses missing weights; this is the exporter's own guard
            raise EsparseError(f"{src} has no tensor {hf_key}: re-save the model with all its weights")
        if runtime.get(name) == "pos_embeddings.weight":
            t = t[fam.position_offset:]  # rows of HF's table before position 0 (OPT: 2)
        written += write_tensor(t.to(dtype), folder / tensor_file(name))
    return written


def _plan(src: Path, out: Path, tp: int, dtype: str, overwrite: bool) -> tuple[FTConfig, dict]:
    """Everything checked before the weights load: output place, config variants, the split, the disk space.
    Returns (the planned config, the permutations of esparse_perms.safetensors)."""
    if dtype not in DTYPES:
        raise EsparseError(f"--dtype {dtype}: use fp16, bf16 or fp32")
    check_output_location(Path(out), [Path(src)])
    check_output_dir(Path(out), overwrite)
    check_model_path(Path(src))  # every config variant the runtime does not implement, before the weights load
    pruned = read_prune_meta(Path(src)) if Path(src).is_dir() else None
    meta, perms = pruned if pruned else ({}, {})
    sparsity, method = str(meta.get("pattern", "")), meta.get("method", "dense")
    permuted = sorted({k.split(".")[-1] for k in perms})
    planned = ft_config_from_hf(read_model_config(Path(src)), tp, dtype, sparsity, method, permuted)
    check_tp(planned)  # the split and the disk space follow from the config alone
    check_free_space(Path(out), sum(expected_files(planned).values()))
    return planned, perms


def export_folder(src: Path, out: Path, tp: int = 1, dtype: str = "fp16", overwrite: bool = False) -> ExportReport:
    """``esparse export``: a pruned (or dense) HF folder or GGUF -> the FT folder ``out``/<tp>-gpu, written
    into a temporary folder and swapped in complete."""
    planned, perms = _plan(src, out, tp, dtype, overwrite)
    torch_dtype = DTYPES[dtype]
    model = load_model(src, dtype=torch_dtype)
    check_perms(perms, model, Path(src))
    cfg = ft_config_from_hf(model.config, tp, dtype, planned.sparsity, planned.method, planned.permuted)
    heads = head_shape(model.config)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    dense_lin = written_lin = 0
    with atomic_output_dir(Path(out), overwrite) as tmp:
        folder = rank_dir(tmp, tp)
        folder.mkdir()
        if is_gguf(Path(src)):  # the tokenizer travels with the weights, for esparse generate
            load_tokenizer(Path(src)).save_pretrained(tmp)
        else:
            copy_tokenizer_files(Path(src), tmp)
        write_tokenizer_manifest(tmp)
        write_config(cfg, folder / "config.ini")
        other = _write_replicated(folder, cfg, model, torch_dtype, Path(src))
        layers = decoder_base(model).layers
        for i in tqdm(range(cfg.n_layers), desc="export", unit="layer"):
            tensors = {k: v.to(torch_dtype) for k, v in layers[i].state_dict().items()}
            lp = {g: p for g in GROUPS if (p := perms.get(f"layers.{i}.{g}")) is not None}
            tensors, _ = serving_layer(cfg.family, tensors, lp, heads)
            for spec in linear_specs(cfg, i):
                w = torch.cat([tensors[f"{h}.weight"] for h in spec.hf], 0)
                b = torch.cat([tensors[f"{h}.bias"] for h in spec.hf], 0) if spec.bias else None
                dense_lin += w.numel() * item
                lin_bytes, bias_bytes = _write_linear(folder, spec, w, b, cfg)
                written_lin, other = written_lin + lin_bytes, other + bias_bytes
            for group, stem in perm_names(cfg, i).items():
                if group in lp:
                    other += write_tensor(lp[group].to(torch.int32), folder / tensor_file(stem))
        missing = set(expected_files(cfg)) - {p.name for p in folder.iterdir()}
        if missing:
            raise EsparseError(f"internal error: export did not write {sorted(missing)[:3]}")
        write_checksums(folder, [*expected_files(cfg), "config.ini"])
    rep = ExportReport(Path(out), dense_lin, written_lin, dense_lin + other, written_lin + other)
    log.debug("%s", rep.summary())  # debug: the callers (esparse export, the demo) print the summary once
    return rep
