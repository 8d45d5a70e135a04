"""Tiny random LLaMA/OPT models and a tiny trained tokenizer, built offline for the tests; and tiny models whose
weights come from fixed integers, for tests that pin bytes."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esparse.format.ft_format import FTConfig, linear_specs, perm_names
from esparse.format.ft_loader import FTFolder
from esparse.format.nm_pack import PackedNM

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse matrices keep two of every four weights. "
    "Entropy measures how much information a channel carries across tokens. "
    "Large language models are pruned one layer at a time with calibration text. "
) * 4


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def opt_config(vocab_size: int, **kw):
    from transformers import OPTConfig

    base = dict(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return OPTConfig(**base)


def make_model(arch: str, seed: int = 0, dtype=torch.float32, **kw):
    from transformers import LlamaForCausalLM, OPTForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer()
    vocab = kw.pop("vocab_size", None) or len(tok)
    if arch == "llama":
        model = LlamaForCausalLM(llama_config(vocab, **kw))
    else:
        model = OPTForCausalLM(opt_config(vocab, **kw))
    # spread the weights so that importance differs between channels, as in trained models
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(torch.randn(p.shape[1]) * 0.5)[None, :])
    return model.to(dtype).eval(), tok


def save_model(arch: str, path: Path, seed: int = 0, dtype=torch.float32, **kw) -> Path:
    model, tok = make_model(arch, seed, dtype, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def integer_weights_(model):
    """Set every parameter of ``model`` from fixed integers: entry i of the parameter named ``name`` is
    ((i * 7919 + crc32(name)) mod 251 - 125) / 64, exact in fp32, fp16 and bf16 alike.

    Why: a random init goes through the CPU's vectorised kernels (randn, exp), whose last bits depend on the
    instruction set torch picks (AVX-512, AVX2 or none, ATEN_CPU_CAPABILITY); bytes pinned from such weights
    hold only on CPUs like the one that made the pins. Integer arithmetic and a power-of-two scale do not, and
    keying on the checkpoint names (not on the order modules are declared in) keeps the values when a
    transformers release reorders its modules. Tied parameters take the value of their last name in sorted order."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            idx = torch.arange(p.numel(), dtype=torch.int64)
            ints = (idx * 7919 + zlib.crc32(name.encode())) % 251 - 125
            p.copy_((ints.to(torch.float64) / 64).view(p.shape).to(p.dtype))
    return model


def save_integer_model(arch: str, path: Path, **kw) -> Path:
    """:func:`save_model` with :func:`integer_weights_` (fp32, vocab fixed at 300 whatever the tokenizer
    trainer makes): the same bytes on every CPU and every version of torch the project allows."""
    model, tok = make_model(arch, vocab_size=300, **kw)
    integer_weights_(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_text(path: Path, repeats: int = 20) -> Path:
    lines = []
    g = torch.Generator().manual_seed(0)
    words = SAMPLE_TEXT.split()
    for _ in range(repeats):
        idx = torch.randint(0, len(words), (60,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx))
    path.write_text("\n".join(lines) + "\n")
    return path


def one_error(capsys) -> str:
    """The single `esparse: error:` line a failed command printed (no traceback, no second error line)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("esparse: error:"), err[-2000:]
    return lines[0]


@dataclass
class FTWeights:
    cfg: FTConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # replicated, by FT name
    linears: dict[str, torch.Tensor | PackedNM] = field(default_factory=dict)  # torch layout [out, in]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # column-parallel biases, merged
    perms: dict[str, torch.Tensor] = field(default_factory=dict)  # perm stem -> int64 [K]

    def dense(self, name: str) -> torch.Tensor:
        w = self.linears[name]
        return w.to_dense() if isinstance(w, PackedNM) else w


def load_ft(path: Path, tp: int | None = None) -> FTWeights:
    """The whole folder in memory (the tests); the runtime reads it a layer at a time (:class:`FTFolder`)."""
    src = FTFolder(path, tp)
    out = FTWeights(src.cfg)
    out.tensors.update(src.model_tensors())
    for i in range(src.cfg.n_layers):
        lw = src.layer(i)
        out.tensors.update(lw.tensors)
        out.linears.update(lw.linears)
        for spec in linear_specs(src.cfg, i):
            if spec.bias:
                (out.biases if spec.parallel == "col" else out.tensors)[spec.bias_name] = lw.biases[spec.bias_name]
        names = perm_names(src.cfg, i)
        out.perms.update({names[g]: p for g, p in lw.perms.items()})
    return out
