"""GGUF input: dequantize through transformers' own GGUF loader into a plain fp16 HF model.

Architectures read: ``llama`` and ``qwen2`` (LLaMA's layout plus q/k/v biases; e.g. Qwen2.5-Coder-0.5B as a
Q4_K_M GGUF); any quantization the ``gguf`` package dequantizes becomes float. Anything else is refused from
the header, in one line, before transformers reads a tensor.

Traps handled (see docs/real_assets.md of the team): a GGUF-loaded model refuses ``save_pretrained``, so
we rebuild a fresh model from its config and load the state dict; ``GgufConfig(dequantize=True)`` keeps
packed GGUF linears out; converter/model_io.convert_gguf writes ``rope_theta`` at the top of config.json for
transformers 4.x readers.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import torch
from torch import nn

from esparse.errors import EsparseError
from esparse.format.families import family

log = logging.getLogger(__name__)


def require_gguf() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise EsparseError(
            f"reading .gguf files needs the {' and '.join(missing)} package(s): pip install 'esparse[gguf]'"
        )


LLAMA_HPARAMS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
# the GGUF architectures esparse reads -> the per-block bias tensors (besides LLaMA's weights) each must carry
GGUF_ARCHS = {"llama": (), "qwen2": ("attn_q", "attn_k", "attn_v")}


def _reader(path: Path):
    require_gguf()
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
        raise EsparseError(f"{path} is not a readable GGUF file ({e}): re-download or re-convert it") from e


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` string of a GGUF file, read from its header only."""
    field = _reader(path).fields.get("general.architecture")
    if field is None:
        raise EsparseError(f"{path} has no general.architecture key: not a model GGUF")
    return bytes(field.parts[field.data[0]]).decode()


def _int_field(reader, key: str, path: Path) -> int | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        value = int(field.parts[field.data[0]][0])
    except (IndexError, TypeError, ValueError, OverflowError) as e:
        raise EsparseError(f"{path}: {key} is not an integer: a corrupt GGUF; re-download or re-convert it") from e
    if value < 1:
        raise EsparseError(f"{path}: {key} is {value}, not a positive integer: a corrupt GGUF; re-download or "
                           "re-convert it")
    return value


def check_llama_gguf(path: Path, arch: str = "llama") -> None:
    """Every hyperparameter, tensor and tokenizer list a LLaMA (or Qwen2: the same with q/k/v biases) needs is
    in the file and they agree: the blocks present are exactly 0..block_count-1, every tensor has the shape the
    hyperparameters give, and the tokenizer's ids fit the embedding. Checked against the file itself (not against
    a model transformers has already filled with random values, and with no fallback defaults), from its header
    only. Long because it is a list of checks, each with its own message."""
    reader = _reader(path)
    missing = [f"{arch}.{k}" for k in LLAMA_HPARAMS if f"{arch}.{k}" not in reader.fields]
    if missing:
        raise EsparseError(f"{path} lacks the hyperparameters {', '.join(missing)}: an incomplete GGUF; "
                           "re-download or re-convert the model")
    n_layers, hidden, ffn, heads = (_int_field(reader, f"{arch}.{k}", path) for k in LLAMA_HPARAMS)
    kv = _int_field(reader, f"{arch}.attention.head_count_kv", path) or heads
    head_dim = _int_field(reader, f"{arch}.attention.key_length", path) or hidden // heads
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    blocks = {int(m[1]) for name in shapes if (m := re.match(r"blk\.(\d+)\.", name))}
    extra = sorted(b for b in blocks if b >= n_layers)
    if extra or len(blocks) != n_layers:  # (never a set of block_count numbers: the header may say 10^9)
        what = (f"tensors of block {extra[0]}, past {arch}.block_count = {n_layers}" if extra else
                f"only {len(blocks)} of the {n_layers} blocks {arch}.block_count names")
        raise EsparseError(f"{path} has {what}: the header and the tensors disagree (a corrupt or incomplete GGUF); "
                           "re-download or re-convert it")
    vocab = shapes.get("token_embd.weight", (0, 0))[-1]
    q, k = heads * head_dim, kv * head_dim
    want = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    if "output.weight" in shapes:
        want["output.weight"] = (hidden, vocab)
    per_block = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (hidden, q), "attn_k": (hidden, k),
                 "attn_v": (hidden, k), "attn_output": (q, hidden), "ffn_gate": (hidden, ffn), "ffn_up": (hidden, ffn),
                 "ffn_down": (ffn, hidden)}
    bias_width = {"attn_q": q, "attn_k": k, "attn_v": k}
    for i in range(n_layers):
        want.update({f"blk.{i}.{t}.weight": shape for t, shape in per_block.items()})
        want.update({f"blk.{i}.{t}.bias": (bias_width[t],) for t in GGUF_ARCHS[arch]})
    absent = [t for t in want if t not in shapes]
    if absent:
        name = {"llama": "LLaMA", "qwen2": "Qwen2"}[arch]
        raise EsparseError(f"{path} lacks {len(absent)} of the {len(want)} tensors a {n_layers}-layer {name} needs "
                           f"(first: {', '.join(absent[:3])}): an incomplete GGUF; re-download or re-convert it")
    wrong = [t for t, shape in want.items() if shapes[t] != shape]
    if wrong:
        t = wrong[0]
        raise EsparseError(f"{path}: tensor {t} has shape {list(shapes[t])}, the header's hyperparameters give "
                           f"{list(want[t])}: the metadata and the tensors disagree (a corrupt GGUF); re-download or "
                           "re-convert it")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise EsparseError(f"{path} has no tokenizer (tokenizer.ggml.tokens): esparse needs the model's tokenizer "
                           "in the GGUF; re-convert it with its tokenizer")
    if len(tokens.data) > vocab:
        raise EsparseError(f"{path}: its tokenizer has {len(tokens.data)} tokens but token_embd.weight embeds only "
                           f"{vocab}: a corrupt GGUF; re-download or re-convert it")


def check_gguf(path: Path) -> str:
    """The file's architecture, once it is one esparse reads and its header and tensors agree
    (:func:`check_llama_gguf`); one clear error otherwise."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHS:
        raise EsparseError(
            f"unsupported GGUF architecture {arch!r} in {path}: esparse reads {' and '.join(GGUF_ARCHS)} GGUF "
            "files (OPT has no GGUF form); convert other models to a HF folder first"
        )
    check_llama_gguf(path, arch)
    return arch


def gguf_param_count(path: Path) -> int:
    """Values of every tensor of a GGUF, from its header."""
    total = 0
    for t in _reader(path).tensors:
        n = 1
        for d in t.shape:
            n *= int(d)
        total += n
    return total


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Dequantize a LLaMA or Qwen2 GGUF into an ordinary (saveable) ``LlamaForCausalLM`` /
    ``Qwen2ForCausalLM``."""
    from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig

    path = Path(path)
    if not path.is_file():
        raise EsparseError(f"GGUF file {path} does not exist")
    check_gguf(path)
    kwargs = dict(gguf_file=path.name, dtype=torch.float32)
    try:
        qcfg = GgufConfig(gguf_file=path.name, dequantize=True)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, quantization_config=qcfg, **kwargs)
    except TypeError:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.use_cache = False
    # what transformers read from the header (rope scaling, ...) is what the runtime runs
    family(config.model_type).hf_shape(config)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in loaded.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise EsparseError(f"GGUF {path} did not map onto {type(fresh).__name__}: missing {missing[:3]}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    return fresh.to(dtype).eval()
