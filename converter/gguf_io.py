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

from esparse.errors import EsparseError

from .fsutil import atomic_output_dir, check_output_dir, check_output_location

log = logging.getLogger(__name__)


def require_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise EsparseError(
            f"reading .gguf files needs the {' and '.join(missing)} package(s): pip install 'esparse[gguf]'"
        )


LLAMA_HPARAMS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
LLAMA_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                       "ffn_down")


def _reader(path: Path):
    require_gguf()
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
        raise EsparseError(f"{path} is not a readable GGUF file: {e}") from e


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` string of a GGUF file, read from its header only."""
    field = _reader(path).fields.get("general.architecture")
    if field is None:
        raise EsparseError(f"{path} has no general.architecture key: not a model GGUF")
    return bytes(field.parts[field.data[0]]).decode()


def check_llama_gguf(path: Path) -> None:
    """Every hyperparameter and tensor a LLaMA needs is in the file, checked against the file itself (not
    against a model transformers has already filled with random values, and with no fallback defaults)."""
    reader = _reader(path)
    missing = [f"llama.{k}" for k in LLAMA_HPARAMS if f"llama.{k}" not in reader.fields]
    if missing:
        raise EsparseError(f"{path} lacks the hyperparameters {', '.join(missing)}: an incomplete GGUF; "
                           "re-download or re-convert the model")
    field = reader.fields["llama.block_count"]
    n_layers = int(field.parts[field.data[0]][0])
    have = {t.name for t in reader.tensors}
    need = ["token_embd.weight", "output_norm.weight"]
    need += [f"blk.{i}.{t}.weight" for i in range(n_layers) for t in LLAMA_BLOCK_TENSORS]
    absent = [t for t in need if t not in have]
    if absent:
        raise EsparseError(f"{path} lacks {len(absent)} of the {len(need)} tensors a {n_layers}-layer LLaMA needs "
                           f"(first: {', '.join(absent[:3])}): an incomplete GGUF; re-download or re-convert it")


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
    check_llama_gguf(path)
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
