"""Loading and saving the HF models esparse works on (local folders and GGUF files, never a hub).

Supported architectures are LLaMA (grouped-query attention included) and OPT; anything else is refused
up front with a message naming them, before any weights are read, and so is a config variant the runtime does
not implement (families.py). A checkpoint that lacks a weight the architecture needs, or holds weights it does
not use (a layer count that does not match the files), is refused too: transformers would fill the missing
ones with random numbers, or drop the extra ones, and esparse would prune or export that silently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from esparse.errors import EsparseError
from esparse.format.families import FAMILIES, family
from esparse.format.tokenizer import check_tokenizer_fits, copy_tokenizer_files, load_folder_tokenizer

from .fsutil import atomic_output_dir, check_free_space, check_output_dir, check_output_location

log = logging.getLogger(__name__)

# unexpected keys that carry nothing the config does not (old checkpoints saved rotary buffers)
_IGNORED_UNEXPECTED = ("rotary_emb.inv_freq",)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


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


def read_hf_config(model_dir: Path):
    """The transformers config of a HF folder (no weights read), refused when transformers cannot read it."""
    from transformers import AutoConfig

    read_model_type(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # a config transformers refuses surfaces as any error type
        raise EsparseError(f"cannot read the config of {model_dir} ({type(e).__name__}: {_first_line(e)}): its "
                           "config.json is corrupt") from e


def read_model_config(path: Path):
    """The transformers config of a HF folder or a GGUF file, without reading the weights."""
    path = Path(path)
    if not is_gguf(path):
        return read_hf_config(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # the GGUF config reader raises any error type on odd metadata
        raise EsparseError(f"cannot read the config of {path} ({type(e).__name__}: {_first_line(e)}): its "
                           "metadata is corrupt; re-download or re-convert it") from e


def check_variant(config) -> dict:
    """What the runtime needs to know of a config, every variant it does not implement refused (families.py)."""
    return family(config.model_type).hf_shape(config)


def check_model_path(path: Path) -> None:
    """Fail fast, before anything heavy, on a missing, unreadable or unsupported model path: a HF folder's
    config is checked variant by variant, a GGUF's header and tensor list against each other."""
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise EsparseError(f"GGUF file {path} does not exist")
        from .gguf_io import check_gguf

        check_gguf(path)
    else:
        config = read_hf_config(path)
        try:
            check_variant(config)
        except EsparseError as e:
            raise EsparseError(f"{path}: {e}") from None


def output_bytes(path: Path) -> int:
    """About the bytes a pruned copy of the model takes (same dtype as the source; a GGUF becomes fp16): for the
    disk-space check before the work."""
    path = Path(path)
    if is_gguf(path):
        from .gguf_io import gguf_param_count

        return 2 * gguf_param_count(path)
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in path.glob(pat) if f.is_file())


def check_loading_info(path: Path, info: dict) -> None:
    """Refuse a checkpoint whose weights do not match its architecture: a missing weight (transformers would
    initialise it randomly), an unexpected one (a layer the config does not have) or a mismatched shape."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith(_IGNORED_UNEXPECTED))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    for keys, what, fix in ((missing, "lacks", "the files are incomplete (a shard or tensor is missing, or the "
                             "index leaves one out); re-download or re-save the model"),
                            (mismatched, "has wrongly shaped", "the config and the weights disagree"),
                            (unexpected, "has weights the config does not use:", "the config (e.g. "
                             "num_hidden_layers) does not match the weight files; fix config.json or re-save")):
        if keys:
            raise EsparseError(f"{path} {what} {len(keys)} tensor(s) (first: {', '.join(keys[:3])}): {fix}")


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
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", low_cpu_mem_usage=True,
                                                               output_loading_info=True)
        except Exception as e:  # corrupt files surface as any of OSError/ValueError/RuntimeError/TypeError/...
            raise EsparseError(f"cannot load the model in {path} ({type(e).__name__}: {_first_line(e)}); its config "
                               "or weight files are corrupt or do not match: re-download or re-save the model") from e
        check_loading_info(path, info)
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
        from .gguf_io import check_gguf, require_gguf

        require_gguf()
        check_gguf(path)  # a readable LLaMA / Qwen2 GGUF with a tokenizer, before transformers parses it
        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # the GGUF tokenizer converter raises any error type on odd metadata
            raise EsparseError(f"cannot read the tokenizer embedded in {path} ({type(e).__name__}: "
                               f"{_first_line(e)}): the GGUF's tokenizer metadata is corrupt") from e
    tok = load_folder_tokenizer(path)
    vocab = _config_vocab(path)
    if vocab is not None:
        check_tokenizer_fits(tok, vocab, str(path))
    return tok


def _config_vocab(path: Path) -> int | None:
    """vocab_size of a HF folder's config.json, when it has a usable one."""
    try:
        vocab = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None


def save_hf_folder(model: nn.Module, tokenizer_src: Path | None, out: Path, tokenizer=None) -> None:
    """Write a plain HF folder (safetensors) that transformers loads back as it is."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    elif tokenizer_src is not None and Path(tokenizer_src).is_dir():
        copy_tokenizer_files(Path(tokenizer_src), out)


def convert_gguf(path: Path, out: Path, overwrite: bool = False) -> Path:
    """``esparse convert-gguf``: write a fp16 HF folder (safetensors, tokenizer, config with rope_theta)."""
    from .gguf_io import load_gguf_model

    check_output_location(Path(out), [Path(path)])
    check_output_dir(Path(out), overwrite)
    model = load_gguf_model(Path(path), torch.float16)
    tok = load_tokenizer(Path(path))
    check_free_space(Path(out), 2 * sum(p.numel() for p in model.parameters()))
    with atomic_output_dir(Path(out), overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
        if theta is not None:
            cfg["rope_theta"] = theta
        cfg_path.write_text(json.dumps(cfg, indent=2))
    log.info("wrote %s", out)
    return Path(out)
