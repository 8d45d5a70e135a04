"""Loading and saving the HF models esparse works on (local folders and GGUF files, never a hub).

Supported architectures are LLaMA (grouped-query attention included) and OPT; anything else is refused
up front with a message naming them, before any weights are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from esparse.errors import EsparseError
from esparse.format.families import FAMILIES
from esparse.format.tokenizer import copy_tokenizer_files, load_folder_tokenizer

log = logging.getLogger(__name__)




def is_gguf(path: Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def read_model_type(model_dir: Path) -> str:
    """The ``model_type`` of a local HF folder, checked against the supported architectures."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise EsparseError(f"model path {model_dir} does not exist")
    if not model_dir.is_dir():
        raise EsparseError(f"{model_dir} is not a folder: give a Hugging Face model folder or a .gguf file")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise EsparseError(f"{model_dir} has no config.json: it is not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EsparseError(f"cannot read {cfg_path}: {e}; the folder's config.json is corrupt") from e
    if not isinstance(cfg, dict):
        raise EsparseError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object: the config is corrupt")
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        arch = cfg.get("architectures") or [model_type]
        raise EsparseError(
            f"unsupported architecture {arch[0]!r} in {model_dir}: esparse supports "
            f"{', '.join(f.hf_class for f in FAMILIES.values())}"
        )
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if not has_weights:
        raise EsparseError(f"{model_dir} has no *.safetensors or *.bin weight files")
    return model_type


def check_model_path(path: Path) -> None:
    """Fail fast, before anything heavy, on a missing or unsupported model path."""
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise EsparseError(f"GGUF file {path} does not exist")
    else:
        read_model_type(path)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a LLaMA/OPT causal LM from a local HF folder or a ``.gguf`` file, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if is_gguf(path):
        from .gguf_io import load_gguf_model

        model = load_gguf_model(path, dtype=dtype or torch.float16)
    else:
        read_model_type(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", low_cpu_mem_usage=True)
        except Exception as e:  # corrupt files surface as any of OSError/ValueError/RuntimeError/TypeError/...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise EsparseError(f"cannot load the model in {path} ({type(e).__name__}: {first}); its config or "
                               "weight files are corrupt or do not match: re-download or re-save the model") from e
    model.eval()
    model.config.use_cache = False
    return model.to(device)


def load_tokenizer(path: str | Path):
    """The tokenizer of a HF folder, or the one embedded in a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise EsparseError(f"{path} does not exist")
    if is_gguf(path):
        from .gguf_io import require_gguf

        require_gguf()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_folder_tokenizer(path)


def save_hf_folder(model: nn.Module, tokenizer_src: Path | None, out: Path, tokenizer=None) -> None:
    """Write a plain HF folder (safetensors) that transformers loads back as it is."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    elif tokenizer_src is not None and Path(tokenizer_src).is_dir():
        copy_tokenizer_files(Path(tokenizer_src), out)
