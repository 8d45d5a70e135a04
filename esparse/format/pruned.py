"""The pruned HF folder that `esparse prune` writes and `esparse export` reads: an ordinary Hugging Face folder
(safetensors, config, tokenizer) plus ``esparse.json`` (what was done: pattern, method, settings, report) and
``esparse_perms.safetensors`` (the channel permutation of each sharing group, ``layers.<i>.<group>``, int32,
not yet applied to the weights). docs/format.md describes both files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from esparse.errors import EsparseError

from .ft_format import parse_nm

PRUNED_FORMAT_VERSION = 1
META_FILE = "esparse.json"
PERMS_FILE = "esparse_perms.safetensors"


def read_prune_meta(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(esparse.json, permutations) of a pruned folder, or None for a plain dense HF folder."""
    from safetensors.torch import load_file

    meta_path = Path(folder) / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EsparseError(f"{meta_path} is not readable JSON ({e}): re-run esparse prune") from e
    if not isinstance(meta, dict) or meta.get("format_version") != PRUNED_FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise EsparseError(f"{meta_path} has format_version {got}, expected {PRUNED_FORMAT_VERSION}: "
                           "re-run esparse prune")
    parse_nm(str(meta.get("pattern", "")), f"{meta_path}: pattern")
    if not isinstance(meta.get("method", "dense"), str):
        raise EsparseError(f"{meta_path}: method {meta.get('method')!r} is not a name: re-run esparse prune")
    perms_path = Path(folder) / PERMS_FILE
    if not perms_path.is_file():
        cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        if cfg.get("gns") or cfg.get("lbs"):  # the masks are N:M only in the shuffled channel order
            raise EsparseError(f"{perms_path} is missing, and {meta_path} records channel shuffles: the masks are "
                               f"N:M only in the shuffled order. Copy the file back from the prune output or "
                               "re-run esparse prune")
        return meta, {}
    try:
        return meta, load_file(str(perms_path))
    except Exception as e:  # safetensors raises its own error types on a corrupt header or truncated data
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EsparseError(f"{perms_path} is corrupt ({type(e).__name__}: {first}): copy it back from the prune "
                           "output or re-run esparse prune") from e
