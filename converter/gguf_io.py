"""GGUF input: dequantize through transformers' own GGUF loader into a plain fp16 HF model.

Traps handled (see docs/real_assets.md of the team): a GGUF-loaded model refuses ``save_pretrained``, so
we rebuild a fresh model from its config and load the state dict; ``GgufConfig(dequantize=True)`` keeps
packed GGUF linears out; ``rope_theta`` is written at the top of config.json for transformers 4.x readers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .errors import EsparseError
from .fsutil import atomic_output_dir, check_output_dir, check_output_location

log = logging.getLogger(__name__)


def require_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise EsparseError(
            f"reading .gguf files needs the {' and '.join(missing)} package(s): pip install 'esparse[gguf]'"
        )


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` string of a GGUF file, read from its header only."""
    require_gguf()
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
        raise EsparseError(f"{path} is not a readable GGUF file: {e}") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise EsparseError(f"{path} has no general.architecture key: not a model GGUF")
    return bytes(field.parts[field.data[0]]).decode()


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Dequantize a LLaMA GGUF into an ordinary (saveable) ``LlamaForCausalLM``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    path = Path(path)
    if not path.is_file():
        raise EsparseError(f"GGUF file {path} does not exist")
    arch = gguf_architecture(path)
    if arch != "llama":
        raise EsparseError(
            f"unsupported GGUF architecture {arch!r} in {path}: esparse reads LLaMA GGUF files "
            "(OPT has no GGUF form); convert other models to a HF folder first"
        )
    kwargs = dict(gguf_file=path.name, dtype=torch.float32)
    try:
        qcfg = GgufConfig(gguf_file=path.name, dequantize=True)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, quantization_config=qcfg, **kwargs)
    except TypeError:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.use_cache = False
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in loaded.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise EsparseError(f"GGUF {path} did not map onto {type(fresh).__name__}: missing {missing[:3]}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    return fresh.to(dtype).eval()


def convert_gguf(path: Path, out: Path, overwrite: bool = False) -> Path:
    """``esparse convert-gguf``: write a fp16 HF folder (safetensors, tokenizer, config with rope_theta)."""
    from .model_io import load_tokenizer

    check_output_location(Path(out), [Path(path)])
    check_output_dir(Path(out), overwrite)
    model = load_gguf_model(Path(path), torch.float16)
    tok = load_tokenizer(Path(path))
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
