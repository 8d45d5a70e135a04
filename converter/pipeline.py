"""``esparse prune``: checkpoint in, pruned HF folder out (plus esparse.json and the permutations).

The output folder is an ordinary HF folder (weights in the original channel order, so transformers serves
exactly the pruned function) with two additions the exporter reads: ``esparse.json`` (method, pattern,
calibration, per-layer sparsity, and whether the stored order is N:M) and ``esparse_perms.safetensors``
("layers.{i}.{group}" -> int32 P). After channel shuffles the stored weights are N:M only once each group's
permutation is applied (W[:, P]); ``esparse.json``'s "channel_order" says so in the folder itself, because a
user who loads it elsewhere would otherwise get no N:M speedup without knowing why (docs/format.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from esparse.devices import resolve_device
from esparse.errors import EsparseError
from esparse.format.pruned import META_FILE, PERMS_FILE, PRUNED_FORMAT_VERSION
from esparse.limits import check_calibration_fits

from .arch import decoder_base, get_linear, groups_of
from .fsutil import atomic_output_dir, check_free_space, check_output_dir, check_output_location
from .masks import is_nm_sparse
from .model_io import check_model_path, is_gguf, load_model, load_tokenizer, output_bytes, save_hf_folder
from .prune import PruneConfig, PruneResult, prune_model, summary_table
from .text import calibration_windows, read_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibConfig:
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


def source_dtype(model_path: Path) -> torch.dtype:
    """The dtype a HF folder's config.json declares (read before loading: a CPU run computes in fp32 and must
    still write the source's dtype); fp16 when it declares none."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float16
    dt = cfg.get("dtype") or cfg.get("torch_dtype") if isinstance(cfg, dict) else None
    dt = getattr(torch, dt, None) if isinstance(dt, str) else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float16


def check_divisibility(model, m: int) -> None:
    """Every pruned linear's input dim must divide by M: say which one does not, before any work."""
    layer = decoder_base(model).layers[0]
    for g in groups_of(model):
        for path in g.linears:
            k = get_linear(layer, path).in_features
            if k % m:
                raise EsparseError(f"{path} has input dim {k}, not divisible by M={m}: choose another pattern")


def check_pattern_before_loading(model_path: Path, m: int) -> None:
    """The same check from config.json alone, so that a pattern the model cannot take is refused before the
    weights are read (a GGUF is checked after loading: its sizes live in the file's metadata)."""
    if is_gguf(Path(model_path)):
        return
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        inter = int(cfg.get("intermediate_size") or cfg.get("ffn_dim"))
    except (OSError, ValueError, KeyError, TypeError):
        return  # load_model gives the precise error for a broken config
    for what, k in (("hidden size", hidden), ("attention width", heads * head_dim), ("intermediate size", inter)):
        if k % m:
            raise EsparseError(f"the model's {what} {k} is not divisible by M={m}: choose another pattern")


def channel_order_note(model, cfg: PruneConfig, shuffled: bool) -> dict:
    """esparse.json's "channel_order": whether every pruned linear is N:M along its input dim as stored, and if
    not, what a runtime must apply first. Checked on the weights, not assumed from the method."""
    layers = decoder_base(model).layers
    as_stored = all(is_nm_sparse(get_linear(layer, path).weight, cfg.n, cfg.m)
                    for layer in layers for g in groups_of(model) for path in g.linears)
    groups = ", ".join(f"{g.name} = {'/'.join(p.split('.')[-1] for p in g.linears)}" for g in groups_of(model))
    if as_stored:
        how = (f"the weights are {cfg.n}:{cfg.m} along the input dim exactly as stored: an N:M runtime can use "
               "them as they are")
    else:
        how = (f"the weights are stored in the original channel order and are {cfg.n}:{cfg.m} only after the "
               f"input channels of every linear of a group are gathered by that group's permutation: W[:, P] with "
               f"P = {PERMS_FILE}['layers.<i>.<group>'] (groups: {groups}). A runtime loading this folder as it "
               f"is computes the pruned model exactly but sees no {cfg.n}:{cfg.m} pattern (no sparse speedup). "
               "esparse export writes the permuted order (docs/format.md)")
    return {"nm_in_stored_order": as_stored, "shuffled": shuffled, "how": how}


def prune_checkpoint(
    model_path: Path,
    calib_path: Path | None,
    out: Path,
    cfg: PruneConfig,
    calib: CalibConfig = CalibConfig(),
    device: str | None = None,
    overwrite: bool = False,
) -> PruneResult:
    """Load, calibrate, prune and write ``out`` atomically. Returns the per-layer report. ``calib_path`` may be
    None only for a method that needs no calibration (magnitude without refinement). One function: every check
    that must run before the hours of pruning (inputs, output place, memory) is in the order it runs."""
    if calib_path is None and cfg.needs_calibration:
        # (--refine is named only where it is what needs the text: magnitude, whose score reads none)
        flags = f"--method {cfg.metric.method}" + (f" --refine {cfg.refine}" if cfg.refine and not
                                                   cfg.metric.needs_stats else "")
        raise EsparseError(f"{flags} chooses its masks from calibration activations: give --calib TEXT (plain "
                           "text, <doc>-tagged text or JSON lines with a \"text\" field)")
    # a --calib the method does not read is still an input that --overwrite must never destroy
    check_output_location(Path(out), [Path(model_path)] + ([Path(calib_path)] if calib_path is not None else []))
    if calib_path is not None and not cfg.needs_calibration:
        log.info("--method %s chooses masks from |W| alone: %s is not read", cfg.metric.method, calib_path)
        calib_path = None
    check_output_dir(Path(out), overwrite)
    check_model_path(Path(model_path))
    check_free_space(Path(out), output_bytes(Path(model_path)))
    check_pattern_before_loading(Path(model_path), cfg.m)
    dev = resolve_device(device)
    docs = read_documents(calib_path) if calib_path is not None else None
    tokenizer = load_tokenizer(model_path)
    # on the CPU compute in fp32 (half matmuls are slow there); weights are saved in the source dtype
    model = load_model(model_path, dtype=torch.float32 if dev.type == "cpu" else None)
    from_gguf = is_gguf(Path(model_path))
    save_dtype = torch.float16 if from_gguf else source_dtype(Path(model_path))
    check_divisibility(model, cfg.m)
    windows, calibration = None, None
    if docs is not None:
        max_pos = getattr(model.config, "max_position_embeddings", calib.seqlen)
        seqlen = min(calib.seqlen, max_pos)
        if seqlen < calib.seqlen:
            log.info("seqlen %d clipped to the model's %d positions", calib.seqlen, max_pos)
        check_calibration_fits(model.config, calib.nsamples, seqlen, dev, model.dtype)
        windows = calibration_windows(tokenizer, docs, calib.nsamples, seqlen, calib.seed)
        log.info("calibration: %d windows x %d tokens from %s", windows.shape[0], seqlen, calib_path)
        if dev.type == "cpu" and windows.numel() > 16 * 512:
            log.info("on the CPU %d x %d calibration tokens take long (the demo uses --nsamples 16 --seqlen 512)",
                     windows.shape[0], seqlen)
        calibration = {
            "file": str(calib_path),
            "sha256": hashlib.sha256(Path(calib_path).read_bytes()).hexdigest(),
            "nsamples": int(windows.shape[0]),
            "seqlen": seqlen,
            "seed": calib.seed,
        }
    t0 = time.perf_counter()
    result = prune_model(model, windows, cfg, dev)
    elapsed = time.perf_counter() - t0
    log.info("pruned in %.1f s\n%s", elapsed, summary_table(result))
    meta = {
        "format_version": PRUNED_FORMAT_VERSION,
        "source": str(model_path),
        "arch": model.config.model_type,
        "pattern": f"{cfg.n}:{cfg.m}",
        "method": cfg.metric.method,
        "config": cfg.to_json(),
        "calibration": calibration,  # None: the method read no text
        "channel_order": channel_order_note(model, cfg, bool(result.perms)),
        "prune_seconds": elapsed,
        "stage_seconds": result.stage_seconds,
        "layers": result.layers,
    }
    with atomic_output_dir(Path(out), overwrite) as tmp:
        save_hf_folder(model.to(save_dtype), None if from_gguf else Path(model_path), tmp,
                       tokenizer=tokenizer if from_gguf else None)
        save_file({k: v.contiguous() for k, v in result.perms.items()}, str(tmp / PERMS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return result
